"""accumulate_class_attention: definition, numba and triton against the torch reference."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import torch.nn.functional as F

from attnseg.kernels import _dispatch
from attnseg.kernels.class_attention import (
    accumulate_class_attention,
    accumulate_class_attention_numba,
    accumulate_class_attention_ref,
    accumulate_class_attention_triton,
)

from . import ptxas
from .marks import HAS_CUDA, needs_numba, needs_triton


@dataclasses.dataclass(frozen=True)
class Case:
    b: int
    h: int
    hw: tuple
    d: int
    l: int
    c: int
    out: tuple
    mode: str = "none"
    clamp: bool = False
    weight: float = 1.0
    dtype: torch.dtype = torch.float32
    negative: bool = False  # a negative token weight, so that clamping matters

    def __str__(self):
        dt = str(self.dtype).replace("torch.", "")
        return (f"B{self.b}H{self.h}_{self.hw[0]}x{self.hw[1]}_D{self.d}L{self.l}C{self.c}"
                f"_to{self.out[0]}x{self.out[1]}_{self.mode}_clamp{int(self.clamp)}"
                f"_w{self.weight}_{dt}{'_neg' if self.negative else ''}")


def make_inputs(case: Case, seed: int = 0, device="cpu"):
    """Queries/keys in the case's dtype, token weights with a multi-token class (column 0 sums
    tokens 1..3), single/partial-token classes, and an all-zero column when C >= 3."""
    g = torch.Generator().manual_seed(seed)
    n = case.hw[0] * case.hw[1]
    # Scaled so that the softmax is neither flat nor one-hot.
    q = (2.0 * torch.randn(case.b, case.h, n, case.d, generator=g)).to(case.dtype)
    k = torch.randn(case.b, case.h, case.l, case.d, generator=g).to(case.dtype)
    tw = torch.zeros(case.b, case.l, case.c)
    tw[:, 1:4, 0] = 1.0
    for cc in range(1, case.c):
        tw[:, (2 + 2 * cc) % case.l, cc] = 1.0
        tw[:, (3 + 2 * cc) % case.l, cc] = 0.5
    if case.c >= 3:
        tw[:, :, case.c - 1] = 0.0  # absent / padded class
    if case.negative:
        tw[:, 0, 0] = -3.0
    out = torch.randn(case.b, case.c, *case.out, generator=g)
    return q.to(device), k.to(device), tw.to(device), out.to(device)


def run(fn, case: Case, q, k, tw, out):
    res = fn(q, k, tw, out, hw=case.hw, scale=case.d ** -0.5, weight=case.weight,
             mode=case.mode, clamp=case.clamp)
    assert res is out
    return out


def assert_close_to_ref(case: Case, fn, seed=0, device="cpu"):
    q, k, tw, out0 = make_inputs(case, seed, device)
    # Same (possibly fp16/bf16-rounded) inputs for both: the kernels must agree with the
    # fp32 reference evaluated on those inputs up to fp32 rounding.
    want = run(accumulate_class_attention_ref, case, q, k, tw, out0.clone())
    got = run(fn, case, q, k, tw, out0.clone())
    scale = max(1.0, want.abs().max().item())
    err = (got - want).abs().max().item()
    assert err <= 1e-5 * scale, f"max abs err {err:.3g} (scale {scale:.3g})"
    # The accumulation really added something.
    assert (want - out0).abs().max().item() > 1e-3


NUMBA_CASES = [
    Case(1, 8, (32, 32), 40, 77, 3, (32, 32)),
    Case(1, 8, (32, 32), 40, 77, 2, (32, 32), clamp=True, negative=True),
    Case(2, 8, (16, 16), 160, 77, 1, (64, 48), "bicubic", clamp=True, weight=0.37),
    Case(2, 8, (16, 16), 160, 77, 3, (64, 48), "bicubic", negative=True),
    Case(2, 5, (8, 12), 64, 77, 3, (40, 24), "bilinear", weight=2.5, dtype=torch.float16),
    Case(1, 4, (16, 16), 80, 77, 2, (512, 512), "bilinear", clamp=True, dtype=torch.bfloat16,
         negative=True),
    Case(1, 2, (7, 9), 40, 33, 3, (13, 20), "nearest", weight=-0.5),
    Case(3, 3, (8, 8), 22, 10, 2, (8, 8), clamp=True, negative=True),  # D, L not multiples of 4
    Case(1, 8, (64, 64), 40, 77, 2, (64, 64), dtype=torch.float16),
    Case(1, 10, (32, 32), 64, 77, 3, (16, 16), "bicubic", clamp=True, negative=True),
    Case(1, 1, (8, 8), 160, 256, 3, (8, 8), dtype=torch.bfloat16),
]

TRITON_CASES = [
    Case(1, 2, (8, 8), 40, 77, 3, (8, 8), clamp=True, negative=True),
    Case(2, 1, (16, 8), 160, 77, 1, (24, 40), "bicubic", weight=0.5, dtype=torch.float16),
    Case(1, 2, (8, 16), 64, 77, 3, (16, 32), "bilinear", clamp=True, dtype=torch.bfloat16,
         negative=True),
    Case(1, 2, (16, 16), 80, 20, 2, (12, 12), "nearest", weight=1.7),
    Case(1, 1, (8, 8), 40, 77, 3, (8, 8), weight=0.25, dtype=torch.float16),
    # More than TRITON_MAX_KEYS text keys (T5 contexts): the kernel that sweeps key tiles,
    # with a partial last tile, a resize, fp16 and several heads.
    Case(1, 2, (8, 8), 40, 300, 3, (8, 8), clamp=True, negative=True),
    Case(2, 2, (8, 4), 16, 333, 2, (16, 8), "bilinear", weight=0.5, dtype=torch.float16),
    Case(1, 3, (4, 4), 24, 512, 2, (4, 4)),
    # 129-256 keys also take the two sweeps (a 256-key tile spills registers on a GPU).
    Case(1, 2, (8, 8), 40, 154, 3, (8, 8), dtype=torch.float16),
    Case(1, 2, (4, 4), 24, 256, 2, (8, 8), "bicubic", clamp=True, negative=True),
    # More classes than the widest class tile (64): a launch per tile of classes, into
    # non-contiguous slices of the accumulator (B = 2).
    Case(2, 1, (4, 4), 16, 77, 70, (4, 4), clamp=True, negative=True),
    Case(2, 1, (4, 4), 16, 300, 70, (8, 8), "bilinear", weight=0.5),
    # A 128-wide map: the resize kernel's 16 x 16 output tiles.
    Case(1, 1, (2, 128), 16, 20, 2, (3, 160), "bilinear", clamp=True, negative=True),
]


@needs_numba
@pytest.mark.parametrize("case", NUMBA_CASES, ids=str)
def test_numba_matches_ref(case):
    assert_close_to_ref(case, accumulate_class_attention_numba)


@needs_triton
@pytest.mark.parametrize("case", TRITON_CASES, ids=str)
def test_triton_matches_ref(case):
    device = "cuda" if HAS_CUDA else "cpu"
    assert_close_to_ref(case, accumulate_class_attention_triton, device=device)


def _naive(case: Case, q, k, tw, out):
    """The definition spelled out in float64, with F.interpolate for the resize."""
    qd, kd = q.double(), k.double()
    probs = torch.stack([torch.softmax(case.d ** -0.5 * qd[:, hd] @ kd[:, hd].transpose(1, 2),
                                       dim=-1) for hd in range(case.h)], dim=1)
    maps = probs.mean(dim=1) @ tw.double()  # [B, N, C]
    maps = maps.transpose(1, 2).reshape(case.b, case.c, *case.hw)
    if case.mode != "none":
        extra = {} if case.mode == "nearest" else {"align_corners": False}
        maps = F.interpolate(maps, size=case.out, mode=case.mode, **extra)
    if case.clamp:
        maps = maps.clamp_min(0.0)
    return out.double() + case.weight * maps


@pytest.mark.parametrize("case", [NUMBA_CASES[2], NUMBA_CASES[5], NUMBA_CASES[6],
                                  NUMBA_CASES[7]], ids=str)
def test_ref_matches_definition(case):
    q, k, tw, out0 = make_inputs(case, seed=3)
    want = _naive(case, q, k, tw, out0)
    got = run(accumulate_class_attention_ref, case, q, k, tw, out0.clone())
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("impl", [
    "ref",
    pytest.param("numba", marks=needs_numba),
    pytest.param("triton", marks=needs_triton),
])
def test_noncontiguous_views(impl):
    # Attention code produces q/k as transposed views of [B, N, H, D] projections.
    case = Case(2, 2, (8, 8), 40, 77, 3, (16, 16), "bilinear", clamp=True, negative=True)
    q, k, tw, out0 = make_inputs(case, seed=5)
    qv = q.transpose(1, 2).contiguous().transpose(1, 2)
    kv = torch.cat([k, k], dim=-1)[..., : case.d]
    assert not qv.is_contiguous() and not kv.is_contiguous()
    want = run(accumulate_class_attention_ref, case, q, k, tw, out0.clone())
    got = out0.clone()
    accumulate_class_attention(qv, kv, tw, got, hw=case.hw, scale=case.d ** -0.5, mode=case.mode,
                               clamp=case.clamp, impl=impl)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


@needs_triton
@pytest.mark.parametrize("groups", [2, 3, 8])
@pytest.mark.parametrize("case", [
    Case(1, 8, (8, 8), 40, 77, 3, (8, 8), clamp=True, negative=True),
    Case(2, 5, (8, 8), 40, 20, 2, (16, 16), "bilinear", weight=0.5),
], ids=str)
def test_triton_head_groups_match_one_group(case, groups):
    # Small layers split their heads over several programs on a GPU; the partial maps are
    # summed afterwards (in a fixed order), so the result is the one-group result.
    device = "cuda" if HAS_CUDA else "cpu"
    q, k, tw, out0 = make_inputs(case, seed=7)
    q, k, tw, out0 = (t.to(device) for t in (q, k, tw, out0))
    # The projections' layout: [B, N, H*D] viewed as [B, H, N, D], not copied.
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    want = run(accumulate_class_attention_ref, case, q, k, tw, out0.clone())
    one = out0.clone()
    accumulate_class_attention_triton(q, k, tw, one, hw=case.hw, scale=case.d ** -0.5,
                                      weight=case.weight, mode=case.mode, clamp=case.clamp,
                                      groups=1)
    split = out0.clone()
    accumulate_class_attention_triton(q, k, tw, split, hw=case.hw, scale=case.d ** -0.5,
                                      weight=case.weight, mode=case.mode, clamp=case.clamp,
                                      groups=groups)
    tol = 1e-5 * want.abs().max().item()
    torch.testing.assert_close(split, one, rtol=0, atol=tol)
    torch.testing.assert_close(split, want, rtol=0, atol=tol)


def test_head_groups_fill_the_gpu_only(monkeypatch):
    from attnseg.kernels import class_attention as ca

    monkeypatch.setitem(ca._SM_COUNTS, 0, 132)  # an H100/H200's SM count, no GPU needed
    gpu = torch.device("cuda", 0)
    assert ca.head_groups(4, 8, gpu) == 8  # SD's 16x16 layers at batch 1: every head apart
    assert ca.head_groups(32, 8, gpu) == 5  # 32 row tiles: 5 groups (of 2 heads: 4) fill it
    assert ca.head_groups(200, 8, gpu) == 1  # big layers already fill the GPU
    assert ca.head_groups(4, 1, gpu) == 1
    assert ca.head_groups(4, 8, torch.device("cpu")) == 1


def test_accumulates_across_calls():
    case = Case(1, 2, (8, 8), 40, 20, 2, (8, 8))
    q, k, tw, _ = make_inputs(case)
    out = torch.zeros(1, 2, 8, 8)
    for _ in range(3):
        accumulate_class_attention(q, k, tw, out, hw=(8, 8), scale=0.2, weight=0.5, impl="ref")
    once = accumulate_class_attention_ref(q, k, tw, torch.zeros(1, 2, 8, 8), hw=(8, 8),
                                          scale=0.2)
    torch.testing.assert_close(out, 1.5 * once)
    # Column 0 sums three tokens' probabilities; a softmax row sums to 1.
    assert out[:, 0].max() <= 1.5 + 1e-6 and out.min() >= 0


def test_argument_checks():
    case = Case(1, 2, (8, 8), 40, 20, 2, (8, 8))
    q, k, tw, out = make_inputs(case)
    with pytest.raises(ValueError, match="mode 'none'"):
        accumulate_class_attention(q, k, tw, torch.zeros(1, 2, 16, 16), hw=(8, 8), scale=1.0,
                                   impl="ref")
    with pytest.raises(ValueError, match="hw"):
        accumulate_class_attention(q, k, tw, out, hw=(4, 8), scale=1.0, impl="ref")
    with pytest.raises(ValueError, match="contiguous float32"):
        accumulate_class_attention(q, k, tw, out.double(), hw=(8, 8), scale=1.0, impl="ref")
    with pytest.raises(ValueError, match="token_weights"):
        accumulate_class_attention(q, k, tw[:, :5], out, hw=(8, 8), scale=1.0, impl="ref")
    with pytest.raises(ValueError, match="unknown kernel impl"):
        accumulate_class_attention(q, k, tw, out, hw=(8, 8), scale=1.0, impl="cuda")


def test_dispatch(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    expected = "numba" if _dispatch.numba_module() is not None else "ref"
    assert _dispatch.resolve_impl(None, cpu) == expected
    assert _dispatch.resolve_impl("ref", cpu) == "ref"
    if _dispatch.triton_modules() is not None:
        assert _dispatch.resolve_impl(None, torch.device("cuda")) == "triton"
    monkeypatch.setenv(_dispatch.ENV_VAR, "ref")
    assert _dispatch.resolve_impl(None, cpu) == "ref"
    assert _dispatch.resolve_impl("numba", cpu) == "numba"  # explicit beats the variable
    monkeypatch.setenv(_dispatch.ENV_VAR, "bogus")
    with pytest.raises(ValueError):
        _dispatch.resolve_impl(None, cpu)


@needs_numba
def test_default_impl_on_cpu_is_numba(monkeypatch):
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    case = NUMBA_CASES[4]
    q, k, tw, out0 = make_inputs(case)
    a = run(accumulate_class_attention_numba, case, q, k, tw, out0.clone())
    b = out0.clone()
    accumulate_class_attention(q, k, tw, b, hw=case.hw, scale=case.d ** -0.5,
                               weight=case.weight, mode=case.mode, clamp=case.clamp)
    assert torch.equal(a, b)


def test_aot_compile_for_hopper(aot_compile):
    """Both kernels lower to an sm_90 cubin with the NVIDIA backend, no GPU needed."""
    out = aot_compile("""
        from attnseg.kernels import class_attention as ca
        attn_sig = {"q_ptr": "*fp16", "k_ptr": "*fp16", "tw_ptr": "*fp32", "dst_ptr": "*fp32",
                    "N": "i32", "L": "i32", "D": "i32", "C": "i32", "H": "i32",
                    "HPG": "i32", "sq_b": "i32", "sq_h": "i32", "sq_n": "i32", "sk_b": "i32",
                    "sk_h": "i32", "sk_l": "i32", "scale": "fp32", "weight": "fp32"}
        import torch
        blocks = ca.attn_blocks(77, 40, 3, torch.float16)
        warps = ca._TRITON_NUM_WARPS
        aot(ca.class_attn_kernel, attn_sig, dict(blocks, C0=0, DIRECT=False, CLAMP=False),
            warps)
        resize_sig = {"src_ptr": "*fp32", "wy_ptr": "*fp32", "wx_ptr": "*fp32",
                      "out_ptr": "*fp32", "h": "i32", "w": "i32", "RH": "i32", "RW": "i32",
                      "weight": "fp32"}
        aot(ca._resize_acc_kernel, resize_sig,
            {"BLOCK_R": 32, "BLOCK_Q": 32, "BLOCK_K": 32, "BLOCK_W": 64, "CLAMP": True}, warps)
    """)
    assert "class_attn_kernel cubin bytes" in out and "_resize_acc_kernel cubin bytes" in out


# Every tile the launchers ship (derived by calling them: see tests/kernels/ptxas.py).
SHIPPED = ptxas.shipped_launches()
_ATTENTION = ("class_attn_kernel", "class_attn_long_kernel")
# The attention launches (the TensorRT plugin's included) whose scores take the tensor cores on
# a GPU.
HALF_PRECISION = [launch for launch in SHIPPED
                  if launch.kernel in (*_ATTENTION, "class_attention_maps_plugin")
                  and launch.dtype in ("fp16", "bf16")]


@pytest.fixture(scope="module")
def ptxas_reports(request, tmp_path_factory):
    """ptxas -v at sm_80 and sm_90 of the shipped launches the selected tests ask about (all of
    them, unless -k narrows the run): compiled once per test process, in parallel, with a
    private triton cache so that it really compiles; no GPU needed."""
    selected = {item.callspec.params["launch"] for item in request.session.items
                if "launch" in getattr(getattr(item, "callspec", None), "params", {})}
    try:
        return ptxas.ptxas_reports([launch for launch in SHIPPED if launch in selected],
                                   cache_dir=tmp_path_factory.mktemp("triton-cache"))
    except ptxas.CannotCompile as exc:
        pytest.skip(str(exc))


@needs_triton
def test_shipped_tiles_are_the_documented_ones():
    from attnseg.kernels import class_attention as ca

    kernels = {launch.kernel for launch in SHIPPED}
    assert kernels == {*_ATTENTION, "_resize_acc_kernel", "finalize_kernel",
                       "crf_messages_kernel", "lattice_blur_kernel", "class_attention_maps_plugin"}
    for launch in SHIPPED:
        consts = dict(launch.constexprs)
        if launch.kernel == "class_attn_kernel":  # 129+ keys go to the two sweeps
            assert consts["BLOCK_L"] <= ca.TRITON_MAX_KEYS == 128
            # and so do exact-fp32 dots with 65-128 keys and more than 32 classes
            assert not (consts["F32_DOT"] and consts["BLOCK_L"] > 64 and consts["BLOCK_C"] > 32)
        if launch.kernel in _ATTENTION:
            assert consts["CLAMP"] <= consts["DIRECT"]
        if launch.kernel in (*_ATTENTION, "class_attention_maps_plugin"):
            assert consts["BLOCK_C"] <= ca.TRITON_MAX_BLOCK_C
            assert consts["F32_DOT"] == (launch.dtype == "fp32")  # bf16: tensor cores
        assert launch.num_warps == (4 if launch.kernel in ("finalize_kernel",
                                                           "crf_messages_kernel",
                                                           "lattice_blur_kernel") else 8)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ptxas.ARCHS)
@pytest.mark.parametrize("launch", SHIPPED, ids=str)
def test_shipped_tile_compiles_without_register_spills(ptxas_reports, launch, arch):
    """Every tile the launchers pick (class attention, both kernels, its resize, finalize, the
    exact CRF, the GPU lattice's blur) for the model families' shapes, fp16/bf16/fp32, compiles
    for sm_80 and sm_90 with no register spills, per ptxas -v."""
    report = ptxas_reports[(launch, arch)]
    assert (report["spill_stores"], report["spill_loads"]) == (0, 0), report
    assert report["regs"] <= 255


@pytest.mark.slow
@pytest.mark.parametrize("arch", ptxas.ARCHS)
@pytest.mark.parametrize("launch", HALF_PRECISION, ids=str)
def test_half_precision_scores_use_tensor_cores(ptxas_reports, launch, arch):
    """fp16 and bf16 scores are tensor-core MMAs of that type (mma.sync at sm_80; at sm_90
    wgmma, or mma.sync where the row tile is under wgmma's 64), with fp32 accumulation: the
    path bf16 takes on a GPU, which the interpreter tests do not run (see below)."""
    t = {"fp16": "f16", "bf16": "bf16"}[launch.dtype]  # PTX's type names
    mma = ptxas_reports[(launch, arch)]["mma"]
    sync = f"mma.sync.aligned.m16n8k16.row.col.f32.{t}.{t}.f32"
    wgmma = re.compile(rf"wgmma\.mma_async\.sync\.aligned\.m64n\d+k16\.f32\.{t}\.{t}$")
    if arch < 90:
        assert sync in mma, mma
    else:
        assert sync in mma or any(wgmma.match(m) for m in mma), mma


@pytest.fixture
def interpreter_bf16_dot(monkeypatch):
    """Triton 3.7's interpreter multiplies bf16 dot operands as their raw uint16 bits (its
    InterpreterBuilder.create_dot upcasts only 8-bit floats). This upcasts them to fp32 first,
    exactly (a bf16 is the high half of an fp32), as the tensor cores multiply them; and makes
    `attn_blocks` send bf16 down the tensor-core path under the interpreter."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    from attnseg.kernels import class_attention as ca

    dot = interpreter.InterpreterBuilder.create_dot

    def as_f32(x):
        if x.dtype != tl.bfloat16:
            return x
        return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32),
                                        tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return dot(self, as_f32(a), as_f32(b), d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)
    monkeypatch.setattr(ca, "_INTERPRETER_BF16_MMA", True)


BF16_DOT_CASES = [
    Case(1, 2, (8, 16), 64, 77, 3, (16, 32), "bilinear", clamp=True, dtype=torch.bfloat16,
         negative=True),
    Case(2, 2, (8, 8), 40, 20, 40, (8, 8), weight=0.5, dtype=torch.bfloat16),
    Case(1, 2, (8, 8), 40, 154, 3, (8, 8), clamp=True, dtype=torch.bfloat16, negative=True),
    Case(2, 2, (8, 4), 16, 333, 2, (16, 8), "bilinear", weight=0.5, dtype=torch.bfloat16),
]


@needs_triton
@pytest.mark.skipif(HAS_CUDA, reason="the interpreter's run of the tensor-core path")
@pytest.mark.parametrize("case", BF16_DOT_CASES, ids=str)
def test_triton_bf16_tensor_core_path_under_interpreter(case, interpreter_bf16_dot):
    from attnseg.kernels import class_attention as ca

    long_text = case.l > ca.TRITON_MAX_KEYS
    blocks = (ca.attn_blocks_long(case.d, case.c, case.dtype) if long_text
              else ca.attn_blocks(case.l, case.d, case.c, case.dtype))
    assert blocks["F32_DOT"] is False  # the tl.dot(q, k^T) of bf16 tiles, as on a GPU
    assert_close_to_ref(case, accumulate_class_attention_triton)


@needs_triton
@pytest.mark.skipif(HAS_CUDA, reason="the interpreter's bf16 dot")
def test_interpreter_bf16_dot_still_multiplies_raw_bits(monkeypatch):
    """Why bf16 takes the FMA path under the interpreter: without the patched dot, the
    tensor-core path's scores are products of bf16 bit patterns read as integers. Should a
    triton upgrade fix this, drop `_INTERPRETER_BF16_MMA`'s FMA fallback and the patch."""
    from attnseg.kernels import class_attention as ca

    monkeypatch.setattr(ca, "_INTERPRETER_BF16_MMA", True)
    case = BF16_DOT_CASES[0]
    q, k, tw, out0 = make_inputs(case)
    want = run(accumulate_class_attention_ref, case, q, k, tw, out0.clone())
    got = run(accumulate_class_attention_triton, case, q, k, tw, out0.clone())
    err = (got - want).abs().max().item()
    assert not err <= 1e-2, ("the interpreter's bf16 tl.dot now matches the reference "
                        f"(max abs err {err:.3g}): remove the workaround")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("case", NUMBA_CASES, ids=str)
def test_triton_cuda_matches_ref(case):
    assert_close_to_ref(case, accumulate_class_attention_triton, device="cuda")
