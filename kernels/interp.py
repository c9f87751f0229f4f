"""Resampling as matrices: the exact weights of ``F.interpolate`` (``align_corners=False``).

A 2-D resize of a map ``x[..., h, w]`` to ``(H, W)`` is separable, so it equals
``Wy @ x @ Wx.T`` with ``Wy = interp_matrix(h, H, mode)`` and ``Wx = interp_matrix(w, W, mode)``.
The fused kernels use the same weights in "tap" form (for each output index, at most four
``(source index, weight)`` pairs), so every implementation shares one definition.

Supported modes: ``"nearest"``, ``"bilinear"``, ``"bicubic"`` (torch's semantics) and ``"none"``
(identity; the sizes must match).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

MODES = ("none", "nearest", "bilinear", "bicubic")

# torch's bicubic kernel constant (Keys' cubic convolution with A = -0.75).
_CUBIC_A = -0.75


def _check(in_size: int, out_size: int, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown interpolation mode {mode!r}; expected one of {MODES}")
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    if mode == "none" and in_size != out_size:
        raise ValueError(f"mode 'none' needs equal sizes, got {in_size} -> {out_size}")


def _cubic_near(x: float) -> float:
    # Weight for |x| <= 1.
    a = _CUBIC_A
    return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0


def _cubic_far(x: float) -> float:
    # Weight for 1 < |x| < 2.
    a = _CUBIC_A
    return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a


@functools.lru_cache(maxsize=256)
def _taps_np(in_size: int, out_size: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Host taps: (index int32 [out, K], weight float64 [out, K]); K = 1, 2 or 4."""
    _check(in_size, out_size, mode)
    if mode == "none":
        idx = np.arange(out_size, dtype=np.int32)[:, None]
        return idx, np.ones((out_size, 1), dtype=np.float64)

    if mode == "nearest":
        # torch computes the scale and the product in float32 (nearest_idx in UpSample.h), and
        # that rounding decides some floors, so it is replayed in float32 here.
        if out_size == in_size:
            src = np.arange(out_size)
        elif out_size == 2 * in_size:
            src = np.arange(out_size) >> 1
        else:
            scale = np.float32(in_size) / np.float32(out_size)
            prod = np.arange(out_size, dtype=np.float32) * scale
            src = np.minimum(np.floor(prod).astype(np.int64), in_size - 1)
        idx = src.astype(np.int32)[:, None]
        return idx, np.ones((out_size, 1), dtype=np.float64)

    scale = in_size / out_size
    if mode == "bilinear":
        idx = np.empty((out_size, 2), dtype=np.int32)
        wts = np.empty((out_size, 2), dtype=np.float64)
        for o in range(out_size):
            # Half-pixel centres; linear modes clamp negative source coordinates to 0.
            src = max(scale * (o + 0.5) - 0.5, 0.0)
            i0 = int(src)
            i1 = i0 + 1 if i0 < in_size - 1 else i0
            frac = src - i0
            idx[o] = (i0, i1)
            wts[o] = (1.0 - frac, frac)
        return idx, wts

    # bicubic: no clamping of the source coordinate, but the four taps clamp to the border.
    idx = np.empty((out_size, 4), dtype=np.int32)
    wts = np.empty((out_size, 4), dtype=np.float64)
    for o in range(out_size):
        src = scale * (o + 0.5) - 0.5
        i = math.floor(src)
        t = src - i
        wts[o] = (_cubic_far(t + 1.0), _cubic_near(t), _cubic_near(1.0 - t), _cubic_far(2.0 - t))
        idx[o] = [min(max(i - 1 + j, 0), in_size - 1) for j in range(4)]
    return idx, wts


@functools.lru_cache(maxsize=256)
def _matrix_host(in_size: int, out_size: int, mode: str) -> torch.Tensor:
    idx, wts = _taps_np(in_size, out_size, mode)
    mat = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.repeat(np.arange(out_size), idx.shape[1])
    # Clamped bicubic taps can hit the same column twice; np.add.at sums them.
    np.add.at(mat, (rows, idx.reshape(-1)), wts.reshape(-1))
    return torch.from_numpy(mat)


@functools.lru_cache(maxsize=512)
def _matrix_cached(in_size: int, out_size: int, mode: str, device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor:
    return _matrix_host(in_size, out_size, mode).to(device=device, dtype=dtype).contiguous()


def interp_matrix(in_size: int, out_size: int, mode: str, device=None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Return the ``[out_size, in_size]`` matrix that resamples one axis like ``F.interpolate``.

    ``mode`` is ``"nearest"``, ``"bilinear"``, ``"bicubic"`` (``align_corners=False``) or
    ``"none"`` (identity, ``in_size == out_size`` required). The result is cached per
    (sizes, mode, device, dtype) and shared between callers: treat it as read-only.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return _matrix_cached(int(in_size), int(out_size), mode, dev, dtype)


def interp_taps_np(in_size: int, out_size: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Return the sparse form of :func:`interp_matrix` as numpy arrays.

    ``(index int32 [out_size, K], weight float32 [out_size, K])`` with K = 1 (none, nearest),
    2 (bilinear) or 4 (bicubic); output ``o`` is ``sum_k weight[o, k] * x[index[o, k]]``.
    Cached; treat as read-only.
    """
    return _taps_f32(int(in_size), int(out_size), mode)


@functools.lru_cache(maxsize=256)
def _taps_f32(in_size: int, out_size: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    idx, wts = _taps_np(in_size, out_size, mode)
    idx = np.ascontiguousarray(idx)
    wts = np.ascontiguousarray(wts.astype(np.float32))
    idx.setflags(write=False)
    wts.setflags(write=False)
    return idx, wts


@functools.lru_cache(maxsize=512)
def _taps_torch_cached(in_size: int, out_size: int, mode: str,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    idx, wts = _taps_f32(in_size, out_size, mode)
    return (torch.from_numpy(idx.copy()).to(device).contiguous(),
            torch.from_numpy(wts.copy()).to(device).contiguous())


def interp_taps(in_size: int, out_size: int, mode: str,
                device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch version of :func:`interp_taps_np` (int32 indices, float32 weights) on ``device``."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return _taps_torch_cached(int(in_size), int(out_size), mode, dev)


def resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize ``x[..., h, w]`` to ``size = (H, W)`` as ``Wy @ x @ Wx.T``.

    Equals ``F.interpolate(x, size, mode=mode, align_corners=False)`` for the interpolating
    modes (up to float rounding) and works for any number of leading dimensions. Floating
    inputs keep their dtype; the matrices are built in that dtype.
    """
    h, w = x.shape[-2], x.shape[-1]
    out_h, out_w = int(size[0]), int(size[1])
    if mode == "none":
        _check(h, out_h, mode)
        _check(w, out_w, mode)
        return x
    wy = interp_matrix(h, out_h, mode, device=x.device, dtype=x.dtype)
    wx = interp_matrix(w, out_w, mode, device=x.device, dtype=x.dtype)
    return torch.matmul(torch.matmul(wy, x), wx.transpose(0, 1))
