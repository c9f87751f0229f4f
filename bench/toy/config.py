"""`attnseg bench toy`'s settings: one ToyBenchConfig, checked before anything runs."""

from __future__ import annotations

from dataclasses import dataclass

from attnseg.pipeline.adapt.lora_train import LORA_TARGETS
from attnseg.pipeline.adapt.prompt_augment import check_classes_per_prompt
from attnseg.pipeline.config import PRESETS, get_preset
from attnseg.pipeline.errors import UserError
from attnseg.pipeline.harvest.real_images import (
    RealImageConfig,
)
from attnseg.pipeline.settings import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    UnitFloat,
)
from attnseg.pipeline.train.losses import LossConfig

PROMPT_ARMS = ("templates", "augmented", "several-classes")


@dataclass
class ToyBenchConfig:
    """One `attnseg bench toy` run."""

    model: str = "toy"
    presets: tuple[str, ...] = tuple(PRESETS)
    seeds: tuple[int, ...] = (0, 1, 2)
    # The seed every choice made on the validation set uses (the labeller's noise draw, the
    # training protocol's synthetic data), and the one-seed figures (localisation, which
    # object is which): fixed apart from `seeds`, so that one-seed commands run side by side
    # (`seeds=[1]`) choose what the whole run chooses.
    tune_seed: int = 0
    val_seed: int = 101
    test_seed: int = 102
    num_images: PositiveInt = 200  # per rendered set (validation, test)
    size: PositiveInt = 64
    # Candidate noise levels of the labeller, tuned on the validation set.
    noise_candidates: tuple[tuple[UnitFloat, ...], ...] = (
        (0.1,), (0.2,), (0.3,), (0.5,), (0.1, 0.3), (0.2, 0.4))
    template: str = "a photo of a {}"
    # the colour baseline's thresholds, RGB distance
    thresholds: tuple[NonNegativeFloat, ...] = tuple(range(10, 201, 10))
    bg_candidates: tuple[UnitFloat, ...] = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)  # default preset, tuned
    # Layer choices (the model's own strides, UNet blocks) the default preset's maps are also
    # taken from, for localisation: which layers bind a word to its object differs between
    # models, and the preset's every-layer mean is not tuned to one. The defaults are the toy
    # model's (4x VAE: strides 4, 8, 16 are its 16x16, 8x8 and 4x4 maps).
    layer_candidates: tuple[tuple[tuple[int, ...], tuple[str, ...]], ...] = (
        ((8,), ("up",)), ((8,), ("down", "up")), ((8, 16), ("mid", "up")), ((4, 8), ("up",)),
        ((4,), ("down",)))
    # Attention heads, for localisation: each cross-attention head of the model alone is
    # ranked by localisation on the validation set, then the best k together for k = 1 ..
    # `head_candidates` (0: skipped); the k that localises best on validation (the fewest
    # on a tie) is reported on the test set. Some heads of a layer carry the words' places
    # and others do not, and a layer's mean over its heads blurs the two.
    head_candidates: NonNegativeInt = 6
    # Which object is which, as the model knows it apart from its attention: the noise levels
    # and draws per level of the denoising-error probe (`error_probe_draws` 0: skipped). The
    # levels are the ones whose summed error told the shapes apart best on 60 multi-object
    # scenes of the validation render for the shipped model (0.3: 60.5 %, 0.5: 66.1 %,
    # 0.7: 58.4 %, all three summed: 69.9 %).
    error_probe_levels: tuple[UnitFloat, ...] = (0.3, 0.5, 0.7)
    error_probe_draws: NonNegativeInt = 4
    # Downstream: images synthesised (and rendered, for the upper bound) per run; 0: skipped.
    downstream_images: NonNegativeInt = 240
    # The segmenters' training protocol (steps, learning rate, input size): chosen on the
    # validation set among `train_candidates` (trained on `tune_seed`'s synthetic data, a
    # main row's); with no candidates, train_steps, train_lr and train_size as given. The input
    # size is the side training crops and test images are resized to (0: the render's own
    # size): segformer predicts at a quarter of its input, so at 64x64 its 16x16 logits cannot
    # draw the outlines exact labels give, which caps the upper bound; a candidate may leave
    # the size out (then 0).
    train_candidates: tuple[tuple, ...] = ((2000, 2e-3), (6000, 2e-3), (6000, 8e-3),
                                           (6000, 8e-3, 128))
    train_steps: PositiveInt = 2000
    train_lr: PositiveFloat = 2e-3
    train_size: NonNegativeInt = 0
    train_model: str = "segformer-tiny"
    synth_steps: PositiveInt = 20
    guidance: NonNegativeFloat = 4.0
    exact_seed: int = 2000  # render seed of the upper bound's training scenes
    # Ablations (downstream; skipped without downstream_images): reliability-aware losses
    # trained on the same synthetic data as the CE row; prompt sets at the same budget.
    losses: tuple[str, ...] = ("ignore-band", "reliability-weighted", "cotrain")
    # Prompt arms: "templates" (the toy templates, class word only), "augmented" (`attnseg
    # prompts`: synonyms and hyponyms too), "several-classes" (augmented, a prompt naming 1,
    # 2, 3 classes at `classes_per_prompt`: the renders' own shares of 1, 2, 3 objects, fixed
    # from the world, not tuned).
    prompt_arms: tuple[str, ...] = ("templates", "augmented", "several-classes")
    classes_per_prompt: tuple[NonNegativeFloat, ...] = (0.4, 0.35, 0.25)
    # Target domain: unlabelled target renders a LoRA is trained on (0: skipped), its settings
    # (fixed beforehand, not tuned), and the seed of those renders.
    lora_images: NonNegativeInt = 400
    lora_steps: PositiveInt = 300
    lora_rank: PositiveInt = 8
    lora_lr: PositiveFloat = 1e-3
    lora_seed: int = 3000
    # Offset noise in the LoRA's training (`lora train --noise-offset`; without it the LoRA
    # learns the target's textures but not its colours) and the scale the LoRA is fused at.
    lora_noise_offset: NonNegativeFloat = 0.0
    lora_scale: float = 1.0
    # The layers the LoRA adapts: the attention projections (`attnseg lora train`'s default),
    # optionally the ResNet blocks' convolutions too (conv1, conv2), which carry more of a
    # domain's backgrounds and palette.
    lora_targets: tuple[str, ...] = LORA_TARGETS
    # The prompts both target-domain synthesis rows (without and with the LoRA) use: "plain"
    # (synth's own, the main row's) or one of the prompt arms.
    lora_prompt_arm: str = "plain"
    # Scaling: more synthetic-image counts besides downstream_images, on the first
    # `scaling_seeds` seeds.
    scaling_images: tuple[PositiveInt, ...] = (960, 3840)
    scaling_seeds: PositiveInt = 1
    # The CRF table: each preset with and without (this many iterations where the preset has
    # none); 0: skipped.
    crf_iterations: NonNegativeInt = 10
    # the CRF's cost is also timed at this size, 21 labels (0: not)
    crf_cost_size: NonNegativeInt = 512
    device: str = "auto"
    dtype: str = "auto"
    work: str | None = None  # None: <out>.work
    out: str = "attnseg-bench/toy"
    progress: bool = True

    def __post_init__(self):
        self.presets = tuple(self.presets)
        self.seeds = tuple(self.seeds)
        self.noise_candidates = tuple(tuple(c) for c in self.noise_candidates)
        self.error_probe_levels = tuple(self.error_probe_levels)
        self.losses = tuple(self.losses)
        self.prompt_arms = tuple(self.prompt_arms)
        self.classes_per_prompt = check_classes_per_prompt(self.classes_per_prompt)
        self.scaling_images = tuple(self.scaling_images)
        self.train_candidates = tuple((int(c[0]), float(c[1]), int(c[2]) if len(c) > 2 else 0)
                                      for c in self.train_candidates)
        self.lora_targets = tuple(self.lora_targets)
        self.layer_candidates = tuple((tuple(int(x) for x in strides), tuple(blocks))
                                      for strides, blocks in self.layer_candidates)

    def validate(self) -> None:
        for p in self.presets:
            get_preset(p)
        if not self.seeds:
            raise UserError("seeds must not be empty")
        if self.num_images < 1:
            raise UserError("num_images must be >= 1")
        if self.val_seed == self.test_seed:
            raise UserError("val_seed and test_seed must differ (tune on one, report the other)")
        for c in self.noise_candidates + (self.error_probe_levels,):
            RealImageConfig(noise_levels=c).validate()
        if self.error_probe_draws < 0:
            raise UserError("error_probe_draws must be >= 0")
        if self.head_candidates < 0:
            raise UserError("head_candidates must be >= 0")
        if self.tune_seed < 0:
            raise UserError("tune_seed must be >= 0")
        for name in self.losses:
            LossConfig(name=name).validate()
        unknown = set(self.prompt_arms) - set(PROMPT_ARMS)
        if unknown:
            raise UserError(f"unknown prompt arm(s) {sorted(unknown)}; choose from "
                            f"{list(PROMPT_ARMS)}")
        if self.lora_prompt_arm not in ("plain", *PROMPT_ARMS):
            raise UserError(f"unknown lora_prompt_arm {self.lora_prompt_arm!r}; choose from "
                            f"{['plain', *PROMPT_ARMS]}")
        for steps, lr, size in self.train_candidates or (
                (self.train_steps, self.train_lr, self.train_size),):
            if steps < 1 or not lr > 0 or not (size == 0 or size >= 32):
                raise UserError(f"training protocol ({steps} steps, lr {lr}, input size {size}) "
                                "needs steps >= 1, lr > 0 and a size of 0 (the render's) or "
                                ">= 32")
        if not 1 <= self.scaling_seeds <= len(self.seeds):
            raise UserError("scaling_seeds must be between 1 and the number of seeds")
