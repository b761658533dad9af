"""A CLIP-style tokenizer built in memory, so the offline presets need no files and no network.

The vocabulary follows CLIP's layout (byte characters, the same with "</w>", learned merges, then
the two special tokens last), and the merges are learned here by plain BPE on ``COMMON_WORDS`` so
that each listed word is one token while any other word falls back to several sub-word pieces,
the two cases ConsiStory's subject-token lookup has to handle.
"""

from __future__ import annotations

from collections import Counter
from functools import lru_cache

from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 77  # CLIP's context length, used by both SDXL text encoders

# Words that must each be a single token. Order does not matter: merges are learned from the set.
COMMON_WORDS: tuple[str, ...] = tuple(
    """
    a an the of in on at with and or to from by for into under over near behind inside outside
    is are was his her their its this that some two three
    photo picture image illustration drawing painting sketch render style watercolor cartoon
    anime portrait closeup close up oil pencil digital art realistic cinematic detailed
    dog cat hat wizard old young polar bear caesar salad girl boy man woman child baby robot
    car truck bus house home park beach forest city town village street road bridge snow rain
    sun moon star stars night day morning evening sunset sunrise winter summer spring autumn
    red blue green yellow orange purple pink black white brown gray golden silver
    small big large tiny huge tall short happy sad cute funny little pretty beautiful
    sitting running playing reading book wearing standing walking flying eating sleeping
    jumping swimming dancing singing cooking riding holding looking smiling drinking writing
    cafe kitchen garden mountain mountains river lake sky space castle room bedroom library
    school office market shop restaurant museum church temple tower palace farm zoo island
    chair table window door tree trees flower flowers field desert ocean sea boat ship train
    bicycle bike guitar piano violin drum teddy toy ball kite dragon knight princess prince
    king queen astronaut hedgehog fox owl rabbit puppy kitten bird fish horse cow pig sheep
    lion tiger elephant monkey mouse duck frog turtle penguin wolf deer squirrel unicorn
    monster ghost alien pirate chef doctor teacher student soldier farmer artist scientist
    cowboy ninja witch fairy elf superhero detective sailor
    shirt dress coat jacket scarf glasses boots shoes cape crown helmet backpack umbrella
    sword shield wand lamp candle clock phone computer camera cup coffee tea cake bread apple
    pizza ice cream food water fire light shadow cloud clouds grass sand stone rock wall floor
    bed sofa couch bench fence bag box bottle plate paper letter map
    background foreground front side top bottom edge corner center middle
    """.split()
)


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 byte -> printable-character table: every byte gets a visible, non-space char.

    The printable Latin-1 bytes map to themselves; the rest are shifted past 255 so the
    byte-level pre-tokenizer never produces whitespace or control characters inside a token.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    shift = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + shift)
            shift += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _word_symbols(word: str) -> tuple[str, ...]:
    # CLIP's BPE marks the last character of a word with "</w>" before merging.
    return tuple(word[:-1]) + (word[-1] + END_OF_WORD,)


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def learn_merges(words: tuple[str, ...] = COMMON_WORDS) -> list[tuple[str, str]]:
    """Plain BPE: repeatedly merge the most frequent adjacent pair until every word is one symbol.

    Ties break on the pair itself, so the merge list (and hence every token id) is deterministic.
    """
    segmented = {w: _word_symbols(w) for w in sorted(set(words))}
    merges: list[tuple[str, str]] = []
    while True:
        counts: Counter[tuple[str, str]] = Counter()
        for symbols in segmented.values():
            counts.update(zip(symbols, symbols[1:]))
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        segmented = {w: _merge_pair(s, best) for w, s in segmented.items()}


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + END_OF_WORD for c in byte_chars]
    merges = learn_merges()
    tokens += ["".join(pair) for pair in merges]
    # Special tokens last, as in CLIP, so the end-of-text id is the largest: the text encoders'
    # pooling may locate it with argmax(input_ids).
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {}
    for tok in tokens:
        vocab.setdefault(tok, len(vocab))
    return tuple(vocab.items()), tuple(merges)


def local_vocab_size() -> int:
    """Number of ids the local tokenizer can emit (text encoders need ``vocab_size >=`` this)."""
    return len(_vocab_and_merges()[0])


def build_local_clip_tokenizer(pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
    """A fresh in-memory CLIP tokenizer; SDXL pads its first tokenizer with EOS, its second with "!"."""
    vocab_items, merges = _vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab_items),
        # The `tokenizers` BPE here wants (left, right) tuples; "left right" strings are rejected.
        merges=list(merges),
        unk_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=pad_token,
        model_max_length=MODEL_MAX_LENGTH,
    )
