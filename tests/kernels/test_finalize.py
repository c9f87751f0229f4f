"""finalize_masks: the decision rules, and numba/triton against the torch reference."""

from __future__ import annotations

import pytest
import torch

from attnseg.kernels import _dispatch
from attnseg.kernels.finalize import (
    finalize_masks,
    finalize_masks_numba,
    finalize_masks_ref,
    normalize_maps,
)
from attnseg.kernels.interp import resize

from .marks import HAS_CUDA, needs_numba, needs_triton

TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"

ALL_IMPLS = [
    "ref",
    pytest.param("numba", marks=needs_numba),
    pytest.param("triton", marks=needs_triton),
]

# Background rules from the literature, as (bg_const, bg_slope, ignore_low, ignore_high).
RULES = {
    "threshold0.4": (0.4, 0.0, 1.0, 1.0),
    "attn2mask": (0.8, -1.0, 1.0, 1.0),  # background = 1 - max - 0.2
    "dataset_diffusion": (0.6, 0.0, 0.5, 0.6),  # 0.5 <= max < 0.6 -> ignore
}

# Decisions whose reference margin is below this may legitimately flip between implementations.
DECISION_EPS = 1e-5


def _finalize(impl, maps, ids, **kw):
    device = TRITON_DEVICE if impl == "triton" else "cpu"
    labels, rel = finalize_masks(maps.to(device), ids.to(device), impl=impl, **kw)
    assert labels.dtype == torch.uint8 and rel.dtype == torch.uint8
    assert labels.shape == rel.shape == (maps.shape[0], *kw["size"])
    return labels.cpu(), rel.cpu()


def _margins(maps, ids, *, size, normalize, bg_const, bg_slope, ignore_low, ignore_high, mode):
    """Float64 view of the reference decision at each pixel: which pixels sit within
    DECISION_EPS of a tie or a band edge (labels may flip), and which sit that close to a
    reliability rounding point (reliability may move by 1)."""
    scores = resize(normalize_maps(maps, normalize).double(), size, mode)
    valid = (ids != 0)[:, :, None, None]
    scores = torch.where(valid, scores, torch.tensor(float("-inf"), dtype=torch.float64))
    best = scores.amax(dim=1)
    m = torch.where(valid.any(dim=1), best, torch.zeros_like(best))
    bg = bg_const + bg_slope * m
    cand = torch.cat([bg[:, None], scores], dim=1).sort(dim=1, descending=True).values
    gap = cand[:, 0] - torch.where(torch.isneginf(cand[:, 1]), 0.0, cand[:, 1])
    near = (cand[:, 0] - cand[:, 1]) < DECISION_EPS
    if ignore_low < ignore_high:
        near |= ((m - ignore_low).abs() < DECISION_EPS) | ((m - ignore_high).abs() < DECISION_EPS)
    scaled = 255.0 * gap.clamp(0.0, 1.0)
    near_round = ((scaled - scaled.floor() - 0.5).abs() < 255.0 * DECISION_EPS) & ~near
    return near, near_round


def assert_matches_ref(impl, maps, ids, **kw):
    want_l, want_r = finalize_masks_ref(maps, ids, **kw)
    got_l, got_r = _finalize(impl, maps, ids, **kw)
    near, near_round = _margins(maps, ids, **kw)
    npix = near.numel()
    # The inputs are random floats: near-ties must be rare, or the comparison means little.
    assert near.sum().item() < 1e-3 * npix, f"{near.sum().item()} of {npix} pixels near a tie"
    assert near_round.sum().item() < 1e-2 * npix
    firm = ~near
    assert torch.equal(got_l[firm], want_l[firm]), \
        f"{(got_l != want_l)[firm].sum().item()} label mismatches away from ties"
    dr = (got_r.int() - want_r.int()).abs()
    assert dr[firm & ~near_round].max().item() == 0
    if near_round.any():
        assert dr[near_round].max().item() <= 1
    # In practice the implementations agree everywhere.
    assert (got_l != want_l).sum().item() <= near.sum().item()


def _random_inputs(b, c, mh, mw, seed, padded=True):
    g = torch.Generator().manual_seed(seed)
    # Smooth-ish maps: a low-resolution field upsampled, plus noise, plus an offset.
    coarse = torch.rand(b, c, max(2, mh // 4), max(2, mw // 4), generator=g)
    maps = resize(coarse, (mh, mw), "bilinear") + 0.3 * torch.rand(b, c, mh, mw, generator=g)
    maps = maps * 3.0 + 0.5
    ids = torch.randint(1, 255, (b, c), generator=g)
    if padded and c > 1:
        ids[0, c - 1] = 0
        maps[0, c - 1] += 10.0  # a padded channel with the largest values must still lose
    return maps, ids


def _seed(*parts) -> int:
    # Deterministic across runs (str hashes are salted per process).
    return sum(ord(ch) for ch in repr(parts)) % 10_000


# (maps size, output size, mode, normalize)
GEOMETRIES = [
    ((16, 16), (64, 48), "bilinear", "minmax"),
    ((12, 20), (37, 61), "bicubic", "minmax"),
    ((16, 16), (50, 50), "nearest", "max"),
    ((24, 24), (24, 24), "none", "minmax"),
    ((16, 12), (40, 40), "bilinear", "none"),
]


@needs_numba
@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda g: f"{g[0]}to{g[1]}_{g[2]}_{g[3]}")
@pytest.mark.parametrize("channels", [1, 3])
def test_numba_matches_ref(rule, geom, channels):
    (mh, mw), size, mode, normalize = geom
    bg_const, bg_slope, lo, hi = RULES[rule]
    if normalize == "none":  # raw maps live in [0.5, 4.4]: move the rules into that range
        bg_const, lo, hi = bg_const + 2.0, lo + 2.0, hi + 2.0
    maps, ids = _random_inputs(2, channels, mh, mw, seed=_seed(rule, geom, channels))
    assert_matches_ref("numba", maps, ids, size=size, normalize=normalize, bg_const=bg_const,
                       bg_slope=bg_slope, ignore_low=lo, ignore_high=hi, mode=mode)


TRITON_CASES = [
    ("threshold0.4", ((8, 8), (24, 20), "bilinear", "minmax"), 3),
    ("attn2mask", ((6, 10), (17, 13), "bicubic", "minmax"), 2),
    ("dataset_diffusion", ((16, 16), (16, 16), "none", "max"), 3),
    ("threshold0.4", ((8, 8), (20, 12), "nearest", "minmax"), 1),
]


@needs_triton
@pytest.mark.parametrize("rule,geom,channels", TRITON_CASES,
                         ids=[f"{r}_{g[2]}_C{c}" for r, g, c in TRITON_CASES])
def test_triton_matches_ref(rule, geom, channels):
    (mh, mw), size, mode, normalize = geom
    bg_const, bg_slope, lo, hi = RULES[rule]
    maps, ids = _random_inputs(2, channels, mh, mw, seed=11)
    assert_matches_ref("triton", maps, ids, size=size, normalize=normalize, bg_const=bg_const,
                       bg_slope=bg_slope, ignore_low=lo, ignore_high=hi, mode=mode)


def _row_maps(*channels):
    """[1, C, 1, W] maps from per-channel rows of values (no normalisation/resizing needed)."""
    return torch.tensor([list(ch) for ch in channels], dtype=torch.float32)[None, :, None, :]


def _row_case(impl, maps, ids, **kw):
    w = maps.shape[-1]
    labels, rel = _finalize(impl, maps, torch.tensor([ids]), size=(1, w), normalize="none",
                            mode="none", **kw)
    return labels[0, 0].tolist(), rel[0, 0].tolist()


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_rule_constant_threshold(impl):
    maps = _row_maps([0.9, 0.2, 0.3, 0.45, 0.7, 0.7],
                     [0.1, 0.62, 0.3, 0.3, 0.7, 2.0])
    labels, rel = _row_case(impl, maps, [3, 7], bg_const=0.5)
    assert labels == [3, 7, 0, 0, 3, 7]  # a tie between classes goes to the first channel
    # gaps 0.4, 0.12, 0.2, 0.05, 0 (tie), 1.3 (clamped to 1)
    assert rel == [102, 31, 51, 13, 0, 255]


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_rule_attn2mask(impl):
    # background = 0.8 - m: a class needs m > 0.4.
    maps = _row_maps([0.9, 0.5, 0.33, 0.1, 0.46])
    labels, rel = _row_case(impl, maps, [5], bg_const=0.8, bg_slope=-1.0)
    assert labels == [5, 5, 0, 0, 5]
    assert rel == [255, 51, 36, 153, 31]


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_rule_ignore_band(impl):
    # Dataset-Diffusion: background 0.6, 0.5 <= m < 0.6 -> ignore (255, reliability 0).
    maps = _row_maps([0.55, 0.45, 0.72, 0.5, 0.6, 0.2],
                     [0.1, 0.2, 0.3, 0.1, 0.3, 0.59])
    labels, rel = _row_case(impl, maps, [9, 4], bg_const=0.6, ignore_low=0.5, ignore_high=0.6)
    # m = 0.5 is inside the band; m = 0.6 is outside it and ties with background, which wins.
    assert labels == [255, 0, 9, 255, 0, 255]
    assert rel == [0, 38, 31, 0, 0, 0]


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_padded_channel_never_wins(impl):
    maps, ids = _random_inputs(1, 3, 8, 8, seed=4, padded=False)
    ids[0] = torch.tensor([2, 0, 11])
    maps[0, 1] = 50.0 + 10 * maps[0, 1]  # padded channel dominates everywhere
    kw = {"size": (20, 16), "normalize": "minmax", "bg_const": 0.7, "bg_slope": -0.5,
          "mode": "bilinear"}
    labels, rel = _finalize(impl, maps, ids, **kw)
    assert set(labels.unique().tolist()) <= {0, 2, 11}
    # Identical to the problem without that channel: it counts nowhere, not even in m.
    keep = [0, 2]
    want_l, want_r = finalize_masks_ref(maps[:, keep], ids[:, keep], **kw)
    assert torch.equal(labels, want_l) and torch.equal(rel, want_r)
    assert (labels == 2).any() and (labels == 11).any()


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("normalize", ["minmax", "max", "none"])
def test_all_zero_maps(impl, normalize):
    maps = torch.zeros(2, 2, 6, 6)
    ids = torch.tensor([[1, 2], [3, 0]])
    labels, rel = _finalize(impl, maps, ids, size=(12, 12), normalize=normalize, bg_const=0.5,
                            mode="bilinear")
    assert (labels == 0).all()
    assert (rel == 128).all()  # floor(255 * 0.5 + 0.5)
    labels, rel = _finalize(impl, maps, ids, size=(12, 12), normalize=normalize, bg_const=0.0,
                            mode="bilinear")
    assert (labels == 0).all() and (rel == 0).all()  # tie: background wins, no margin


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_no_valid_channel(impl):
    maps = torch.rand(1, 2, 4, 4)
    ids = torch.zeros(1, 2, dtype=torch.int64)
    labels, rel = _finalize(impl, maps, ids, size=(4, 4), bg_const=0.25, mode="none")
    assert (labels == 0).all() and (rel == 64).all()  # top2 = 0: floor(63.75 + 0.5)
    # m = 0 when nothing is valid, so a band containing 0 ignores everything.
    labels, rel = _finalize(impl, maps, ids, size=(4, 4), bg_const=0.25, ignore_low=0.0,
                            ignore_high=0.1, mode="none")
    assert (labels == 255).all() and (rel == 0).all()


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_normalisations(impl):
    # One channel whose values make minmax and max give different decisions at 0.5.
    maps = _row_maps([1.0, 2.0, 3.0, 4.0, 5.0])
    ids = torch.tensor([[8]])
    kw = {"size": (1, 5), "mode": "none", "bg_const": 0.5}
    labels, _ = _finalize(impl, maps, ids, normalize="minmax", **kw)  # 0, .25, .5, .75, 1
    assert labels[0, 0].tolist() == [0, 0, 0, 8, 8]
    labels, _ = _finalize(impl, maps, ids, normalize="max", **kw)  # .2, .4, .6, .8, 1
    assert labels[0, 0].tolist() == [0, 0, 8, 8, 8]
    labels, _ = _finalize(impl, maps, ids, normalize="none", **kw)
    assert labels[0, 0].tolist() == [8, 8, 8, 8, 8]


def test_argument_checks():
    maps = torch.rand(1, 2, 4, 4)
    ids = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="mode 'none'"):
        finalize_masks(maps, ids, size=(8, 8), mode="none", impl="ref")
    with pytest.raises(ValueError, match="class_ids"):
        finalize_masks(maps, ids[:, :1], size=(4, 4), impl="ref")
    with pytest.raises(ValueError, match="normalize"):
        finalize_masks(maps, ids, size=(4, 4), normalize="l2", impl="ref")


@needs_numba
def test_default_impl_on_cpu(monkeypatch):
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    maps, ids = _random_inputs(1, 3, 8, 8, seed=2)
    a = finalize_masks(maps, ids, size=(16, 16))
    b = finalize_masks_numba(maps, ids, size=(16, 16))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_aot_compile_for_hopper(aot_compile):
    """The per-pixel kernel lowers to an sm_90 cubin with the NVIDIA backend, no GPU needed."""
    out = aot_compile("""
        from attnseg.kernels import finalize as fz
        sig = {"norm_ptr": "*fp32", "ids_ptr": "*i64", "iy_ptr": "*i32", "wy_ptr": "*fp32",
               "ix_ptr": "*i32", "wx_ptr": "*fp32", "lab_ptr": "*u8", "rel_ptr": "*u8",
               "C": "i32", "MH": "i32", "MW": "i32", "H": "i32", "W": "i32",
               "bg_const": "fp32", "bg_slope": "fp32", "ignore_low": "fp32",
               "ignore_high": "fp32"}
        aot(fz.finalize_kernel, sig, {"KY": 4, "KX": 4, "BLOCK_P": 256})
    """)
    assert "finalize_kernel cubin bytes" in out


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda g: f"{g[0]}to{g[1]}_{g[2]}_{g[3]}")
def test_triton_cuda_matches_ref(rule, geom):
    (mh, mw), size, mode, normalize = geom
    bg_const, bg_slope, lo, hi = RULES[rule]
    if normalize == "none":
        bg_const, lo, hi = bg_const + 2.0, lo + 2.0, hi + 2.0
    maps, ids = _random_inputs(2, 3, mh, mw, seed=7)
    assert_matches_ref("triton", maps, ids, size=size, normalize=normalize, bg_const=bg_const,
                       bg_slope=bg_slope, ignore_low=lo, ignore_high=hi, mode=mode)
