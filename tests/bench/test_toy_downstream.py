"""`attnseg bench toy-downstream`: the interval, the protocol rule, the arms' pairing and the
resume, end to end through the CLI on the shipped toy model (a few steps: the path, not the
figures)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from attnseg.bench.toy.instrument import interval95
from attnseg.pipeline.cli import main
from attnseg.pipeline.config import get_preset

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_interval95_is_the_t_interval_of_the_mean():
    r = interval95([1.0, 2.0, 3.0])
    assert r["mean"] == 2.0 and r["std"] == 1.0
    half = 4.303 / math.sqrt(3)  # t(0.975, 2 degrees of freedom)
    assert r["ci95"] == pytest.approx([2.0 - half, 2.0 + half])
    five = interval95([0.5, 0.7, 0.6, 0.4, 0.8])
    assert five["ci95"] == pytest.approx([0.6 - 2.776 * five["std"] / math.sqrt(5),
                                          0.6 + 2.776 * five["std"] / math.sqrt(5)])
    assert interval95([0.3, 0.3])["ci95"] == [0.3, 0.3]


ARGS = ["--device", "cpu", "--set",
        'candidates=[["segformer-tiny", 0, 2, 0.002], ["segformer-tiny", 0, 2, 0.05, true]]',
        "--set", "protocol_seeds=[0,1]", "--set", "seeds=[0,1]", "--set", "test_seeds=[7,8]",
        "--set", "test_images=4", "--set", "images=12", "--set", "synth_steps=2", "--set",
        'arms=["exact", "synthetic", "loss:ignore-band", "recipe:daam-bg0.3", "target", '
        '"lora:r2", "renders", "renders:crf"]', "--set", 'presets=["attnseg", "daam"]',
        "--set", "labeller_seeds=[0, 1]",
        "--set", 'recipes=[{"name": "daam-bg0.3", "preset": "daam", "mask": {"bg_const": 0.3}, '
        '"noise": [0.2]}]', "--set",
        'loras=[{"name": "r2", "images": 8, "rank": 2, "steps": 2, "lr": 0.01, "scale": 0.5}]']


def test_instrument_end_to_end_and_resumed(tmp_path, capsys):
    out = tmp_path / "inst"
    assert main(["bench", "toy-downstream", "--out", str(out), *ARGS]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "inst.json").read_text())
    protocol = report["protocol"]
    rows = protocol["candidates"]
    assert len(rows) == 2 and all(len(r["values"]) == 2 for r in rows)
    steady = [r for r in rows if r["std"] <= 0.015]
    best = max(steady, key=lambda r: r["mean"]) if steady else min(rows, key=lambda r: r["std"])
    assert protocol["chosen"] == best["candidate"]
    arms = report["arms"]
    # the default's masks as they were at the run: which way renders:crf switched the CRF
    assert report["default_mask"] == asdict(get_preset("attnseg").mask)
    assert list(arms) == ["exact", "synthetic", "loss:ignore-band", "recipe:daam-bg0.3",
                          "target", "lora:r2", "renders", "renders:crf"]
    # every run's cost is the trainer's own record of it
    assert all(r["train_seconds"] > 0 for r in rows)
    for row in arms.values():
        assert len(row["values"]) == 2 and len(row["by_render"]) == 2
        assert row["train_minutes"] > 0
        for seed in range(2):  # a seed's figure is its mean over the test renders
            assert row["values"][seed] == pytest.approx(
                sum(r["values"][seed] for r in row["by_render"]) / 2)
    gain = arms["loss:ignore-band"]["gain"]
    assert gain["values"] == pytest.approx(
        [a - b for a, b in zip(arms["loss:ignore-band"]["values"], arms["synthetic"]["values"],
                               strict=True)])
    assert "gain" not in arms["exact"] and "gain" not in arms["synthetic"]
    assert "gain" in arms["recipe:daam-bg0.3"]
    _check_recipe_arm(tmp_path / "inst.work")
    _check_judged_masks(arms, protocol["chosen"], tmp_path / "inst.work", printed)
    _check_target_arms(arms, tmp_path / "inst.work", printed)
    _check_renders_arms(arms, tmp_path / "inst.work", printed)
    assert "| loss:ignore-band |" in printed and "Rule: highest mean" in printed
    _check_pseudo_masks(report, tmp_path / "inst.work", printed)
    # A second run reuses every finished training run: same figures, no weights rewritten.
    work = tmp_path / "inst.work"
    weights = {p: p.stat().st_mtime_ns for p in work.rglob("*.safetensors")}
    scored = {p: p.stat().st_mtime_ns for p in (work / "pseudo").iterdir()}
    # 2 presets x CRF on/off x 3 renders (validation, 2 tests) x 2 labeller seeds; the
    # recipe on validation (and on the tests where it is the best there) x 2 labeller seeds
    recipe_renders = 3 if "recipe" in report["pseudo_masks"]["best_on_validation"] else 1
    assert len(scored) == 2 * 2 * 3 * 2 + recipe_renders * 2
    # protocol: 2 candidates x 2 seeds (the chosen one's are the exact arm's); synthetic,
    # loss, recipe, lora and the two renders arms: 2 seeds each (target: the synthetic arm's
    # runs)
    assert len([p for p in weights if p.name == "model.safetensors"]) == 2 * 2 + 6 * 2
    assert main(["bench", "toy-downstream", "--out", str(out), *ARGS]) == 0
    again = json.loads((tmp_path / "inst.json").read_text())
    assert again["arms"] == report["arms"] and again["protocol"] == report["protocol"]
    assert {p: p.stat().st_mtime_ns for p in work.rglob("*.safetensors")} == weights
    assert again["pseudo_masks"] == report["pseudo_masks"]
    assert {p: p.stat().st_mtime_ns for p in (work / "pseudo").iterdir()} == scored


def _check_judged_masks(arms, chosen, work, printed):
    """Each seed's exact-label segmenter scores that seed's training masks of the arms trained
    on generated source-domain images (the loss arm trains on the synthetic arm's masks)."""
    from attnseg.pipeline.train.evaluate import InferenceConfig, evaluate_model
    from attnseg.pipeline.train.sources import open_source
    from attnseg.pipeline.train.trainer import load_model

    judged = [a for a in arms if "training_masks" in arms[a]]
    assert judged == ["synthetic", "loss:ignore-band", "recipe:daam-bg0.3"]
    masks = arms["synthetic"]["training_masks"]
    assert arms["loss:ignore-band"]["training_masks"] == masks
    for seed in (0, 1):
        exact, = work.glob(f"train-exact-12-seed{seed}-*-lr{chosen['lr']:g}*")  # the judge
        data = open_source(next(work.glob(f"synth-2x6-seed{seed}-*")), "synthetic", "train")
        result = evaluate_model(load_model(exact), data, InferenceConfig())
        assert masks["mIoU"]["values"][seed] == pytest.approx(result["mIoU"])
        shapes = [c["acc"] for c in result["per_class"]
                  if c["name"] != "background" and c["acc"] is not None]
        assert masks["precision"]["values"][seed] == pytest.approx(sum(shapes) / len(shapes))
    assert len(list((work / "judged").iterdir())) == 2 * 2  # synthetic's and the recipe's
    assert "| recipe:daam-bg0.3 |" in printed.split("judged by the exact-label segmenter")[1]


def _check_recipe_arm(work):
    """The recipe arm trains on the synthetic arm's images with the recipe's masks: same
    pictures, other labels (daam's maps at a 0.3 threshold, no ignore band)."""
    import numpy as np
    from PIL import Image

    for seed in (0, 1):
        plain = next(work.glob(f"synth-2x6-seed{seed}-*"))
        recipe = next(work.glob(f"synth-recipe-daam-bg0.3-*-2x6-seed{seed}-*"))
        names = sorted(p.name for p in (plain / "JPEGImages").iterdir())
        assert names == sorted(p.name for p in (recipe / "JPEGImages").iterdir())
        same = [np.array_equal(np.asarray(Image.open(plain / "JPEGImages" / n)),
                               np.asarray(Image.open(recipe / "JPEGImages" / n))) for n in names]
        assert all(same)
        masks = sorted(p.name for p in (plain / "SegmentationClass").iterdir())
        assert any(not np.array_equal(np.asarray(Image.open(plain / "SegmentationClass" / n)),
                                      np.asarray(Image.open(recipe / "SegmentationClass" / n)))
                   for n in masks)
        job = json.loads((recipe / "job.json").read_text())
        assert job["preset"] == "daam" and job["mask"]["bg_const"] == 0.3
    assert len(list(work.glob("train-recipe-daam-bg0.3-*-12-seed*"))) == 2


def _check_target_arms(arms, work, printed):
    """`target` scores the synthetic arm's own segmenters on target-domain renders of the test
    seeds; `lora:r2` trains one LoRA on unlabelled target renders, draws the synthetic arm's
    prompts and seeds with it fused at its scale, and is paired by seed with `target`."""
    import numpy as np
    from PIL import Image

    from attnseg.pipeline.train.evaluate import InferenceConfig, evaluate_model
    from attnseg.pipeline.train.sources import open_source
    from attnseg.pipeline.train.trainer import load_model

    assert [arms[a]["test_domain"] for a in arms] == ["source"] * 4 + ["target"] * 2 + [
        "source"] * 2
    for seed in (0, 1):  # target: the synthetic arm's segmenter, scored afresh
        model = load_model(next(work.glob(f"train-synth-12-ce-seed{seed}-*")))
        for r, render in enumerate((7, 8)):
            target = open_source(work / f"target-test-{render}-4", "synthetic", "train")
            assert json.loads((target.root / "job.json").read_text())["render"]["domain"] == \
                "target"
            assert arms["target"]["by_render"][r]["values"][seed] == pytest.approx(
                evaluate_model(model, target, InferenceConfig())["mIoU"])
    lora = arms["lora:r2"]
    assert lora["gain"]["values"] == pytest.approx(
        [a - b for a, b in zip(lora["values"], arms["target"]["values"], strict=True)])
    assert "gain" not in arms["target"]
    assert lora["lora"]["steps"] == 2 and lora["lora"]["images"] == 8
    folders = [p for p in work.glob("lora-*") if p.is_dir()]  # one LoRA for both seeds
    assert len(folders) == 1 and (folders[0] / "pytorch_lora_weights.safetensors").is_file()
    unlabelled = work / "target-unlabelled-8-3000"
    assert json.loads((unlabelled / "job.json").read_text())["render"]["domain"] == "target"
    for seed in (0, 1):
        plain = next(work.glob(f"synth-2x6-seed{seed}-*"))
        adapted = next(work.glob(f"synth-lora-r2-*-2x6-seed{seed}-*"))
        job = json.loads((adapted / "job.json").read_text())
        assert [(Path(x["path"]).name, x["scale"]) for x in job["loras"]] == [
            (folders[0].name, 0.5)]
        names = sorted(p.name for p in (plain / "JPEGImages").iterdir())
        assert names == sorted(p.name for p in (adapted / "JPEGImages").iterdir())
        assert any(not np.array_equal(np.asarray(Image.open(plain / "JPEGImages" / n)),
                                      np.asarray(Image.open(adapted / "JPEGImages" / n)))
                   for n in names)
        prompts = [[json.loads(line)["prompt"] for line in
                    (d / "manifest.jsonl").read_text().splitlines()] for d in (plain, adapted)]
        assert prompts[0] == prompts[1]
    assert "| lora:r2 (target) |" in printed and "LoRA `r2`: rank 2, 2 steps" in printed


def _check_renders_arms(arms, work, printed):
    """`renders` trains on the exact arm's own scenes with the real-image labeller's masks
    (the default preset), `renders:crf` on the same scenes with its CRF switched, paired by
    seed with `renders`."""
    import numpy as np
    from PIL import Image

    def mask(folder, name):
        return np.asarray(Image.open(folder / "SegmentationClass" / name))

    crf = arms["renders:crf"]
    assert crf["gain"]["values"] == pytest.approx(
        [a - b for a, b in zip(crf["values"], arms["renders"]["values"], strict=True)])
    assert "gain" not in arms["renders"] and "training_masks" not in crf
    # renders:crf switches the default preset's CRF (on: 10 iterations, the config's; off: 0);
    # each folder is named by the labeller's harvest and mask settings and its noise
    from attnseg.bench.toy.instrument import masks_tag

    preset = get_preset("attnseg", 4)  # the toy model's latent stride
    switched = replace(preset.mask, crf_iterations=0 if preset.mask.crf_iterations else 10)
    tags = [masks_tag(replace(preset, mask=mask), (0.1,)) for mask in (preset.mask, switched)]
    for seed in (0, 1):
        exact = work / f"exact-12-seed{2000 + seed}"
        default, refined = (next(work.glob(f"relabelled-{tag}-12-seed{2000 + seed}-*"))
                            for tag in tags)
        assert json.loads((refined / "job.json").read_text())["preset"] == tags[1]
        names = sorted(p.name for p in (exact / "JPEGImages").glob("*.jpg"))
        assert len(names) == 12
        for folder in (default, refined):
            assert names == sorted(p.name for p in (folder / "JPEGImages").iterdir())
            assert all((folder / "JPEGImages" / n).read_bytes() ==
                       (exact / "JPEGImages" / n).read_bytes() for n in names)
        masks = [n.replace(".jpg", ".png") for n in names]
        assert any(not np.array_equal(mask(default, n), mask(exact, n)) for n in masks)
        assert any(not np.array_equal(mask(default, n), mask(refined, n)) for n in masks)
    assert len(list(work.glob(f"train-relabelled-{tags[1]}-12-ce-seed*"))) == 2
    assert "| renders:crf |" in printed and "against `renders`" in printed
    for arm in ("renders", "renders:crf"):  # their masks against the exact labels
        assert 0 < arms[arm]["masks_vs_exact"]["mIoU"]["mean"] < 1, arm
    assert "### The masks each `renders` arm trains on, against the exact labels" in printed
    assert "default preset's masks: its dense CRF " in printed


def test_a_lora_is_named_by_its_settings_and_the_model():
    """An edited LoRA is not taken for its old files: its scale names the synthesis only,
    its training settings and the model name its folder; lr=1 reads as lr=1.0 does."""
    from attnseg.bench.toy.instrument import LoraArm, ToyDownstreamConfig

    cfg = ToyDownstreamConfig()
    base = LoraArm(name="a", lr=1)
    folder = Path(base.training_config(cfg, Path("w"), "m1").out)
    assert base.digest() == LoraArm(name="b", lr=1.0).digest()  # the name is only a label
    scaled = LoraArm(name="a", lr=1, scale=0.5)
    assert Path(scaled.training_config(cfg, Path("w"), "m1").out) == folder
    assert scaled.digest() != base.digest()
    for other in (LoraArm(name="a", lr=1, rank=4), LoraArm(name="a", lr=1, render_seed=1),
                  LoraArm(name="a", lr=1, targets=("to_q",))):
        assert Path(other.training_config(cfg, Path("w"), "m1").out) != folder
    assert Path(base.training_config(cfg, Path("w"), "m2").out) != folder


def _check_pseudo_masks(report, work, printed):
    """Each preset as published and with its CRF switched; a render's figure is the mean over
    the labeller's seeds, the test figure the mean over the renders; the best recipe is the
    best on validation; one stored score recomputed from scratch agrees."""
    from attnseg.bench.toy.instrument import ToyDownstreamConfig, _bench_config
    from attnseg.bench.toy.pseudo_masks import _pseudo_scores
    from attnseg.pipeline.models.loading import load_pipeline
    from attnseg.pipeline.prompts import load_classes
    from attnseg.pipeline.train.sources import open_source

    pm = report["pseudo_masks"]
    recipes = pm["recipes"]
    own = get_preset("attnseg").mask.crf_iterations  # the default's CRF, then switched
    assert [(r["preset"], r["crf_iterations"], r["published"]) for r in recipes] == [
        ("attnseg", own, True), ("attnseg", 0 if own else 10, False), ("daam", 0, True),
        ("daam", 10, False)]
    for r in recipes:
        assert len(r["per_render"]) == 2
        assert r["test"]["mean"] == pytest.approx(
            sum(x["mIoU"] for x in r["per_render"]) / 2)
    tried = pm["tried_on_validation"]
    assert [(r["name"], r["preset"], r["mask"], r["noise"]) for r in tried] == [
        ("daam-bg0.3", "daam", {"bg_const": 0.3}, [0.2])]
    best = max(recipes + tried, key=lambda r: r["validation"])
    assert pm["best_on_validation"] == ({"recipe": best["name"]} if "name" in best else {
        "preset": best["preset"], "crf_iterations": best["crf_iterations"]})
    assert ("test" in tried[0]) == (best is tried[0])
    stored = [json.loads(p.read_text())["mIoU"] for p in sorted((work / "pseudo").glob(
        "*-daam-crf10-noise0.1-test-8-4-seed*.json"))]
    assert len(stored) == 2 and recipes[3]["per_render"][1]["mIoU"] == pytest.approx(
        sum(stored) / 2)
    pipe = load_pipeline("toy", torch.device("cpu"), torch.float32)
    cfg = ToyDownstreamConfig(size=64, test_images=4, candidates=[["segformer-tiny", 0, 2, 0.002]])
    fresh = _pseudo_scores(pipe, "daam", (0.1,), _bench_config(cfg, cfg.candidates[0]), 1,
                           open_source(work / "test-8-4", "synthetic", "train"),
                           load_classes("toy"), crf=10)["mIoU"]
    assert fresh == pytest.approx(stored[1])
    # The recipe: its preset with its override and its own noise level, scored afresh.
    from attnseg.pipeline.config import preset_with_overrides

    recipe_preset = preset_with_overrides("daam", {"mask": {"bg_const": 0.3}},
                                          pipe.vae_scale_factor)
    val = open_source(work / "val-101-4", "synthetic", "train")
    fresh = [_pseudo_scores(pipe, recipe_preset, (0.2,), _bench_config(cfg, cfg.candidates[0]),
                            s, val, load_classes("toy"))["mIoU"] for s in (0, 1)]
    assert tried[0]["validation"] == pytest.approx(sum(fresh) / 2)
    assert "| daam-bg0.3 | `daam` | `mask.bg_const=0.3` | 0.2 |" in printed
    loc = pm["localisation"]["word_peaks_on_own_object"]
    assert len(loc["values"]) == 2
    assert "## Pseudo-masks" in printed and "`daam` | 10 it. (switched)" in printed


@pytest.mark.parametrize("recipe_wins", [True, False])
def test_the_best_on_validation_and_only_it_is_scored_on_the_tests(monkeypatch, recipe_wins):
    """Presets and recipes compete on validation; a winning recipe alone among the recipes is
    scored on each test render (mean over the labeller's seeds, then over the renders)."""
    from dataclasses import asdict
    from pathlib import Path

    from attnseg.bench.toy import instrument
    from attnseg.bench.toy import pseudo_masks as pseudo_module

    scored = []

    def preset_row(cfg, pipe, work, preset, crf, source, render, seed):
        return {"mIoU": 0.7 if recipe_wins else 0.9, "foreground_iou": 0.6,
                "class_accuracy_on_foreground": 0.7}

    def recipe_row(cfg, pipe, work, recipe, source, render, seed):
        scored.append((recipe.name, render))
        value = {"good": 0.8, "bad": 0.1}[recipe.name] + (0.01 * seed if "test-7" in render
                                                          else 0.0)
        return {"mIoU": value, "foreground_iou": None, "class_accuracy_on_foreground": 0.9}

    monkeypatch.setattr(instrument, "_pseudo_row", preset_row)
    monkeypatch.setattr(instrument, "_recipe_row", recipe_row)
    monkeypatch.setattr(pseudo_module, "two_object_localisation", lambda *a, **k: {
        "word_peaks_on_own_object": 0.5, "both_words": 0.25})
    cfg = instrument.ToyDownstreamConfig(
        presets=("daam",), test_seeds=(7, 8), test_images=4, labeller_seeds=(0, 2),
        recipes=(instrument.Recipe(name="bad"),
                 instrument.Recipe(name="good", preset="daam", mask={"bg_const": 0.3})))
    out = instrument.pseudo_masks(cfg, None, Path("unused"), "val", ["t7", "t8"])
    bad, good = out["tried_on_validation"]
    assert "test" not in bad
    assert good["mask"] == {"bg_const": 0.3} and good["noise"] == [0.1]
    if recipe_wins:
        assert out["best_on_validation"] == {"recipe": "good"}
        # test-7: seeds 0 and 2 give 0.80 and 0.82 (mean 0.81); test-8: 0.80
        assert [r["mIoU"] for r in good["per_render"]] == pytest.approx([0.81, 0.80])
        assert good["test"]["mean"] == pytest.approx(0.805)
        assert sorted(set(scored)) == [("bad", "val-101-4"), ("good", "test-7-4"),
                                       ("good", "test-8-4"), ("good", "val-101-4")]
        markdown = "\n".join(instrument._pseudo_markdown(out, asdict(cfg)))
        assert "| good | `daam` | `mask.bg_const=0.3` | 0.1 | 80.0 | — | 90.0 | 80.5 ± 0.7 " \
               "(81.0, 80.0) |" in markdown
        assert "Best on validation: the recipe `good`" in markdown
    else:
        assert out["best_on_validation"] == {"preset": "daam", "crf_iterations": 0}
        assert "test" not in good and {r for _, r in scored} == {"val-101-4"}


def test_arms_on_a_prompt_arm_share_its_data_and_runs(tmp_path):
    """With `synthetic_prompts`, every arm on generated images draws that prompt arm's prompts
    (the crf arm the same pictures, its masks refined); the synthetic arm is the prompt arm's
    own data and CE run, a loss arm a run of its own on them; with "plain" the folders keep
    their names (work folders made before the choice are reused)."""
    import numpy as np
    from PIL import Image

    from attnseg.bench.toy.instrument import ToyDownstreamConfig, _arm_runs
    from attnseg.pipeline.jsonfile import read_json
    from attnseg.pipeline.models.loading import load_pipeline

    pipe = load_pipeline("toy", torch.device("cpu"), torch.float32)
    cand = ("segformer-tiny", 0, 2, 0.01, False)
    base = dict(images=12, synth_steps=1, seeds=(0, 1), test_seeds=(7,), test_images=2)
    several = ToyDownstreamConfig(**base, synthetic_prompts="several-classes")
    synthetic = _arm_runs(several, "synthetic", cand, pipe, tmp_path, 0)
    assert synthetic == _arm_runs(several, "prompts:several-classes", cand, pipe, tmp_path, 0)
    data, run, loss = _arm_runs(several, "loss:ignore-band", cand, pipe, tmp_path, 0)
    assert data == synthetic[0] and run != synthetic[1] and loss == "ignore-band"
    assert _arm_runs(several, "target", cand, pipe, tmp_path, 0) == synthetic
    crf, crf_run, _ = _arm_runs(several, "crf", cand, pipe, tmp_path, 0)
    prompts = read_json(synthetic[0] / "job.json")["prompts"]
    assert "prompts-several-classes-2-" in prompts
    assert read_json(crf / "job.json")["prompts"] == prompts
    assert crf.name.startswith("synth-several-classes-") and crf_run.name.startswith(
        "train-several-classes-")
    names = sorted(p.name for p in (crf / "JPEGImages").iterdir())
    assert len(names) == 12 and names == sorted(
        p.name for p in (synthetic[0] / "JPEGImages").iterdir())
    assert all(np.array_equal(np.asarray(Image.open(crf / "JPEGImages" / n)),
                              np.asarray(Image.open(synthetic[0] / "JPEGImages" / n)))
               for n in names)
    plain = ToyDownstreamConfig(**base)
    folders = {arm: _arm_runs(plain, arm, cand, pipe, tmp_path / "plain", 1)[:2]
               for arm in ("synthetic", "loss:ignore-band")}
    assert folders["synthetic"][0].name.startswith("synth-2x6-seed1-")
    assert folders["synthetic"][1].name.startswith("train-synth-12-ce-seed1-")
    assert folders["loss:ignore-band"][1].name.startswith("train-synth-12-ignore-band-seed1-")
    assert read_json(folders["synthetic"][0] / "job.json")["prompts"] is None


def test_renders_recipe_and_loss_arms(tmp_path):
    """`renders:recipe:NAME` labels the exact arm's scenes with the recipe (its own labeller
    noise, its folder named by its settings), `renders:loss:NAME` trains with the loss on the
    `renders` arm's own data."""
    import numpy as np
    from PIL import Image

    from attnseg.bench.toy.instrument import (
        Recipe,
        ToyDownstreamConfig,
        _arm_runs,
        compare_training_masks,
    )
    from attnseg.pipeline.models.loading import load_pipeline

    pipe = load_pipeline("toy", torch.device("cpu"), torch.float32)
    cand = ("segformer-tiny", 0, 2, 0.01, False)
    recipe = Recipe(name="daam-bg0.3", preset="daam", mask={"bg_const": 0.3}, noise=(0.2,))
    cfg = ToyDownstreamConfig(images=12, seeds=(0, 1), test_seeds=(7,), test_images=2,
                              presets=("daam",), recipes=(recipe,))
    # a recipe an arm names needs no presets (it is not scored beside them)
    ToyDownstreamConfig(arms=("renders", "renders:recipe:daam-bg0.3"), recipes=(recipe,)
                        ).validate()
    default, run, loss = _arm_runs(cfg, "renders", cand, pipe, tmp_path, 1)
    assert loss == "ce" and re.fullmatch(
        r"train-relabelled-[0-9a-f]{12}-noise0\.1-12-ce-seed1-.*", run.name)
    data, band_run, band = _arm_runs(cfg, "renders:loss:ignore-band", cand, pipe, tmp_path, 1)
    assert data == default and band == "ignore-band" and band_run != run
    assert band_run.name == run.name.replace("-ce-seed1-", "-ignore-band-seed1-")
    # the masks against the exact labels of the same scenes, counted here pixel by pixel
    compared = compare_training_masks(default, tmp_path)
    exact = tmp_path / "exact-12-seed2001"
    classes = len(json.loads((exact / "classes.json").read_text()))
    pred, gold, rel = (np.stack([np.asarray(Image.open(p)) for p in sorted(
        (folder / sub).glob("*.png"))]) for folder, sub in (
        (default, "SegmentationClass"), (exact, "SegmentationClass"), (default, "Reliability")))
    keep = pred != 255
    valid = keep & (gold != 255)
    ious = [((pred == c) & (gold == c) & valid).sum() / union for c in range(classes)
            if (union := (((pred == c) | (gold == c)) & valid).sum())]
    assert compared["mIoU"] == pytest.approx(np.mean(ious))
    assert compared["labelled"] == pytest.approx(keep.mean()) and 0 < keep.mean() < 1
    assert compared["reliability_mean"] == pytest.approx((rel[keep] / 255).mean(), abs=1e-6)
    assert compared["below_band"] == pytest.approx((rel[keep] / 255 < 0.2).mean())
    assert compare_training_masks(default, tmp_path) == compared  # kept in work/compared
    assert len(list((tmp_path / "compared").iterdir())) == 1
    relabelled, recipe_run, loss = _arm_runs(cfg, "renders:recipe:daam-bg0.3", cand, pipe,
                                             tmp_path, 1)
    assert re.fullmatch(r"relabelled-[0-9a-f]{12}-noise0\.2-12-seed2001-.*",
                        relabelled.name) and loss == "ce"
    assert recipe_run.name == relabelled.name.replace("relabelled-", "train-relabelled-", 1) \
        .replace("-12-seed2001-", "-12-ce-seed1-")
    names = sorted(p.name for p in (exact / "JPEGImages").glob("*.jpg"))
    assert names == sorted(p.name for p in (relabelled / "JPEGImages").iterdir())
    masks = [n.replace(".jpg", ".png") for n in names]
    assert any(not np.array_equal(np.asarray(Image.open(default / "SegmentationClass" / n)),
                                  np.asarray(Image.open(relabelled / "SegmentationClass" / n)))
               for n in masks)
    # an edited recipe labels again, into a folder of its own
    edited = ToyDownstreamConfig(images=12, seeds=(0, 1), test_seeds=(7,), test_images=2,
                                 presets=("daam",), recipes=(Recipe(
                                     name="daam-bg0.3", preset="daam", mask={"bg_const": 0.4},
                                     noise=(0.2,)),))
    assert _arm_runs(edited, "renders:recipe:daam-bg0.3", cand, pipe, tmp_path, 1)[0] != \
        relabelled
    # a recipe that resolves to the default's masks is the default's folder and run: folders
    # are named by what makes the masks, not by the recipe's or preset's name
    same = ToyDownstreamConfig(images=12, seeds=(0, 1), test_seeds=(7,), test_images=2,
                               presets=("daam",), recipes=(Recipe(
                                   name="as-default", preset="attnseg", mask={}),))
    assert _arm_runs(same, "renders:recipe:as-default", cand, pipe, tmp_path, 1) == \
        (default, run, "ce")


def test_a_fixed_protocol_trains_nothing_on_validation(tmp_path):
    """One candidate and no protocol seeds: the candidate is the protocol, no run is trained
    on the validation render, and the arms are trained and reported as with a chosen one."""
    out = tmp_path / "fixed"
    assert main(["bench", "toy-downstream", "--out", str(out), "--device", "cpu",
                 "--set", 'candidates=[["segformer-tiny", 0, 2, 0.01]]',
                 "--set", "protocol_seeds=[]", "--set", "seeds=[0,1]",
                 "--set", "test_seeds=[7]", "--set", "test_images=2", "--set", "images=12",
                 "--set", 'arms=["renders", "renders:crf"]']) == 0
    report = json.loads((tmp_path / "fixed.json").read_text())
    assert report["protocol"]["candidates"] == [] and report["protocol"]["seeds"] == []
    assert report["protocol"]["chosen"] == {"model": "segformer-tiny", "input_side": 0,
                                            "steps": 2, "lr": 0.01, "full_res_head": False}
    work = tmp_path / "fixed.work"
    assert not list(work.glob("train-exact-*"))  # the validation runs are the exact arm's
    assert sorted(report["arms"]) == ["renders", "renders:crf"]
    assert len(report["arms"]["renders:crf"]["gain"]["values"]) == 2
    md = (tmp_path / "fixed.md").read_text()
    assert "fixed by the settings" in md and "| candidate |" not in md


def test_an_images_arm_has_the_bound_at_its_count_beside_it(tmp_path):
    """`images:N` trains on N generated images (the synthetic arm's prompts, fewer per class),
    is paired by seed with `synthetic`, and has the exact arm at N beside it: the segmenter
    trained on N exact-label renders of the exact arm's seeds, scored on the same tests."""
    from attnseg.bench.common import pct
    from attnseg.pipeline.train.evaluate import InferenceConfig, evaluate_model
    from attnseg.pipeline.train.sources import open_source
    from attnseg.pipeline.train.trainer import load_model

    out = tmp_path / "scaling"
    assert main(["bench", "toy-downstream", "--out", str(out), "--device", "cpu",
                 "--set", 'candidates=[["segformer-tiny", 0, 2, 0.01]]',
                 "--set", "protocol_seeds=[]", "--set", "seeds=[0,1]", "--set", "synth_steps=1",
                 "--set", "test_seeds=[7]", "--set", "test_images=2", "--set", "images=12",
                 "--set", 'arms=["synthetic", "images:6"]']) == 0
    report = json.loads((tmp_path / "scaling.json").read_text())
    arms, work = report["arms"], tmp_path / "scaling.work"
    fewer = arms["images:6"]
    assert fewer["gain"]["values"] == pytest.approx(
        [a - b for a, b in zip(fewer["values"], arms["synthetic"]["values"], strict=True)])
    assert "exact" not in arms["synthetic"]
    test = open_source(work / "test-7-2", "synthetic", "train")
    for seed in (0, 1):
        data = next(work.glob(f"synth-1x6-seed{seed}-*"))
        assert len(list((data / "JPEGImages").iterdir())) == 6
        run, = work.glob(f"train-synth-6-ce-seed{seed}-*")
        assert json.loads((run / "run.json").read_text())["config"]["data"] == [str(data)]
        assert fewer["values"][seed] == pytest.approx(
            evaluate_model(load_model(run), test, InferenceConfig())["mIoU"])
        exact = work / f"exact-6-seed{2000 + seed}"
        assert len(list((exact / "JPEGImages").glob("*.jpg"))) == 6
        bound_run, = work.glob(f"train-exact-6-seed{seed}-*")
        assert json.loads((bound_run / "run.json").read_text())["config"]["data"] == [str(exact)]
        assert fewer["exact"]["values"][seed] == pytest.approx(
            evaluate_model(load_model(bound_run), test, InferenceConfig())["mIoU"])
    md = (tmp_path / "scaling.md").read_text()
    bound = md.split("### The exact-label bound at each `images:N` arm's count")[1]
    exact = fewer["exact"]
    share = sum(v / b for v, b in zip(fewer["values"], exact["values"], strict=True)) / 2
    assert (f"| images:6 | {pct(fewer['mean'])} | {pct(exact['mean'])} | {pct(exact['std'])} | "
            f"{pct(share)} | {pct(exact['values'][0])}, {pct(exact['values'][1])} |") in bound


def test_a_run_folder_holding_another_run_is_refused(tmp_path, capsys):
    """A finished run is reused only when it was trained with these settings: the two arms'
    runs of a seed swapped by hand (each trained on the other's masks) are refused in one
    line, not scored as each other."""
    args = ["bench", "toy-downstream", "--out", str(tmp_path / "r"), "--device", "cpu",
            "--set", 'candidates=[["segformer-tiny", 0, 2, 0.01]]', "--set", "protocol_seeds=[]",
            "--set", "seeds=[0,1]", "--set", "test_seeds=[7]", "--set", "test_images=2",
            "--set", "images=12", "--set", 'arms=["renders", "renders:crf"]']
    assert main(args) == 0
    first = json.loads((tmp_path / "r.json").read_text())["arms"]
    runs = sorted((tmp_path / "r.work").glob("train-relabelled-*-seed0-*"))
    assert len(runs) == 2
    runs[0].rename(tmp_path / "swap")
    runs[1].rename(runs[0])
    (tmp_path / "swap").rename(runs[1])
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "holds a different run" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert json.loads((tmp_path / "r.json").read_text())["arms"] == first  # not rewritten


def test_bad_arms_and_renders_are_one_line(tmp_path, capsys):
    daam = 'presets=["daam"]'
    for settings, words in (
            (['arms=["crf:3"]'], "unknown arm"),
            (['arms=["images:2"]'], "a multiple of 6"),
            (['arms=["images:10"]'], "a multiple of 6"),
            (['arms=["loss:nope"]'], "loss"),
            (['synthetic_prompts="many"'], "unknown synthetic_prompts"),
            (['arms=["renders:crf"]'], "paired with arm renders"),
            (['arms=["renders:"]'], "unknown arm"),
            (['arms=["synthetic:"]'], "unknown arm"),
            (['arms=["renders", "renders:recipe:"]'], "the renders arms are"),
            (['arms=["renders", "renders:recipe:x"]'], "no recipe named 'x'"),
            (['arms=["renders", "renders:loss:nope"]'], "loss"),
            (['arms=["renders"]', "labeller_noise=[]"], "labeller_noise must not be empty"),
            (['arms=["renders"]', "labeller_noise=[1.0]"], "noise levels [1.0]"),
            (['arms=["renders", "renders:blur"]'], "the renders arms are"),
            (['arms=["renders", "renders:crf:3"]'], "the renders arms are"),
            (['arms=["renders", "renders:loss"]'], "the renders arms are"),
            (['arms=["prompts:augmented"]', 'synthetic_prompts="augmented"'],
             "the synthetic arm itself"),
            (["test_seeds=[101]"], "must not include val_seed"),
            (["seeds=[0]"], "at least two"),
            (["protocol_seeds=[0]"], "protocol_seeds needs at least two"),
            (['candidates=[["segformer-tiny", 0, 2, 0.01], ["segformer-tiny", 0, 4, 0.01]]',
              "protocol_seeds=[]"], "or none with a single candidate"),
            (['presets=["nope"]'], "unknown preset"),
            ([daam, "labeller_noise=[1.0]"], "noise levels [1.0]"),
            (['recipes=[{"name": "a b"}]'], "recipe name"),
            (['recipes=[{"preset": "daam"}]'], "needs a name"),
            (['recipes=[{"name": "x", "mask": {"bg": 0.3}}]'], "unknown mask"),
            (['recipes=[{"name": "x", "noise": [1.0]}]'], "noise levels [1.0]"),
            (['recipes=[{"name": "x"}, {"name": "x"}]'], "must differ"),
            (['recipes=[{"name": "x", "size": 3}]'], "unknown recipes"),
            (['recipes=[{"name": "x"}]'], "give presets too"),
            # stride 4 is the toy model's first level (its latent stride), so it is accepted
            (['recipes=[{"name": "x", "harvest": {"strides": [4]}}]'], "give presets too"),
            (['arms=["recipe:nope"]'], "no recipe named"),
            (['arms=["lora"]'], "unknown arm"),
            (['arms=["lora:r"]', 'loras=[{"name": "r"}]'], "paired with arm target"),
            (['arms=["target", "lora:x"]', 'loras=[{"name": "r"}]'], "no LoRA named 'x'"),
            (['loras=[{"name": "r", "rank": 0}]'], "rank"),
            (['loras=[{"name": "r", "steps": 0}]'], "steps"),
            (['loras=[{"name": "r", "targets": []}]'], "LoRA 'r': targets"),
            (['loras=[{"name": "r", "noise_offset": 2.0}]'], "noise_offset"),
            (['loras=[{"name": "r", "render_seed": 103}]'], "learn the scenes it is scored on"),
            # a layer the model lacks is refused before any render or training
            (['arms=["target", "lora:r"]', 'loras=[{"name": "r", "targets": ["to_qq"]}]'],
             "LoRA 'r': --target-modules ['to_qq'] match no"),
            (['loras=[{"name": "r", "scale": 0}]'], "scale"),
            (['loras=[{"name": "r"}, {"name": "r"}]'], "must differ"),
            (['loras=[{"rank": 4}]'], "every LoRA needs a name"),
            (['loras=[{"name": "r", "size": 3}]'], "unknown loras"),
            # a head the model lacks is refused before any render or training
            ([daam, 'recipes=[{"name": "h", "harvest": {"heads": {"nope": [0]}}}]'],
             "recipe 'h': harvest heads name")):
        args = [x for setting in settings for x in ("--set", setting)]
        assert main(["bench", "toy-downstream", "--out", str(tmp_path / "x"), *args]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "x.work").exists()

