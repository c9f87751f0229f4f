"""Prompt augmentation: class sets, lexicon, templates, captions, WordNet, tokenizer checks."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest

from attnseg.pipeline.adapt.prompt_augment import (
    LEXICON_FILE,
    PromptsConfig,
    augment_prompts,
    build_prompt_set,
    load_lexicon,
    load_templates,
    wordnet_words,
)
from attnseg.pipeline.cli import main
from attnseg.pipeline.errors import UserError
from attnseg.pipeline.prompts import (
    CLASS_SETS,
    class_token_weights,
    data_file,
    describe_classes,
    fill_template,
    find_word_tokens,
    load_classes,
    load_prompt_file,
)


@pytest.fixture(scope="module")
def tok():
    from attnseg.pipeline.models.tiny import tiny_tokenizer

    return tiny_tokenizer()


def test_builtin_class_sets():
    sizes = {"voc": 20, "cityscapes": 19, "coco": 80, "imagenet-s50": 50, "toy": 6}
    assert set(CLASS_SETS) == set(sizes)
    for name, n in sizes.items():
        classes = load_classes(name)
        assert [c.id for c in classes] == list(range(1, n + 1))
        assert len({c.name for c in classes}) == n and all(c.word for c in classes)
    city = [c.name for c in load_classes("cityscapes")]
    assert city[:3] == ["road", "sidewalk", "building"] and city[-1] == "bicycle"
    coco = {c.name: c for c in load_classes("coco")}
    assert coco["mouse"].word == "computer mouse" and list(coco)[79] == "toothbrush"
    inet = load_classes("imagenet-s50")
    # Trailing '# wnid' comments are not part of the name or the word.
    assert inet[0].name == "goldfish" and inet[-1].word == "mushroom"


def test_lexicon_file_format(tmp_path):
    lex = load_lexicon(data_file(LEXICON_FILE))
    assert "puppy" in lex["dog"] and "airplane" in lex["aeroplane"]
    assert "golden retriever" in lex["dog"] and "beagle" in lex["dog"]
    f = tmp_path / "lex.txt"
    f.write_text("# mine\nDog: hound dog, pup\ndog: mutt\n")
    assert load_lexicon(f) == {"dog": ["hound dog", "pup", "mutt"]}
    f.write_text("dog puppy\n")
    with pytest.raises(UserError, match="line 1: expected 'class name: word, word'"):
        load_lexicon(f)
    with pytest.raises(UserError, match="does not exist"):
        load_lexicon(tmp_path / "nope.txt")
    f.write_bytes(b"dog: \xff\xfe\n")
    with pytest.raises(UserError, match="cannot be read as UTF-8 text"):
        load_lexicon(f)


def test_templates_and_articles(tmp_path):
    assert fill_template("a photo of a {}", "aeroplane") == "a photo of an aeroplane"
    assert fill_template("An {} on grass", "dog") == "A dog on grass"
    assert fill_template("a photo of a {}", "trees") == "a photo of trees"
    assert fill_template("a photo of a {}", "grass") == "a photo of grass"
    assert fill_template("a {} seen from above", "bus") == "a bus seen from above"
    # Several classes are listed where the word goes, the template's article fixed for the
    # first and each other with its own.
    assert describe_classes("a photo of a {}", ["dog"]) == "a photo of a dog"
    assert describe_classes("a photo of a {}", ["apple", "trees", "cat"]) == (
        "a photo of an apple and trees and a cat")
    assert describe_classes("a {} on a meadow", ["egg", "star"]) == (
        "an egg and a star on a meadow")
    f = tmp_path / "t.txt"
    f.write_text("a photo of {}\n{} and {}\n")
    with pytest.raises(UserError, match="line 2: a template needs exactly one"):
        load_templates(f)


@pytest.mark.parametrize("class_set", ["voc", "cityscapes", "coco", "imagenet-s50"])
def test_every_builtin_prompt_is_found_by_harvesting(class_set, tok):
    """Deterministic, balanced, de-duplicated, and every label word's tokens are found."""
    cfg = PromptsConfig(classes=class_set, num_per_class=8, seed=3)
    result = build_prompt_set(cfg, tokenizer=tok)
    assert result.checked and not result.issues
    records = result.records()
    classes = load_classes(class_set)
    assert Counter(r["labels"][0]["class"] for r in records) == {c.name: 8 for c in classes}
    texts = [" ".join(r["prompt"].casefold().split()) for r in records]
    assert len(set(texts)) == len(texts)
    by_name = {c.name: c for c in classes}
    assert any(len(r["labels"]) > 1 for r in records)  # the default names several classes
    for r in records:
        for label in r["labels"]:
            pos = find_word_tokens(tok, r["prompt"], label["word"])
            ids = tok(r["prompt"], padding="max_length", max_length=77).input_ids
            assert [ids[p] for p in pos] == tok(label["word"],
                                                add_special_tokens=False).input_ids
            assert by_name[label["class"]].name == label["class"]
    # Same seed, same prompts (the check leaves out nothing here, so it changes nothing);
    # another seed, another selection.
    assert build_prompt_set(cfg).records() == records
    assert build_prompt_set(PromptsConfig(classes=class_set, num_per_class=8, seed=4)).records() \
        != records


def test_words_are_spread_and_class_word_comes_first():
    classes = load_classes("voc")
    result = augment_prompts(classes, 12, seed=0,
                             lexicon=load_lexicon(data_file(LEXICON_FILE)))
    dog = [c for c in result.prompts["dog"]]
    assert dog[0].source == "class word" and dog[0].spec.labels[0][1] == "dog"
    words = Counter(c.spec.labels[0][1] for c in dog)
    assert len(words) == 12  # 13 words for dog: the first round uses 12 different ones
    # Adding a class leaves the other classes' prompts unchanged.
    fewer = augment_prompts(classes[:12], 12, seed=0,
                            lexicon=load_lexicon(data_file(LEXICON_FILE)))
    assert [c.spec for c in fewer.prompts["dog"]] == [c.spec for c in dog]


def test_prompts_can_name_several_classes(tok):
    classes = load_classes("voc")
    lexicon = load_lexicon(data_file(LEXICON_FILE))
    one = augment_prompts(classes, 12, seed=0, lexicon=lexicon, tokenizer=tok)
    more = augment_prompts(classes, 12, seed=0, lexicon=lexicon, tokenizer=tok,
                           classes_per_prompt=(0.4, 0.35, 0.25))
    assert more.specs() == augment_prompts(classes, 12, seed=0, lexicon=lexicon, tokenizer=tok,
                                           classes_per_prompt=(0.4, 0.35, 0.25)).specs()
    counts = Counter()
    for cls in classes:
        specs = more.specs()[cls.name]
        assert len(specs) == 12
        for single, spec in zip(one.specs()[cls.name], specs, strict=True):
            # Drawn for this class: its first label, and the word it was drawn with, stay.
            assert spec.labels[0] == single.labels[0]
            names = [c.name for c, _ in spec.labels]
            assert len(set(names)) == len(names)
            for _, word in spec.labels:  # every class is named and found by the tokenizer
                find_word_tokens(tok, spec.text, word)
            counts[len(spec.labels)] += 1
    # 240 prompts at 0.4 / 0.35 / 0.25 (binomial spread about 7.6, 7.4, 6.7)
    assert 66 <= counts[1] <= 126 and 54 <= counts[2] <= 114 and 36 <= counts[3] <= 84
    texts = [s.text.casefold() for specs in more.specs().values() for s in specs]
    assert len(set(texts)) == len(texts)
    with pytest.raises(UserError, match="classes-per-prompt"):
        augment_prompts(classes, 2, classes_per_prompt=(0.0, 0.0))
    with pytest.raises(UserError, match="classes-per-prompt"):
        PromptsConfig(classes_per_prompt=["x", 1])  # as a config file may give it


def test_too_few_prompts_is_an_error_unless_a_cap():
    templates = ["a {}", "the {}", "{} at noon", "a photo of {}"]
    with pytest.raises(UserError, match="class 'sky' has only 4 distinct prompts"):
        augment_prompts(load_classes("sky,"), 5, templates=templates)
    # as a cap: a class short of prompts keeps every one it has, the others exactly the cap
    classes = load_classes("sky,cat")
    lexicon = {"cat": ["kitten", "tabby"]}
    capped = augment_prompts(classes, 7, templates=templates, lexicon=lexicon, at_most=True)
    sky = [s.text for s in capped.specs()["sky"]]
    assert sorted(sky) == sorted(fill_template(t, "sky") for t in templates)
    assert len(capped.specs()["cat"]) == 7
    exact = augment_prompts(classes, 4, templates=templates, lexicon=lexicon)
    assert (augment_prompts(classes, 4, templates=templates, lexicon=lexicon, at_most=True)
            .specs() == exact.specs())  # enough prompts: the cap changes nothing


def test_captions_become_labelled_prompts(tmp_path, tok):
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join([
        "Two puppies chasing a kitten on the lawn",
        "a hot dog on a plate",
        "A man riding a motorbike down the road",
        "a quiet beach at sunset",
        "two puppies chasing a kitten on the lawn",  # repeat (case): skipped
    ]) + "\n")
    lexicon = tmp_path / "lex.txt"
    lexicon.write_text("hot dog: frankfurter\n")
    cfg = PromptsConfig(classes="dog,cat,hot dog,person,motorbike", num_per_class=3,
                        captions=str(captions), lexicons=[str(lexicon)])
    result = build_prompt_set(cfg, tokenizer=tok)
    records = result.records()
    caps = [r for r in records if r["source"] == "caption"]
    got = {r["prompt"]: [(lab["class"], lab["word"]) for lab in r["labels"]] for r in caps}
    # The plural is found, the multi-word class wins over the "dog" inside "hot dog", and a
    # caption naming several classes labels all of them (its owner first).
    assert got["a hot dog on a plate"] == [("hot dog", "hot dog")]
    first = got["Two puppies chasing a kitten on the lawn"]
    assert sorted(first) == [("cat", "kitten"), ("dog", "puppies")]
    assert got["A man riding a motorbike down the road"][0][0] in {"person", "motorbike"}
    assert "a quiet beach at sunset" not in got
    # Captions are used once (de-duplicated across classes) and read back by synth's loader.
    assert len(caps) == len(set(got))
    out = tmp_path / "p.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    specs = load_prompt_file(str(out), load_classes("dog,cat,hot dog,person,motorbike"))
    assert all(len(v) == 3 for v in specs.values())
    weights, ids = class_token_weights(tok, [s for v in specs.values() for s in v])
    assert (weights.sum(1) > 0).sum() == sum(len(s.labels) for v in specs.values() for s in v)


def test_tokenisation_failures_are_reported_not_dropped(tmp_path, tok):
    # "good boy!" followed by the template's "." becomes the single token "!." in context:
    # the word's own tokens are not in the prompt, so it is reported for that template.
    lexicon = tmp_path / "lex.txt"
    lexicon.write_text("dog: puppy, good boy!\n")
    templates = tmp_path / "t.txt"
    templates.write_text("a photo of a {}.\na {} on the grass\na {} at home\n")
    cfg = PromptsConfig(classes="dog,", num_per_class=6, lexicons=[str(lexicon)],
                        templates=str(templates), builtin_lexicon=False)
    result = build_prompt_set(cfg, tokenizer=tok)
    [issue] = result.issues
    assert (issue.class_name, issue.word, issue.source) == ("dog", "good boy!", "lexicon")
    assert (issue.failed, issue.total) == (1, 3)
    assert "does not survive tokenisation" in issue.reason
    assert "a photo of a good boy!." in issue.reason
    texts = [r["prompt"] for r in result.records()]
    assert "a photo of a good boy!." not in texts and "a good boy! on the grass" in texts
    # Without a tokenizer nothing is checked; with --strict the failure is an error.
    unchecked = build_prompt_set(cfg)
    assert not unchecked.checked and "a photo of a good boy!." in [
        r["prompt"] for r in unchecked.records()]
    cfg.strict = True
    with pytest.raises(UserError, match="left out .*'good boy!'"):
        build_prompt_set(cfg, tokenizer=tok)


def test_word_that_becomes_the_unknown_token_is_reported(tmp_path):
    """A tokenizer whose vocabulary lacks a character maps it to the unknown token."""
    from transformers import CLIPTokenizer

    from attnseg.pipeline.models.tiny import write_tiny_tokenizer

    folder = write_tiny_tokenizer(tmp_path / "tok")
    vocab = json.loads((folder / "vocab.json").read_text())
    vocab = {t: i for i, t in enumerate(t for t in vocab if "q" not in t)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    merges = [m for m in (folder / "merges.txt").read_text().splitlines() if "q" not in m]
    (folder / "merges.txt").write_text("\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                        pad_token="<|endoftext|>")
    with pytest.raises(UserError, match="unknown or special token"):
        find_word_tokens(tok, "a photo of a quokka", "quokka")
    lexicon = tmp_path / "lex.txt"
    lexicon.write_text("cat: kitten, quoll\n")
    cfg = PromptsConfig(classes="cat,", num_per_class=3, lexicons=[str(lexicon)],
                        builtin_lexicon=False)
    result = build_prompt_set(cfg, tokenizer=tok)
    assert [(i.word, i.failed, i.total) for i in result.issues] == [("quoll", 20, 20)]
    assert all("quoll" not in r["prompt"] for r in result.records())


def test_ambiguous_lexicon_words_are_reported(tmp_path):
    lexicon = tmp_path / "lex.txt"
    lexicon.write_text("dog: pup, pet\ncat: pet, kitten, dog\n")
    result = augment_prompts(load_classes("dog,cat"), 2, lexicon=load_lexicon(lexicon))
    reasons = {(i.class_name, i.word): i.reason for i in result.issues}
    assert reasons[("dog", "pet")] == "class(es) ['cat'] claim it too"
    assert reasons[("cat", "pet")] == "class(es) ['dog'] claim it too"
    assert reasons[("cat", "dog")] == "it is the word of class 'dog'"
    assert all("pet" not in r["prompt"] for r in result.records())


class _FakeSynset:
    def __init__(self, name, lemmas, hyponyms=()):
        self._name, self._lemmas, self._hyponyms = name, lemmas, list(hyponyms)

    def name(self):
        return self._name

    def lemma_names(self):
        return list(self._lemmas)

    def hyponyms(self):
        return list(self._hyponyms)


class _FakeWordNet:
    """The slice of nltk's WordNet reader that attnseg uses."""

    def __init__(self):
        retriever = _FakeSynset("retriever.n.01", ["retriever"], [
            _FakeSynset("golden_retriever.n.01", ["golden_retriever"])])
        dog = _FakeSynset("dog.n.01", ["dog", "domestic_dog", "Canis_familiaris"], [
            _FakeSynset("puppy.n.01", ["puppy"]), retriever])
        self.synsets_by_word = {"dog": [dog, _FakeSynset("frump.n.01", ["frump", "dog"])]}

    def synsets(self, word, pos=None):
        assert pos == "n"
        return self.synsets_by_word.get(word, [])


def test_wordnet_words_and_missing_nltk(monkeypatch):
    wn = _FakeWordNet()
    assert wordnet_words("dog", wn) == ["domestic dog", "Canis familiaris", "puppy", "retriever",
                                        "golden retriever"]
    assert wordnet_words("dog", wn, max_words=2) == ["domestic dog", "Canis familiaris"]
    cfg = PromptsConfig(classes="dog,zorblax", num_per_class=2, wordnet=True,
                        builtin_lexicon=False)
    result = build_prompt_set(cfg, wordnet=wn)
    dog_words = {r["labels"][0]["word"] for r in result.records()
                 if r["labels"][0]["class"] == "dog"}
    assert len(dog_words) == 2 and "dog" in dog_words
    assert any(r["source"] == "wordnet" for r in result.records())
    [issue] = result.issues
    assert issue.class_name == "zorblax" and "no noun sense" in issue.reason
    # Without nltk the flag is a clear error.
    monkeypatch.setitem(sys.modules, "nltk", None)
    monkeypatch.setitem(sys.modules, "nltk.corpus", None)
    with pytest.raises(UserError, match="--wordnet needs nltk"):
        build_prompt_set(PromptsConfig(classes="dog,", num_per_class=1, wordnet=True))


def test_prompts_cli_end_to_end_into_synth(tmp_path):
    prompts = tmp_path / "p.jsonl"
    r = subprocess.run(
        [sys.executable, "-m", "attnseg.pipeline.cli", "prompts", "--classes", "dog,cat,",
         "--num-per-class", "3", "--seed", "1", "--model", "tiny", "--out", str(prompts)],
        capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "wrote 6 prompts (2 classes x 3)" in r.stdout
    assert "checked against the tokenizer of model 'tiny'" in r.stdout
    records = [json.loads(x) for x in prompts.read_text().splitlines()]
    assert [r["labels"][0]["class"] for r in records] == ["dog"] * 3 + ["cat"] * 3
    # by default a template prompt may name the other class too (the toy downstream's best
    # prompt arm); --classes-per-prompt 1 names one class each
    assert "prompts naming 1 class: 3, 2 classes: 3" in r.stdout
    assert sorted(len(r["labels"]) for r in records) == [1, 1, 1, 2, 2, 2]
    one = tmp_path / "one.jsonl"
    assert main(["prompts", "--classes", "dog,cat,", "--num-per-class", "3", "--seed", "1",
                 "--classes-per-prompt", "1", "--out", str(one)]) == 0
    singles = [json.loads(x) for x in one.read_text().splitlines()]
    assert len(singles) == 6 and all(len(r["labels"]) == 1 for r in singles)
    out = tmp_path / "ds"
    assert main(["synth", "--model", "tiny", "--classes", "dog,cat,", "--prompts", str(prompts),
                 "--num-per-class", "3", "--steps", "2", "--height", "64", "--width", "64",
                 "--out", str(out), "--no-progress"]) == 0
    manifest = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert [m["prompt"] for m in sorted(manifest, key=lambda m: m["index"])] == [
        r["prompt"] for r in records]
    assert [m["classes"][0]["word"] for m in manifest] == [
        r["labels"][0]["word"] for r in records]
    # Every prompt naming both classes: synth harvests a map for each.
    r = subprocess.run(
        [sys.executable, "-m", "attnseg.pipeline.cli", "prompts", "--classes", "dog,cat,",
         "--num-per-class", "3", "--model", "tiny", "--classes-per-prompt", "0,1",
         "--out", str(prompts)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "prompts naming 2 classes: 6" in r.stdout
    records = [json.loads(x) for x in prompts.read_text().splitlines()]
    assert all(sorted(x["class"] for x in r["labels"]) == ["cat", "dog"] for r in records)
    out = tmp_path / "ds2"
    assert main(["synth", "--model", "tiny", "--classes", "dog,cat,", "--prompts", str(prompts),
                 "--num-per-class", "3", "--steps", "2", "--height", "64", "--width", "64",
                 "--out", str(out), "--no-progress"]) == 0
    manifest = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert all(len(m["classes"]) == 2 for m in manifest)


@pytest.mark.parametrize("args, message", [
    (["--classes", "vocc"], "unknown class set 'vocc'"),
    (["--num-per-class", "0"], "'num_per_class' expects an integer >= 1, got 0"),
    (["--lexicon", "/no/such/lexicon.txt"], "lexicon file /no/such/lexicon.txt does not exist"),
    (["--captions", "/no/such/captions.txt"], "captions file /no/such/captions.txt does not"),
    (["--model", "./no/such/model"], "model path ./no/such/model does not exist"),
    (["--classes", "sky,", "--num-per-class", "500"], "class 'sky' has only"),
    (["--classes-per-prompt", "0.4,x"], "is not a comma list of finite weights"),
    (["--classes-per-prompt", "0,0"], "none negative, at least one above 0"),
])
def test_prompts_cli_bad_input(tmp_path, capsys, args, message):
    out = tmp_path / "p.jsonl"
    assert main(["prompts", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("attnseg: error:") and message in err[0]
    assert not out.exists()
