"""Typed settings: every value from a config file or `--set` is checked against its dataclass
field before anything loads (pipeline/settings.py), walked over every command's config."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import operator
import types
import typing
from pathlib import Path
from typing import Any

import pytest

from attnseg.pipeline.cli import main
from attnseg.pipeline.config import HarvestConfig, MaskConfig, SynthConfig
from attnseg.pipeline.errors import UserError
from attnseg.pipeline.settings import check_value, config_from, describe


def test_values_are_converted_to_their_field_types():
    assert check_value(tuple[int, ...], [16, 32], "harvest", "strides") == (16, 32)
    assert check_value(tuple[float, float], [0, 0.5], "harvest", "step_window") == (0.0, 0.5)
    assert check_value(dict[int, float], {"16": 2}, "harvest", "stride_weights") == {16: 2.0}
    assert check_value(str | None, None, "synth", "prompts") is None
    assert check_value(float, 3, "mask", "bg_const") == 3.0
    assert isinstance(check_value(float, 3, "mask", "bg_const"), float)
    assert check_value(list[str], ("a", "b"), "synth", "loras") == ["a", "b"]


@pytest.mark.parametrize("tp, value, expects", [
    (int, "three", "expects an integer, got the string 'three'"),
    (int, True, "expects an integer, got true"),
    (int, 2.5, "expects an integer, got 2.5"),
    (float, "high", "expects a finite number"),
    (float, math.nan, "expects a finite number, got NaN"),
    (float, math.inf, "expects a finite number, got Infinity"),
    (bool, "yes", "expects true or false"),
    (tuple[int, ...], 16, "expects a list of integers, got 16"),
    (tuple[int, ...], [16, "x"], "expects a list of integers"),
    (tuple[float, float], [0.1], "expects a list of 2 finite numbers, got [0.1]"),
    (dict[int, float], {"a": 1.0}, "expects a mapping of integers to finite numbers"),
    (str, 5, "expects a string, got 5"),
    (str | None, [1], "expects a string or null"),
])
def test_a_wrong_value_is_one_line_naming_key_expectation_and_value(tp, value, expects):
    with pytest.raises(UserError) as e:
        check_value(tp, value, "mask", "the_key")
    line = str(e.value)
    assert "\n" not in line
    assert line.startswith("mask setting 'the_key' ") and expects in line, line


def test_unknown_keys_name_the_nearest_known_one():
    with pytest.raises(UserError, match=r"unknown synth setting\(s\) \['num_per_clas'\] "
                                         r"\('num_per_clas': did you mean 'num_per_class'\?\)"):
        config_from(SynthConfig, {"num_per_clas": 3}, "synth")


# --- the walk: every field of every command's config, a wrong value through the CLI ---------

WRONG_CANDIDATES = ("wrong-type-value", 12345, {"x": []}, [[{}]])


# Fields a command also takes in another form, by design: `train --data` (and its config key)
# takes one folder as a string for a list of one.
TAKES_A_STRING = {("train", ("data",))}


def _wrong_value(tp, takes_a_string=False):
    """A value that field type `tp` does not take (None when it takes anything)."""
    for candidate in WRONG_CANDIDATES[takes_a_string:]:
        try:
            check_value(tp, candidate, "probe", "probe")
        except UserError:
            return candidate
    return None


def _fields(cls, prefix=()):
    """(key path, type with its range) of every field, sections (dataclass fields) walked
    into."""
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        yield (*prefix, f.name), tp
        if dataclasses.is_dataclass(tp):
            yield from _fields(tp, (*prefix, f.name))


def _nested(path, value) -> dict:
    doc: Any = value
    for key in reversed(path):
        doc = {key: doc}
    return doc


def _config_classes():
    from attnseg.bench.gpu import GpuProofConfig
    from attnseg.bench.prompts_lora import PromptsLoraConfig
    from attnseg.bench.quality import QualityConfig
    from attnseg.bench.robust_training import RobustTrainingConfig
    from attnseg.bench.throughput import ThroughputConfig
    from attnseg.bench.toy.config import ToyBenchConfig
    from attnseg.bench.writing import WritingBenchConfig
    from attnseg.pipeline.adapt.lora_train import LoraTrainConfig
    from attnseg.pipeline.adapt.prompt_augment import PromptsConfig
    from attnseg.pipeline.toy.model import ToyModelConfig
    from attnseg.pipeline.toy.world import ToyRenderConfig
    from attnseg.pipeline.train.trainer import TrainConfig

    return [
        (["synth"], SynthConfig), (["train"], TrainConfig), (["prompts"], PromptsConfig),
        (["lora", "train"], LoraTrainConfig), (["toy", "render"], ToyRenderConfig),
        (["toy", "train-model"], ToyModelConfig), (["bench", "throughput"], ThroughputConfig),
        (["bench", "writing"], WritingBenchConfig), (["bench", "quality"], QualityConfig),
        (["bench", "robust-training"], RobustTrainingConfig),
        (["bench", "prompts-lora"], PromptsLoraConfig), (["bench", "toy"], ToyBenchConfig),
        (["bench", "gpu"], GpuProofConfig),
    ]


def _cases():
    for command, cls in _config_classes():
        for path, tp in _fields(cls):
            if path == ("overrides",):  # synth's harvest/mask sections: walked below
                continue
            wrong = _wrong_value(tp, (" ".join(command), path) in TAKES_A_STRING)
            if wrong is not None:
                yield pytest.param(command, path, wrong, id=" ".join(command) + ":" +
                                   ".".join(path))


def _run(argv, capsys):
    capsys.readouterr()
    rc = main(argv)
    return rc, capsys.readouterr().err.strip().splitlines()


def test_the_walk_covers_every_command_with_a_config():
    walked = {" ".join(c) for c, _ in _config_classes()}
    assert len(walked) == 13
    assert sum(1 for _ in _cases()) > 250


@pytest.mark.parametrize("command, path, wrong", list(_cases()))
def test_every_config_file_field_refuses_a_wrong_type_in_one_line(command, path, wrong,
                                                                  tmp_path, capsys):
    """Through `--config FILE` (JSON), the path every command with settings has."""
    config = tmp_path / "settings.json"
    config.write_text(json.dumps(_nested(path, wrong)))
    out = tmp_path / "out"
    rc, err = _run([*command, "--config", str(config), *(["--out", str(out)]
                   if "out" != path[0] else [])], capsys)
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("attnseg: error: "), err
    assert repr(path[-1]) in err[0] and "expects" in err[0], err
    assert not out.exists()  # nothing written


@pytest.mark.parametrize("section, cls", [("harvest", HarvestConfig), ("mask", MaskConfig)])
@pytest.mark.parametrize("command", [["synth", "--model", "tiny"],
                                     ["engine", "build", "--backend", "compile"]])
def test_every_preset_setting_refuses_a_wrong_type_through_set(command, section, cls, tmp_path,
                                                               capsys):
    out = tmp_path / "out"
    checked = 0
    for (name,), tp in _fields(cls):
        wrong = _wrong_value(tp)
        if wrong is None:
            continue
        value = wrong if isinstance(wrong, str) else json.dumps(wrong)
        rc, err = _run([*command, "--out", str(out), "--set", f"{section}.{name}={value}"],
                       capsys)
        assert rc == 2, (name, err)
        assert len(err) == 1 and repr(name) in err[0], (name, err)
        assert not out.exists()
        checked += 1
    assert checked == len([f for f in dataclasses.fields(cls) if f.init])


# --- ranges: every documented range refused through the CLI --------------------------------

OUT_OF_RANGE_CANDIDATES = (0, -1, 1.5, 0.0, [0], [-1], [1.5], [0.0], [0, 1], [1.5, 0.5],
                           [[1.5]], {"1": -1.0}, {"0": 1.0}, {"x": [-1]})


def _strip_ranges(tp):
    """`tp` with every Annotated range taken off (the type alone)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return _strip_ranges(args[0])
    if not args or origin is typing.Literal:
        return tp
    stripped = tuple(a if a is Ellipsis else _strip_ranges(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return functools.reduce(operator.or_, stripped)
    return origin[stripped]


def _out_of_range(tp):
    """A value of the right type that the field's range refuses (None: it has no range)."""
    bare = _strip_ranges(tp)
    if bare == tp:
        return None
    for candidate in OUT_OF_RANGE_CANDIDATES:
        try:
            check_value(bare, candidate, "probe", "probe")
        except UserError:
            continue
        try:
            check_value(tp, candidate, "probe", "probe")
        except UserError:
            return candidate
    return None


def _range_cases():
    for command, cls in _config_classes():
        for path, tp in _fields(cls):
            if path == ("overrides",):
                continue
            bad = _out_of_range(tp)
            if bad is not None:
                yield pytest.param(command, path, bad, id=" ".join(command) + ":" +
                                   ".".join(path))
    for section, cls in (("harvest", HarvestConfig), ("mask", MaskConfig)):
        for (name,), tp in _fields(cls):
            bad = _out_of_range(tp)
            if bad is not None:
                yield pytest.param(["synth"], ("overrides", section, name), bad,
                                   id=f"synth:{section}.{name}")


def test_ranges_are_documented_on_the_counts_and_fractions():
    cases = {c.id for c in _range_cases()}
    assert len(cases) > 150
    for expected in ("bench writing:batch_size", "bench writing:repeats", "synth:num_per_class",
                     "synth:mask.crf_sxy_app", "synth:harvest.strides", "train:loss.band_threshold",
                     "toy train-model:time_limit_s", "train:augment.crop_size"):
        assert expected in cases, expected


@pytest.mark.parametrize("command, path, bad", list(_range_cases()))
def test_every_documented_range_is_refused_in_one_line(command, path, bad, tmp_path, capsys):
    """A value of the right type outside its field's range, through `--config FILE`: one line
    naming the key and the range, exit 2, nothing written."""
    config = tmp_path / "settings.json"
    config.write_text(json.dumps(_nested(path, bad)))
    out = tmp_path / "out"
    rc, err = _run([*command, "--config", str(config), *(["--out", str(out)]
                   if "out" != path[0] else [])], capsys)
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("attnseg: error: "), err
    assert path[-1] in err[0], err  # (harvest heads have their own check, naming the range too)
    assert any(word in err[0] for word in (">= ", "> 0", "in [")), err
    assert not out.exists()


def test_ranges_read_as_words():
    from attnseg.pipeline.settings import NonNegativeFloat, PositiveFloat, PositiveInt, UnitFloat

    assert describe(PositiveInt) == "an integer >= 1"
    assert describe(PositiveFloat | None) == "a finite number > 0 or null"
    assert describe(tuple[UnitFloat, UnitFloat]) == "a list of 2 finite numbers in [0, 1]"
    assert describe(dict[PositiveInt, NonNegativeFloat]) == \
        "a mapping of integers >= 1 to finite numbers >= 0"
    with pytest.raises(UserError, match=r"^bench writing setting 'batch_size' expects an "
                                         r"integer >= 1, got 0$"):
        check_value(PositiveInt, 0, "bench writing", "batch_size")


def test_described_types_read_as_words():
    assert describe(tuple[int, ...] | None) == "a list of integers or null"
    assert describe(dict[str, tuple[int, ...]]) == "a mapping of strings to a list of integers"
    assert describe(Path) == "a path (string)"
