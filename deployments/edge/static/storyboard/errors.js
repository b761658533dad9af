// The API's error sentences, shown next to the field they concern. A 422 detail names its
// field ("prompts[1] (...) contains none of the subjects", "subject.steps: ..."), several
// problems joined by "; "; each goes to the first field it names, else to the form as a whole.

const FIELDS = {
  prompts: "prompts",
  subjects: "subjects",
  seeds: "prompts",
  seed: "settings",
  steps: "settings",
  height: "settings",
  width: "settings",
  guidance_scale: "settings",
  mask_dropout: "settings",
  n_anchors: "prompts",
  anchors: "prompts",
};
const FIELD_NAMES = new RegExp(`\\b(${Object.keys(FIELDS).join("|")})\\b`);

function slot(scope, name) {
  return scope.querySelector(`[data-error-for="${name}"]`);
}

export function clearErrors(scope) {
  for (const element of scope.querySelectorAll("[data-error-for]")) element.textContent = "";
  for (const element of scope.querySelectorAll("[aria-invalid]")) element.removeAttribute("aria-invalid");
}

function mark(scope, name) {
  const field = scope.querySelector(`[name="${name}"]`);
  if (field) field.setAttribute("aria-invalid", "true");
}

// Where an error of this status and sentence belongs: [data-error-for name, the API field].
export function fieldOf(status, sentence) {
  if (status === 401) return ["key", "key"];
  if (status === 422) {
    const named = sentence.match(FIELD_NAMES);
    if (named) return [FIELDS[named[1]], named[1]];
  }
  return [null, null];
}

// The problems of one detail: the service joins several field problems ("subject.steps: ...")
// with "; ", and a single sentence may hold "; " too, so only a part that starts with a field
// location starts a new problem.
export function problems(detail) {
  const parts = [];
  for (const part of detail.split("; ")) {
    if (parts.length && !/^[\w.[\]]+: /.test(part)) parts[parts.length - 1] += `; ${part}`;
    else parts.push(part);
  }
  return parts;
}

// Shows an ApiError (or any Error) in `scope`, where `fallback` takes what names no field; the
// key field lives in the page's header.
export function showError(scope, error, fallback = "form") {
  const status = error.status ?? 0;
  const sentences = status === 422 ? problems(error.message) : [error.message];
  for (const sentence of sentences) {
    const [name, field] = fieldOf(status, sentence);
    const where = name === "key" ? document : scope;
    const target = (name && slot(where, name)) || slot(scope, fallback);
    if (!target) continue;
    const fold = target.closest("details");
    if (fold) fold.open = true; // an error inside a folded section must be seen
    target.textContent = target.textContent ? `${target.textContent}; ${sentence}` : sentence;
    if (field) mark(where, field);
  }
}
