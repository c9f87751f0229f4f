"""Prompt augmentation (`attnseg prompts`): templates x (class word, synonyms, hyponyms), plus
user captions that mention a class. Each prompt keeps the exact word that stands for its class,
so harvesting picks that word's tokens after the replacement.
"""

from __future__ import annotations

import json
import random
import re
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..prompts import (
    CLASS_SETS,
    DEFAULT_TEMPLATES,
    ClassInfo,
    PromptSpec,
    _read_lines,
    _strip_comment,
    data_file,
    describe_classes,
    fill_template,
    find_word_tokens,
    load_classes,
)
from ..settings import NonNegativeFloat, NonNegativeInt, PositiveInt

LEXICON_FILE = "lexicon.txt"


def load_lexicon(path: str | Path) -> dict[str, list[str]]:
    """Words per class from a lexicon file, keyed by casefolded class name.

    Each line is `class name: word, word, ...`; a class may have several lines; `#` starts a
    comment. The built-in lexicon is `data/lexicon.txt`.
    """
    out: dict[str, list[str]] = {}
    for i, raw in enumerate(_read_lines(path, "lexicon file"), 1):
        line = _strip_comment(raw)
        if not line:
            continue
        name, colon, rest = line.partition(":")
        if not colon or not name.strip():
            raise UserError(f"lexicon file {path}, line {i}: expected 'class name: word, word'")
        words = [w.strip() for w in rest.split(",") if w.strip()]
        for w in words:
            if "{" in w or "}" in w or not re.search(r"\w", w):
                raise UserError(f"lexicon file {path}, line {i}: {w!r} is not a word")
        out.setdefault(name.strip().casefold(), []).extend(words)
    return out


def merge_lexicons(*lexicons: dict[str, list[str]]) -> dict[str, list[str]]:
    """Union of lexicons; words keep their first-seen order, duplicates (any case) dropped."""
    out: dict[str, list[str]] = {}
    for lex in lexicons:
        for name, words in lex.items():
            have = out.setdefault(name, [])
            seen = {w.casefold() for w in have}
            for w in words:
                if w.casefold() not in seen:
                    have.append(w)
                    seen.add(w.casefold())
    return out


def load_templates(path: str | Path) -> list[str]:
    """Prompt templates, one per line, each with exactly one `{}` for the class word."""
    out = []
    for i, raw in enumerate(_read_lines(path, "templates file"), 1):
        line = _strip_comment(raw)
        if not line:
            continue
        if line.count("{}") != 1 or re.search(r"\{(?!\})|(?<!\{)\}", line):
            raise UserError(f"templates file {path}, line {i}: a template needs exactly one '{{}}'")
        out.append(line)
    if not out:
        raise UserError(f"templates file {path} has no template")
    return out


def default_templates_file(class_spec: str) -> Path:
    """The built-in templates for a class set: street scenes for cityscapes, else generic."""
    specific = data_file(f"templates_{class_spec}.txt")
    return specific if class_spec in CLASS_SETS and specific.is_file() else data_file(
        "templates.txt")


def load_captions(path: str | Path) -> list[str]:
    """Captions, one per line (blank lines and repeats skipped)."""
    seen, out = set(), []
    for raw in _read_lines(path, "captions file"):
        text = " ".join(raw.split())
        if text and text.casefold() not in seen:
            seen.add(text.casefold())
            out.append(text)
    return out


def load_wordnet():
    """nltk's WordNet reader; a UserError explaining the install when it is missing."""
    try:
        from nltk.corpus import wordnet
    except ImportError:
        raise UserError("--wordnet needs nltk: pip install 'attnseg[wordnet]' (or nltk)") from None
    try:
        wordnet.synsets("dog")
    except LookupError:
        raise UserError(
            "--wordnet needs the WordNet corpus: python -m nltk.downloader wordnet"
        ) from None
    return wordnet


def wordnet_words(word: str, wordnet, max_words: int = 20, depth: int = 2) -> list[str]:
    """Synonyms (lemmas of the word's first noun sense) and hyponyms down to `depth` levels.

    The first sense is WordNet's most frequent one, which is the object sense for almost all
    class words; hyponyms are taken level by level in synset-name order, so the list is
    deterministic. Underscores become spaces; at most `max_words` words.
    """
    synsets = wordnet.synsets(word.replace(" ", "_"), pos="n")
    if not synsets:
        return []
    out: list[str] = []
    seen = {word.casefold()}
    level = [synsets[0]]
    for _ in range(depth + 1):
        for syn in level:
            for lemma in syn.lemma_names():
                w = lemma.replace("_", " ")
                if w.casefold() not in seen:
                    seen.add(w.casefold())
                    out.append(w)
        level = sorted({h.name(): h for s in level for h in s.hyponyms()}.items())
        level = [s for _, s in level]
    return out[:max_words]


@dataclass(frozen=True)
class WordIssue:
    """A class's word or caption that was left out of (some) prompts, and why."""

    class_name: str
    word: str
    source: str  # "lexicon", "wordnet", "class word" or "caption"
    reason: str
    failed: int = 1  # prompts lost
    total: int = 1  # prompts it was tried in

    def describe(self) -> str:
        if self.total == 0:
            return f"class {self.class_name!r}: {self.source}: {self.reason}"
        share = "all" if self.failed == self.total else f"{self.failed} of"
        return (f"class {self.class_name!r}: {self.source} {self.word!r} left out of {share} "
                f"{self.total} prompt(s): {self.reason}")


class _MemoTokenizer:
    """A tokenizer that remembers its answers: template prompts share their prefixes, so
    checking every (template, word) pair tokenises each prefix once."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._memo: dict[tuple, object] = {}
        self.all_special_ids = list(tokenizer.all_special_ids)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, text: str, **kwargs):
        key = (text, tuple(sorted(kwargs.items())))
        if key not in self._memo:
            self._memo[key] = self._tokenizer(text, **kwargs)
        return self._memo[key]


@dataclass(frozen=True)
class _Candidate:
    spec: PromptSpec
    source: str  # "class word", "lexicon", "wordnet" or "caption"
    group: str  # the (casefolded) word it exercises: selection balances over these
    template: str = ""  # the template it fills ("" for a caption)


@dataclass
class PromptSet:
    """An augmented prompt set: `num_per_class` prompts per class (at most that many, when
    built as a cap), in class order."""

    classes: list[ClassInfo]
    prompts: dict[str, list[_Candidate]]
    issues: list[WordIssue]
    words_per_class: dict[str, int]
    checked: bool  # every prompt's class words were located in a tokenizer's output

    def records(self) -> list[dict]:
        """The prompts-file records: prompt, labels (class + exact word), source."""
        return [
            {"prompt": c.spec.text,
             "labels": [{"class": cls.name, "word": w} for cls, w in c.spec.labels],
             "source": c.source}
            for cls in self.classes for c in self.prompts[cls.name]
        ]

    def specs(self) -> dict[str, list[PromptSpec]]:
        """Prompts per class name, as `load_prompt_file` returns them."""
        return {name: [c.spec for c in cands] for name, cands in self.prompts.items()}


def _class_words(classes, lexicons: list[tuple[str, dict[str, list[str]]]]):
    """Words per class [(word, source)], the class's own word first; words that name another
    class of the set are dropped from both and reported, so a prompt never means two classes."""
    own = {c.word.casefold(): c.name for c in classes}
    claims: dict[str, set[str]] = {}
    extras = {}
    for c in classes:
        words = []
        for source, lex in lexicons:
            for w in lex.get(c.name.casefold(), []):
                if w.casefold() != c.word.casefold() and w.casefold() not in {
                        x.casefold() for x, _ in words}:
                    words.append((w, source))
        extras[c.name] = words
        for w, _ in words:
            claims.setdefault(w.casefold(), set()).add(c.name)
    out, issues = {}, []
    for c in classes:
        keep = [(c.word, "class word")]
        for w, source in extras[c.name]:
            key = w.casefold()
            if key in own:
                issues.append(WordIssue(c.name, w, source, f"it is the word of class {own[key]!r}"))
            elif len(claims[key]) > 1:
                other = sorted(claims[key] - {c.name})
                issues.append(WordIssue(c.name, w, source, f"class(es) {other} claim it too"))
            else:
                keep.append((w, source))
        out[c.name] = keep
    return out, issues


def _plural_forms(word: str) -> list[str]:
    """The word and its regular plural (irregular ones belong in the lexicon)."""
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return [word, word + "es"]
    if len(word) > 1 and word.endswith("y") and word[-2] not in "aeiou":
        return [word, word[:-1] + "ies"]
    return [word, word + "s"]


def _caption_candidates(captions, classes, words):
    """Per class, the captions that mention one of its words (longest match wins)."""
    out = {c.name: [] for c in classes}
    if not captions:
        return out
    term = {}
    for c in classes:
        for w, _ in words[c.name]:
            for form in _plural_forms(w):
                term.setdefault(form.casefold(), (c, w.casefold()))
    alternatives = "|".join(re.escape(t) for t in sorted(term, key=len, reverse=True))
    pattern = re.compile(r"(?<!\w)(" + alternatives + r")(?!\w)", re.IGNORECASE)
    for text in captions:
        found: dict[str, tuple[ClassInfo, str, str]] = {}
        for m in pattern.finditer(text):
            cls, group = term[m.group(1).casefold()]
            found.setdefault(cls.name, (cls, m.group(1), group))
        mentions = list(found.values())
        for k, (cls, _, group) in enumerate(mentions):
            ordered = [mentions[k]] + mentions[:k] + mentions[k + 1:]
            spec = PromptSpec(text, tuple((c, w) for c, w, _ in ordered))
            out[cls.name].append(_Candidate(spec, "caption", group))
    return out


def _normalise(text: str) -> str:
    return " ".join(text.casefold().split())


def _draw_round_robin(queues: list[deque], count: int, taken: set[str], failure, cls,
                      issues: list) -> list[_Candidate]:
    """Up to `count` candidates, one per queue in turn, skipping texts already taken (by any
    class) and candidates whose `failure` is not None (those are reported in `issues`)."""
    picked: list[_Candidate] = []
    while len(picked) < count and any(queues):
        for queue in queues:
            while queue:
                cand = queue.popleft()
                key = _normalise(cand.spec.text)
                if key in taken:
                    continue
                reason = failure(cand)
                if reason:
                    issues.append(WordIssue(cls.name, cand.spec.text, cand.source, reason))
                    continue
                taken.add(key)
                picked.append(cand)
                break
            if len(picked) == count:
                break
    return picked


def augment_prompts(classes: list[ClassInfo], num_per_class: int, seed: int = 0,
                    templates: list[str] | None = None,
                    lexicon: dict[str, list[str]] | None = None,
                    captions: list[str] | None = None,
                    wordnet_lexicon: dict[str, list[str]] | None = None,
                    tokenizer=None, classes_per_prompt: tuple[float, ...] = (1.0,),
                    at_most: bool = False) -> PromptSet:
    """Build `num_per_class` distinct prompts for every class (with `at_most`, a class that
    has fewer keeps every one it has: synth cycles a class's prompts over its images).

    Candidates per class are every template filled with every word of the class (its own word,
    then lexicon and WordNet words) and every caption that mentions one of those words.
    Selection is deterministic given `seed` (each class draws from its own seeded generator, so
    adding a class does not change the others), balanced (exactly `num_per_class` prompts whose
    first label is the class, or every one it has under `at_most`), de-duplicated (case and
    spacing ignored, across classes) and spread over the class's words round-robin (own word
    first; captions before templates within a word). With a `tokenizer`, every label word must
    be found by `find_word_tokens`; words and captions that fail are left out and returned as
    `issues`, never dropped silently.

    `classes_per_prompt` (weights of naming 1, 2, ... classes; this function's default names
    one, `PromptsConfig`'s, which `attnseg prompts` uses, several): a template prompt drawn to
    name k > 1 classes gets k - 1 other classes of the set, each by one of its words, in
    random order ("a photo of a star and a disc"); its first label stays the class it was
    drawn for. Images of several classes teach a segmenter to tell them apart in one image,
    as real scenes need.
    """
    classes_per_prompt = check_classes_per_prompt(classes_per_prompt)
    if num_per_class < 1:
        raise UserError("--num-per-class must be >= 1")
    templates = list(templates or DEFAULT_TEMPLATES)
    words, issues = _class_words(
        classes, [("lexicon", lexicon or {}), ("wordnet", wordnet_lexicon or {})])
    from_captions = _caption_candidates(captions or [], classes, words)

    failure_cache: dict[str, str | None] = {}
    if tokenizer is not None:
        tokenizer = _MemoTokenizer(tokenizer)

    def failure(spec: PromptSpec) -> str | None:
        if tokenizer is None:
            return None
        if spec.text not in failure_cache:
            reason = None
            for _, word in spec.labels:
                try:
                    find_word_tokens(tokenizer, spec.text, word)
                except UserError as e:
                    reason = str(e)
                    break
            failure_cache[spec.text] = reason
        return failure_cache[spec.text]

    def caption_failure(cand: _Candidate) -> str | None:
        return failure(cand.spec) if cand.source == "caption" else None

    taken: set[str] = set()
    chosen: dict[str, list[_Candidate]] = {}
    for cls in classes:
        rng = random.Random(f"attnseg-prompts/{seed}/{cls.name}")
        groups: dict[str, list[_Candidate]] = {}
        for cand in from_captions[cls.name]:
            groups.setdefault(cand.group, []).append(cand)
        for g in groups.values():
            rng.shuffle(g)
        for word, source in words[cls.name]:
            cands = [_Candidate(PromptSpec(fill_template(t, word), ((cls, word),)), source,
                                word.casefold(), t) for t in templates]
            # Every template prompt is checked up front, so each failing word is reported
            # with how many of its prompts it lost (captions are checked when drawn).
            lost = [(c, failure(c.spec)) for c in cands]
            bad = [(c, r) for c, r in lost if r]
            if bad:
                issues.append(WordIssue(cls.name, word, source, bad[0][1], len(bad), len(cands)))
            good = [c for c, r in lost if not r]
            rng.shuffle(good)
            groups.setdefault(word.casefold(), []).extend(good)
        # Round-robin over the class's words: its own word first, then the words that captions
        # mention (the user's own text), then the rest, each in seeded order.
        own = cls.word.casefold()
        mentioned = sorted({c.group for c in from_captions[cls.name]} - {own})
        others = sorted(set(groups) - set(mentioned) - {own})
        rng.shuffle(mentioned)
        rng.shuffle(others)
        queues = [deque(groups.get(g, [])) for g in [own, *mentioned, *others]]

        picked = _draw_round_robin(queues, num_per_class, taken, caption_failure, cls, issues)
        if len(picked) < num_per_class and not at_most:
            raise UserError(
                f"class {cls.name!r} has only {len(picked)} distinct prompts, fewer than "
                f"--num-per-class {num_per_class}: add templates, lexicon words or captions, "
                "or lower --num-per-class"
            )
        if len(classes_per_prompt) > 1:
            # Its own generator, so a set of one class per prompt is the same with or
            # without this step.
            picked = _name_more_classes(
                picked, cls, classes, words, classes_per_prompt,
                random.Random(f"attnseg-prompts/{seed}/{cls.name}/classes"), taken, failure,
                issues)
        chosen[cls.name] = picked
    return PromptSet(classes, chosen, issues, {n: len(w) for n, w in words.items()},
                     checked=tokenizer is not None)


def check_classes_per_prompt(weights) -> tuple[float, ...]:
    """Weights of naming 1, 2, ... classes per prompt, as floats: at least one, none
    negative, some positive (a config file's list is checked here, so a bad one is one
    line, not a traceback)."""
    try:
        out = tuple(float(w) for w in weights)
    except (TypeError, ValueError):
        out = ()
    if not out or any(not w >= 0 for w in out) or not sum(out) > 0:
        shown = list(weights) if isinstance(weights, (list, tuple)) else weights
        raise UserError(f"--classes-per-prompt {shown!r} must be weights of naming 1, 2, "
                        "... classes: numbers, none negative, at least one above 0")
    return out


def _name_more_classes(picked: list[_Candidate], cls: ClassInfo, classes: list[ClassInfo],
                       words: dict[str, list[tuple[str, str]]], weights: tuple[float, ...],
                       rng: random.Random, taken: set[str], failure, issues: list
                       ) -> list[_Candidate]:
    """`picked` with each template prompt rewritten, at `weights`, to name more classes
    (`augment_prompts`); a rewrite that repeats a taken text keeps the one-class prompt,
    and so does one that fails the tokenizer check, which is reported in `issues` (a repeat
    is chance, not a fault: `--strict` must not fail on it)."""
    others = [c for c in classes if c.name != cls.name]
    out = []
    for cand in picked:
        k = rng.choices(range(1, len(weights) + 1), weights=weights)[0]
        if k == 1 or not cand.template or not others:
            out.append(cand)
            continue
        labels = [cand.spec.labels[0]] + [(c, rng.choice(words[c.name])[0])
                                          for c in rng.sample(others, min(k - 1, len(others)))]
        order = labels[:]
        rng.shuffle(order)
        spec = PromptSpec(describe_classes(cand.template, [w for _, w in order]),
                          tuple(labels))
        key = _normalise(spec.text)
        reason = None if key in taken else failure(spec)
        if key in taken or reason:
            if reason:
                issues.append(WordIssue(cls.name, spec.text, "more classes", reason))
            out.append(cand)
            continue
        taken.add(key)
        out.append(_Candidate(spec, cand.source, cand.group, cand.template))
    return out


def prompt_file_bytes(records: list[dict]) -> bytes:
    """Prompts JSONL, one record a line (the format `load_prompt_file` reads)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def write_prompt_file(path: str | Path, records: list[dict]) -> None:
    """Write prompts JSONL atomically (`prompt_file_bytes`)."""
    from ..files import atomic_write_bytes

    path = Path(path)
    if path.parent and not path.parent.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create folder {path.parent}: {e.strerror}") from None
    try:
        atomic_write_bytes(path, prompt_file_bytes(records))
    except OSError as e:
        raise UserError(f"cannot write prompts file {path}: {e.strerror}") from None


@dataclass
class PromptsConfig:
    """Prompt augmentation (`attnseg prompts`): which words, templates and captions, how many."""

    classes: str = "voc"
    num_per_class: PositiveInt = 20
    seed: int = 0
    out: str = "prompts.jsonl"
    # Lexicon files (`class name: word, word`) added to the built-in synonyms and hyponyms.
    lexicons: list[str] = field(default_factory=list)
    builtin_lexicon: bool = True
    templates: str | None = None  # None: the class set's built-in templates
    captions: str | None = None  # one caption per line; those naming a class become prompts
    wordnet: bool = False  # add WordNet synonyms and hyponyms (needs nltk and its corpus)
    wordnet_max: NonNegativeInt = 20  # at most this many WordNet words per class
    model: str | None = None  # check every prompt against this model's tokenizer
    strict: bool = False  # a word or caption that fails the tokenizer check is an error
    # Weights of a template prompt naming 1, 2, ... classes (the others drawn from the set):
    # (1.0,) names one; (0.4, 0.35, 0.25) names two in 35 % and three in 25 % of prompts. The
    # default is the latter: a segmenter trained on such images (with the lexicon's words)
    # scored higher than on synth's plain one-class prompts beyond the 95 % interval, 5 seeds
    # (bench/results/toy_downstream.md, arm prompts:several-classes; the weights are the toy
    # world's shares of scenes holding one, two and three objects).
    classes_per_prompt: tuple[NonNegativeFloat, ...] = (0.4, 0.35, 0.25)

    def __post_init__(self):
        self.classes_per_prompt = check_classes_per_prompt(self.classes_per_prompt)

    def validate(self) -> None:
        if self.num_per_class < 1:
            raise UserError("--num-per-class must be >= 1")
        if self.wordnet_max < 1:
            raise UserError("--wordnet-max must be >= 1")


def build_prompt_set(cfg, tokenizer=None, wordnet=None, at_most: bool = False) -> PromptSet:
    """The augmented prompt set a `PromptsConfig` describes (files are read, nothing written);
    `at_most`: `cfg.num_per_class` is a cap, not a demand (see `augment_prompts`).

    `tokenizer` (else the tokenizer of `cfg.model`, if set) checks every prompt; `wordnet`
    (else nltk's, when `cfg.wordnet`) supplies WordNet words. With `cfg.strict` any word or
    caption left out is an error.
    """
    cfg.validate()
    classes = load_classes(cfg.classes)
    lexicons = [load_lexicon(data_file(LEXICON_FILE))] if cfg.builtin_lexicon else []
    lexicons += [load_lexicon(p) for p in cfg.lexicons]
    templates = load_templates(cfg.templates or default_templates_file(cfg.classes))
    captions = load_captions(cfg.captions) if cfg.captions else []
    wordnet_lexicon, missing = None, []
    if cfg.wordnet:
        wordnet = wordnet or load_wordnet()
        wordnet_lexicon = {}
        for c in classes:
            words = wordnet_words(c.word, wordnet, cfg.wordnet_max)
            wordnet_lexicon[c.name.casefold()] = words
            if not words:
                missing.append(WordIssue(c.name, c.word, "wordnet", "WordNet has no noun sense "
                                         "of the class word", 0, 0))
    if tokenizer is None and cfg.model:
        from ..models.loading import load_tokenizer

        tokenizer = load_tokenizer(cfg.model)
    result = augment_prompts(classes, cfg.num_per_class, cfg.seed, templates,
                             merge_lexicons(*lexicons), captions, wordnet_lexicon, tokenizer,
                             cfg.classes_per_prompt, at_most)
    result.issues = missing + result.issues
    if cfg.strict and result.issues:
        raise UserError(f"{len(result.issues)} word(s) or caption(s) left out (--strict); "
                        f"first: {result.issues[0].describe()}")
    return result
