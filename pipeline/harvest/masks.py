"""Turn harvested attention into pseudo-masks: combine strides, refine, finalize.

    per-stride means --(normalise per stride, resize to combine stride, weighted mean)-->
    combined [B, C, h, w] --(optional: resize to refine stride, A^k . map)--> refined
    --(kernels.finalize_masks: normalise, resize to image, background, ignore band, argmax,
    reliability)--> labels uint8 [B, H, W] (0 bg, class ids, 255 ignore), reliability uint8.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...kernels.crf import dense_crf
from ...kernels.finalize import finalize_masks, normalize_maps
from ...kernels.interp import resize
from ...kernels.labels import IGNORE_LABEL
from ...kernels.regions import remove_small_regions
from ..config import HarvestConfig, MaskConfig
from .attention import grid_size
from .harvester import HarvestResult


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
                       mask: MaskConfig, images: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Label maps and reliability maps (uint8 [B, H, W] each) from a HarvestResult.
    `images` (RGB [B, H, W, 3] in 0-255) are needed when the recipe refines with a CRF."""
    return mask_steps(result, class_ids, harvest, mask, images)()


def mask_steps(result: HarvestResult, class_ids: torch.Tensor, harvest: HarvestConfig,
               mask: MaskConfig, images: torch.Tensor | None = None
               ) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """`masks_from_harvest` in two parts: the steps that read `result` now, and the rest (the
    CRF refinement and the small-region removal, on tensors of its own) as a function that
    returns the masks when called, on any thread: a job can run it beside the next batch's
    generation."""
    maps = combine_maps(result, harvest)
    if harvest.refine_power > 0:
        maps = refine_maps(maps, result.self_attention, harvest, result.image_size)
    size = result.image_size
    if mask.normalize_at == "image" and tuple(maps.shape[-2:]) != tuple(size):
        maps = resize(maps.float(), size, mask.upsample_mode)  # DAAM: resize, then normalise
    mode = "none" if tuple(maps.shape[-2:]) == tuple(size) else mask.upsample_mode
    if mode == "none" and tuple(maps.shape[-2:]) != tuple(size):
        raise ValueError("maps are not at image size and upsample_mode is 'none'")
    labels, reliability = finalize_masks(
        maps.contiguous(), class_ids.to(maps.device), size=size, normalize=mask.normalize,
        bg_const=mask.bg_const, bg_slope=mask.bg_slope, ignore_low=mask.ignore_low,
        ignore_high=mask.ignore_high, mode=mode,
    )
    if mask.crf_iterations > 0 and images is None:
        raise ValueError("the mask recipe refines with a CRF: pass the images")

    def rest() -> tuple[torch.Tensor, torch.Tensor]:
        out_labels, out_reliability = labels, reliability
        if mask.crf_iterations > 0:
            out_labels, out_reliability = crf_refine(maps, class_ids, images, out_labels,
                                                     out_reliability, mask, mode)
        if mask.min_region_box > 0:
            # Rounded up: DiffuMask keeps a box of exactly 250 pixels at 512x512.
            min_box = int(-(-mask.min_region_box * size[0] * size[1] // 1))
            out_labels, out_reliability = remove_small_regions(out_labels, out_reliability,
                                                               min_box)
        return out_labels, out_reliability

    return rest


def crf_refine(maps: torch.Tensor, class_ids: torch.Tensor, images: torch.Tensor,
               labels: torch.Tensor, reliability: torch.Tensor, mask: MaskConfig, mode: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and reliability after a dense CRF on the recipe's scores: the unary is the
    background score and the normalised class scores at image size, made probabilities by
    their sum; pixels the recipe left unsure (255) stay unsure; reliability is the gap between
    the two best CRF probabilities."""
    h, w = labels.shape[1:]
    ids = class_ids.to(device=maps.device, dtype=torch.int64)
    scores = resize(normalize_maps(maps.float(), mask.normalize), (h, w),
                    "bilinear" if mode == "none" else mode)
    scores = torch.where((ids != 0)[:, :, None, None], scores, torch.zeros_like(scores))
    best = scores.amax(dim=1)
    bg = mask.bg_const + mask.bg_slope * best
    probs = torch.cat([bg[:, None], scores], dim=1).clamp_min(1e-5)
    probs = probs / probs.sum(dim=1, keepdim=True)
    rgb = torch.as_tensor(images, device=maps.device).float().permute(0, 3, 1, 2)
    side = max(h, w)
    small = (h, w) if side <= mask.crf_max_side else (
        max(1, round(h * mask.crf_max_side / side)), max(1, round(w * mask.crf_max_side / side)))
    q = dense_crf(resize(probs, small, "bilinear") if small != (h, w) else probs,
                  resize(rgb, small, "bilinear") if small != (h, w) else rgb,
                  iterations=mask.crf_iterations, w_app=mask.crf_w_app,
                  sxy_app=mask.crf_sxy_app * small[0] / h, srgb=mask.crf_srgb,
                  w_smooth=mask.crf_w_smooth, sxy_smooth=mask.crf_sxy_smooth * small[0] / h)
    if small != (h, w):
        q = resize(q, (h, w), "bilinear")
    top = q.topk(2, dim=1)
    idx = top.indices[:, 0]
    ids_px = torch.gather(ids, 1, (idx - 1).clamp_min(0).flatten(1)).view_as(idx)
    new = torch.where(idx == 0, torch.zeros_like(ids_px), ids_px).to(torch.uint8)
    gap = (top.values[:, 0] - top.values[:, 1]).clamp(0.0, 1.0)
    rel = torch.floor(255.0 * gap + 0.5).to(torch.uint8)
    unsure = labels == IGNORE_LABEL
    return (torch.where(unsure, labels, new),
            torch.where(unsure, reliability, rel))
