"""Turn harvested attention into pseudo-masks: combine strides, refine, finalize.

    per-stride means --(normalise per stride, resize to combine stride, weighted mean)-->
    combined [B, C, h, w] --(optional: resize to refine stride, A^k . map)--> refined
    --(kernels.finalize_masks: normalise, resize to image, background, ignore band, argmax,
    reliability)--> labels uint8 [B, H, W] (0 bg, class ids, 255 ignore), reliability uint8.
"""

from __future__ import annotations

import torch

from ..kernels.finalize import finalize_masks, normalize_maps
from ..kernels.interp import resize
from .attention import grid_size
from .config import HarvestConfig, MaskConfig
from .harvest import HarvestResult


def combine_maps(result: HarvestResult, cfg: HarvestConfig) -> torch.Tensor:
    """Weighted mean of the per-stride maps at `cfg.combine_stride`: [B, C, H/s, W/s]."""
    size = grid_size(result.image_size, cfg.combine_stride)
    if cfg.accumulate in ("common", "per_head"):
        (only,) = result.maps.values()
        return only
    total = None
    weight_sum = 0.0
    for stride in sorted(result.maps):
        m = normalize_maps(result.maps[stride], cfg.stride_normalize)
        mode = "none" if tuple(m.shape[-2:]) == size else cfg.combine_mode
        w = cfg.stride_weights.get(stride, 1.0)
        term = w * resize(m, size, mode)
        total = term if total is None else total + term
        weight_sum += w
    return total / weight_sum


def refine_maps(maps: torch.Tensor, self_attention: torch.Tensor, cfg: HarvestConfig,
                image_size: tuple[int, int]) -> torch.Tensor:
    """Self-attention refinement: resize to the refine stride and apply A^k (A row-stochastic)."""
    size = grid_size(image_size, cfg.refine_stride)
    mode = "none" if tuple(maps.shape[-2:]) == size else cfg.refine_mode
    x = resize(maps, size, mode)
    b, c = x.shape[:2]
    flat = x.reshape(b, c, -1).transpose(1, 2)  # [B, N, C]
    for _ in range(cfg.refine_power):
        flat = torch.bmm(self_attention, flat)
    return flat.transpose(1, 2).reshape(b, c, *size)


def masks_from_harvest(result: HarvestResult, class_ids: torch.Tensor, harvest: HarvestConfig,
                       mask: MaskConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Label maps and reliability maps (uint8 [B, H, W] each) from a HarvestResult."""
    maps = combine_maps(result, harvest)
    if harvest.refine_power > 0:
        maps = refine_maps(maps, result.self_attention, harvest, result.image_size)
    size = result.image_size
    mode = "none" if tuple(maps.shape[-2:]) == tuple(size) else mask.upsample_mode
    if mode == "none" and tuple(maps.shape[-2:]) != tuple(size):
        raise ValueError("maps are not at image size and upsample_mode is 'none'")
    return finalize_masks(
        maps.contiguous(), class_ids.to(maps.device), size=size, normalize=mask.normalize,
        bg_const=mask.bg_const, bg_slope=mask.bg_slope, ignore_low=mask.ignore_low,
        ignore_high=mask.ignore_high, mode=mode,
    )
