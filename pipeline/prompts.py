"""Class sets, prompts, and locating each class word's tokens in a tokenised prompt.

Making more prompts per class (synonyms, hyponyms, templates, captions) is `prompt_augment`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

# Built-in class sets: name -> file under pipeline/data (one class per line, label ids in order).
CLASS_SETS = {
    "voc": "classes_voc.txt",
    "cityscapes": "classes_cityscapes.txt",
    "coco": "classes_coco.txt",
    "imagenet-s50": "classes_imagenet-s50.txt",
    "toy": "classes_toy.txt",  # the toy world's shapes (pipeline/toy/world.py)
}

DEFAULT_TEMPLATES = (
    "a photo of a {}",
    "a realistic photo of a {}",
    "a close up photo of a {}",
    "a high quality picture of a {}",
)


def data_file(name: str) -> Path:
    """A file shipped in the package's data folder."""
    return Path(__file__).resolve().parent / "data" / name


@dataclass(frozen=True)
class ClassInfo:
    """One label class: its id in label maps (1..254), its name and the word used in prompts."""

    id: int
    name: str
    word: str


@dataclass(frozen=True)
class PromptSpec:
    """A prompt and, per labelled class, the exact word in the text that stands for it."""

    text: str
    labels: tuple[tuple[ClassInfo, str], ...]  # (class, word as written in `text`)


def _strip_comment(line: str) -> str:
    return re.sub(r"(^|\s)#.*$", "", line).strip()


def _read_lines(path: str | Path, what: str) -> list[str]:
    """The lines of a UTF-8 text file; a UserError naming it when it is missing or unreadable."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {path} does not exist")
    try:
        return p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path} cannot be read as UTF-8 text: {e}") from None


def _read_class_file(path: Path, where: str) -> list[tuple[str, str]]:
    """(name, prompt word) per line of a class file: `name` or `name: word`, `#` comments."""
    pairs = []
    for i, line in enumerate(_read_lines(path, "class file"), 1):
        line = _strip_comment(line)
        if not line:
            continue
        name, _, word = line.partition(":")
        name, word = name.strip(), (word.strip() or name.strip())
        if not name:
            raise UserError(f"{where}, line {i}: empty class name")
        pairs.append((name, word))
    return pairs


def load_classes(spec: str) -> list[ClassInfo]:
    """Resolve `--classes`: a built-in set name, a file (one class per line), or 'a,b,c'.

    Built-in sets: voc (20), cityscapes (19, id = trainId + 1), coco (80, contiguous ids),
    imagenet-s50 (50). A list needs at least one comma ("dog," for one class), so a mistyped
    set name is an error. A file line may be `name` or `name: prompt word`; `#` starts a
    comment.
    """
    if spec in CLASS_SETS:
        pairs = _read_class_file(data_file(CLASS_SETS[spec]), f"class set {spec}")
    elif Path(spec).is_file():
        pairs = _read_class_file(Path(spec), f"class file {spec}")
    elif "," in spec:  # a single class is written "dog,"
        pairs = [(w.strip(), w.strip()) for w in spec.split(",") if w.strip()]
    else:
        raise UserError(
            f"unknown class set {spec!r}: give one of {sorted(CLASS_SETS)}, a file, "
            "or a comma-separated list"
        )
    if not pairs:
        raise UserError(f"class set {spec!r} is empty")
    if len(pairs) > 254:
        raise UserError(f"class set {spec!r} has {len(pairs)} classes; at most 254 fit in a mask")
    # Class names are matched ignoring case everywhere (training, evaluation, prompt files),
    # so "dog" and "Dog" are one class.
    seen: dict[str, str] = {}
    for name, _ in pairs:
        if name.casefold() in seen:
            raise UserError(f"class set {spec!r} names a class twice ({seen[name.casefold()]!r} "
                            f"and {name!r}; class names are compared ignoring case)")
        seen[name.casefold()] = name
    return [ClassInfo(i + 1, n, w) for i, (n, w) in enumerate(pairs)]


def default_prompts(classes: list[ClassInfo]) -> dict[str, list[PromptSpec]]:
    """Template prompts per class name."""
    return {
        c.name: [PromptSpec(fill_template(t, c.word), ((c, c.word),)) for t in DEFAULT_TEMPLATES]
        for c in classes
    }


def load_prompt_file(path: str, classes: list[ClassInfo]) -> dict[str, list[PromptSpec]]:
    """Read a prompts JSONL file into prompts per class (keyed by the first label's class).

    Each line: {"prompt": "a puppy on grass", "labels": [{"class": "dog", "word": "puppy"}]};
    "word" defaults to the class's prompt word and must occur in the prompt.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"prompts file {path} does not exist")
    by_name = {c.name: c for c in classes}
    out: dict[str, list[PromptSpec]] = {c.name: [] for c in classes}
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"prompts file {path}, line {i}"
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise UserError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
            raise UserError(f"{where}: needs a string field 'prompt'")
        labels = rec.get("labels")
        if not isinstance(labels, list) or not labels:
            raise UserError(f"{where}: needs a non-empty list field 'labels'")
        pairs = []
        for lab in labels:
            if not isinstance(lab, dict) or not isinstance(lab.get("class"), str):
                raise UserError(f"{where}: each label needs a string field 'class'")
            cls = by_name.get(lab["class"])
            if cls is None:
                raise UserError(f"{where}: class {lab['class']!r} is not in the class set")
            word = lab.get("word", cls.word)
            if not isinstance(word, str) or find_word(rec["prompt"], word) < 0:
                raise UserError(f"{where}: word {word!r} does not occur in the prompt")
            pairs.append((cls, word))
        out[pairs[0][0].name].append(PromptSpec(rec["prompt"], tuple(pairs)))
    missing = [n for n, v in out.items() if not v]
    if missing:
        raise UserError(f"prompts file {path} has no prompt for class(es) {missing[:5]}")
    return out


def find_word(text: str, word: str) -> int:
    """Start of the first whole-word, case-insensitive occurrence of `word` in `text`, or -1."""
    m = re.search(r"(?<!\w)" + re.escape(word) + r"(?!\w)", text, flags=re.IGNORECASE)
    return m.start() if m else -1


def find_word_tokens(tokenizer, prompt: str, word: str) -> list[int]:
    """Positions (in the padded token sequence the text encoder sees, special tokens
    included) of `word`'s tokens in `prompt`.

    CLIP's BPE and T5's sentencepiece both split text into words first, so the tokens of a
    prefix that ends at a word boundary (trailing spaces dropped: sentencepiece would make one a
    token of its own) are a prefix of the prompt's tokens: the word's tokens are those between
    the prefix before it and the prefix through it. Positions are shifted past the special
    tokens the tokenizer puts first (CLIP's BOS; T5 has none). Raises UserError naming the
    prompt when the word is absent, vanishes in tokenisation, becomes the unknown token, or
    falls beyond the text encoder's context.
    """
    start = find_word(prompt, word)
    if start < 0:
        raise UserError(f"class word {word!r} does not occur in prompt {prompt!r}")

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False, truncation=False).input_ids

    lead, n_special = special_token_layout(tokenizer)
    before = ids(prompt[:start].rstrip())
    through = ids(prompt[: start + len(word)])
    full = ids(prompt)
    pos = list(range(len(before), len(through)))
    if not pos or full[: len(through)] != through:
        raise UserError(f"class word {word!r} does not survive tokenisation in prompt {prompt!r}")
    # A word that maps to the unknown (or another special) token has no attention of its own.
    special = set(tokenizer.all_special_ids)
    if any(full[p] in special for p in pos):
        raise UserError(
            f"class word {word!r} becomes the tokenizer's unknown or special token in prompt "
            f"{prompt!r}"
        )
    limit = tokenizer.model_max_length - n_special  # e.g. CLIP's BOS and EOS, T5's EOS
    if pos[-1] >= limit:
        raise UserError(
            f"class word {word!r} lies beyond the {tokenizer.model_max_length}-token context "
            f"in prompt {prompt!r}"
        )
    return [p + lead for p in pos]


def special_token_layout(tokenizer) -> tuple[int, int]:
    """(special tokens before the text, special tokens in all) that `tokenizer` adds: (1, 2)
    for CLIP (BOS, EOS), (0, 1) for T5 (EOS)."""
    plain = tokenizer("a", add_special_tokens=False).input_ids
    full = tokenizer("a", add_special_tokens=True).input_ids
    for lead in range(len(full) - len(plain) + 1):
        if full[lead : lead + len(plain)] == plain:
            return lead, len(full) - len(plain)
    raise UserError(f"cannot tell where the text starts in {type(tokenizer).__name__}'s tokens")


def class_token_weights(tokenizer, specs: list[PromptSpec], merge: str = "sum"):
    """[B, L, C] token-to-class weights and [B, C] class ids for a batch of prompts.

    Column c of sample b has weight 1 (merge="sum") or 1/n (merge="mean") on each of the n
    tokens of that sample's c-th labelled word; unused columns are zero with class id 0.
    """
    length = tokenizer.model_max_length
    width = max(len(s.labels) for s in specs)
    import torch  # here, not at the top: the CLI checks class sets before torch loads

    weights = torch.zeros(len(specs), length, width)
    ids = torch.zeros(len(specs), width, dtype=torch.int64)
    for b, spec in enumerate(specs):
        for c, (cls, word) in enumerate(spec.labels):
            pos = find_word_tokens(tokenizer, spec.text, word)
            weights[b, pos, c] = 1.0 if merge == "sum" else 1.0 / len(pos)
            ids[b, c] = cls.id
    return weights, ids


def sequence_token_weights(parts, specs: list[PromptSpec], merge: str = "sum"):
    """[B, L, C] token-to-class weights and [B, C] class ids over a text sequence made of
    several encoders' outputs laid end to end (SD3: CLIP's positions, then T5's). `parts` are
    (tokenizer, length) pairs: each tokenizer's positions fill `length` slots. A class word
    weighs on its tokens in every part; with merge="mean" the weights of a class sum to 1 over
    all of them."""
    import torch

    blocks, ids = [], None
    for tokenizer, length in parts:
        w, ids = class_token_weights(tokenizer, specs, "sum")
        if bool(w[:, length:].any()):
            raise UserError(f"a class word lies past the {length} tokens the model reads from "
                            f"{type(tokenizer).__name__}; shorten the prompt")
        blocks.append(torch.nn.functional.pad(w[:, :length], (0, 0, 0, length - min(
            length, w.shape[1]))))
    weights = torch.cat(blocks, dim=1)
    if merge == "mean":
        weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1.0)
    return weights, ids


# Nouns that take no indefinite article ("a photo of grass"): mass nouns and plurals whose form
# does not show it. Other plurals are recognised by their ending.
NO_ARTICLE = frozenset("""people vegetation terrain grass sand soil dirt foliage greenery
luggage broccoli carbonara asphalt gravel skis""".split())


def takes_no_article(word: str) -> bool:
    """True for mass nouns and (regular) plurals, which read wrong after "a"."""
    last = word.split()[-1].casefold()
    plural = last.endswith("s") and not last.endswith(("ss", "us", "is"))
    return last in NO_ARTICLE or plural


def fill_template(template: str, word: str) -> str:
    """The template with `word` in place of `{}`; the article before it is fixed: "an" before
    a vowel, dropped before a plural or mass noun ("a photo of trees")."""
    return _article_for(template, word).replace("{}", word)


def _article_for(template: str, word: str) -> str:
    """The template, `{}` kept, with the article before `{}` made right for `word`."""
    if takes_no_article(word):
        return re.sub(r"\b[Aa]n? \{\}", "{}", template)
    vowel = word[:1].lower() in "aeiou"

    def article(m: re.Match) -> str:
        new = "an" if vowel else "a"
        return (new.capitalize() if m.group(1)[0].isupper() else new) + " {}"

    return re.sub(r"\b([Aa]n?) \{\}", article, template)


def describe_classes(template: str, words: list[str]) -> str:
    """"a photo of a cat and a dog on grass": the words listed in place of the template's
    `{}`, the first after the template's article (made right for it), the others joined with
    "and" and their own articles."""
    listed = " and ".join([words[0]] + [fill_template("a {}", w) for w in words[1:]])
    return _article_for(template, words[0]).replace("{}", listed)
