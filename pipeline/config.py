"""Typed configuration: harvesting, mask finalisation, synthesis jobs, and the recipe presets.

Every knob is a dataclass field. A config can be read from a JSON or TOML file and then
overridden from the command line; presets are plain functions that return configured
dataclasses, so a user can see and change exactly what a recipe does.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from .errors import UserError
from .settings import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    UnitFloat,
    check_value,
    config_from,
    field_type,
    unknown_keys_line,
)

BLOCKS = ("down", "mid", "up")
# Where the UNet runs: eager torch, or an engine (attnseg.engines).
BACKENDS = ("torch", "compile", "onnxruntime", "tensorrt")
NORMALIZATIONS = ("minmax", "max", "none")
ACCUMULATE = ("native", "common", "per_head")
INTERP_MODES = ("none", "nearest", "bilinear", "bicubic")


@dataclass
class HarvestConfig:
    """What cross-attention is harvested and how it is aggregated into per-class maps.

    Strides are image pixels per attention-map pixel, so a recipe means the same at any image
    size: at 512x512, stride 8 is the 64x64 maps, 16 is 32x32, 32 is 16x16 and 64 is 8x8.
    """

    # Which cross-attention layers contribute: a UNet's by stride and block; a DiT's (PixArt,
    # SD3, Flux: every layer at one stride, `blocks` does not apply) by depth, the fractions
    # [lo, hi) of its transformer blocks in the order they run (Flux: the double-stream
    # blocks, then the single-stream ones).
    strides: tuple[PositiveInt, ...] = (8, 16, 32)
    blocks: tuple[str, ...] = ("down", "mid", "up")
    transformer_depth: tuple[UnitFloat, UnitFloat] = (0.0, 1.0)
    # Attention heads, when only some carry the words' places: attention module name (as in
    # the model, e.g. "up_blocks.1.attentions.0.transformer_blocks.0.attn2") -> the indices
    # of its heads that contribute. Empty: every head of every selected layer. Otherwise only
    # the named layers contribute, and each must be one the settings above select.
    heads: dict[str, tuple[NonNegativeInt, ...]] = field(default_factory=dict)
    # Fractions [lo, hi) of the denoising steps that contribute; lo == hi picks one step.
    step_window: tuple[UnitFloat, UnitFloat] = (0.0, 1.0)
    # Weight of each stride when the per-stride means are combined (missing strides: 1.0).
    stride_weights: dict[PositiveInt, NonNegativeFloat] = field(default_factory=dict)
    # How the sub-tokens of one class word are merged: "sum" or "mean" of their columns.
    token_merge: str = "sum"
    # Where per-step maps are accumulated: "native" keeps one running mean per stride
    # (cheapest: resizing is linear, so it is done once at the end); "common" resizes every
    # step's map to `combine_stride` first, which recipes that clamp each resized map need;
    # "per_head" (DAAM's order) keeps one step-sum per layer and head at native resolution,
    # and at the end resizes each to `combine_stride` with `accumulate_mode`, clamps it at
    # zero and averages over layers and heads.
    accumulate: str = "native"
    accumulate_mode: str = "bicubic"
    clamp_each_step: bool = False
    # Per-stride normalisation applied to each stride's mean before combining.
    stride_normalize: str = "none"
    # Stride of the combined map, and how per-stride maps are resized to it.
    combine_stride: PositiveInt = 8
    combine_mode: str = "bicubic"
    # Joint-attention models (SD3's MMDiT, Flux), whose image queries attend to image and text
    # keys together: the class map is the image queries' softmax over the text keys only
    # ("text", as a cross-attention layer's) or over the whole joint sequence, of which the
    # text columns are kept ("joint": lower where the image attends to itself; costs a
    # softmax over every image key). Other models have text-only cross-attention.
    joint_softmax: str = "text"
    # Self-attention refinement: map <- A^k . map at `refine_stride` (0 turns it off).
    refine_power: NonNegativeInt = 0
    refine_stride: PositiveInt = 16
    refine_mode: str = "bicubic"

    def job_record(self) -> dict:
        """The settings as a synthesis job records them (job.json): `job_record`."""
        return job_record(self, LATER_SETTINGS)

    @classmethod
    def from_record(cls, record: dict) -> HarvestConfig:
        """The settings from a JSON record of them (`job_record`, an engine's manifest)."""
        cfg = config_from(cls, record, "harvest")
        cfg.heads = check_heads(cfg.heads)
        return cfg

    def validate(self, latent_stride: int = 8) -> None:
        """Check the settings; strides are checked against the model's latent stride (its
        VAE's downsampling: 8 for every Stable Diffusion)."""
        for s in self.strides:
            if s < latent_stride or s & (s - 1):
                raise UserError(f"harvest stride {s} is not a power of two >= {latent_stride} "
                                f"(the model's latent stride)")
        bad = [b for b in self.blocks if b not in BLOCKS]
        if bad:
            raise UserError(f"unknown UNet block(s) {bad}; choose from {list(BLOCKS)}")
        lo, hi = self.step_window
        if not (0.0 <= lo <= hi <= 1.0):
            raise UserError(f"step_window {self.step_window} must satisfy 0 <= lo <= hi <= 1")
        lo, hi = self.transformer_depth
        if not (0.0 <= lo < hi <= 1.0):
            raise UserError(f"transformer_depth {self.transformer_depth} must satisfy "
                            "0 <= lo < hi <= 1")
        if self.token_merge not in ("sum", "mean"):
            raise UserError(f"token_merge must be 'sum' or 'mean', not {self.token_merge!r}")
        if self.accumulate not in ACCUMULATE:
            raise UserError(f"accumulate must be one of {list(ACCUMULATE)}, not "
                            f"{self.accumulate!r}")
        for name in ("accumulate_mode", "combine_mode", "refine_mode"):
            if getattr(self, name) not in INTERP_MODES:
                raise UserError(f"{name} must be one of {list(INTERP_MODES)}")
        if self.stride_normalize not in NORMALIZATIONS:
            raise UserError(f"stride_normalize must be one of {list(NORMALIZATIONS)}")
        if self.refine_power < 0:
            raise UserError("refine_power must be >= 0")
        if self.joint_softmax not in ("text", "joint"):
            raise UserError(f"joint_softmax must be 'text' or 'joint', not "
                            f"{self.joint_softmax!r}")
        check_heads(self.heads)

    def step_range(self, num_steps: int) -> range:
        """The denoising step indices that contribute, out of `num_steps` (never empty)."""
        lo, hi = self.step_window
        first = min(int(lo * num_steps), num_steps - 1)
        last = max(first + 1, min(num_steps, math.ceil(hi * num_steps)))
        return range(first, last)


# HarvestConfig settings that job files written before them lack (see `job_record`).
LATER_SETTINGS = {"joint_softmax": "text", "transformer_depth": (0.0, 1.0), "heads": {}}
MASK_LATER_SETTINGS = {"normalize_at": "maps"}


def job_record(settings, later: dict) -> dict:
    """A settings dataclass as a synthesis job records it (job.json, manifest lines). Settings
    added after job files were first written (`later`: name -> default) appear only where they
    differ from their defaults, so a dataset begun before they existed still resumes with the
    same bytes."""
    record = asdict(settings)
    for name, default in later.items():
        if record[name] == default:
            del record[name]
    return record


def check_heads(heads) -> dict[str, tuple[int, ...]]:
    """`HarvestConfig.heads` from a config file or `--set` (layer name -> list of head
    indices) as the dataclass holds it; one clear line when it is malformed."""
    if not isinstance(heads, dict):
        raise UserError(f"harvest setting 'heads' expects a mapping of layer names to lists of "
                        f"head indices, got {heads!r}")
    out = {}
    for name, picked in heads.items():
        if not isinstance(name, str) or not name:
            raise UserError(f"harvest heads: {name!r} is not a layer name")
        if (not isinstance(picked, (list, tuple)) or not picked
                or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 0
                           for h in picked)):
            raise UserError(f"harvest heads of {name}: {picked!r} is not a non-empty list of "
                            "head indices (integers >= 0)")
        if len(set(picked)) != len(picked):
            raise UserError(f"harvest heads of {name}: {list(picked)} names a head twice")
        out[name] = tuple(picked)
    return out


@dataclass
class MaskConfig:
    """How combined maps become a label map and a reliability map (see kernels.finalize)."""

    normalize: str = "minmax"
    # Background score = bg_const + bg_slope * (max foreground score).
    bg_const: UnitFloat = 0.45
    bg_slope: float = 0.0
    # Pixels whose max foreground score lies in [ignore_low, ignore_high) are labelled 255.
    ignore_low: UnitFloat = 0.35
    ignore_high: UnitFloat = 0.45
    upsample_mode: str = "bicubic"
    # Where `normalize` runs: on the combined maps, before they are resized to the image
    # ("maps": cheaper, the default), or on the image-size maps after the resize ("image":
    # DAAM's order, whose bicubic overshoot then sets the min and max).
    normalize_at: Literal["maps", "image"] = "maps"
    # Dense-CRF refinement (kernels.crf, pydensecrf's model): mean-field iterations (0: off);
    # appearance kernel weight, position and colour scales (in pixels of the image); smoothness
    # weight and position scale. Images with a side above crf_max_side are refined at that size
    # and the result resized back (the lattice CRF costs ~0.1-0.4 s per 512x512 iteration on
    # one CPU core; a smaller side trades boundary detail for time). These defaults are a
    # lighter appearance kernel than the presets that cite a codebase use (CRF_PSA below).
    crf_iterations: NonNegativeInt = 0
    crf_w_app: NonNegativeFloat = 4.0
    crf_sxy_app: PositiveFloat = 40.0
    crf_srgb: PositiveFloat = 13.0
    crf_w_smooth: NonNegativeFloat = 3.0
    crf_sxy_smooth: PositiveFloat = 3.0
    crf_max_side: PositiveInt = 512
    # Small-region removal (kernels.regions, DiffuMask's contour step): each class's connected
    # regions whose bounding box covers less than this fraction of the image become background,
    # and background holes inside the rest take their class (0: off). DiffuMask drops boxes
    # under 250 pixels of a 512x512 image: 250 / 512^2 = 0.00095.
    min_region_box: UnitFloat = 0.0

    def job_record(self) -> dict:
        """The settings as a synthesis job records them (job.json, manifest lines)."""
        return job_record(self, MASK_LATER_SETTINGS)

    def validate(self) -> None:
        if self.normalize not in NORMALIZATIONS:
            raise UserError(f"mask normalize must be one of {list(NORMALIZATIONS)}")
        if self.upsample_mode not in INTERP_MODES:
            raise UserError(f"mask upsample_mode must be one of {list(INTERP_MODES)}")
        if self.ignore_low > self.ignore_high:
            raise UserError("mask ignore_low must be <= ignore_high")
        if self.crf_iterations < 0 or self.crf_max_side < 8:
            raise UserError("mask crf_iterations must be >= 0 and crf_max_side >= 8")
        if min(self.crf_sxy_app, self.crf_srgb, self.crf_sxy_smooth) <= 0:
            raise UserError("mask crf_sxy_app, crf_srgb and crf_sxy_smooth must be > 0")
        if not 0.0 <= self.min_region_box < 1.0:
            raise UserError("mask min_region_box must be a fraction of the image in [0, 1)")


# The dense CRF of the codebases the diffumask and attn2mask presets cite: psa's
# `crf_inference` (AffinityNet, the refinement DiffuMask's replicators run), as pydensecrf's
# README example: a smoothness kernel of compat 3 and sxy 3, an appearance kernel of compat 10,
# sxy 80, srgb 13, 10 mean-field iterations.
CRF_PSA = {"crf_iterations": 10, "crf_w_app": 10.0, "crf_sxy_app": 80.0, "crf_srgb": 13.0,
           "crf_w_smooth": 3.0, "crf_sxy_smooth": 3.0}


@dataclass
class Preset:
    """A named recipe: harvesting and mask settings plus where the recipe comes from."""

    name: str
    source: str
    harvest: HarvestConfig
    mask: MaskConfig
    # Recipe defaults for generation that the CLI uses unless the user overrides them.
    steps: int | None = None
    guidance: float | None = None

    def without_crf(self) -> Preset:
        """This recipe with its dense CRF off: its masks as the maps decide them, where the
        maps are what is compared or timed."""
        return replace(self, mask=replace(self.mask, crf_iterations=0))

    def for_latent_stride(self, latent_stride: int) -> Preset:
        """This recipe for a model whose VAE downsamples by `latent_stride`. Recipes are
        written for Stable Diffusion's 8: a stride names a UNet level (8 the first, 16 the
        next, ...), so another VAE scales every stride by latent_stride / 8, keeping the
        levels (the toy model's 4x VAE: strides 4, 8, 16)."""
        if latent_stride == 8:
            return self
        if latent_stride < 1 or latent_stride & (latent_stride - 1):
            raise UserError(f"latent stride {latent_stride} is not a power of two")

        def scale(s: int) -> int:
            return max(1, s * latent_stride // 8)

        h = self.harvest
        harvest = replace(h, strides=tuple(scale(s) for s in h.strides),
                          stride_weights={scale(k): v for k, v in h.stride_weights.items()},
                          combine_stride=scale(h.combine_stride),
                          refine_stride=scale(h.refine_stride))
        return replace(self, harvest=harvest, mask=replace(self.mask))


def _preset_attnseg() -> Preset:
    # The dense CRF is on: on the toy world it lifts the masks by 18 points and, on the same
    # scenes with only the masks changed, the segmenter trained on them beyond the 95 %
    # interval (pipeline/cli/synth.py's TOY_RENDERS_CRF_GAIN); MaskConfig's lighter kernel.
    # The maps and the ignore band stay: the best recipe on validation (DAAM's maps, the CRF,
    # no band) scores higher only by labelling the band, and its masks train no better
    # segmenter (TOY_RENDERS_RECIPE_GAIN).
    return Preset(
        name="attnseg",
        source="attnseg default: every cross-attention layer at strides 8-32, all steps, "
        "per-stride means combined at stride 8, min-max, bg 0.45, ignore band [0.35, 0.45), "
        "dense CRF (10 iterations).",
        harvest=HarvestConfig(),
        mask=MaskConfig(crf_iterations=10),
    )


def _preset_diffumask() -> Preset:
    # DiffuMask (public code, Stable_Diffusion/parallel_generate_VOC_Attention_AnyClass.py):
    # conditional half, mean over steps/heads/layers per resolution (16, 32, 64 at 512), each
    # resized bicubically to image size and divided by its max, averaged; 50 steps, guidance 7;
    # a constant background threshold (swept 0.35-0.54 in the paper; 0.45 here). Differences
    # kept: its VOC-specific exceptions (the 8x8 maps alone for sofa, train and tvmonitor, the
    # 16x16 alone for diningtable) are not applied; it max-normalises each token's map before
    # averaging a word's tokens, where the preset sums the tokens' columns first (one-token
    # words agree). Refinement: its public code refines with an AffinityNet trained on the
    # generated set (a second training stage, out of this tool's scope); the paper and its
    # replicators use a dense CRF, which the preset runs with psa's kernels (CRF_PSA). Then its
    # contour step (infer_aff.py): regions whose bounding box is
    # under 250 pixels of the 512x512 image are dropped, the rest filled.
    return Preset(
        name="diffumask",
        source="DiffuMask (Wu et al., 2023), public code: per-resolution mean, bicubic to image, "
        "/max, average over resolutions, constant background 0.45; dense CRF (psa's kernels, 10 "
        "iterations); "
        "regions with a bounding box under 250 px (of 512x512) dropped, holes filled.",
        harvest=HarvestConfig(
            strides=(8, 16, 32), stride_normalize="max", combine_stride=1,
            combine_mode="bicubic", stride_weights={8: 1 / 3, 16: 1 / 3, 32: 1 / 3},
        ),
        mask=MaskConfig(normalize="none", bg_const=0.45, ignore_low=1.0, ignore_high=1.0,
                        upsample_mode="none", min_region_box=250 / 512 ** 2, **CRF_PSA),
        steps=50, guidance=7.0,
    )


def _preset_dataset_diffusion() -> Preset:
    # Dataset Diffusion (public code, gen_data.py): 16x16 cross-attention (32 stride at 512),
    # mean over heads/layers/steps (all 100), bicubic to 32x32, times the 32x32 self-attention
    # matrix to the 4th power, min-max per class, bicubic to image size; foreground where the
    # best score >= 0.6, 255 where it is in [0.5, 0.6), background below (the same as bg 0.5
    # with the ignore band [0.5, 0.6)); a word's tokens averaged (the same after min-max as the
    # sum). Differences kept: it generates with a fixed negative prompt ("ugly, tiling, ...")
    # and reads the cross-attention of a separate class prompt run beside the caption; here the
    # maps come from the caption itself with an empty negative prompt.
    return Preset(
        name="dataset-diffusion",
        source="Dataset Diffusion (Nguyen et al., 2023): 16x16 cross-attn, bicubic to 32x32, "
        "self-attention^4 refinement, min-max, bg < 0.5, ignore [0.5, 0.6).",
        harvest=HarvestConfig(
            strides=(32,), combine_stride=16, combine_mode="bicubic",
            refine_power=4, refine_stride=16,
        ),
        mask=MaskConfig(normalize="minmax", bg_const=0.5, ignore_low=0.5, ignore_high=0.6,
                        upsample_mode="bicubic"),
        steps=100, guidance=7.5,
    )


def _preset_daam() -> Preset:
    # DAAM (pip daam 0.2.0, trace.py): every cross-attention map of the conditional half
    # except the 8x8 ones (factor 8: the mid block), summed over the steps per (layer, head)
    # at native resolution; each sum resized bicubically to the latent size (64x64 at 512:
    # stride 8) and clamped at 0 once; the mean over layers and heads; a word's tokens
    # averaged; then (heatmap.py, WordHeatMap.expand_as) each word's map resized bicubically to
    # the image and min-max normalised there; threshold 0.4.
    return Preset(
        name="daam",
        source="DAAM (Tang et al., 2023): up+down blocks, per (layer, head) step-sums at "
        "native resolution, each bicubic to 64x64 and clamped >= 0, mean over layers and "
        "heads; word tokens averaged; bicubic to the image, then min-max; threshold 0.4.",
        harvest=HarvestConfig(
            strides=(8, 16, 32, 64), blocks=("down", "up"), accumulate="per_head",
            accumulate_mode="bicubic", combine_stride=8, token_merge="mean",
        ),
        mask=MaskConfig(normalize="minmax", bg_const=0.4, ignore_low=1.0, ignore_high=1.0,
                        upsample_mode="bicubic", normalize_at="image"),
    )


def _preset_attn2mask() -> Preset:
    # attn2mask as replicated by others: heat map at one step (50 of 100), min-max,
    # background = 1 - max - 0.2, argmax, then a dense CRF on the image (CRF_PSA).
    return Preset(
        name="attn2mask",
        source="attn2mask (Yoshihashi et al.), as replicated publicly: one step (50/100), "
        "min-max, background 1 - max - 0.2, argmax, dense CRF (psa's kernels, 10 iterations).",
        harvest=HarvestConfig(strides=(8, 16, 32), step_window=(0.5, 0.5)),
        mask=MaskConfig(normalize="minmax", bg_const=0.8, bg_slope=-1.0, ignore_low=1.0,
                        ignore_high=1.0, **CRF_PSA),
        steps=100,
    )


PRESETS = {
    "attnseg": _preset_attnseg,
    "diffumask": _preset_diffumask,
    "dataset-diffusion": _preset_dataset_diffusion,
    "daam": _preset_daam,
    "attn2mask": _preset_attn2mask,
}


def get_preset(name: str, latent_stride: int = 8) -> Preset:
    """A fresh copy of the named preset, for a model of this latent stride (see
    `Preset.for_latent_stride`)."""
    try:
        preset = PRESETS[name]()
    except KeyError:
        raise UserError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None
    return preset.for_latent_stride(latent_stride)


def preset_with_overrides(name: str, overrides: dict[str, Any], latent_stride: int = 8
                          ) -> Preset:
    """Preset `name` for a model of this latent stride with `overrides` ({"harvest": {...},
    "mask": {...}}, the sections' field names) applied, every value checked, validated."""
    preset = get_preset(name, latent_stride)
    for section in ("harvest", "mask"):
        values = dict(overrides.get(section, {}))
        target = getattr(preset, section)
        names = {f.name for f in dataclasses.fields(target)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise UserError(unknown_keys_line(unknown, names, section))
        for key, value in values.items():
            if section == "harvest" and key == "heads":
                value = check_heads(value)
            else:
                value = check_value(field_type(type(target), key), value, section, key)
            setattr(target, key, value)
    unknown = sorted(set(overrides) - {"harvest", "mask"})
    if unknown:
        raise UserError(unknown_keys_line(unknown, ("harvest", "mask"), "config", "section"))
    preset.harvest.validate(latent_stride)
    preset.mask.validate()
    return preset


@dataclass
class SynthConfig:
    """One dataset-synthesis job (`attnseg synth`)."""

    model: str = "tiny"
    classes: str = "voc"
    num_per_class: PositiveInt = 1
    out: str = "out/synth"
    preset: str = "attnseg"
    prompts: str | None = None
    batch_size: PositiveInt = 4
    steps: PositiveInt | None = None  # None: the preset's, else 20
    guidance: NonNegativeFloat | None = None  # None: the preset's, else 7.5
    # The sampler (models.SCHEDULERS); None: the model's own.
    scheduler: str | None = None
    height: PositiveInt | None = None  # None: 128 for the tiny models, 64 for toy, else 512
    width: PositiveInt | None = None
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    # Output layout: "voc" (files + manifest) or "webdataset" (tar chunks + parquet).
    format: str = "voc"
    samples_per_tar: PositiveInt = 1000  # a multiple of batch_size
    # Which part of the job this process does: "i/n", "auto" (launcher's rank), None: all.
    shard: str | None = None
    # Where the UNet runs: torch (eager), compile, onnxruntime, tensorrt; or a built engine.
    backend: str = "torch"
    engine: str | None = None
    # Overrides on top of the preset, e.g. {"harvest": {"strides": [16]}, "mask": {...}}.
    overrides: dict[str, Any] = field(default_factory=dict)
    # LoRAs fused into the model before generation: "DIR" or "FILE.safetensors", optionally
    # with ":scale"; `lora_scale` is the scale of those written without one.
    loras: list[str] = field(default_factory=list)
    lora_scale: float = 1.0
    # Load pickle weights (.bin, .ckpt): they can run code, so only when the user says so.
    allow_pickle: bool = False
    # Threads that encode and write samples while the next batch generates (0: inline).
    write_workers: NonNegativeInt = 2

    def validate(self) -> None:
        if self.write_workers < 0:
            raise UserError("--write-workers must be >= 0")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and (v <= 0 or v % 8):
                raise UserError(f"--{name} {v} is not a positive multiple of 8")
        if self.num_per_class < 1:
            raise UserError("--num-per-class must be >= 1")
        if self.batch_size < 1:
            raise UserError("--batch-size must be >= 1")
        if self.steps is not None and self.steps < 1:
            raise UserError("--steps must be >= 1")
        from .models.loading import check_scheduler  # light: no torch at import

        check_scheduler(self.scheduler, self.model)  # the family too, where known unloaded
        if self.format not in ("voc", "webdataset"):
            raise UserError(f"--format must be voc or webdataset, not {self.format!r}")
        if self.format == "webdataset" and (
                self.samples_per_tar < 1 or self.samples_per_tar % self.batch_size):
            raise UserError(f"--samples-per-tar {self.samples_per_tar} must be a positive "
                            f"multiple of --batch-size {self.batch_size}")
        if self.dtype not in ("auto", "fp32", "fp16", "bf16"):
            raise UserError(f"--dtype must be auto, fp32, fp16 or bf16, not {self.dtype!r}")
        if self.backend not in BACKENDS:
            raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, not "
                            f"{self.backend!r}")

    def resolve_preset(self, latent_stride: int = 8) -> Preset:
        """The preset for a model of this latent stride with this job's overrides applied
        (override strides are the model's own: image pixels per map pixel), validated."""
        return preset_with_overrides(self.preset, self.overrides, latent_stride)


def parse_shard(spec: str | None) -> tuple[int, int]:
    """`--shard`: "i/n" (0-based), or "auto" for the launcher's rank (torchrun/accelerate set
    RANK and WORLD_SIZE; Slurm arrays SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT)."""
    if spec is None:
        return 0, 1
    if spec == "auto":
        for rank, size in (("RANK", "WORLD_SIZE"),
                           ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")):
            if rank in os.environ and size in os.environ:
                return parse_shard(f"{os.environ[rank]}/{os.environ[size]}")
        return 0, 1
    i, slash, n = spec.partition("/")
    try:
        index, count = int(i), int(n)
    except ValueError:
        index, count = -1, 0
    if not slash or count < 1 or not 0 <= index < count:
        raise UserError(f"--shard {spec!r} is not of the form i/n with 0 <= i < n, or auto")
    return index, count


def synth_config_from(values: dict[str, Any]) -> SynthConfig:
    """Build a SynthConfig from a dict (a config file merged with CLI flags)."""
    from .settings import config_from

    return config_from(SynthConfig, values, "synth")
