// "A photo of" + "corgi" + "in the park" -> "A photo of a corgi in the park": the page's
// shortcut reads as the CLI's --style/--settings prompts do (consistory/cli/prompt_text.py).

const DETERMINERS = new Set(
  `a an the this that these those my your his her its our their some any every each no
   one two three four five six seven eight nine ten several many few`.split(/\s+/),
);
// Openings whose sound, not their first letter, picks the article ("a unicorn", "an hour").
const CONSONANT_SOUND = ["uni", "use", "usu", "ure", "uro", "eu", "one", "once", "ubiq", "uto"];
const VOWEL_SOUND = ["hour", "honest", "honor", "honour", "heir"];

function indefiniteArticle(word) {
  const w = word.toLowerCase();
  if (VOWEL_SOUND.some((p) => w.startsWith(p))) return "an";
  if (CONSONANT_SOUND.some((p) => w.startsWith(p))) return "a";
  return "aeiou".includes(w[0] || "x") ? "an" : "a";
}

function looksPlural(word) {
  const w = word.toLowerCase();
  return w.length > 3 && w.endsWith("s") && !/(ss|us|is|os)$/.test(w);
}

function withArticle(subject, style) {
  const words = subject.split(/\s+/).filter(Boolean);
  if (!words.length) return subject;
  const styleWords = style.split(/\s+/).filter(Boolean);
  if (styleWords.length && DETERMINERS.has(styleWords.at(-1).toLowerCase())) return subject;
  const first = words[0];
  const named = first[0] !== first[0].toLowerCase();
  if (DETERMINERS.has(first.toLowerCase()) || /^\d+$/.test(first) || named || looksPlural(words.at(-1))) return subject;
  return `${indefiniteArticle(first)} ${subject}`;
}

export function settingPrompt(style, subject, setting) {
  return [style.trim(), withArticle(subject.trim(), style), setting.trim()].filter(Boolean).join(" ");
}

export function lines(text) {
  return text.split("\n").map((line) => line.trim()).filter(Boolean);
}
