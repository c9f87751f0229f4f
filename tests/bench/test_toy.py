"""`attnseg bench toy`: the trivial baselines against hand-made scenes, and the benchmark end to
end through the CLI (on the random tiny model: the path, not the figures)."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from attnseg.bench.toy.pseudo_masks import caption_errors, colour_threshold_labels
from attnseg.pipeline.cli import main
from attnseg.pipeline.config import get_preset


def test_colour_threshold_baseline_on_a_plain_scene():
    img = np.full((32, 32, 3), 90, np.uint8)
    img[2:12, 2:12] = (250, 20, 20)  # 100 px
    img[20:26, 20:26] = (20, 20, 250)  # 36 px
    one = colour_threshold_labels(img, [3], threshold=50)
    assert (one[2:12, 2:12] == 3).all() and (one[20:26, 20:26] == 3).all()
    assert (one == 3).sum() == 136
    two = colour_threshold_labels(img, [5, 1], threshold=50)
    assert (two[2:12, 2:12] == 5).all() and (two[20:26, 20:26] == 1).all()  # largest first
    assert (colour_threshold_labels(img, [], 50) == 0).all()
    assert (colour_threshold_labels(img, [3], 400) == 0).all()


def test_caption_errors_batch_equals_one_call_per_caption_level_and_draw():
    from attnseg.pipeline.models.loading import load_pipeline

    pipe = load_pipeline("tiny", torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    texts = torch.cat([pipe.encode_prompt(t, "cpu", 1, False)[0]
                       for t in ("a photo of a dog", "a photo of a cat", "a photo of a bus")])
    levels, draws = (0.3, 0.7), 2
    got = caption_errors(pipe, latents, texts, levels, draws, torch.Generator().manual_seed(1))
    # The plain path: the same noise draws in the same order, one UNet call each.
    noise = torch.randn((len(levels) * draws, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    steps = pipe.scheduler.config.num_train_timesteps
    want = torch.zeros(3, 8, 8)
    with torch.no_grad():
        for k in range(3):
            for j, level in enumerate(v for v in levels for _ in range(draws)):
                t = torch.tensor([int(level * (steps - 1))])
                noisy = pipe.scheduler.add_noise(latents, noise[j:j + 1], t)
                pred = pipe.unet(noisy, t, encoder_hidden_states=texts[k:k + 1]).sample
                want[k] += (pred - noise[j:j + 1]).pow(2).sum(1)[0]
    assert got.shape == (3, 8, 8)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got[0], got[1])  # the captions matter


def _fingerprint(model: str) -> str:
    from attnseg.pipeline.models.loading import load_pipeline, model_fingerprint

    return model_fingerprint(load_pipeline(model, torch.device("cpu"), torch.float32))


def test_bench_toy_cli_end_to_end(tmp_path, capsys, torch_one_thread):
    out = tmp_path / "toy"
    rc = main(["bench", "toy", "--model", "tiny", "--out", str(out), "--no-progress",
               "--set", "num_images=6", "--set", "seeds=[0,1]",
               "--set", "presets=[\"attnseg\",\"daam\"]",
               "--set", "noise_candidates=[[0.2],[0.5]]", "--set", "thresholds=[40,80]",
               "--set", "bg_candidates=[0.3,0.6]",
               "--set", "layer_candidates=[[[8],[\"up\"]],[[8,16],[\"down\"]]]",
               "--set", "head_candidates=2",
               "--set", "downstream_images=12",
               "--set", "train_candidates=[[4,0.002],[2,0.008],[2,0.008,96]]",
               "--set", "synth_steps=2",
               "--set", "crf_iterations=1",
               "--set", "crf_cost_size=24", "--set", "losses=[\"ignore-band\"]",
               "--set", "lora_images=8", "--set", "lora_steps=2",
               "--set", "lora_targets=[\"to_k\",\"to_v\",\"conv1\"]",
               "--set", "lora_noise_offset=0.2", "--set", "lora_scale=0.5",
               "--set", "scaling_images=[18]"])
    assert rc == 0
    report = json.loads((tmp_path / "toy.json").read_text())
    assert set(report["pseudo_masks"]) == {"attnseg", "daam"}
    for r in report["pseudo_masks"].values():
        assert len(r["values"]) == 2 and all(0.0 <= v <= 1.0 for v in r["values"])
        assert 0.0 <= r["foreground_iou"] <= 1.0
    assert "| class accuracy on foreground |" in (tmp_path / "toy.md").read_text()
    assert report["labeller"]["chosen"] in ([0.2], [0.5])
    assert report["baselines"]["colour_threshold_tuned"]["threshold"] in (40, 80)
    assert 0.0 <= report["baselines"]["all_background"] < 0.5
    assert report["tuned_threshold"]["bg_const"] in (0.3, 0.6)
    # Localisation at the layer choice that localises best on validation.
    by_layers = report["localisation_by_layers"]
    val_loc = by_layers["val_localisation"]
    assert set(val_loc) == {"up at stride 8", "down at stride 8,16"}
    assert val_loc[by_layers["chosen"]] == max(val_loc.values())
    assert len(by_layers["test_mIoU"]["values"]) == 2
    # And from the heads that localise best on validation: every head of the model ranked
    # alone, then the best k together (k = 1, 2), the k chosen on validation.
    by_heads = report["localisation_by_heads"]
    alone = [r["localisation"] for r in by_heads["val_alone"]]
    assert len(alone) == 80 and alone == sorted(alone, reverse=True)  # tiny: 10 layers x 8
    by_k = by_heads["val_by_count"]
    assert set(by_k) == {"1", "2"} and by_k[str(by_heads["chosen"])] == max(by_k.values())
    assert sum(len(h) for h in by_heads["heads"].values()) == by_heads["chosen"]
    first = by_heads["val_alone"][0]
    assert first["head"] in by_heads["heads"][first["layer"]]
    assert len(by_heads["test_by_seed"]["values"]) == len(by_heads["test_mIoU"]["values"]) == 2
    assert by_heads["test"]["word_peaks_on_own_object"] == by_heads["test_by_seed"]["values"][0]
    assert "As a setting: `--set 'harvest.heads={" in (tmp_path / "toy.md").read_text()
    for r in report["crf"]["by_preset"].values():
        assert 0.0 <= r["with"]["mean"] <= 1.0 and 0.0 <= r["without"]["mean"] <= 1.0
    assert all(c["lattice_seconds_per_image"] > 0 for c in report["crf"]["cost"])
    assert [c["size"] for c in report["crf"]["cost"]] == [64, 24]
    # Which object is which: over the test scenes with two or more classes, pixel-weighted.
    w, multi, chance, pixels = report["which_object"], 0, 0.0, 0
    for png in sorted((tmp_path / "toy.work" / "test-102" / "SegmentationClass").glob("*.png")):
        label = np.array(Image.open(png))
        k, fg = len(set(np.unique(label).tolist()) - {0, 255}), int((label > 0).sum())
        if k >= 2:
            multi, chance, pixels = multi + 1, chance + fg / k, pixels + fg
    assert multi >= 1 and w["scenes"] == multi
    assert abs(w["chance"] - chance / pixels) < 1e-9
    assert 0.0 <= w["attention"] <= 1.0 and 0.0 <= w["denoising_error"] <= 1.0
    assert "Which object is which" in (tmp_path / "toy.md").read_text()
    # The training protocol is chosen on the validation set; every row then uses it.
    protocol = report["protocol"]
    val = {(r["steps"], r["lr"], r["size"]): r["mIoU"] for r in protocol["val_mIoU"]}
    assert set(val) == {(4, 0.002, 64), (2, 0.008, 64), (2, 0.008, 96)}
    chosen = tuple(protocol["chosen"][k] for k in ("steps", "lr", "size"))
    assert val[chosen] == max(val.values())
    d = report["downstream"]
    assert (d["train_steps"], d["train_lr"], d["train_size"]) == chosen
    work = tmp_path / "toy.work"
    run = work / f"train-synth-seed0-{_fingerprint('tiny')}-2s-lr0.008"
    assert run.is_dir()
    # The input-size candidate trains on crops resized to its side, in its own run folder.
    resized = json.loads((run.with_name(run.name + "-96px") / "run.json").read_text())
    assert resized["config"]["augment"]["crop_size"] == [96, 96]
    assert resized["config"]["augment"]["base_scale"] == [96, 96]
    assert d["images"] == 12 and len(d["synthetic"]["values"]) == 2
    assert all(0.0 <= v <= 1.0 for v in d["synthetic"]["values"] + d["exact_labels"]["values"])
    # The exact-label renders relabelled by the labeller: same image files, the labeller's
    # masks (at the chosen noise levels) in place of the exact ones.
    assert len(d["rendered_pseudo_masks"]["values"]) == 2
    exact = work / "exact-12-seed2000"
    relabelled = next(work.glob("relabelled-12-seed2000-*"))
    assert json.loads((relabelled / "job.json").read_text())["noise_levels"] == \
        report["labeller"]["chosen"]
    names = sorted(p.name for p in (exact / "JPEGImages").glob("*.jpg"))
    assert names == sorted(p.name for p in (relabelled / "JPEGImages").glob("*.jpg"))
    assert all((exact / "JPEGImages" / n).read_bytes() ==
               (relabelled / "JPEGImages" / n).read_bytes() for n in names)
    assert any(not np.array_equal(
        np.array(Image.open(exact / "SegmentationClass" / n.replace(".jpg", ".png"))),
        np.array(Image.open(relabelled / "SegmentationClass" / n.replace(".jpg", ".png"))))
        for n in names)
    a = report["ablations"]
    # Paired by seed: each gain is the variant's score minus CE's on the same seed.
    for r in [a["losses"]["ignore-band"], *a["prompts"].values(), a["lora"]["with_lora"]]:
        assert len(r["values"]) == 2 and all(0.0 <= v <= 1.0 for v in r["values"])
    r = a["losses"]["ignore-band"]
    assert r["gain"]["values"] == [v - b for v, b in zip(r["values"], d["synthetic"]["values"],
                                                          strict=True)]
    assert set(a["prompts"]) == {"templates", "augmented", "several-classes"}
    # Mask refinement: the default preset's CRF switched (the default refines, so the arm
    # synthesises without it; the job records it) on the CE row's seeds, paired with it.
    crf = 0 if get_preset("attnseg").mask.crf_iterations else 1
    r = a["crf"]
    assert r["iterations"] == crf and len(r["values"]) == 2
    assert r["gain"]["values"] == [v - b for v, b in zip(r["values"], d["synthetic"]["values"],
                                                          strict=True)]
    for seed in (0, 1):
        job = json.loads(next(work.glob(f"synth-crf{crf}-2x6-seed{seed}-*")).joinpath(
            "job.json").read_text())
        assert job["mask"]["crf_iterations"] == crf and job["preset"] == "attnseg"
    t = a["lora"]
    assert t["lora"]["steps"] == 2 and t["lora"]["images"] == 8
    assert t["lora"]["targets"] == ["to_k", "to_v", "conv1"]
    assert t["lora"]["noise_offset"] == 0.2 and t["lora"]["scale"] == 0.5
    assert t["lora"]["seconds"] > 0
    lora_run = next(work.glob("lora-2-r8-to_k-to_v-conv1-lr0.001-off0.2-*"))
    assert json.loads((lora_run / "lora_train.json").read_text())["noise_offset"] == 0.2
    job = json.loads(next(work.glob("synth-lora-to_k-to_v-conv1-lr0.001-off0.2-s0.5-2x6-seed1-*"))
                     .joinpath("job.json").read_text())
    assert [lo["scale"] for lo in job["loras"]] == [0.5]
    assert len(t["exact_labels_target"]["values"]) == 2
    # The target table's trivial baselines (threshold tuned on a target validation render)
    # and the labeller's pseudo-masks of the target test renders, paired by seed.
    assert (work / "target-val-101").is_dir()
    assert t["baselines"]["colour_threshold_tuned"]["threshold"] in (40, 80)
    assert 0.0 <= t["baselines"]["all_background"] < 0.5
    r, plain = t["pseudo_masks_with_lora"], t["pseudo_masks_without_lora"]
    assert len(r["values"]) == 2 and r["gain"]["values"] == [
        v - b for v, b in zip(r["values"], plain["values"], strict=True)]
    assert r["values"] != plain["values"]  # the LoRA is fused: the maps differ
    for k in ("colour_distance_without_lora", "colour_distance_with_lora"):
        assert len(t[k]["values"]) == 2 and all(0 < v < 442 for v in t[k]["values"])
    assert [r["images"] for r in report["scaling"]] == [12, 18]
    assert report["scaling"][1]["seeds"] == [0] and len(report["scaling"][1]["synthetic"]
                                                        ["values"]) == 1
    # Every count on the same seeds: the base count's point is its seed-0 run.
    assert report["scaling"][0]["seeds"] == [0]
    assert report["scaling"][0]["synthetic"]["values"] == d["synthetic"]["values"][:1]
    assert (tmp_path / "toy.png").stat().st_size > 0  # matplotlib: a dev dependency
    md = (tmp_path / "toy.md").read_text()
    assert "colour threshold" in md and "preset `daam`" in md
    assert "chosen on the validation set" in md
    assert "`ignore-band`" in md and "with the target LoRA" in md and "| 18 |" in md
    assert "noise offset 0.2" in md and "fused at scale 0.5" in md
    assert "tuned on target validation seed 101" in md
    assert "the labeller's pseudo-masks, with the LoRA" in md
    assert "Domain gap in colour" in md
    fraction = 100 * a["prompts"]["several-classes"]["mean"] / d["exact_labels"]["mean"]
    assert "the prompt arms reach: templates" in md and f"several-classes {fraction:.1f} %" in md
    assert ("| mask refinement | dense CRF (1 iterations)" if crf else
            "| mask refinement | the default preset's masks without its CRF") in md
    assert "the model's pseudo-masks (real-image labeller)" in md
    assert "results:" in capsys.readouterr().out
    # The target rows with the several-classes prompts: without the LoRA it is the ablation
    # arm's data and segmenters (reused, scored on the target), with it the same prompt files
    # synthesised with the LoRA fused. A one-seed command (seed 1) chooses as the whole run
    # did: on tune_seed 0's runs, reused.
    again = tmp_path / "toy-target"
    rc = main(["bench", "toy", "--model", "tiny", "--out", str(again), "--no-progress",
               "--set", f"work={work}", "--set", "num_images=6", "--set", "seeds=[1]",
               "--set", "presets=[\"attnseg\"]", "--set", "thresholds=[40,80]",
               "--set", "noise_candidates=[[0.2],[0.5]]",
               "--set", "bg_candidates=[0.3]", "--set", "layer_candidates=[]",
               "--set", "head_candidates=0", "--set", "error_probe_draws=0",
               "--set", "crf_iterations=0", "--set", "downstream_images=12",
               "--set", "train_candidates=[[4,0.002],[2,0.008],[2,0.008,96]]",
               "--set", "synth_steps=2", "--set", "losses=[]", "--set", "prompt_arms=[]",
               "--set", "lora_images=8", "--set", "lora_steps=2",
               "--set", "lora_targets=[\"to_k\",\"to_v\",\"conv1\"]",
               "--set", "lora_noise_offset=0.2", "--set", "lora_scale=0.5",
               "--set", "lora_prompt_arm=several-classes", "--set", "scaling_images=[]"])
    assert rc == 0
    report2 = json.loads((tmp_path / "toy-target.json").read_text())
    assert report2["protocol"]["seed"] == 0 and report2["protocol"]["chosen"] == protocol["chosen"]
    assert report2["protocol"]["val_mIoU"] == protocol["val_mIoU"]  # tune_seed's runs, reused
    assert report2["labeller"]["chosen"] == report["labeller"]["chosen"]
    t2 = report2["ablations"]["lora"]
    assert t2["prompt_arm"] == "several-classes" and t["prompt_arm"] == "plain"
    # Seed 1's runs, reused.
    assert t2["exact_labels_target"]["values"] == t["exact_labels_target"]["values"][1:]
    assert t2["without_lora"]["values"] != t["without_lora"]["values"][1:]
    for seed in (1,):
        with_lora = next(work.glob(f"synth-several-classes-*-lora-to_k-to_v-conv1-lr0.001-"
                                   f"off0.2-s0.5-2x6-seed{seed}-*"))
        job = json.loads((with_lora / "job.json").read_text())
        assert [lo["scale"] for lo in job["loras"]] == [0.5]
        assert job["prompts"].endswith(f"prompts-several-classes-2-0.4,0.35,0.25-seed{seed}"
                                       ".jsonl")
        assert next(work.glob(f"train-several-classes-*-lora-*-seed{seed}-*")).is_dir()
    assert "Both synthetic rows: prompts of the `several-classes` arm." in (
        tmp_path / "toy-target.md").read_text()
    assert main(["bench", "toy", "--model", "tiny", "--out", str(tmp_path / "bad"),
                 "--set", "lora_prompt_arm=nope"]) == 2
    # Tuning and reporting on one render seed is refused.
    rc = main(["bench", "toy", "--model", "tiny", "--out", str(out), "--set", "val_seed=5",
               "--set", "test_seed=5"])
    assert rc == 2
    # A layer choice the model does not have (the tiny model's VAE is 8x: no stride 4) is
    # refused in one line before anything runs.
    rc = main(["bench", "toy", "--model", "tiny", "--out", str(tmp_path / "bad"),
               "--set", "num_images=2", "--set", "layer_candidates=[[[4],[\"up\"]]]"])
    assert rc == 2
    assert "stride 4" in capsys.readouterr().err
    assert not (tmp_path / "bad.json").exists()
