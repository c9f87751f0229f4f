"""The toy benchmark's downstream experiments: segmenters trained on synthetic data against
exact labels (the protocol chosen on validation), the ablations of the method's techniques,
the target-domain LoRA and the scaling curve."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from attnseg.pipeline.adapt.lora_train import LORA_TARGETS
from attnseg.pipeline.config import get_preset
from attnseg.pipeline.models.loading import load_pipeline, model_fingerprint
from attnseg.pipeline.prompts import load_classes
from attnseg.pipeline.toy.world import ToyRenderConfig, render_dataset

from .config import ToyBenchConfig
from .pseudo_masks import _labeller, _mean_spread, _pseudo_miou, _render, trivial_baselines


def _train_and_score(cfg: ToyBenchConfig, data: Path, run: Path, seed: int, tests: list,
                     loss: str = "ce") -> list[float]:
    """Train the downstream segmenter on `data` (resumes a finished run: nothing retrained)
    and score it on each of `tests`."""
    from attnseg.pipeline.train.evaluate import (
        InferenceConfig,
        evaluate_model,
        inference_for,
    )
    from attnseg.pipeline.train.trainer import load_model, run_training, train_config_from

    if (cfg.train_steps, cfg.train_lr) != (2000, 2e-3):
        # Runs of the first protocol keep their names (work folders from before the
        # protocol was a setting); the others are named by it.
        run = run.with_name(f"{run.name}-{cfg.train_steps}s-lr{cfg.train_lr:g}")
    size = _input_size(cfg)
    resized = size != cfg.size
    if resized:
        run = run.with_name(f"{run.name}-{size}px")
    tcfg = train_config_from(dict(
        data=[str(data)], out=str(run), model=cfg.train_model, steps=cfg.train_steps,
        batch_size=8, lr=cfg.train_lr, warmup_steps=cfg.train_steps // 10, head_lr_mult=1.0,
        workers=0, checkpoint_every=cfg.train_steps, log_every=cfg.train_steps,
        progress=False, seed=seed, loss={"name": loss},
        augment={"crop_size": [size, size], "base_scale": [size, size] if resized else None}))
    run_training(tcfg)
    model = load_model(run)
    inference = InferenceConfig(scale=(size, size)) if resized else inference_for("synthetic")
    return [evaluate_model(model, t, inference)["mIoU"] for t in tests]


def _input_size(cfg: ToyBenchConfig) -> int:
    """The side the segmenter's inputs are resized to (train_size, else the render's)."""
    return cfg.train_size or cfg.size


def _synthesise(cfg: ToyBenchConfig, pipe, folder: Path, per_class: int, seed: int,
                prompts: str | None = None, loras: tuple[str, ...] = (),
                overrides: dict | None = None, preset: str = "attnseg") -> Path:
    """`attnseg synth` of per_class x 6 images into `folder` (a finished folder is reused),
    with `preset` (the default preset unless given; plus `overrides`, synth's own). With
    LoRAs the model is loaded anew with them fused (the shared pipeline stays as is)."""
    from attnseg.pipeline.config import SynthConfig
    from attnseg.pipeline.synth.job import run_synth

    run_synth(SynthConfig(model=cfg.model, classes="toy", num_per_class=per_class,
                          out=str(folder), batch_size=24, steps=cfg.synth_steps,
                          guidance=cfg.guidance, height=cfg.size, width=cfg.size, seed=seed,
                          prompts=prompts, loras=list(loras), overrides=overrides or {},
                          preset=preset,
                          device=cfg.device, dtype=cfg.dtype),
              progress=False, pipe=None if loras else pipe)
    return folder


def _rendered(cfg: ToyBenchConfig, folder: Path, count: int, seed: int,
              domain: str = "source") -> Path:
    render_dataset(ToyRenderConfig(out=str(folder), num_images=count, seed=seed, domain=domain,
                                   height=cfg.size, width=cfg.size), progress=False)
    return folder


def _per_class(images: int) -> int:
    return max(1, images // len(load_classes("toy")))


def _synth_dir(work: Path, per_class: int, seed: int, key: str) -> Path:
    """The plain-prompt synthetic dataset of a seed and model (`key`: its fingerprint): the
    main row's, which the protocol choice, the loss ablations, the target domain's no-LoRA
    row and the scaling curve train on too."""
    return work / f"synth-{per_class}x6-seed{seed}-{key}"


def _synth_run(work: Path, seed: int, key: str) -> Path:
    """The CE segmenter trained on `_synth_dir`'s data (the main row's run, reused)."""
    return work / f"train-synth-seed{seed}-{key}"


def choose_protocol(cfg: ToyBenchConfig, pipe, work: Path, val) -> tuple[ToyBenchConfig, dict]:
    """The training protocol with the best validation mIoU of the segmenter trained on the
    synthetic data of `tune_seed` (a main-row run); returns the config set to it."""
    per_class = _per_class(cfg.downstream_images)
    key = model_fingerprint(pipe)
    seed = cfg.tune_seed
    data = _synthesise(cfg, pipe, _synth_dir(work, per_class, seed, key), per_class,
                       seed)
    scores = {}
    for steps, lr, size in cfg.train_candidates:
        c = replace(cfg, train_steps=steps, train_lr=lr, train_size=size)
        scores[(steps, lr, size)] = _train_and_score(c, data, _synth_run(work, seed, key),
                                                     seed, [val])[0]
    steps, lr, size = max(scores, key=scores.get)
    chosen = replace(cfg, train_steps=steps, train_lr=lr, train_size=size)
    return chosen, {
        "chosen": {"steps": steps, "lr": lr, "size": _input_size(chosen)}, "seed": seed,
        "val_mIoU": [{"steps": n, "lr": r, "size": _input_size(replace(cfg, train_size=z)),
                      "mIoU": v} for (n, r, z), v in scores.items()]}


def _relabelled(cfg: ToyBenchConfig, pipe, levels, rendered: Path, folder: Path, seed: int,
                key: str, preset="attnseg", name: str = "attnseg") -> Path:
    """The rendered scenes of `rendered` (same image files) with the real-image labeller's
    pseudo-masks (`preset`, a name or one resolved for this model and called `name` in the
    job; image-level labels, latents noised to `levels`) in place of their exact labels; a
    finished folder is reused."""
    from attnseg.pipeline.files import atomic_write_bytes
    from attnseg.pipeline.synth.writer import (
        DatasetWriter,
        encode_png,
        read_manifest_records,
        voc_palette,
    )

    by_id = {c.id: c for c in load_classes("toy")}
    job = {"model": cfg.model, "model_hash": key, "preset": name, "mask": {},
           "relabelled": rendered.name, "noise_levels": list(levels), "seed": seed}
    writer = DatasetWriter(folder, job, by_id.values())
    records = sorted(read_manifest_records(rendered), key=lambda r: r["index"])
    palette = voc_palette()
    with _labeller(pipe, preset, levels, cfg, seed) as labeller:
        for r in records:
            if r["index"] in writer.done:
                continue
            name = r["name"]
            image = rendered / "JPEGImages" / f"{name}.jpg"
            label, reliability = labeller.label(
                np.array(Image.open(image).convert("RGB")),
                [by_id[c["id"]] for c in r["classes"]], r["index"])
            atomic_write_bytes(folder / "JPEGImages" / f"{name}.jpg", image.read_bytes())
            atomic_write_bytes(folder / "SegmentationClass" / f"{name}.png",
                               encode_png(label, palette))
            atomic_write_bytes(folder / "Reliability" / f"{name}.png", encode_png(reliability))
            writer.record(r["index"], name, {"classes": r["classes"], "prompt": r["prompt"]})
    writer.finish()
    return folder


def downstream(cfg: ToyBenchConfig, pipe, work: Path, test, levels) -> dict:
    """Segmenters trained on the model's synthetic data vs on exact-label renders; and, to
    tell the synthetic images' share of the gap from their masks', on the same renders
    pseudo-labelled by the model (the real-image labeller at `levels`)."""
    per_class = _per_class(cfg.downstream_images)
    # The model's data and the runs trained on it are keyed by its weights: a work folder
    # kept from another model's run must not be resumed as this one's (a finished synth job
    # returns without loading the model, so it would not notice).
    model_key = model_fingerprint(pipe)
    synthetic, exact, relabelled = [], [], []
    tag = f"{','.join(map(str, levels))}-{model_key}"  # the labeller's noise and weights
    for seed in cfg.seeds:
        data = _synthesise(cfg, pipe, _synth_dir(work, per_class, seed, model_key),
                           per_class, seed)
        synthetic += _train_and_score(cfg, data, _synth_run(work, seed, model_key),
                                      seed, [test])
        rendered = _rendered(cfg, work / f"exact-{per_class * 6}-seed{cfg.exact_seed + seed}",
                             per_class * 6, cfg.exact_seed + seed)
        exact += _train_and_score(cfg, rendered, work / f"train-exact-seed{seed}", seed, [test])
        data = _relabelled(cfg, pipe, levels, rendered,
                           work / f"relabelled-{per_class * 6}-seed{cfg.exact_seed + seed}-{tag}",
                           seed, model_key)
        relabelled += _train_and_score(cfg, data, work / f"train-relabelled-seed{seed}-{tag}",
                                       seed, [test])
    s, e = _mean_spread(synthetic), _mean_spread(exact)
    return {"images": per_class * 6, "train_model": cfg.train_model,
            "train_steps": cfg.train_steps, "train_lr": cfg.train_lr,
            "train_size": _input_size(cfg), "synthetic": s,
            "exact_labels": e, "rendered_pseudo_masks": _mean_spread(relabelled),
            "fraction_of_upper_bound": s["mean"] / e["mean"] if e["mean"] else None}


def _paired(values: list[float], base: list[float]) -> dict:
    """Mean and spread of `values`, and of their differences to `base` seed by seed."""
    return {**_mean_spread(values),
            "gain": _mean_spread([v - b for v, b in zip(values, base, strict=True)])}


def ablations(cfg: ToyBenchConfig, pipe, work: Path, test, base: dict, levels) -> dict:
    """The paper's three techniques, downstream, paired by seed with `base` (the CE row on
    the plain prompts' synthetic data, `downstream`'s); `levels`: the labeller's noise."""
    per_class = _per_class(cfg.downstream_images)
    key = model_fingerprint(pipe)
    ce = base["synthetic"]["values"]
    out: dict = {}
    losses = {}
    for loss in cfg.losses:
        scores = []
        for seed in cfg.seeds:
            data = _synth_dir(work, per_class, seed, key)
            scores += _train_and_score(cfg, data, work / f"train-{loss}-seed{seed}-{key}", seed,
                                       [test], loss=loss)
        losses[loss] = _paired(scores, ce)
    out["losses"] = losses
    if cfg.prompt_arms:
        arms = {}
        for arm in cfg.prompt_arms:
            scores = []
            for seed in cfg.seeds:
                data, name = _arm_data(cfg, pipe, work, arm, per_class, seed, key)
                scores += _train_and_score(cfg, data, work / f"train-{name}-seed{seed}-{key}",
                                           seed, [test])
            arms[arm] = _paired(scores, ce)
        out["prompts"] = arms
    if cfg.crf_iterations:
        out["crf"] = crf_arm(cfg, pipe, work, test, key, ce)
    if cfg.lora_images:
        out["lora"] = target_domain(cfg, pipe, work, key, levels)
    return out


def _prompt_file(cfg: ToyBenchConfig, work: Path, arm: str, per_class: int, seed: int
                 ) -> tuple[str, str]:
    """Prompt arm `arm`'s name (its data's and runs' folders take it) and its prompt file for a
    seed: the toy templates with the class word only, then with the lexicon's synonyms and
    hyponyms too, then those naming several classes per prompt; each holds at most
    `per_class` distinct prompts per class (synth cycles through them where there are
    fewer)."""
    from attnseg.pipeline.adapt.prompt_augment import (
        PromptsConfig,
        build_prompt_set,
        default_templates_file,
        load_templates,
        write_prompt_file,
    )

    templates = len(load_templates(default_templates_file("toy")))
    lexicon, count, weights = {"templates": (False, templates, (1.0,)),
                               "augmented": (True, per_class, (1.0,)),
                               "several-classes": (True, per_class,
                                                   cfg.classes_per_prompt)}[arm]
    # Files and folders are named by the weights, so a work folder's of other weights is not
    # taken for this one.
    suffix = "" if weights == (1.0,) else "-" + ",".join(f"{w:g}" for w in weights)
    file = work / f"prompts-{arm}-{count}{suffix}-seed{seed}.jsonl"
    if not file.is_file():
        prompt_set = build_prompt_set(PromptsConfig(
            classes="toy", num_per_class=count, seed=seed, model=cfg.model,
            builtin_lexicon=lexicon, classes_per_prompt=weights), at_most=True)
        write_prompt_file(file, prompt_set.records())
    return f"{arm}{suffix}", str(file)


def _arm_data(cfg: ToyBenchConfig, pipe, work: Path, arm: str, per_class: int, seed: int,
              key: str, lora: str | None = None, lora_tag: str = "") -> tuple[Path, str]:
    """The synthetic data of prompt arm `arm` for a seed and model (`key`), with the LoRA
    `lora` ("DIR:SCALE", named by `lora_tag`) fused or none; and the name its segmenter runs
    take (`train-NAME-seed...`). "plain" is synth's own prompts (the main row's data: made by
    `downstream`); the others are `_prompt_file`'s."""
    loras = (lora,) if lora else ()
    if arm == "plain":
        if not lora:
            return _synth_dir(work, per_class, seed, key), "synth"
        name, prompts = f"lora{lora_tag}", None
    else:
        name, prompts = _prompt_file(cfg, work, arm, per_class, seed)
        name += f"-lora{lora_tag}" if lora else ""
    data = _synthesise(cfg, pipe, work / f"synth-{name}-{per_class}x6-seed{seed}-{key}",
                       per_class, seed, prompts=prompts, loras=loras)
    return data, name


def crf_arm(cfg: ToyBenchConfig, pipe, work: Path, test, key: str, ce: list[float]) -> dict:
    """Mask refinement, downstream: the same synthesis (same seeds, prompts and images) with
    the default preset's dense CRF switched (on at `crf_iterations` where the preset has
    none, else off), paired by seed with the CE row."""
    per_class = _per_class(cfg.downstream_images)
    iterations = 0 if get_preset("attnseg").mask.crf_iterations else cfg.crf_iterations
    scores = []
    for seed in cfg.seeds:
        data = _synthesise(cfg, pipe, work / f"synth-crf{iterations}-{per_class}x6-seed{seed}-"
                           f"{key}", per_class, seed,
                           overrides={"mask": {"crf_iterations": iterations}})
        scores += _train_and_score(cfg, data, work / f"train-crf{iterations}-seed{seed}-{key}",
                                   seed, [test])
    return {"iterations": iterations, **_paired(scores, ce)}


def _mean_colour(folder: Path) -> np.ndarray:
    """The mean RGB of a dataset folder's images (0-255): how far synthesis is from a
    domain's palette, the plainest measure of a domain gap."""
    total, count = np.zeros(3), 0
    for f in sorted((folder / "JPEGImages").glob("*.jpg")):
        with Image.open(f) as im:
            total += np.asarray(im.convert("RGB"), dtype=np.float64).mean((0, 1))
        count += 1
    return total / max(count, 1)


def _lora_tag(targets: tuple[str, ...]) -> str:
    """What names the runs of a LoRA on `targets`: nothing for the default layers (runs from
    before the setting keep their names), else the layers added to them (or all of them)."""
    if targets == LORA_TARGETS:
        return ""
    if set(targets) >= set(LORA_TARGETS):
        return "".join(f"-{t}" for t in targets if t not in LORA_TARGETS)
    return "".join(f"-{t}" for t in targets)


LORA_SUMMARY_KEYS = ("steps", "images", "trainable_params", "probe_loss_start",
                     "probe_loss_end")  # what a report keeps of `train_lora`'s summary


def target_lora_config(cfg: ToyBenchConfig, work: Path, out: Path, images: int,
                       render_seed: int, rank: int, steps: int, lr: float,
                       targets: tuple[str, ...], noise_offset: float):
    """`attnseg lora train`'s settings for a LoRA on `images` unlabelled target-domain renders
    of `render_seed` (in `work`, shared by every LoRA on the same renders), written to `out`:
    crops of the scenes' size, batch 8, a checkpoint halfway."""
    from attnseg.pipeline.adapt.lora_train import LoraTrainConfig

    unlabelled = work / f"target-unlabelled-{images}-{render_seed}"
    return LoraTrainConfig(
        images=str(unlabelled / "JPEGImages"), model=cfg.model, out=str(out), rank=rank,
        steps=steps, lr=lr, batch_size=8, crop=cfg.size, target_modules=tuple(targets),
        checkpoint_every=max(1, steps // 2), noise_offset=noise_offset, device=cfg.device)


def train_target_lora(cfg: ToyBenchConfig, tcfg, images: int, render_seed: int) -> dict:
    """Render the `images` unlabelled target scenes of `render_seed` that `tcfg` (made by
    `target_lora_config` with them) trains on, and train the LoRA; a finished LoRA is not
    trained again. Returns `train_lora`'s summary."""
    from attnseg.pipeline.adapt.lora_train import train_lora

    _rendered(cfg, Path(tcfg.images).parent, images, render_seed, "target")
    return train_lora(tcfg, progress=False)


def target_domain(cfg: ToyBenchConfig, pipe, work: Path, key: str, levels) -> dict:
    """On the distant target domain: synthesis with and without a LoRA trained on unlabelled
    target renders, the segmenters scored on a target test set; the exact-label segmenters of
    both domains, the trivial baselines (the colour threshold tuned on a target validation
    render) and the labeller's pseudo-masks of the target test renders (at `levels`) with and
    without the LoRA beside them: the last tell whether the LoRA adapts the attention itself,
    apart from what the synthetic images teach a segmenter."""
    from attnseg.pipeline.models.lora import LoraSpec

    per_class = _per_class(cfg.downstream_images)
    target_test = _render(work, f"target-test-{cfg.test_seed}", cfg.test_seed, cfg, "target")
    target_val = _render(work, f"target-val-{cfg.val_seed}", cfg.val_seed, cfg, "target")
    classes = load_classes("toy")
    tag = _lora_tag(cfg.lora_targets)
    # Runs of the first settings (lr 1e-3, plain noise, scale 1) keep their names.
    if (cfg.lora_lr, cfg.lora_noise_offset) != (1e-3, 0.0):
        tag += f"-lr{cfg.lora_lr:g}-off{cfg.lora_noise_offset:g}"
    lora_dir = work / f"lora-{cfg.lora_steps}-r{cfg.lora_rank}{tag}-{key}"
    lora = train_target_lora(cfg, target_lora_config(
        cfg, work, lora_dir, cfg.lora_images, cfg.lora_seed, cfg.lora_rank, cfg.lora_steps,
        cfg.lora_lr, cfg.lora_targets, cfg.lora_noise_offset), cfg.lora_images, cfg.lora_seed)
    if cfg.lora_scale != 1.0:
        tag += f"-s{cfg.lora_scale:g}"
    without, with_lora, exact_target, exact_source = [], [], [], []
    colour_without, colour_with = [], []
    target_colour = _mean_colour(Path(target_test.root))
    arm = cfg.lora_prompt_arm
    for seed in cfg.seeds:
        data, name = _arm_data(cfg, pipe, work, arm, per_class, seed, key)
        without += _train_and_score(cfg, data, work / f"train-{name}-seed{seed}-{key}", seed,
                                    [target_test])
        colour_without.append(float(np.linalg.norm(_mean_colour(data) - target_colour)))
        data, name = _arm_data(cfg, pipe, work, arm, per_class, seed, key,
                               f"{lora_dir}:{cfg.lora_scale:g}", tag)
        with_lora += _train_and_score(cfg, data, work / f"train-{name}-seed{seed}-{key}",
                                      seed, [target_test])
        colour_with.append(float(np.linalg.norm(_mean_colour(data) - target_colour)))
        rendered = _rendered(cfg, work / f"exact-target-{per_class * 6}-seed"
                             f"{cfg.exact_seed + seed}", per_class * 6, cfg.exact_seed + seed,
                             "target")
        exact_target += _train_and_score(cfg, rendered, work / f"train-exact-target-seed{seed}",
                                         seed, [target_test])
        exact_source += _train_and_score(cfg, work / f"exact-{per_class * 6}-seed"
                                         f"{cfg.exact_seed + seed}",
                                         work / f"train-exact-seed{seed}", seed, [target_test])
    labels_without = [_pseudo_miou(pipe, "attnseg", levels, cfg, s, target_test, classes)
                      for s in cfg.seeds]
    fused = load_pipeline(cfg.model, pipe.unet.device, pipe.unet.dtype,
                          [LoraSpec(str(lora_dir), cfg.lora_scale)])
    labels_with = [_pseudo_miou(fused, "attnseg", levels, cfg, s, target_test, classes)
                   for s in cfg.seeds]
    del fused
    return {"test_images": cfg.num_images, "prompt_arm": arm,
            "baselines": trivial_baselines(target_val, target_test, cfg.thresholds),
            "pseudo_masks_without_lora": _mean_spread(labels_without),
            "pseudo_masks_with_lora": _paired(labels_with, labels_without),
            "colour_distance_without_lora": _mean_spread(colour_without),
            "colour_distance_with_lora": _mean_spread(colour_with), "lora": {
                k: lora[k] for k in LORA_SUMMARY_KEYS} | {"rank": cfg.lora_rank,
                                                            "lr": cfg.lora_lr,
                                                            "targets": list(cfg.lora_targets),
                                                            "noise_offset": cfg.lora_noise_offset,
                                                            "scale": cfg.lora_scale,
                                                            # None: trained before it was kept
                                                            "seconds": lora["train_seconds"]},
            "without_lora": _mean_spread(without), "with_lora": _paired(with_lora, without),
            "exact_labels_target": _mean_spread(exact_target),
            "exact_labels_source": _mean_spread(exact_source)}


def scaling(cfg: ToyBenchConfig, pipe, work: Path, test, base: dict) -> list[dict]:
    """Downstream mIoU against the synthetic images' count, every count on the same
    `scaling_seeds` seeds (the base row is one point, its first seeds' runs)."""
    key = model_fingerprint(pipe)
    seeds = cfg.seeds[: cfg.scaling_seeds]
    n = len(seeds)
    rows = [{"images": base["images"], "seeds": list(seeds),
             "synthetic": _mean_spread(base["synthetic"]["values"][:n]),
             "exact_labels": _mean_spread(base["exact_labels"]["values"][:n])}]
    for images in cfg.scaling_images:
        per_class = _per_class(images)
        synthetic, exact = [], []
        for seed in seeds:
            data = _synthesise(cfg, pipe, _synth_dir(work, per_class, seed, key),
                               per_class, seed)
            synthetic += _train_and_score(
                cfg, data, work / f"train-synth-{per_class}x6-seed{seed}-{key}", seed, [test])
            rendered = _rendered(cfg, work / f"exact-{per_class * 6}-seed{cfg.exact_seed + seed}",
                                 per_class * 6, cfg.exact_seed + seed)
            exact += _train_and_score(cfg, rendered,
                                      work / f"train-exact-{per_class * 6}-seed{seed}", seed,
                                      [test])
        rows.append({"images": per_class * 6, "seeds": list(seeds),
                     "synthetic": _mean_spread(synthetic), "exact_labels": _mean_spread(exact)})
    return rows
