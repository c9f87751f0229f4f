"""The command line's help and its first-hour rough edges (issue 32 item 16): one placeholder,
one wording and the command's own default per concept, a description for every command, and
the small refusals and notes a first run meets. Fast: parsers, and `main` with the slow parts
replaced."""

from __future__ import annotations

import argparse
import io
import re

import pytest

from attnseg.pipeline.cli import build_parser, main


def _parsers(parser=None, name="attnseg"):
    """(command name, parser) for the top parser and every subcommand's, at any depth."""
    parser = parser or build_parser()
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def _option(parser, flag):
    for action in parser._actions:
        if flag in action.option_strings:
            return action
    return None


def _with(flag):
    return [(name, p, _option(p, flag)) for name, p in _parsers() if _option(p, flag)]


def test_every_set_has_the_same_placeholder_and_sections_are_said_in_words():
    sets = _with("--set")
    assert len(sets) >= 10
    for name, _, action in sets:
        assert action.metavar == "KEY=VALUE", (name, action.metavar)
    helps = {name: action.help for name, _, action in sets}
    # The commands whose keys are SECTION.NAME say so, and name the sections.
    assert "KEY is SECTION.NAME, sections: harvest, mask" in helps["attnseg synth"]
    assert "KEY is SECTION.NAME, sections: harvest, mask" in helps["attnseg engine build"]
    assert "KEY is SECTION.NAME, sections: real" in helps["attnseg bench quality"]
    assert "or SECTION.NAME for sections loss, augment" in helps["attnseg train"]


def test_backend_is_listed_the_same_way_everywhere():
    from attnseg.pipeline.config import BACKENDS

    backends = {name: action for name, _, action in _with("--backend")}
    assert set(backends) == {"attnseg synth", "attnseg bench throughput", "attnseg engine build"}
    for name, action in backends.items():
        assert action.choices is None, name  # checked by the config, in one line
        names = BACKENDS[1:] if name == "attnseg engine build" else BACKENDS
        assert f"where the denoiser runs: one of {', '.join(names)}" in action.help, name
    assert backends["attnseg bench throughput"].metavar == "BACKEND[,BACKEND...]"
    assert "or a comma list of them" in backends["attnseg bench throughput"].help
    assert backends["attnseg synth"].metavar == backends["attnseg engine build"].metavar \
        == "BACKEND"
    assert backends["attnseg engine build"].required


def test_a_bad_backend_is_one_line(tmp_path, capsys):
    assert main(["synth", "--backend", "nope", "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip() == ("attnseg: error: --backend must be one of "
                                               "torch, compile, onnxruntime, tensorrt, not 'nope'")


def _stated_default(help_text: str) -> str:
    return re.search(r"\(default: (.*)\)$", help_text, re.S).group(1).replace("\n", " ")


def _sizes(text: str) -> tuple[dict[str, int], int | None]:
    """'128 for a, b; 64 for c; else 512' -> ({a: 128, b: 128, c: 64}, 512)."""
    by_model, other = {}, None
    for part in text.split("; "):
        if part.startswith("else "):
            other = int(part[5:])
        elif " for " in part:
            size, models = part.split(" for ")
            by_model.update({m.strip(): int(size) for m in models.split(",")})
        else:
            other = int(part)
    return by_model, other


def test_each_height_help_states_the_default_its_command_uses():
    from attnseg.pipeline.models.loading import RANDOM_MODELS, default_size
    from attnseg.pipeline.toy.world import ToyRenderConfig

    heights = _with("--height")
    assert {name for name, _, _ in heights} >= {"attnseg synth", "attnseg engine build",
                                               "attnseg bench throughput",
                                               "attnseg bench quality", "attnseg toy render"}
    for name, parser, action in heights:
        by_model, other = _sizes(_stated_default(action.help))
        if _option(parser, "--model") is not None:  # the model's size: default_size
            for model in (*RANDOM_MODELS, "toy", "runwayml/stable-diffusion-v1-5"):
                assert by_model.get(model, other) == default_size(model), (name, model)
            assert set(by_model) <= {*RANDOM_MODELS, "toy"}, name
        else:  # toy render: its config's
            assert by_model == {} and other == ToyRenderConfig().height, name
        assert "default: as --height's" in _option(parser, "--width").help, name


def test_bench_gpu_takes_phases_not_steps():
    from attnseg.bench.cli import GPU_PHASES
    from attnseg.bench.gpu import PHASES, GpuProofConfig

    parser = dict(_parsers())["attnseg bench gpu"]
    assert _option(parser, "--steps") is None
    phases = _option(parser, "--phases")
    assert "not denoising steps" in phases.help and ", ".join(PHASES) in phases.help
    assert GPU_PHASES == PHASES and GpuProofConfig().phases == PHASES


def test_bench_gpu_refuses_an_unknown_phase(tmp_path, capsys):
    assert main(["bench", "gpu", "--phases", "kernels,nonsense", "--out", str(tmp_path)]) == 2
    assert "unknown phase(s) ['nonsense']" in capsys.readouterr().err


@pytest.mark.parametrize("flags, progress", [([], True), (["--no-progress"], False)])
def test_bench_writing_no_progress_reaches_the_benchmark(tmp_path, monkeypatch, flags, progress):
    seen = []

    def fake(cfg):
        seen.append(cfg)
        md = tmp_path / "w.md"
        md.write_text("table\n")
        return {"files": [str(tmp_path / "w.json"), str(md)]}

    monkeypatch.setattr("attnseg.bench.writing.run_writing_bench", fake)
    assert main(["bench", "writing", *flags, "--out", str(tmp_path / "w")]) == 0
    assert seen[0].progress is progress


def test_every_command_has_a_description():
    missing = [name for name, parser in _parsers() if not parser.description]
    assert missing == []


def test_classes_help_names_every_built_in_class_set():
    from attnseg.pipeline.prompts import CLASS_SETS

    commands = {name: action for name, _, action in _with("--classes") if name != "attnseg train"}
    assert {"attnseg synth", "attnseg prompts", "attnseg bench quality"} <= set(commands)
    for name, action in commands.items():
        for class_set in CLASS_SETS:
            assert class_set in action.help, (name, class_set)


def test_bench_help_names_every_bench():
    parser = build_parser()
    bench = dict(_parsers(parser))["attnseg bench"]
    names = next(a for a in bench._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert len(names) == 9
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    line = next(c.help for c in commands._choices_actions if c.dest == "bench")
    assert line in " ".join(parser.format_help().split())  # what `attnseg --help` shows
    desc = " ".join(bench.description.split())
    for name in names:
        assert re.search(rf"\b{name}\b", line), (name, line)
        assert re.search(rf"\b{name}\b", desc), (name, desc)


@pytest.mark.parametrize("argv, hint", [
    (["synth", "--set", "harvest.stridez=[8]"], "'stridez': did you mean 'strides'?"),
    (["synth", "--set", "harvst.strides=[8]"],
     "unknown config section(s) ['harvst'] ('harvst': did you mean 'harvest'?)"),
    (["synth", "--set", "zzz.strides=[8]"], "unknown config section(s) ['zzz'] (known: harvest, "
     "mask)"),
    (["train", "--data", "x", "--set", "lrr=1"], "'lrr': did you mean 'lr'?"),
    (["train", "--data", "x", "--set", "los.name=ce"], "'los': did you mean 'loss'?"),
    (["train", "--data", "x", "--set", "loss.nme=ce"], "'nme': did you mean 'name'?"),
    (["bench", "quality", "--set", "rea.noise_levels=[0.3]"],
     "unknown bench quality section(s) ['rea'] ('rea': did you mean 'real'?)"),
    (["bench", "quality", "--set", "real.noise_level=[0.3]"],
     "'noise_level': did you mean 'noise_levels'?"),
    (["bench", "throughput", "--set", "repeat=3"], "'repeat': did you mean 'repeats'?"),
    (["toy", "render", "--set", "max_object=2"], "'max_object': did you mean 'max_objects'?"),
    (["engine", "build", "--backend", "compile", "--set", "mask.bg_cons=0.3"],
     "'bg_cons': did you mean 'bg_const'?"),
])
def test_a_set_typo_is_answered_with_the_nearest_name(tmp_path, capsys, argv, hint):
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("attnseg: error: unknown "), err
    assert hint in err, err
    assert not (tmp_path / "out").exists()


def _fake_bar_clock(monkeypatch):
    """tqdm's clock, one second per reading: a run of many updates, at once."""
    import tqdm.std

    now = [0.0]

    def clock():
        now[0] += 1.0
        return now[0]

    monkeypatch.setattr(tqdm.std, "time", clock)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_bar_that_is_not_on_a_terminal_writes_a_few_lines(monkeypatch):
    from attnseg.pipeline.progress import progress_bar

    _fake_bar_clock(monkeypatch)
    log = io.StringIO()  # a log file: not a terminal
    bar = progress_bar(total=300, file=log, desc="train")
    for _ in range(300):  # about 600 s on the fake clock
        bar.update(1)
    bar.close()
    redraws = log.getvalue().count("\r")
    assert 2 <= redraws <= 600 / 30 + 3, redraws
    assert "300/300" in log.getvalue()
    # On a terminal the bar stays live.
    tty = _Terminal()
    bar = progress_bar(total=300, file=tty)
    for _ in range(300):
        bar.update(1)
    bar.close()
    assert tty.getvalue().count("\r") > 100


def test_every_progress_bar_is_made_by_the_helper():
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    allowed = {"pipeline/progress.py"}
    direct = [str(f.relative_to(root)) for folder in ("pipeline", "bench", "engines")
              for f in (root / folder).rglob("*.py")
              if re.search(r"^\s*(from tqdm|import tqdm)", f.read_text(), re.M)
              and str(f.relative_to(root)) not in allowed]
    assert direct == []


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl", "tiny-pixart", "tiny-sd3", "tiny-flux",
                                   "sd15-random", "sdxl-random", "flux-random"])
def test_synth_notes_that_every_built_in_random_model_makes_noise(tmp_path, monkeypatch, capsys,
                                                                  model):
    from attnseg.pipeline.models.loading import RANDOM_MODELS

    assert model in RANDOM_MODELS
    summary = {"images_per_s": 1.0, "shard": "0/1", "samples": 1, "out": str(tmp_path), "new": 1,
               "already_present": 0, "seconds": 1.0, "model": model, "preset": "attnseg",
               "steps": 1, "size": [64, 64], "device": "cpu", "dtype": "fp32",
               "backend": "torch"}
    monkeypatch.setattr("attnseg.pipeline.cli.synth.check_synth_job", lambda cfg: None)
    monkeypatch.setattr("attnseg.pipeline.synth.job.run_synth", lambda cfg, **kw: summary)
    assert main(["synth", "--model", model, "--out", str(tmp_path / "ds"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"note: model {model!r} is one of attnseg's built-in random models: its images are " \
           "noise" in out


def test_no_noise_note_for_a_real_or_the_toy_model():
    from attnseg.pipeline.models.loading import random_model_notice

    for model in ("toy", "runwayml/stable-diffusion-v1-5", "/models/sd15"):
        assert random_model_notice(model) is None
    assert "\n" not in random_model_notice("tiny")
