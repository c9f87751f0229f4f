"""Class sets, prompt files and class-word token positions."""

from __future__ import annotations

import pytest
import torch

from attnseg.pipeline.errors import UserError
from attnseg.pipeline.prompts import (
    PromptSpec,
    class_token_weights,
    default_prompts,
    find_word_tokens,
    load_classes,
    load_prompt_file,
)


def test_voc_has_20_classes_with_ids():
    classes = load_classes("voc")
    assert [c.id for c in classes] == list(range(1, 21))
    assert classes[15].name == "pottedplant" and classes[15].word == "potted plant"


def test_class_list_and_file(tmp_path):
    assert [c.name for c in load_classes("dog,")] == ["dog"]
    f = tmp_path / "classes.txt"
    f.write_text("# comment\nroad\nperson: pedestrian\n")
    got = load_classes(str(f))
    assert [(c.id, c.name, c.word) for c in got] == [(1, "road", "road"),
                                                      (2, "person", "pedestrian")]
    with pytest.raises(UserError, match="unknown class set"):
        load_classes("vocc")
    with pytest.raises(UserError, match="names a class twice"):
        load_classes("dog,dog")
    # Training and evaluation match class names ignoring case: "Dog" is "dog".
    with pytest.raises(UserError, match="names a class twice .*'dog' and 'Dog'"):
        load_classes("dog,Dog")


def test_default_prompts_read_as_english():
    classes = load_classes("voc")
    prompts = default_prompts(classes)
    texts = [s.text for specs in prompts.values() for s in specs]
    assert "a photo of an aeroplane" in texts and "a photo of a dog" in texts
    assert not [t for t in texts if " a a" in t or " a e" in t or " a o" in t]


def test_word_tokens_match_the_prompt_tokens(tiny_pipe):
    tok = tiny_pipe.tokenizer
    prompt = "a photo of an aeroplane and a dog"
    ids = tok(prompt, padding="max_length", max_length=77).input_ids
    for word in ("aeroplane", "dog", "a photo"):
        pos = find_word_tokens(tok, prompt, word)
        alone = tok(word, add_special_tokens=False).input_ids
        assert [ids[p] for p in pos] == alone
    assert len(find_word_tokens(tok, prompt, "aeroplane")) > 1  # a multi-token word


def test_whole_words_only(tiny_pipe):
    with pytest.raises(UserError, match="does not occur"):
        find_word_tokens(tiny_pipe.tokenizer, "a category of things", "cat")


def test_token_weights_merge_sub_tokens(tiny_pipe):
    classes = {c.name: c for c in load_classes("voc")}
    specs = [PromptSpec("an aeroplane and a dog", ((classes["aeroplane"], "aeroplane"),
                                                    (classes["dog"], "dog"))),
             PromptSpec("a cat", ((classes["cat"], "cat"),))]
    w, ids = class_token_weights(tiny_pipe.tokenizer, specs, merge="sum")
    n_aero = len(find_word_tokens(tiny_pipe.tokenizer, specs[0].text, "aeroplane"))
    assert w.shape == (2, 77, 2)
    assert w[0, :, 0].sum() == n_aero and w[0, :, 1].sum() == 1
    assert w[1, :, 1].abs().sum() == 0 and ids.tolist() == [[1, 12], [8, 0]]
    wm, _ = class_token_weights(tiny_pipe.tokenizer, specs, merge="mean")
    assert torch.allclose(wm[0, :, 0].sum(), torch.tensor(1.0))


def test_prompt_file(tmp_path):
    classes = load_classes("dog,cat")
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a puppy", "labels": [{"class": "dog", "word": "puppy"}]}\n'
                 '{"prompt": "a cat", "labels": [{"class": "cat"}]}\n')
    got = load_prompt_file(str(f), classes)
    assert got["dog"][0].labels[0][1] == "puppy"
    f.write_text('{"prompt": "a puppy", "labels": [{"class": "wolf"}]}\n')
    with pytest.raises(UserError, match="class 'wolf' is not in the class set"):
        load_prompt_file(str(f), classes)
    f.write_text('{"prompt": "a puppy", "labels": [{"class": "dog", "word": "puppy"}]}\n')
    with pytest.raises(UserError, match=r"no prompt for class\(es\) \['cat'\]"):
        load_prompt_file(str(f), classes)
