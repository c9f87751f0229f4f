"""Op (b): turn aggregated class maps into a label map and a per-pixel reliability.

Per (b, c) the map is normalised over its own pixels, resized to the image size, and every
pixel picks the best of ``[background, class 1..C]`` where the background score is
``bg_const + bg_slope * m`` and ``m`` is the best class score there. A band of ``m`` values can
be marked "ignore" (label 255). Reliability is the gap between the two best scores, in 1/255.

The fused kernels never materialise the resized ``[B, C, H, W]`` maps: each output pixel
interpolates its class scores from the small normalised maps with the interpolation taps.
"""

from __future__ import annotations

import numpy as np
import torch

from ._dispatch import numba_module, resolve_impl, torch_threads_kept, triton_modules
from .interp import MODES, interp_taps, interp_taps_np, resize
from .labels import IGNORE_LABEL

__all__ = ["finalize_masks", "finalize_masks_numba", "finalize_masks_ref", "finalize_masks_triton",
           "normalize_maps"]

NORMALIZE = ("minmax", "max", "none")
# Spans (max - min, or max) at or below this count as flat maps, which normalise to zeros.
_FLAT_EPS = 1e-12


def _f32(x) -> float:
    # Every implementation works in float32; rounding the parameters once here makes the torch
    # reference compare against exactly the values the kernels see.
    return float(np.float32(x))


def _check_args(maps, class_ids, size, normalize, mode):
    if maps.dim() != 4:
        raise ValueError(f"maps must be [B, C, M_h, M_w], got {tuple(maps.shape)}")
    b, c, mh, mw = maps.shape
    if c < 1:
        raise ValueError("maps needs at least one channel")
    if tuple(class_ids.shape) != (b, c):
        raise ValueError(f"class_ids must be [B={b}, C={c}], got {tuple(class_ids.shape)}")
    if normalize not in NORMALIZE:
        raise ValueError(f"unknown normalize {normalize!r}; expected one of {NORMALIZE}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    out_h, out_w = int(size[0]), int(size[1])
    if mode == "none" and (mh, mw) != (out_h, out_w):
        raise ValueError(f"mode 'none' needs maps of the output size, got {(mh, mw)} vs {size}")
    return b, c, mh, mw, out_h, out_w


def normalize_maps(maps: torch.Tensor, normalize: str) -> torch.Tensor:
    """Per-(b, c) normalisation over the map's pixels, in float32 ("minmax", "max", "none");
    flat maps become zeros."""
    x = maps.float()
    if normalize == "none":
        return x
    flat = x.flatten(2)
    hi = flat.amax(dim=-1, keepdim=True)
    if normalize == "minmax":
        lo = flat.amin(dim=-1, keepdim=True)
        span = hi - lo
        y = torch.where(span < _f32(_FLAT_EPS), torch.zeros_like(flat), (flat - lo) / span)
    else:
        y = torch.where(hi <= _f32(_FLAT_EPS), torch.zeros_like(flat), flat / hi)
    return y.view_as(x)


def finalize_masks_ref(maps, class_ids, *, size, normalize="minmax", bg_const=0.5, bg_slope=0.0,
                       ignore_low=1.0, ignore_high=1.0, mode="bilinear"):
    """Reference (plain torch) version of :func:`finalize_masks`; the definition."""
    b, c, _, _, out_h, out_w = _check_args(maps, class_ids, size, normalize, mode)
    ids = class_ids.to(device=maps.device, dtype=torch.int64)
    scores = resize(normalize_maps(maps, normalize), (out_h, out_w), mode)  # [B, C, H, W]
    valid = (ids != 0)[:, :, None, None]
    neg_inf = torch.tensor(float("-inf"), device=maps.device)
    scores = torch.where(valid, scores, neg_inf)
    any_valid = valid.any(dim=1)  # [B, 1, 1]
    best = scores.amax(dim=1)
    m = torch.where(any_valid, best, torch.zeros_like(best))
    bg = _f32(bg_const) + _f32(bg_slope) * m
    cand = torch.cat([bg[:, None], scores], dim=1)  # [B, C + 1, H, W]
    # argmax returns the first maximum, so background wins ties and lower channels win ties.
    idx = cand.argmax(dim=1)
    top = cand.topk(2, dim=1).values
    first, second = top[:, 0], top[:, 1]
    # Only background is a candidate: the gap is measured against 0.
    second = torch.where(torch.isneginf(second), torch.zeros_like(second), second)
    gap = (first - second).clamp(0.0, 1.0)
    rel = torch.floor(255.0 * gap + 0.5)
    ids_px = torch.gather(ids, 1, (idx - 1).clamp_min(0).flatten(1)).view_as(idx)
    labels = torch.where(idx == 0, torch.zeros_like(ids_px), ids_px)
    ignore = (m >= _f32(ignore_low)) & (m < _f32(ignore_high))
    labels = torch.where(ignore, torch.full_like(labels, IGNORE_LABEL), labels)
    rel = torch.where(ignore, torch.zeros_like(rel), rel)
    return labels.to(torch.uint8), rel.to(torch.uint8)


# --------------------------------------------------------------------------------------------
# numba (CPU)
# --------------------------------------------------------------------------------------------

_NORM_CODES = {"none": 0, "minmax": 1, "max": 2}

_nb = numba_module()

if _nb is not None:

    @_nb.njit(parallel=True, fastmath=False, cache=True)
    def _normalize_nb(maps, ids, code, out):
        """out[b, c] = normalised maps[b, c] (code 0 none, 1 minmax, 2 max); padded channels
        (id 0) are left as zeros."""
        n_b, n_c, n_h, n_w = maps.shape
        zero = np.float32(0.0)
        eps = np.float32(_FLAT_EPS)
        for bc in _nb.prange(n_b * n_c):
            b = bc // n_c
            c = bc - b * n_c
            if ids[b, c] == 0:
                for y in range(n_h):
                    for x in range(n_w):
                        out[b, c, y, x] = zero
                continue
            if code == 0:
                for y in range(n_h):
                    for x in range(n_w):
                        out[b, c, y, x] = maps[b, c, y, x]
                continue
            lo = maps[b, c, 0, 0]
            hi = lo
            for y in range(n_h):
                for x in range(n_w):
                    v = maps[b, c, y, x]
                    lo = min(lo, v)
                    hi = max(hi, v)
            if code == 1:
                span = hi - lo
                flat = span < eps
                for y in range(n_h):
                    for x in range(n_w):
                        out[b, c, y, x] = zero if flat else (maps[b, c, y, x] - lo) / span
            else:
                flat = hi <= eps
                for y in range(n_h):
                    for x in range(n_w):
                        out[b, c, y, x] = zero if flat else maps[b, c, y, x] / hi

    @_nb.njit(parallel=True, fastmath=False, cache=True)
    def _decide_nb(norm, ids, iy, wy, ix, wx, bg_const, bg_slope, ignore_low, ignore_high,
                   labels, rel):
        """Per pixel: interpolate the class scores, pick background/class, ignore band,
        reliability. norm [B,C,M_h,M_w] float32; labels/rel [B,H,W] uint8."""
        n_b, n_c, _, n_w = norm.shape
        out_h = labels.shape[1]
        out_w = labels.shape[2]
        ky = iy.shape[1]
        kx = ix.shape[1]
        zero = np.float32(0.0)
        one = np.float32(1.0)
        neg_inf = np.float32(-np.inf)
        for job in _nb.prange(n_b * out_h):
            b = job // out_h
            y = job - b * out_h
            # Vertical pass once per output row: rows[c] = sum_a wy[y, a] * norm[b, c, iy[y, a]].
            rows = np.zeros((n_c, n_w), np.float32)
            for c in range(n_c):
                if ids[b, c] == 0:
                    continue
                for a in range(ky):
                    src = iy[y, a]
                    wa = wy[y, a]
                    for j in range(n_w):
                        rows[c, j] += wa * norm[b, c, src, j]
            for x in range(out_w):
                top1 = neg_inf
                top2 = neg_inf
                arg = -1
                for c in range(n_c):
                    if ids[b, c] == 0:
                        continue
                    v = zero
                    for t in range(kx):
                        v += wx[x, t] * rows[c, ix[x, t]]
                    if v > top1:
                        top2 = top1
                        top1 = v
                        arg = c
                    elif v > top2:
                        top2 = v
                m = top1 if arg >= 0 else zero
                bg = bg_const + bg_slope * m
                if bg >= top1:
                    lab = 0
                    first = bg
                    second = top1
                else:
                    lab = ids[b, arg]
                    first = top1
                    second = max(bg, top2)
                if second == neg_inf:
                    second = zero
                gap = min(max(first - second, zero), one)
                r = np.floor(np.float32(255.0) * gap + np.float32(0.5))
                if m >= ignore_low and m < ignore_high:
                    lab = 255
                    r = zero
                labels[b, y, x] = lab
                rel[b, y, x] = np.uint8(r)


def finalize_masks_numba(maps, class_ids, *, size, normalize="minmax", bg_const=0.5,
                         bg_slope=0.0, ignore_low=1.0, ignore_high=1.0, mode="bilinear"):
    """numba (CPU, parallel) version of :func:`finalize_masks`; CUDA inputs round-trip via
    the host."""
    if _nb is None:
        raise RuntimeError("numba is not available")
    b, c, mh, mw, out_h, out_w = _check_args(maps, class_ids, size, normalize, mode)
    maps_np = maps.detach().to("cpu", torch.float32).contiguous().numpy()
    ids_np = class_ids.detach().to("cpu", torch.int64).contiguous().numpy()
    norm = np.empty_like(maps_np)
    iy, wy = interp_taps_np(mh, out_h, mode)
    ix, wx = interp_taps_np(mw, out_w, mode)
    labels = torch.empty((b, out_h, out_w), dtype=torch.uint8)
    rel = torch.empty((b, out_h, out_w), dtype=torch.uint8)
    with torch_threads_kept():
        _normalize_nb(maps_np, ids_np, _NORM_CODES[normalize], norm)
        _decide_nb(norm, ids_np, iy, wy, ix, wx, np.float32(bg_const), np.float32(bg_slope),
                   np.float32(ignore_low), np.float32(ignore_high), labels.numpy(), rel.numpy())
    if maps.device.type != "cpu":
        labels, rel = labels.to(maps.device), rel.to(maps.device)
    return labels, rel


# --------------------------------------------------------------------------------------------
# triton (GPU; CPU tensors under TRITON_INTERPRET=1)
# --------------------------------------------------------------------------------------------

_tr = triton_modules()

if _tr is not None:
    triton, tl = _tr

    @triton.jit
    def finalize_kernel(norm_ptr, ids_ptr, iy_ptr, wy_ptr, ix_ptr, wx_ptr, lab_ptr, rel_ptr,
                         C, MH, MW, H, W, bg_const, bg_slope, ignore_low, ignore_high,
                         KY: tl.constexpr, KX: tl.constexpr, BLOCK_P: tl.constexpr):
        # One program: BLOCK_P output pixels of sample b; all channels in a loop.
        b = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        mask = offs < H * W
        y = offs // W
        x = offs - y * W
        top1 = tl.full([BLOCK_P], float("-inf"), tl.float32)
        top2 = tl.full([BLOCK_P], float("-inf"), tl.float32)
        arg = tl.full([BLOCK_P], -1, tl.int32)
        for c in range(C):
            cid = tl.load(ids_ptr + b * C + c)
            base = norm_ptr + (b * C + c) * MH * MW
            v = tl.zeros([BLOCK_P], tl.float32)
            # Same order as the numba kernel: vertical taps first, then horizontal.
            for tb in tl.static_range(KX):
                ixb = tl.load(ix_ptr + x * KX + tb, mask=mask, other=0)
                wxb = tl.load(wx_ptr + x * KX + tb, mask=mask, other=0.0)
                col = tl.zeros([BLOCK_P], tl.float32)
                for ta in tl.static_range(KY):
                    iya = tl.load(iy_ptr + y * KY + ta, mask=mask, other=0)
                    wya = tl.load(wy_ptr + y * KY + ta, mask=mask, other=0.0)
                    col += wya * tl.load(base + iya * MW + ixb, mask=mask, other=0.0)
                v += wxb * col
            ok = mask & (cid != 0)
            gt = ok & (v > top1)
            gt2 = ok & (v > top2) & (v <= top1)
            top2 = tl.where(gt, top1, tl.where(gt2, v, top2))
            top1 = tl.where(gt, v, top1)
            arg = tl.where(gt, c, arg)
        has = arg >= 0
        m = tl.where(has, top1, 0.0)
        bg = bg_const + bg_slope * m
        bg_wins = bg >= top1
        first = tl.where(bg_wins, bg, top1)
        second = tl.where(bg_wins, top1, tl.maximum(bg, top2))
        second = tl.where(second == float("-inf"), 0.0, second)
        gap = tl.minimum(tl.maximum(first - second, 0.0), 1.0)
        r = tl.floor(255.0 * gap + 0.5)
        cls = tl.load(ids_ptr + b * C + arg, mask=mask & has & (~bg_wins), other=0)
        lab = tl.where(bg_wins, 0, cls)
        ignore = (m >= ignore_low) & (m < ignore_high)
        lab = tl.where(ignore, 255, lab)
        r = tl.where(ignore, 0.0, r)
        tl.store(lab_ptr + b * H * W + offs, lab.to(tl.uint8), mask=mask)
        tl.store(rel_ptr + b * H * W + offs, r.to(tl.uint8), mask=mask)


def finalize_masks_triton(maps, class_ids, *, size, normalize="minmax", bg_const=0.5,
                          bg_slope=0.0, ignore_low=1.0, ignore_high=1.0, mode="bilinear"):
    """Triton version of :func:`finalize_masks` (CUDA, or CPU under ``TRITON_INTERPRET=1``).

    The per-(b, c) statistics and normalisation run in torch on the small maps; one kernel
    does interpolation, decision and reliability per output pixel.
    """
    if _tr is None:
        raise RuntimeError("triton is not available")
    b, c, mh, mw, out_h, out_w = _check_args(maps, class_ids, size, normalize, mode)
    dev = maps.device
    norm = normalize_maps(maps, normalize).contiguous()
    ids = class_ids.to(device=dev, dtype=torch.int64).contiguous()
    iy, wy = interp_taps(mh, out_h, mode, device=dev)
    ix, wx = interp_taps(mw, out_w, mode, device=dev)
    labels = torch.empty((b, out_h, out_w), dtype=torch.uint8, device=dev)
    rel = torch.empty((b, out_h, out_w), dtype=torch.uint8, device=dev)
    block_p = 256
    grid = (b, triton.cdiv(out_h * out_w, block_p))
    finalize_kernel[grid](norm, ids, iy, wy, ix, wx, labels, rel, c, mh, mw, out_h, out_w,
                           _f32(bg_const), _f32(bg_slope), _f32(ignore_low), _f32(ignore_high),
                           KY=iy.shape[1], KX=ix.shape[1], BLOCK_P=block_p)
    return labels, rel


_IMPLS = {
    "ref": finalize_masks_ref,
    "numba": finalize_masks_numba,
    "triton": finalize_masks_triton,
}


def finalize_masks(maps, class_ids, *, size, normalize="minmax", bg_const=0.5, bg_slope=0.0,
                   ignore_low=1.0, ignore_high=1.0, mode="bilinear", impl=None):
    """Label map and reliability from aggregated class maps.

    Args:
        maps: ``[B, C, M_h, M_w]`` float32 class maps.
        class_ids: ``[B, C]`` int64 dataset ids (1..254) per channel; 0 = padded channel,
            which never wins and is ignored everywhere.
        size: ``(H, W)`` of the output.
        normalize: per-(b, c) ``"minmax"`` ((x - min) / (max - min)), ``"max"`` (x / max) or
            ``"none"``; flat maps (span or max <= 1e-12) become zeros.
        bg_const, bg_slope: background score ``bg_const + bg_slope * m``, where ``m`` is the
            best valid class score at the pixel (0 if there is none).
        ignore_low, ignore_high: pixels with ``ignore_low <= m < ignore_high`` get label 255
            and reliability 0 (equal bounds disable the band).
        mode: resampling of the normalised maps to ``size`` (``F.interpolate`` semantics,
            ``align_corners=False``; ``"none"`` needs equal sizes).
        impl: ``None`` (``ATTNSEG_KERNEL_IMPL`` or by device), ``"ref"``, ``"triton"``,
            ``"numba"``.

    Returns:
        ``(labels, reliability)``, both uint8 ``[B, H, W]``. The label is the first maximum of
        ``[bg, s_1..s_C]`` mapped to ``[0, class_ids...]`` (background wins ties); reliability
        is ``floor(255 * clamp(top1 - top2, 0, 1) + 0.5)`` over those candidates (``top2 = 0``
        when background is the only one).
    """
    which = resolve_impl(impl, maps.device)
    return _IMPLS[which](maps, class_ids, size=size, normalize=normalize, bg_const=bg_const,
                         bg_slope=bg_slope, ignore_low=ignore_low, ignore_high=ignore_high,
                         mode=mode)
