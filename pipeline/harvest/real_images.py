"""Pseudo-masks for real images, to measure a harvesting recipe against ground truth.

A generated image has no ground truth, but a labelled real image does. To score the
attention-to-mask recipe on a labelled set (`attnseg bench quality`), each real image goes
through the same harvesting as a generated one:

    image --VAE encode--> latents --noise to timestep t (for each noise level)--> UNet, one
    conditional call per level, prompt naming the image's classes --harvester--> HarvestResult
    --masks_from_harvest (the preset's recipe)--> label map, resized back to the image.

The prompt names the classes present in the image's ground truth, i.e. its image-level labels:
the protocol weakly-supervised segmentation uses to score pseudo-masks. Noise is seeded per image
index, so results do not depend on batching.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from ..config import Preset
from ..errors import UserError
from ..models.loading import model_family
from ..prompts import ClassInfo, PromptSpec, class_token_weights, describe_classes
from ..seeds import sample_seed
from ..settings import PositiveInt, UnitFloat
from .harvester import AttentionHarvester
from .masks import combine_maps, masks_from_harvest, refine_maps


@dataclass
class RealImageConfig:
    """How real images are put through the harvester."""

    # Fractions of the scheduler's training timesteps the latents are noised to; one UNet call
    # each, and their maps are averaged. Low levels keep the image's layout in the latents.
    noise_levels: tuple[UnitFloat, ...] = (0.2, 0.4)
    template: str = "a photo of a {}"
    size: PositiveInt = 512  # the long side is resized to this, then both sides to multiples of 8
    seed: int = 0

    def validate(self) -> None:
        if not self.noise_levels or not all(0.0 <= v < 1.0 for v in self.noise_levels):
            raise UserError(f"noise levels {list(self.noise_levels)} must be in [0, 1)")
        if "{}" not in self.template:
            raise UserError(f"template {self.template!r} has no {{}} for the class word")
        if self.size < 64:
            raise UserError(f"size {self.size} is below 64")


def model_input_size(h: int, w: int, long_side: int) -> tuple[int, int]:
    """(H, W) with the long side `long_side`, the aspect kept, both multiples of 8."""
    scale = long_side / max(h, w)
    return (max(8, round(h * scale / 8) * 8), max(8, round(w * scale / 8) * 8))


def noise_timesteps(pipe, levels, device=None) -> torch.Tensor:
    """The scheduler's training timesteps at these fractions of its schedule, in order."""
    steps = pipe.scheduler.config.num_train_timesteps
    return torch.tensor([int(v * (steps - 1)) for v in levels], device=device)


@torch.no_grad()
def image_latents(pipe, image: np.ndarray, long_side: int) -> tuple[torch.Tensor, tuple]:
    """(latents, (H, W)): an RGB uint8 image resized to the model input size for `long_side`
    and encoded by the pipeline's VAE (its distribution's mean, scaled as the UNet expects)."""
    size = model_input_size(image.shape[0], image.shape[1], long_side)
    x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None]
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    x = (x / 127.5 - 1.0).clamp(-1, 1).to(device=pipe.vae.device, dtype=pipe.vae.dtype)
    return pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor, size


class RealImageLabeller:
    """Pseudo-masks for real images from a diffusers SD pipeline and a preset.

    The preset's step window is for generation (which of N denoising steps count); here every
    UNet call counts, one per noise level.
    """

    def __init__(self, pipe, preset: Preset, cfg: RealImageConfig):
        cfg.validate()
        family = model_family(pipe)
        if family != "sd":
            # It calls the UNet itself (noise prediction on noised images) with SD's inputs;
            # SDXL's added conditioning and PixArt's transformer inputs are not built here.
            raise UserError(f"labelling real images supports Stable Diffusion 1.x/2.x models; "
                            f"this one is {family}")
        self.pipe = pipe
        self.cfg = cfg
        self.harvest_cfg = replace(preset.harvest, step_window=(0.0, 1.0))
        self.mask_cfg = preset.mask
        self.harvester = AttentionHarvester(pipe.unet, self.harvest_cfg)

    def close(self) -> None:
        """Give the UNet its previous attention processors back."""
        self.harvester.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @torch.no_grad()
    def _harvest(self, image: np.ndarray, classes: list[ClassInfo], index: int):
        """(HarvestResult, class ids, model input size) of one image."""
        pipe = self.pipe
        device, dtype = pipe.unet.device, pipe.unet.dtype
        latents, size = image_latents(pipe, image, self.cfg.size)
        spec = PromptSpec(describe_classes(self.cfg.template, [c.word for c in classes]),
                          tuple((c, c.word) for c in classes))
        weights, ids = class_token_weights(pipe.tokenizer, [spec])
        text, _ = pipe.encode_prompt(spec.text, device, 1, False)
        gen = torch.Generator().manual_seed(sample_seed(self.cfg.seed, index))
        noise = torch.randn(latents.shape, generator=gen).to(device=device, dtype=latents.dtype)
        levels = self.cfg.noise_levels
        with self.harvester.capture(weights, image_size=size, num_steps=len(levels)) as cap:
            for t in noise_timesteps(pipe, levels, device).split(1):
                noisy = pipe.scheduler.add_noise(latents, noise, t)
                pipe.unet(noisy.to(dtype), t, encoder_hidden_states=text.to(dtype))
        return cap.result, ids, size

    @torch.no_grad()
    def maps(self, image: np.ndarray, classes: list[ClassInfo], index: int) -> np.ndarray:
        """The preset's combined (and refined) class maps before any threshold, resized to the
        image: float32 [len(classes), H, W], in the order of `classes`."""
        h, w = image.shape[:2]
        result, _, _ = self._harvest(image, classes, index)
        maps = combine_maps(result, self.harvest_cfg)
        if self.harvest_cfg.refine_power > 0:
            maps = refine_maps(maps, result.self_attention, self.harvest_cfg, result.image_size)
        maps = F.interpolate(maps.float(), size=(h, w), mode="bilinear", align_corners=False)
        return maps[0].cpu().numpy()

    @torch.no_grad()
    def label(self, image: np.ndarray, classes: list[ClassInfo], index: int):
        """Label map and reliability (uint8 [H, W] each, at the image's size) for one RGB
        uint8 image whose present classes are `classes`. 0 is background, 255 unsure.
        With no classes, everything is background."""
        h, w = image.shape[:2]
        if not classes:
            return np.zeros((h, w), np.uint8), np.full((h, w), 255, np.uint8)
        result, ids, size = self._harvest(image, classes, index)
        images = None
        if self.mask_cfg.crf_iterations:  # the CRF sees the image at the model's input size
            images = F.interpolate(torch.from_numpy(np.array(image, np.float32)).permute(
                2, 0, 1)[None], size=size, mode="bilinear", antialias=True,
                align_corners=False).permute(0, 2, 3, 1)
        labels, reliability = masks_from_harvest(result, ids, self.harvest_cfg, self.mask_cfg,
                                                 images)
        out = torch.stack([labels[0], reliability[0]])[None].float()
        out = F.interpolate(out, size=(h, w), mode="nearest-exact")[0].to(torch.uint8)
        return out[0].cpu().numpy(), out[1].cpu().numpy()
