"""`attnseg bench toy-downstream`: the downstream instrument, segmenters trained on synthetic
data scored against exact labels with a protocol sharp enough to resolve a one-point effect.

1. **Protocol** (validation render only): each candidate (segmenter, input side, steps,
   learning rate, full-resolution head) is trained on `images` exact-label renders with each
   of `protocol_seeds`; the rule, fixed before any run: among the candidates whose
   seed-to-seed standard deviation on validation is at most `max_spread`, the highest mean;
   if none qualifies, the smallest deviation. With a single candidate and no protocol seeds
   the protocol is fixed (an earlier run chose it) and nothing is trained on validation.
2. **Arms** (test renders): each arm trained with every entry of `seeds` and scored on every
   test render (`test_seeds`); an arm's figure per seed is its mean over the renders. Arms
   other than `exact`, `synthetic` and `target` are paired by seed with `synthetic` (the
   `synthetic_prompts`, CE, the default preset), a `lora:NAME` arm with `target`: the gain's
   mean and its 95 % t-interval over the seeds.

3. **Pseudo-masks** (`presets`; validation and test renders): each preset as published and
   with its dense CRF switched, labelling the rendered scenes with the real-image labeller;
   the recipe with the best validation mIoU is named, and every row's test figure is its mean
   over the test renders (each render's figure: its mean over `labeller_seeds`) with the
   spread over the renders; the default preset's two-object localisation likewise. Each of
   `recipes` (a preset with harvest and mask overrides and its own labeller noise) is scored
   on validation beside them; where one is the best on validation, it is scored on the test
   renders too.

Arms: `exact` (rendered scenes, exact labels: the bound), `synthetic`, `loss:NAME` (a
reliability-aware loss on the `synthetic` data), `prompts:ARM` (bench toy's prompt arms),
`crf` (the default preset's dense CRF switched), `images:N` (`synthetic` with N images, and
`exact` at N beside it), `recipe:NAME` (the `synthetic` images with the masks of recipe NAME).
On the distant target domain (scored on target-domain renders of the same test seeds):
`target` (the `synthetic` arm's segmenters themselves) and `lora:NAME` (the `synthetic` arm's
prompts and seeds drawn by the model with LoRA NAME fused, trained on unlabelled target
renders), paired by seed with `target`. On the exact arm's own rendered scenes, labelled by
the real-image labeller instead of exactly (no generated images, so no image gap between
training and test): `renders` (the default preset's masks), and, paired by seed with it,
`renders:crf` (its dense CRF switched), `renders:recipe:NAME` and `renders:loss:NAME`.
Each `renders` arm's training masks are also scored against the scenes' exact labels, with
their reliability (what the reliability-aware losses weight).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from attnseg.pipeline.adapt.lora_train import LORA_TARGETS
from attnseg.pipeline.settings import NonNegativeFloat, PositiveFloat, PositiveInt, UnitFloat

from ..common import machine_info, output_base, pct, with_suffix, write_json_and_markdown

ARM_KINDS = ("exact", "synthetic", "loss", "prompts", "crf", "images", "recipe", "target",
             "lora", "renders")
TARGET_ARMS = ("target", "lora")  # scored on the target-domain test renders
# trained on generated source-domain images, whose masks the exact-label segmenter judges
JUDGED_ARMS = ("synthetic", "loss", "prompts", "crf", "images", "recipe")
_NAME = r"[A-Za-z0-9][A-Za-z0-9_.+-]*"  # a recipe's or LoRA's name: it names files


def _digest(content) -> str:
    """12 hex digits naming JSON-able `content` (settings that name files)."""
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:12]


def _check_name(kind: str, name: str) -> None:
    from attnseg.pipeline.errors import UserError

    if not name:
        raise UserError(f"every {kind} needs a name")
    if not re.fullmatch(_NAME, name):
        raise UserError(f"{kind} name {name!r} must be letters, digits and _.+- (it names its "
                        "files)")


@dataclass
class Recipe:
    """A pseudo-mask recipe tried on validation: preset `preset` with `harvest` and `mask`
    overrides (a synth job's `overrides`, checked the same way) and the labeller's noise
    levels (empty: the instrument's `labeller_noise`)."""

    name: str = ""
    preset: str = "attnseg"
    harvest: dict[str, Any] = field(default_factory=dict)
    mask: dict[str, Any] = field(default_factory=dict)
    noise: tuple[UnitFloat, ...] = ()

    def validate(self, latent_stride: int) -> None:
        """Check the recipe for a model of this latent stride (its heads are checked against
        the model itself by `check_recipe_heads`)."""
        from attnseg.pipeline.errors import UserError
        from attnseg.pipeline.harvest.real_images import RealImageConfig

        _check_name("recipe", self.name)
        try:
            self.resolve(latent_stride)
            if self.noise:
                RealImageConfig(noise_levels=tuple(self.noise)).validate()
        except UserError as e:
            raise UserError(f"recipe {self.name!r}: {e}") from None

    def resolve(self, latent_stride: int):
        """The recipe's preset for a model of this latent stride, overrides applied."""
        from attnseg.pipeline.config import preset_with_overrides

        return preset_with_overrides(self.preset, {"harvest": self.harvest, "mask": self.mask},
                                     latent_stride)


@dataclass
class LoraArm:
    """A target-domain LoRA tried downstream (arm `lora:NAME`): `attnseg lora train` on
    `images` unlabelled target-domain renders of render seed `render_seed`, at `rank`, `steps`,
    `lr`, on the UNet layers `targets`, with offset noise `noise_offset`; fused at `scale` into
    the model that draws the `synthetic` arm's prompts and seeds. Trained once for all seeds."""

    name: str = ""
    images: PositiveInt = 400
    render_seed: int = 3000
    rank: PositiveInt = 8
    steps: PositiveInt = 300
    lr: PositiveFloat = 1e-3
    targets: tuple[str, ...] = LORA_TARGETS
    noise_offset: UnitFloat = 0.0
    scale: PositiveFloat = 1.0

    def __post_init__(self):
        # As a settings file reads them, so that lr=1 and lr=1.0 name the same files.
        self.targets = tuple(self.targets)
        self.lr, self.noise_offset, self.scale = (float(self.lr), float(self.noise_offset),
                                                  float(self.scale))

    def validate(self, cfg: ToyDownstreamConfig) -> None:
        """Check the LoRA for the instrument `cfg` (its layers are checked against the model
        itself by `check_lora_targets`)."""
        from attnseg.pipeline.errors import UserError

        _check_name("LoRA", self.name)
        try:
            if not self.targets:
                raise UserError("targets must name at least one UNet layer")
            if self.render_seed in (*cfg.test_seeds, cfg.val_seed):
                raise UserError(f"render_seed {self.render_seed} is a test or validation "
                                "render's seed: the LoRA would learn the scenes it is scored on")
            self.training_config(cfg, Path("."), "").validate()
        except UserError as e:
            raise UserError(f"LoRA {self.name!r}: {e}") from None

    def training_config(self, cfg: ToyDownstreamConfig, work: Path, key: str):
        """`attnseg lora train`'s settings for this LoRA on the model of fingerprint `key`, in
        `work` (named by what its training depends on and by the model)."""
        from .downstream import target_lora_config

        return target_lora_config(
            _bench_config(cfg, cfg.candidates[0]), work,
            work / f"lora-{self.digest(training_only=True)}-{key}", self.images,
            self.render_seed, self.rank, self.steps, self.lr, self.targets, self.noise_offset)

    def digest(self, training_only: bool = False) -> str:
        """12 hex digits naming the LoRA's settings (with `training_only`, those its training
        depends on: all but the scale), so an edited LoRA is not taken for its old files."""
        content = {k: v for k, v in asdict(self).items()
                   if k != "name" and not (training_only and k == "scale")}
        return _digest(content)


def check_lora_targets(loras, pipe) -> None:
    """Refuse, before any training, a LoRA whose `targets` match no layer of the model."""
    from attnseg.pipeline.adapt.lora_train import check_target_modules
    from attnseg.pipeline.errors import UserError

    for lora in loras:
        try:
            check_target_modules(pipe.unet, lora.targets)
        except UserError as e:
            raise UserError(f"LoRA {lora.name!r}: {e}") from None


def check_recipe_heads(recipes, pipe) -> None:
    """Refuse, before any training, a recipe whose `harvest.heads` names a layer or head the
    model lacks (or one its strides and blocks leave out)."""
    from attnseg.pipeline.errors import UserError
    from attnseg.pipeline.harvest.harvester import AttentionHarvester

    for recipe in recipes:
        if recipe.harvest.get("heads"):
            try:
                AttentionHarvester(pipe.unet, recipe.resolve(pipe.vae_scale_factor).harvest
                                   ).remove()
            except UserError as e:
                raise UserError(f"recipe {recipe.name!r}: {e}") from None


@dataclass
class ToyDownstreamConfig:
    """One `attnseg bench toy-downstream` run."""

    model: str = "toy"
    size: PositiveInt = 64  # side of the rendered and synthesised scenes
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # training (and synthesis) seeds of every arm
    val_seed: int = 101
    test_seeds: tuple[int, ...] = (102, 103, 104)
    test_images: PositiveInt = 500  # scenes per validation and test render
    images: PositiveInt = 240  # training images of every arm but images:N
    # (segmenter, input side (0: the scenes'), steps, learning rate, full-resolution head)
    candidates: tuple[tuple, ...] = (("segformer-tiny", 128, 2000, 1e-2, False),)
    # Training augmentation's random rescaling (the trainer's default is 0.5-2): a toy scene's
    # objects are drawn at the test scenes' scale, and a 2x rescale crops a quarter of the
    # scene, cutting shapes whose outline is their class.
    scale_range: tuple[PositiveFloat, PositiveFloat] = (1.0, 1.0)
    protocol_seeds: tuple[int, ...] = (0, 1, 2)
    max_spread: NonNegativeFloat = 0.015  # mIoU as a fraction (0.015: 1.5 points)
    arms: tuple[str, ...] = ("exact",)
    # The prompts of the arms trained on generated images (synthetic, loss, images, crf,
    # recipe, target, lora): "plain" (synth's own, one class each) or a prompt arm; a
    # `prompts:ARM` arm is paired with `synthetic` on these.
    synthetic_prompts: str = "plain"
    synth_steps: PositiveInt = 20
    guidance: NonNegativeFloat = 4.0
    exact_seed: int = 2000  # render seed of the exact arm's training scenes (plus the seed)
    crf_iterations: PositiveInt = 10  # the crf arm's, where the default preset has none
    # Pseudo-masks (3): the presets scored (() skips), with the labeller's noise levels (bench
    # toy chooses them on validation: 0.1 for the shipped model) and its seeds per render.
    presets: tuple[str, ...] = ()
    labeller_noise: tuple[UnitFloat, ...] = (0.1,)
    labeller_seeds: tuple[int, ...] = (0,)
    recipes: tuple[Recipe, ...] = ()  # needs `presets`, unless arms name each
    loras: tuple[LoraArm, ...] = ()  # the LoRAs of the `lora:NAME` arms
    device: str = "auto"
    dtype: str = "auto"
    work: str | None = None  # None: <out>.work
    out: str = "attnseg-bench/toy-downstream"

    def __post_init__(self):
        self.seeds = tuple(self.seeds)
        self.test_seeds = tuple(self.test_seeds)
        self.protocol_seeds = tuple(self.protocol_seeds)
        self.arms = tuple(self.arms)
        self.scale_range = tuple(self.scale_range)
        self.candidates = tuple(_candidate(c) for c in self.candidates)
        self.presets = tuple(self.presets)
        self.labeller_noise = tuple(self.labeller_noise)
        self.labeller_seeds = tuple(self.labeller_seeds)
        self.recipes = tuple(r if isinstance(r, Recipe) else Recipe(**r) for r in self.recipes)
        self.loras = tuple(r if isinstance(r, LoraArm) else LoraArm(**r) for r in self.loras)

    def validate(self) -> None:
        from attnseg.pipeline.config import PRESETS
        from attnseg.pipeline.errors import UserError
        from attnseg.pipeline.harvest.real_images import RealImageConfig
        from attnseg.pipeline.models.loading import latent_stride
        from attnseg.pipeline.prompts import load_classes
        from attnseg.pipeline.train.losses import LossConfig
        from attnseg.pipeline.train.segmodels import MODEL_NAMES

        from .config import PROMPT_ARMS

        if len(self.seeds) < 2:
            raise UserError("seeds needs at least two entries (a spread)")
        if len(self.protocol_seeds) == 1 or (not self.protocol_seeds
                                             and len(self.candidates) != 1):
            raise UserError("protocol_seeds needs at least two entries (a spread), or none "
                            "with a single candidate (the protocol fixed, not chosen)")
        if not self.test_seeds or self.val_seed in self.test_seeds:
            raise UserError("test_seeds must be given and must not include val_seed")
        if not self.candidates:
            raise UserError("candidates must not be empty")
        if self.synthetic_prompts not in ("plain", *PROMPT_ARMS):
            raise UserError(f"unknown synthetic_prompts {self.synthetic_prompts!r}; choose from "
                            f"{['plain', *PROMPT_ARMS]}")
        for name, side, steps, lr, _ in self.candidates:
            if name not in MODEL_NAMES:
                raise UserError(f"candidate model {name!r} unknown; choose from "
                                f"{list(MODEL_NAMES)}")
            if steps < 1 or not lr > 0 or not (side == 0 or side >= 32):
                raise UserError(f"candidate ({name}, {side}, {steps}, {lr}) needs steps >= 1, "
                                "lr > 0 and an input side of 0 (the scenes') or >= 32")
        for preset in self.presets:
            if preset not in PRESETS:
                raise UserError(f"unknown preset {preset!r}; choose from {list(PRESETS)}")
        if self.presets and not (self.labeller_seeds and self.labeller_noise):
            raise UserError("labeller_seeds and labeller_noise must not be empty with presets")
        if self.presets or any(a.partition(":")[0] == "renders" for a in self.arms):
            if not self.labeller_noise:
                raise UserError("labeller_noise must not be empty with presets or renders arms")
            RealImageConfig(noise_levels=tuple(self.labeller_noise)).validate()
        stride = latent_stride(self.model) if self.recipes else 8
        for recipe in self.recipes:
            recipe.validate(stride)
        names = [r.name for r in self.recipes]
        if len(set(names)) != len(names):
            raise UserError(f"recipe names must differ: {names}")
        used = {a.rpartition("recipe:")[2] for a in self.arms if "recipe:" in a}
        if not self.presets and set(names) - used:
            raise UserError("recipes that no arm names are scored beside the presets: give "
                            "presets too")
        for lora in self.loras:
            lora.validate(self)
        lora_names = [r.name for r in self.loras]
        if len(set(lora_names)) != len(lora_names):
            raise UserError(f"LoRA names must differ: {lora_names}")
        classes = len(load_classes("toy"))  # an images:N arm draws N // classes each
        for arm in self.arms:
            kind, colon, value = arm.partition(":")
            takes_value = kind in ("loss", "prompts", "images", "recipe", "lora")
            if kind not in ARM_KINDS or (colon and not value) or (
                    kind != "renders" and bool(value) != takes_value):
                raise UserError(f"unknown arm {arm!r}; arms are exact, synthetic, crf, "
                                "loss:NAME, prompts:ARM, images:N, recipe:NAME, target, "
                                "lora:NAME, renders, renders:crf, renders:loss:NAME, "
                                "renders:recipe:NAME")
            if kind == "renders" and value:
                if "renders" not in self.arms:
                    raise UserError(f"arm {arm!r} is paired with arm renders (the same scenes "
                                    "with the default preset's masks): add it to arms")
                kind, _, value = value.partition(":")
                if kind not in ("crf", "loss", "recipe") or bool(value) == (kind == "crf"):
                    raise UserError(f"unknown arm {arm!r}; the renders arms are renders, "
                                    "renders:crf, renders:loss:NAME and renders:recipe:NAME")
            if kind == "recipe" and value not in names:
                raise UserError(f"arm {arm!r}: no recipe named {value!r} (recipes: {names})")
            if kind == "lora" and value not in lora_names:
                raise UserError(f"arm {arm!r}: no LoRA named {value!r} (loras: {lora_names})")
            if kind == "lora" and "target" not in self.arms:
                raise UserError(f"arm {arm!r} is paired with arm target (the same prompts "
                                "without the LoRA, on the same renders): add it to arms")
            if kind == "loss":
                LossConfig(name=value).validate()
            if kind == "prompts" and value not in PROMPT_ARMS:
                raise UserError(f"unknown prompt arm {value!r}; choose from {list(PROMPT_ARMS)}")
            if kind == "prompts" and value == self.synthetic_prompts:
                raise UserError(f"arm {arm!r} is the synthetic arm itself (synthetic_prompts)")
            if kind == "images" and not (value.isdigit() and int(value) >= classes
                                         and int(value) % classes == 0):
                raise UserError(f"arm {arm!r}: N must be a multiple of {classes} (the same "
                                f"number of images for each of the {classes} classes), at "
                                f"least {classes}")


def _candidate(c) -> tuple:
    name, side, steps, lr, *rest = c
    return (str(name), int(side), int(steps), float(lr), bool(rest[0]) if rest else False)


# Two-sided 95 % quantiles of Student's t by degrees of freedom (1-30; normal beyond).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def interval95(values: list[float]) -> dict:
    """Mean, standard deviation and the 95 % t-interval of the mean of `values`."""
    a = np.asarray(values, dtype=float)
    n = len(a)
    std = float(a.std(ddof=1)) if n > 1 else 0.0
    half = (_T975[n - 2] if n - 1 <= len(_T975) else 1.96) * std / np.sqrt(n) if n > 1 else 0.0
    mean = float(a.mean())
    return {"mean": mean, "std": std, "ci95": [mean - half, mean + half],
            "values": [float(v) for v in a]}


def _bench_config(cfg: ToyDownstreamConfig, candidate: tuple):
    """bench toy's settings for its downstream helpers (synthesis, prompt arms, renders)."""
    from .config import ToyBenchConfig

    name, side, steps, lr, _ = candidate
    return ToyBenchConfig(model=cfg.model, size=cfg.size, num_images=cfg.test_images,
                          synth_steps=cfg.synth_steps, guidance=cfg.guidance,
                          train_model=name, train_steps=steps, train_lr=lr, train_size=side,
                          train_candidates=(), crf_iterations=cfg.crf_iterations,
                          device=cfg.device, dtype=cfg.dtype)


def _run_name(candidate: tuple) -> str:
    name, side, steps, lr, full_res = candidate
    return f"{name}-{side}px-{steps}s-lr{lr:g}" + ("-fr" if full_res else "")


def _run_folder(candidate: tuple, run: Path, scale_range: tuple[float, float]) -> Path:
    """The folder `train_and_score` trains `candidate` in for the arm's run name `run`."""
    run = run.with_name(f"{run.name}-{_run_name(candidate)}")
    if tuple(scale_range) != (0.5, 2.0):  # the trainer's default range is left out of the name
        run = run.with_name(f"{run.name}-scale{scale_range[0]:g}-{scale_range[1]:g}")
    return run


def _inference(side: int):
    from attnseg.pipeline.train.evaluate import InferenceConfig

    return InferenceConfig(scale=(side, side)) if side else InferenceConfig()


def train_and_score(candidate: tuple, data: Path, run: Path, seed: int, tests: list,
                    loss: str = "ce", scale_range: tuple[float, float] = (1.0, 1.0)
                    ) -> tuple[list[float], float]:
    """Train the candidate's segmenter on `data` (a finished run of these settings is reused,
    not retrained; a folder holding another is refused) and score it on each of `tests`;
    returns the mIoUs and the training's seconds over every process that trained it (as the
    run recorded them; NaN where it did not)."""
    from attnseg.pipeline.jsonfile import read_json
    from attnseg.pipeline.train.evaluate import evaluate_model
    from attnseg.pipeline.train.trainer import (
        load_model,
        read_final,
        run_training,
        train_config_from,
    )

    name, side, steps, lr, full_res = candidate
    run = _run_folder(candidate, run, scale_range)
    augment: dict = {"crop_size": [side, side], "base_scale": [side, side]} if side else {
        "crop_size": [64, 64], "base_scale": None}
    augment["scale_range"] = list(scale_range)
    tcfg = train_config_from(dict(
        data=[str(data)], out=str(run), model=name, full_res_head=full_res, steps=steps,
        batch_size=8, lr=lr, warmup_steps=steps // 10, head_lr_mult=1.0, workers=0,
        checkpoint_every=steps, log_every=steps, progress=False, seed=seed,
        loss={"name": loss}, augment=augment))
    # A finished run returns at once; a folder holding another run (other data or settings
    # under this name) is refused, not scored as this one.
    run_training(tcfg)
    seconds = read_final(run)["seconds"]
    if seconds is None and (run / "seconds.json").is_file():
        # runs trained before the trainer recorded its own seconds
        seconds = read_json(run / "seconds.json")["seconds"]
    model = load_model(run)
    seconds = float("nan") if seconds is None else seconds
    return [evaluate_model(model, t, _inference(side))["mIoU"] for t in tests], seconds


def judge_training_masks(data: Path, judge: Path, side: int, work: Path) -> dict:
    """The masks an arm trains on, scored against what the exact-label segmenter in run folder
    `judge` sees in the generated images: mIoU over the classes, and `precision`, the mean
    over the shapes of the share of a shape's mask that the judge calls that shape. Pixels a
    mask leaves unsure (ignore) are not counted. Generated images have no ground truth, and
    the judge errs too, so this is a proxy with its own bias; but it needs no training and
    does not move with the segmenter's seed. Kept in `work/judged` (atomic write)."""
    from attnseg.pipeline.files import atomic_write_bytes
    from attnseg.pipeline.jsonfile import read_json
    from attnseg.pipeline.train.evaluate import evaluate_model
    from attnseg.pipeline.train.sources import open_source
    from attnseg.pipeline.train.trainer import load_model

    path = work / "judged" / f"{data.name}--by--{judge.name}.json"
    if path.is_file():
        return read_json(path)
    result = evaluate_model(load_model(judge), open_source(data, "synthetic", "train"),
                            _inference(side))
    shapes = [c["acc"] for c in result["per_class"]
              if c["name"] != "background" and c["acc"] is not None]
    row = {"mIoU": result["mIoU"], "precision": float(np.mean(shapes))}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(row) + "\n").encode())
    return row


def compare_training_masks(data: Path, work: Path) -> dict:
    """A renders arm's training masks (folder `data`) against the exact labels of the same
    scenes (the folder its job.json says it relabelled): their mIoU, pixels they leave unsure
    not counted; `labelled`, the share of pixels they label; and their reliability on those
    pixels, which is what the reliability-aware losses act on: its mean and `below_band`, the
    share under ignore-band's default threshold. Kept in `work/compared` (atomic write)."""
    import torch

    from attnseg.pipeline.files import atomic_write_bytes
    from attnseg.pipeline.jsonfile import read_json
    from attnseg.pipeline.train.evaluate import confusion_matrix, metrics_from_confusion
    from attnseg.pipeline.train.losses import LossConfig
    from attnseg.pipeline.train.sources import open_source

    exact = data.parent / read_json(data / "job.json")["relabelled"]
    path = work / "compared" / f"{data.name}--vs--{exact.name}.json"
    if path.is_file():
        return read_json(path)
    masks, truth = open_source(data, "synthetic", "train"), open_source(exact, "auto", "train")
    if masks.class_names != truth.class_names or len(masks) != len(truth):
        raise ValueError(f"{data} does not relabel {exact}: classes or sizes differ")
    n = len(truth.class_names)
    threshold = LossConfig().band_threshold
    hist = torch.zeros(n, n + 1, dtype=torch.int64)
    labelled = total = below = 0
    reliability = 0.0
    for i in range(len(truth)):
        mask, gold = masks.load(i), truth.load(i)
        keep = mask.label != masks.ignore_index
        pred = np.where(keep, mask.label, n)  # unsure: the column of no prediction, dropped
        hist += confusion_matrix(torch.from_numpy(pred), torch.from_numpy(gold.label), n,
                                 truth.ignore_index, extra_column=True)
        rel = mask.reliability[keep] if mask.reliability is not None else np.ones(keep.sum())
        labelled += int(keep.sum())
        total += keep.size
        reliability += float(rel.sum())
        below += int((rel < threshold).sum())
    row = {"mIoU": metrics_from_confusion(hist[:, :n], truth.class_names)["mIoU"],
           "labelled": labelled / total, "reliability_mean": reliability / max(labelled, 1),
           "below_band": below / max(labelled, 1)}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(row) + "\n").encode())
    return row


def choose_protocol(cfg: ToyDownstreamConfig, work: Path, val) -> tuple[tuple, dict]:
    """The candidate the rule picks on validation (module docstring, 1) and every score."""
    from .downstream import _per_class, _rendered

    if not cfg.protocol_seeds:  # a protocol chosen by an earlier run: nothing trained here
        return cfg.candidates[0], {"rule": "fixed by the settings (no protocol seeds)",
                                   "seeds": [], "candidates": [],
                                   "chosen": _candidate_dict(cfg.candidates[0])}
    per_class = _per_class(cfg.images)
    rows = []
    for candidate in cfg.candidates:
        scores, seconds = [], []
        for seed in cfg.protocol_seeds:
            data = _rendered(_bench_config(cfg, candidate),
                             work / f"exact-{per_class * 6}-seed{cfg.exact_seed + seed}",
                             per_class * 6, cfg.exact_seed + seed)
            # Named as the exact arm's run: the chosen candidate's are not trained again.
            m, s = train_and_score(candidate, data,
                                   work / f"train-exact-{per_class * 6}-seed{seed}", seed, [val],
                                   scale_range=cfg.scale_range)
            scores += m
            seconds.append(s)
        rows.append({"candidate": _candidate_dict(candidate), **interval95(scores),
                     "train_seconds": float(np.mean(seconds))})
    steady = [r for r in rows if r["std"] <= cfg.max_spread]
    best = max(steady, key=lambda r: r["mean"]) if steady else min(rows, key=lambda r: r["std"])
    chosen = cfg.candidates[rows.index(best)]
    return chosen, {"rule": f"highest mean among std <= {cfg.max_spread:g}, else lowest std",
                    "seeds": list(cfg.protocol_seeds), "candidates": rows,
                    "chosen": _candidate_dict(chosen)}


def _candidate_dict(c: tuple) -> dict:
    return dict(zip(("model", "input_side", "steps", "lr", "full_res_head"), c, strict=True))


def _arm_runs(cfg: ToyDownstreamConfig, arm: str, candidate: tuple, pipe, work: Path,
              seed: int) -> tuple[Path, Path, str]:
    """The training data of `arm` for `seed`, its run folder and its loss."""
    from attnseg.pipeline.config import get_preset
    from attnseg.pipeline.models.loading import model_fingerprint

    from .downstream import (
        _arm_data,
        _per_class,
        _prompt_file,
        _rendered,
        _synth_dir,
        _synthesise,
    )

    bcfg = _bench_config(cfg, candidate)
    kind, _, value = arm.partition(":")
    per_class = _per_class(int(value) if kind == "images" else cfg.images)
    if kind == "exact":
        data = _rendered(bcfg, work / f"exact-{per_class * 6}-seed{cfg.exact_seed + seed}",
                         per_class * 6, cfg.exact_seed + seed)
        return data, work / f"train-exact-{per_class * 6}-seed{seed}", "ce"
    key = model_fingerprint(pipe)
    if kind == "renders":
        return _renders_arm(cfg, bcfg, value, pipe, work, seed, key)
    if kind == "prompts":
        data, name = _arm_data(bcfg, pipe, work, value, per_class, seed, key)
        return data, work / f"train-{name}-{per_class * 6}-seed{seed}-{key}", "ce"
    # The arms on the synthetic arm's prompts: with synth's own, folders named as before
    # there was a choice (their work folders are reused); with a prompt arm, named by it first.
    prompts, tag = None, ""
    if cfg.synthetic_prompts != "plain":
        name, prompts = _prompt_file(bcfg, work, cfg.synthetic_prompts, per_class, seed)
        tag = f"{name}-"
    if kind == "target":  # the synthetic arm's segmenters, scored on the target domain
        kind = "synthetic"
    if kind in ("synthetic", "loss", "images"):
        loss = value if kind == "loss" else "ce"
        if not prompts:
            data = _synthesise(bcfg, pipe, _synth_dir(work, per_class, seed, key), per_class,
                               seed)
            return data, work / f"train-synth-{per_class * 6}-{loss}-seed{seed}-{key}", loss
        # the same data and CE runs as the prompt arm's
        data, name = _arm_data(bcfg, pipe, work, cfg.synthetic_prompts, per_class, seed, key)
        run = f"train-{name}-{per_class * 6}-" + ("" if loss == "ce" else f"{loss}-")
        return data, work / f"{run}seed{seed}-{key}", loss
    if kind == "recipe":  # the synthetic arm's images, the recipe's masks
        recipe = next(r for r in cfg.recipes if r.name == value)
        name = f"{tag}recipe-{value}-{_recipe_digest(recipe, pipe.vae_scale_factor)}"
        data = _synthesise(bcfg, pipe, work / f"synth-{name}-{per_class}x6-seed{seed}-{key}",
                           per_class, seed, prompts=prompts, preset=recipe.preset,
                           overrides={"harvest": recipe.harvest, "mask": recipe.mask})
        return data, work / f"train-{name}-{per_class * 6}-seed{seed}-{key}", "ce"
    if kind == "lora":
        lora = next(r for r in cfg.loras if r.name == value)
        folder, _ = train_arm_lora(cfg, lora, work, key)
        name = f"{tag}lora-{value}-{lora.digest()}"
        data = _synthesise(bcfg, pipe, work / f"synth-{name}-{per_class}x6-seed{seed}-{key}",
                           per_class, seed, prompts=prompts, loras=(f"{folder}:{lora.scale:g}",))
        return data, work / f"train-{name}-{per_class * 6}-seed{seed}-{key}", "ce"
    iterations = 0 if get_preset("attnseg").mask.crf_iterations else cfg.crf_iterations
    name = f"{tag}crf{iterations}"
    data = _synthesise(bcfg, pipe, work / f"synth-{name}-{per_class}x6-seed{seed}-{key}",
                       per_class, seed, prompts=prompts,
                       overrides={"mask": {"crf_iterations": iterations}})
    return data, work / f"train-{name}-{per_class * 6}-seed{seed}-{key}", "ce"


def masks_tag(preset, levels) -> str:
    """The name of the masks the real-image labeller makes with `preset` at noise `levels`:
    the digest of what it reads (the preset's harvest and mask settings) and the levels. A
    changed default is not taken for the old one, and the same masks under another name (a
    reworded preset, a default that adopts a recipe) are neither labelled nor trained on
    again."""
    return (_digest({"harvest": asdict(preset.harvest), "mask": asdict(preset.mask)})
            + "-noise" + ",".join(f"{x:g}" for x in levels))


def _renders_arm(cfg: ToyDownstreamConfig, bcfg, value: str, pipe, work: Path, seed: int,
                 key: str) -> tuple[Path, Path, str]:
    """A renders arm's data (the exact arm's scenes of `seed`, labelled by the real-image
    labeller with the default preset, its CRF switched, or a recipe; labeller seed `seed`),
    its run folder and its loss."""
    from attnseg.pipeline.config import get_preset

    from .downstream import _per_class, _relabelled, _rendered

    count = _per_class(cfg.images) * 6
    rendered = _rendered(bcfg, work / f"exact-{count}-seed{cfg.exact_seed + seed}", count,
                         cfg.exact_seed + seed)
    kind, _, name = value.partition(":")
    stride = pipe.vae_scale_factor
    preset, levels = get_preset("attnseg", stride), tuple(cfg.labeller_noise)
    if kind == "crf":
        iterations = 0 if preset.mask.crf_iterations else cfg.crf_iterations
        preset = replace(preset, mask=replace(preset.mask, crf_iterations=iterations))
    elif kind == "recipe":
        recipe = next(r for r in cfg.recipes if r.name == name)
        levels = _recipe_noise(cfg, recipe)
        preset = recipe.resolve(stride)
    tag = masks_tag(preset, levels)
    data = _relabelled(bcfg, pipe, levels, rendered,
                       work / f"relabelled-{tag}-{count}-seed{cfg.exact_seed + seed}-{key}",
                       seed, key, preset, tag)
    loss = name if kind == "loss" else "ce"
    return data, work / f"train-relabelled-{tag}-{count}-{loss}-seed{seed}-{key}", loss


def train_arm_lora(cfg: ToyDownstreamConfig, lora: LoraArm, work: Path, key: str
                   ) -> tuple[Path, dict]:
    """`lora`'s folder for the model of fingerprint `key`, trained on its target renders (a
    finished one is not trained again), and what the report keeps of its training."""
    from .downstream import LORA_SUMMARY_KEYS, train_target_lora

    tcfg = lora.training_config(cfg, work, key)
    done = train_target_lora(_bench_config(cfg, cfg.candidates[0]), tcfg, lora.images,
                             lora.render_seed)
    return Path(tcfg.out), {k: done[k] for k in (*LORA_SUMMARY_KEYS, "train_seconds")}


def _stored_row(cfg: ToyDownstreamConfig, pipe, path: Path, preset, levels, source,
                seed: int, crf: int | None = None) -> dict:
    """The pseudo-mask figures of `preset` (a name, or one resolved for this model) with the
    labeller at noise `levels` and `seed` on `source`: kept at `path` (atomic write), so a
    rerun scores nothing twice."""
    from attnseg.pipeline.files import atomic_write_bytes
    from attnseg.pipeline.prompts import load_classes

    from .pseudo_masks import _pseudo_scores

    if path.is_file():
        return json.loads(path.read_text())
    scores = _pseudo_scores(pipe, preset, levels, _bench_config(cfg, cfg.candidates[0]), seed,
                            source, load_classes("toy"), crf=crf)
    row = {k: scores.get(k) for k in ("mIoU", "foreground_iou", "class_accuracy_on_foreground")}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(row) + "\n").encode())
    return row


def _pseudo_row(cfg: ToyDownstreamConfig, pipe, work: Path, preset: str, crf: int,
                source, render: str, seed: int) -> dict:
    """One preset's pseudo-mask scores on one render with one labeller seed (kept in `work`
    by model, recipe, render and seed)."""
    from attnseg.pipeline.models.loading import model_fingerprint

    noise = ",".join(f"{x:g}" for x in cfg.labeller_noise)
    path = work / "pseudo" / (f"{model_fingerprint(pipe)}-{preset}-crf{crf}-noise{noise}-"
                              f"{render}-seed{seed}.json")
    return _stored_row(cfg, pipe, path, preset, cfg.labeller_noise, source, seed, crf=crf)


def _recipe_noise(cfg: ToyDownstreamConfig, recipe: Recipe) -> tuple[float, ...]:
    return tuple(recipe.noise) or tuple(cfg.labeller_noise)


def _recipe_digest(recipe: Recipe, latent_stride: int,
                   levels: tuple[float, ...] | None = None) -> str:
    """12 hex digits naming what the recipe resolves to (every setting of its preset with the
    overrides applied, and the labeller's noise `levels` where they matter): files made with
    an edited recipe, or after its preset changed, are not taken for its old ones."""
    content = {"preset": asdict(recipe.resolve(latent_stride)),
               "noise": list(levels) if levels is not None else None}
    return _digest(content)


def _recipe_row(cfg: ToyDownstreamConfig, pipe, work: Path, recipe: Recipe, source,
                render: str, seed: int) -> dict:
    """`_pseudo_row` for a recipe; its files are named by the recipe's content, so an edited
    recipe is scored again."""
    from attnseg.pipeline.models.loading import model_fingerprint

    levels = _recipe_noise(cfg, recipe)
    stride = pipe.vae_scale_factor
    path = work / "pseudo" / (f"{model_fingerprint(pipe)}-recipe-{recipe.name}-"
                              f"{_recipe_digest(recipe, stride, levels)}-{render}-seed{seed}.json")
    return _stored_row(cfg, pipe, path, recipe.resolve(stride), levels, source, seed)


def pseudo_masks(cfg: ToyDownstreamConfig, pipe, work: Path, val, tests: list) -> dict:
    """Part 3 of the module docstring: every preset with and without its CRF on validation
    and on each test render, each recipe on validation, the best on validation (on the test
    renders too), and the default preset's localisation over the test renders."""
    from functools import partial

    from attnseg.pipeline.config import get_preset
    from attnseg.pipeline.prompts import load_classes

    from .pseudo_masks import two_object_localisation

    def on(row, source, name) -> dict:
        rows = [row(source, name, s) for s in cfg.labeller_seeds]
        out = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if
               all(r[k] is not None for r in rows)}
        out["labeller_std"] = float(np.std([r["mIoU"] for r in rows], ddof=1)) \
            if len(rows) > 1 else 0.0
        return out

    def on_tests(row) -> dict:
        per_render = [on(row, t, n) for t, n in zip(tests, names, strict=True)]
        return {"test": interval95([r["mIoU"] for r in per_render]), "per_render": per_render}

    names = [f"test-{s}-{cfg.test_images}" for s in cfg.test_seeds]
    val_name = f"val-{cfg.val_seed}-{cfg.test_images}"
    recipes = []
    for preset in cfg.presets:
        own = get_preset(preset).mask.crf_iterations
        for crf in (own, 0 if own else cfg.crf_iterations):  # as published, then switched
            row = partial(_pseudo_row, cfg, pipe, work, preset, crf)
            recipes.append({"preset": preset, "crf_iterations": crf, "published": crf == own,
                            "validation": on(row, val, val_name)["mIoU"], **on_tests(row)})
    tried = []
    for recipe in cfg.recipes:
        validation = on(partial(_recipe_row, cfg, pipe, work, recipe), val, val_name)
        tried.append({**asdict(recipe), "noise": list(_recipe_noise(cfg, recipe)),
                      "validation": validation["mIoU"],
                      **{k: validation.get(k) for k in ("foreground_iou",
                                                        "class_accuracy_on_foreground")}})
    best = max(recipes + tried, key=lambda r: r["validation"])
    if "name" in best:  # a recipe: scored on the test renders too
        best.update(on_tests(partial(_recipe_row, cfg, pipe, work,
                                     cfg.recipes[tried.index(best)])))
        chosen = {"recipe": best["name"]}
    else:
        chosen = {"preset": best["preset"], "crf_iterations": best["crf_iterations"]}
    bcfg = _bench_config(cfg, cfg.candidates[0])
    local = [two_object_localisation(pipe, bcfg, cfg.labeller_noise, t, load_classes("toy"),
                                     seed=cfg.labeller_seeds[0]) for t in tests]
    return {"noise_levels": list(cfg.labeller_noise), "labeller_seeds": list(cfg.labeller_seeds),
            "recipes": recipes, "tried_on_validation": tried, "best_on_validation": chosen,
            "localisation": {key: interval95([float(r[key]) for r in local])
                             for key in ("word_peaks_on_own_object", "both_words")}}


def run_toy_downstream(cfg: ToyDownstreamConfig) -> dict:
    """Run the instrument; writes OUT.json and OUT.md and returns the report."""
    from attnseg.pipeline.config import get_preset
    from attnseg.pipeline.device import resolve_device, resolve_dtype
    from attnseg.pipeline.models.loading import model_fingerprint

    from .pseudo_masks import _render

    cfg.validate()
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    pipe = None
    if cfg.presets or any(a != "exact" for a in cfg.arms):
        from attnseg.pipeline.models.loading import load_pipeline

        pipe = load_pipeline(cfg.model, device, resolve_dtype(cfg.dtype, device))
        check_recipe_heads(cfg.recipes, pipe)
        check_lora_targets(cfg.loras, pipe)
    base = output_base(cfg.out)
    work = Path(cfg.work) if cfg.work else with_suffix(base, ".work")
    work.mkdir(parents=True, exist_ok=True)
    first = _bench_config(cfg, cfg.candidates[0])
    val = _render(work, f"val-{cfg.val_seed}-{cfg.test_images}", cfg.val_seed, first)
    tests = [_render(work, f"test-{s}-{cfg.test_images}", s, first) for s in cfg.test_seeds]
    target_tests = [_render(work, f"target-test-{s}-{cfg.test_images}", s, first, "target")
                    for s in cfg.test_seeds] if any(
        a.partition(":")[0] in TARGET_ARMS for a in cfg.arms) else []
    # The default preset's masks as they were at this run: the arms that switch its CRF read
    # the other way once the default changes.
    report: dict = {"benchmark": "toy-downstream", "config": asdict(cfg),
                    "machine": machine_info(device), "model": cfg.model,
                    "default_mask": asdict(get_preset("attnseg").mask)}
    # Run for a single candidate too: its validation spread is reported, and its runs are the
    # exact arm's.
    candidate, report["protocol"] = choose_protocol(cfg, work, val)
    report["pseudo_masks"] = pseudo_masks(cfg, pipe, work, val, tests) if cfg.presets else None
    arms: dict = {}
    trained_on: dict = {}  # arm -> (data, run folder) per seed
    for arm in cfg.arms:
        per_seed, per_render, seconds = [], [], []
        domain = "target" if arm.partition(":")[0] in TARGET_ARMS else "source"
        for seed in cfg.seeds:
            data, run, loss = _arm_runs(cfg, arm, candidate, pipe, work, seed)
            scores, s = train_and_score(candidate, data, run, seed,
                                        target_tests if domain == "target" else tests, loss,
                                        cfg.scale_range)
            per_seed.append(float(np.mean(scores)))
            per_render.append(scores)
            seconds.append(s)
            trained_on.setdefault(arm, []).append(
                (data, _run_folder(candidate, run, cfg.scale_range)))
        by_render = np.asarray(per_render)  # [seed, render]
        arms[arm] = {**interval95(per_seed), "test_domain": domain,
                     "by_render": [interval95(list(col)) for col in by_render.T],
                     "train_minutes": float(np.mean(seconds)) / 60}
        if arm.startswith("lora:"):
            lora = next(r for r in cfg.loras if r.name == arm.partition(":")[2])
            arms[arm]["lora"] = train_arm_lora(cfg, lora, work, model_fingerprint(pipe))[1]
        if arm.startswith("images:"):  # the bound at the same count beside it
            at_count = replace(cfg, images=int(arm.partition(":")[2]))
            exact = []
            for seed in cfg.seeds:
                data, run, _ = _arm_runs(at_count, "exact", candidate, pipe, work, seed)
                exact.append(float(np.mean(train_and_score(
                    candidate, data, run, seed, tests, scale_range=cfg.scale_range)[0])))
            arms[arm]["exact"] = interval95(exact)
    if "exact" in arms:  # each seed's exact-label segmenter judges that seed's training masks
        judges = [run for _, run in trained_on["exact"]]
        for arm, row in arms.items():
            if arm.partition(":")[0] in JUDGED_ARMS:
                judged = [judge_training_masks(data, judge, candidate[1], work)
                          for (data, _), judge in zip(trained_on[arm], judges, strict=True)]
                row["training_masks"] = {k: interval95([j[k] for j in judged])
                                         for k in ("mIoU", "precision")}
    for arm, row in arms.items():  # a renders arm's masks have the exact labels beside them
        if arm.partition(":")[0] == "renders":
            compared = [compare_training_masks(data, work) for data, _ in trained_on[arm]]
            row["masks_vs_exact"] = {k: interval95([c[k] for c in compared])
                                     for k in compared[0]}
    bases = {kind: arms.get(base, {}).get("values") for kind, base in (
        ("lora", "target"), ("renders", "renders"))}
    for arm, row in arms.items():
        paired = bases.get(arm.partition(":")[0], arms.get("synthetic", {}).get("values"))
        if paired and arm not in ("exact", "synthetic", "target", "renders"):
            row["gain"] = interval95([v - b for v, b in zip(row["values"], paired,
                                                            strict=True)])
    report["arms"] = arms
    report["test_renders"] = {"seeds": list(cfg.test_seeds), "images": cfg.test_images}
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["files"] = write_json_and_markdown(report, base, to_markdown(report))
    return report


def _spread_table(arms: dict, key: str, columns: tuple, title: str, text: str,
                  headers: tuple) -> list[str]:
    """A markdown section of the arms that have `key`: each column's mean ± std over seeds."""
    rows = {arm: r[key] for arm, r in arms.items() if key in r}
    if not rows:
        return []
    lines = [title, "", text, "", "| arm | " + " | ".join(headers) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for arm, row in rows.items():
        lines.append("| " + " | ".join([arm] + [f"{pct(row[c]['mean'])} ± {pct(row[c]['std'])}"
                                               for c in columns]) + " |")
    return lines + [""]


def _bound_table(arms: dict) -> list[str]:
    """A markdown section of the `images:N` arms: each beside the exact-label bound at its own
    count, trained on the same seeds."""
    rows = {arm: r for arm, r in arms.items() if "exact" in r}
    if not rows:
        return []
    lines = ["### The exact-label bound at each `images:N` arm's count", "",
             "The exact arm trained on N rendered scenes with the same seeds and protocol; the "
             "share is the mean of the per-seed ratios.", "",
             "| arm | mIoU | exact labels at N | the bound's std (seeds) | share of the bound "
             "(%) | exact labels per seed |", "|---|---|---|---|---|---|"]
    for arm, r in rows.items():
        exact = r["exact"]
        share = (np.mean([v / b for v, b in zip(r["values"], exact["values"], strict=True)])
                 if all(exact["values"]) else None)
        lines.append(f"| {arm} | {pct(r['mean'])} | {pct(exact['mean'])} | {pct(exact['std'])} "
                     f"| {pct(share)} | {', '.join(pct(v) for v in exact['values'])} |")
    return lines + [""]


def to_markdown(report: dict) -> str:
    cfg = {"synthetic_prompts": "plain", **report["config"]}  # reports from before the choice
    lines = ["# Toy world: the downstream instrument", "",
             f"Segmenters trained on {cfg['images']} images per arm (an `images:N` arm: N), "
             "scored on "
             f"{len(cfg['test_seeds'])} test renders (seeds "
             f"{', '.join(map(str, cfg['test_seeds']))}) of {cfg['test_images']} scenes each "
             f"against exact labels; training seeds {', '.join(map(str, cfg['seeds']))}. "
             f"The arms on generated images draw {_PROMPTS[cfg['synthetic_prompts']]}. "
             "mIoU in %: mean over seeds of each seed's mean over the renders, its standard "
             "deviation over seeds and the 95 % t-interval of the mean. Made on this project's "
             "2-core CPU machine with the shipped toy model (no downloaded weights or data).",
             ""]
    protocol = report["protocol"]
    chosen = protocol["chosen"]
    if protocol["candidates"]:
        lines += ["## Protocol (chosen on the validation render)", "",
                  f"Rule: {protocol['rule']}. Chosen: {_describe(chosen)}.", "",
                  "| candidate | validation mIoU | std | minutes per run |",
                  "|---|---|---|---|"]
        for r in protocol["candidates"]:
            lines.append(f"| {_describe(r['candidate'])} | {pct(r['mean'])} | "
                         f"{pct(r['std'])} | {r['train_seconds'] / 60:.1f} |")
    else:
        lines += ["## Protocol", "", f"{_describe(chosen)}: {protocol['rule']}."]
    lines.append("")
    lines += ["## Arms (test renders)", "",
              "Arms marked (target) are scored on target-domain renders of the same seeds; "
              "their gain is against `target` (the synthetic arm's segmenters there); "
              + ("the `renders:` arms' against `renders` (the exact arm's scenes with the "
                 "default preset's masks: its dense CRF "
                 + _crf_words(report.get("default_mask")) + "); "
                 if "renders" in report["arms"] else "")
              + "the others' against `synthetic`.", "",
              "| arm | mIoU | std (seeds) | 95 % interval | gain [95 % interval] | "
              "per render | minutes per run |", "|---|---|---|---|---|---|---|"]
    for arm, r in report["arms"].items():
        gain = r.get("gain")
        g = (f"{100 * gain['mean']:+.1f} [{100 * gain['ci95'][0]:+.1f}, "
             f"{100 * gain['ci95'][1]:+.1f}]") if gain else ""
        per_render = ", ".join(pct(x["mean"]) for x in r["by_render"])
        label = f"{arm} (target)" if r.get("test_domain") == "target" else arm
        lines.append(f"| {label} | {pct(r['mean'])} | {pct(r['std'])} | "
                     f"[{pct(r['ci95'][0])}, {pct(r['ci95'][1])}] | {g} | {per_render} | "
                     f"{r['train_minutes']:.1f} |")
    lines.append("")
    lines += _bound_table(report["arms"])
    lines += _spread_table(
        report["arms"], "training_masks", ("mIoU", "precision"),
        "### The masks each arm trains on, judged by the exact-label segmenter",
        "Each seed's training masks against what that seed's exact-label segmenter sees in the "
        "generated images (a proxy: generated images have no ground truth, and the judge errs "
        "too; unsure pixels not counted). Precision: the mean over the shapes of the share of a "
        "shape's mask that the judge calls that shape. Mean ± standard deviation over the "
        "seeds, in %.", ("mIoU against the judge", "precision of the shapes' masks"))
    lines += _spread_table(
        report["arms"], "masks_vs_exact", ("mIoU", "labelled", "reliability_mean", "below_band"),
        "### The masks each `renders` arm trains on, against the exact labels",
        "The same scenes' exact labels score each seed's training masks (unsure pixels not "
        "counted); their reliability on the pixels they label is what the reliability-aware "
        "losses weight. Mean ± standard deviation over the seeds, in %.",
        ("mIoU", "pixels labelled", "mean reliability",
         "reliability below ignore-band's threshold"))
    for arm, r in report["arms"].items():
        if "lora" in r:
            lora = next(x for x in cfg["loras"] if x["name"] == arm.partition(":")[2])
            done = r["lora"]
            lines += [f"LoRA `{lora['name']}`: rank {lora['rank']}, {done['steps']} steps at lr "
                      f"{lora['lr']:g} on {', '.join(lora['targets'])}, offset noise "
                      f"{lora['noise_offset']:g}, {done['images']} unlabelled target renders "
                      f"(seed {lora['render_seed']}), fused at scale {lora['scale']:g}; "
                      f"{done['trainable_params']} parameters, probe loss "
                      f"{done['probe_loss_start']:.4f} -> {done['probe_loss_end']:.4f}"
                      + (f", trained in {done['train_seconds'] / 60:.1f} min"
                         if done["train_seconds"] is not None else "") + ".", ""]
    if report.get("pseudo_masks"):
        lines += _pseudo_markdown(report["pseudo_masks"], cfg)
    lines += [f"Wall time: {report['seconds'] / 60:.0f} min.", ""]
    return "\n".join(lines)


def _pseudo_markdown(pm: dict, cfg: dict) -> list[str]:
    best = pm["best_on_validation"]
    chosen = (f"the recipe `{best['recipe']}` (below)" if "recipe" in best else
              f"`{best['preset']}` with {best['crf_iterations']} CRF iterations")
    seeds = ", ".join(map(str, pm["labeller_seeds"]))
    lines = ["## Pseudo-masks (validation and test renders)", "",
             f"The real-image labeller (noise levels {pm['noise_levels']}, seeds {seeds}) on the "
             f"rendered scenes; unsure pixels count as wrong. Test: mean over the "
             f"{len(cfg['test_seeds'])} renders of each render's mean over the labeller's "
             "seeds, the standard deviation over the renders, and the 95 % t-interval. "
             f"Best on validation: {chosen}.", "",
             "| preset | dense CRF | validation mIoU | test mIoU | std (renders) | "
             "95 % interval | per render | foreground IoU | class accuracy on foreground |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in pm["recipes"]:
        crf = f"{r['crf_iterations']} it." if r["crf_iterations"] else "off"
        crf += "" if r["published"] else " (switched)"
        t = r["test"]
        extra = [np.mean([x.get(k, np.nan) for x in r["per_render"]])
                 for k in ("foreground_iou", "class_accuracy_on_foreground")]
        lines.append(
            f"| `{r['preset']}` | {crf} | {pct(r['validation'])} | {pct(t['mean'])} | "
            f"{pct(t['std'])} | [{pct(t['ci95'][0])}, {pct(t['ci95'][1])}] | "
            f"{', '.join(pct(x['mIoU']) for x in r['per_render'])} | "
            + " | ".join("—" if np.isnan(x) else pct(x) for x in extra) + " |")
    if pm["tried_on_validation"]:
        lines += ["", "Recipes tried on validation (a preset with overrides; the best on "
                  "validation is also scored on the test renders):", "",
                  "| recipe | preset | overrides | labeller noise | validation mIoU | "
                  "foreground IoU | class accuracy on foreground | test mIoU (renders) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in pm["tried_on_validation"]:
            overrides = "; ".join(f"{section}.{k}={json.dumps(v)}" for section in
                                  ("harvest", "mask") for k, v in r[section].items()) or "none"
            t = r.get("test")
            test = (f"{pct(t['mean'])} ± {pct(t['std'])} "
                    f"({', '.join(pct(x['mIoU']) for x in r['per_render'])})") if t else ""
            lines.append(
                f"| {r['name']} | `{r['preset']}` | `{overrides}` | "
                f"{', '.join(f'{x:g}' for x in r['noise'])} | {pct(r['validation'])} | "
                + " | ".join("—" if r[k] is None else pct(r[k]) for k in
                             ("foreground_iou", "class_accuracy_on_foreground"))
                + f" | {test} |")
    loc = pm["localisation"]
    w, b = loc["word_peaks_on_own_object"], loc["both_words"]
    lines += ["", "Two-object localisation (the default preset's maps, test renders): each "
              f"class word's map peaks on its own object in {pct(w['mean'])} ± "
              f"{pct(w['std'])} % of (scene, word) pairs (per render: "
              f"{', '.join(pct(x) for x in w['values'])}); both words in {pct(b['mean'])} ± "
              f"{pct(b['std'])} % of scenes.", ""]
    return lines


_PROMPTS = {"plain": "synth's own prompts (one class each)",
            "templates": "the toy templates with the class word (one class each)",
            "augmented": "augmented prompts (synonyms and hyponyms; one class each)",
            "several-classes": "augmented prompts naming one to three classes"}


def _crf_words(mask: dict | None) -> str:
    if mask is None:  # reports from before the record
        return "as the run's default had it"
    n = mask["crf_iterations"]
    return f"{n} iterations at this run" if n else "off at this run"


def _describe(c: dict) -> str:
    side = f"{c['input_side']}px input" if c["input_side"] else "scene-size input"
    head = ", full-resolution head" if c["full_res_head"] else ""
    return f"{c['model']}, {side}, {c['steps']} steps, lr {c['lr']:g}{head}"
