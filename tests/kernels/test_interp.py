"""Interpolation matrices against F.interpolate (align_corners=False)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnseg.kernels.interp import interp_matrix, interp_taps, interp_taps_np, resize

SIZES = [(8, 64), (16, 32), (64, 512), (64, 256), (32, 16), (7, 13), (13, 7), (1, 5), (96, 64)]
MODES = ["nearest", "bilinear", "bicubic"]


def _interpolate(x, size, mode):
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(x, size=size, mode=mode, **kwargs)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sizes", SIZES, ids=[f"{a}to{b}" for a, b in SIZES])
def test_resize_matches_interpolate(sizes, mode):
    in_h, out_h = sizes
    # A different (and non-square) width axis: the two axes use different matrices.
    in_w, out_w = in_h + 3, out_h + 5
    x = torch.randn(2, 3, in_h, in_w, generator=torch.Generator().manual_seed(in_h + out_h),
                    dtype=torch.float64)
    want = _interpolate(x, (out_h, out_w), mode)
    got = resize(x, (out_h, out_w), mode)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # float32 matrices: compared with the float64 interpolation (torch's own float32 kernel
    # computes its source coordinates in float32 and is itself off by up to ~3e-5 at 512).
    got32 = resize(x.float(), (out_h, out_w), mode)
    torch.testing.assert_close(got32.double(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("sizes", SIZES, ids=[f"{a}to{b}" for a, b in SIZES])
def test_nearest_is_exact_in_float32(sizes):
    # torch picks nearest source indices with float32 arithmetic whatever the dtype; the
    # matrices must replay those choices exactly.
    in_h, out_h = sizes
    x = torch.randn(1, 2, in_h, in_h + 1)
    want = _interpolate(x, (out_h, out_h + 2), "nearest")
    got = resize(x, (out_h, out_h + 2), "nearest")
    assert torch.equal(got, want)


@pytest.mark.parametrize("mode", MODES + ["none"])
@pytest.mark.parametrize("sizes", [(8, 64), (7, 13), (32, 16), (5, 5)])
def test_matrix_properties_and_taps(sizes, mode):
    in_size, out_size = sizes
    if mode == "none":
        in_size = out_size
    mat = interp_matrix(in_size, out_size, mode, dtype=torch.float64)
    assert mat.shape == (out_size, in_size)
    torch.testing.assert_close(mat.sum(dim=1), torch.ones(out_size, dtype=torch.float64))
    # The taps are the sparse form of the same matrix.
    idx, wts = interp_taps(in_size, out_size, mode)
    assert idx.dtype == torch.int32 and wts.dtype == torch.float32
    dense = torch.zeros(out_size, in_size, dtype=torch.float64)
    dense.scatter_add_(1, idx.long(), wts.double())
    torch.testing.assert_close(dense, mat, rtol=0, atol=1e-7)
    idx_np, wts_np = interp_taps_np(in_size, out_size, mode)
    assert (idx_np == idx.numpy()).all() and (wts_np == wts.numpy()).all()


def test_none_mode_is_identity():
    x = torch.randn(2, 3, 6, 7)
    assert torch.equal(interp_matrix(6, 6, "none"), torch.eye(6))
    assert torch.equal(resize(x, (6, 7), "none"), x)
    with pytest.raises(ValueError):
        resize(x, (8, 7), "none")
    with pytest.raises(ValueError):
        interp_matrix(4, 5, "none")
    with pytest.raises(ValueError):
        interp_matrix(4, 5, "area")


def test_matrix_cache_device_dtype():
    a = interp_matrix(16, 64, "bicubic")
    b = interp_matrix(16, 64, "bicubic", device="cpu", dtype=torch.float32)
    assert a is b  # cached
    c = interp_matrix(16, 64, "bicubic", dtype=torch.float64)
    assert c.dtype == torch.float64
    torch.testing.assert_close(a.double(), c, rtol=0, atol=1e-7)


def test_resize_leading_dims():
    x = torch.randn(5, 8, 8)
    want = _interpolate(x[None].double(), (20, 12), "bilinear")[0]
    torch.testing.assert_close(resize(x.double(), (20, 12), "bilinear"), want)
