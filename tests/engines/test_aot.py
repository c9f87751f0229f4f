"""The ahead-of-time kernel entry points (C library and TensorRT plugin) against the
reference op, run in Triton's interpreter on CPU; and their compilation for sm_90 (no GPU)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap

import pytest
import torch

from attnseg.kernels import _dispatch
from attnseg.kernels.class_attention import accumulate_class_attention_ref, attn_blocks
from attnseg.kernels.finalize import finalize_masks_ref, normalize_maps
from attnseg.kernels.interp import interp_taps

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
needs_triton = pytest.mark.skipif(
    _dispatch.triton_modules() is None or not (HAS_CUDA or _dispatch.triton_interpreting()),
    reason="triton missing, or no GPU and TRITON_INTERPRET was not set before triton's import")


def _bits(x: float) -> int:
    return struct.unpack("<i", struct.pack("<f", x))[0]


def _inputs(dtype, b=2, heads=2, n=24, l_tokens=77, d=40, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, heads, n, d, generator=g).to(dtype)
    k = torch.randn(b, heads, l_tokens, d, generator=g).to(dtype)
    tw = (torch.rand(b, l_tokens, c, generator=g) > 0.7).float()
    return q.to(DEVICE), k.to(DEVICE), tw.to(DEVICE)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_aot_class_attention_entry_point_matches_reference(dtype):
    from attnseg.engines import triton_kernels as tk

    b, heads, n, d, c = 2, 2, 24, 40, 3
    q, k, tw = _inputs(dtype, b, heads, n, 77, d, c)
    scale = d ** -0.5
    ref = torch.zeros(b, c, 4, 6, device=DEVICE)
    accumulate_class_attention_ref(q, k, tw, ref, hw=(4, 6), scale=scale)
    out = torch.full((b, c, n), float("nan"), device=DEVICE)
    blocks = attn_blocks(77, d, 16, dtype)
    blocks["BLOCK_C"] = 16
    grid = (b, -(-n // blocks["BLOCK_N"]))
    tk.class_attention_maps_aot[grid](q, k, tw, out, b, n, 77, d, c, heads, _bits(scale),
                                      num_warps=8, **blocks)
    tol = 1e-5 if dtype == torch.float32 else 1e-4
    torch.testing.assert_close(out.view(b, c, 4, 6), ref, atol=tol, rtol=tol)


@needs_triton
@pytest.mark.parametrize("dtype,l_tokens,c,long_text", [
    (torch.float32, 77, 3, False),
    (torch.float16, 77, 3, False),
    (torch.float16, 154, 3, True),   # past one key tile: the two sweeps
    (torch.float32, 77, 40, True),   # exact-fp32 dots with more than 32 classes: two sweeps
    (torch.float16, 40, 64, False),  # the widest class tile
])
def test_plugin_entry_point_matches_reference(dtype, l_tokens, c, long_text):
    """The TensorRT plugin's kernel, compiled with the constants `plugin_constants` picks
    (the launcher's tiles and kernel), gives the reference maps: one key tile or the two
    sweeps."""
    from attnseg.engines import triton_kernels as tk
    from attnseg.engines.aot import plugin_constants

    b, heads, n, d = 1, 2, 24, 40
    q, k, tw = _inputs(dtype, b, heads, n, l_tokens, d, c)
    scale = d ** -0.5
    ref = torch.zeros(b, c, 4, 6, device=DEVICE)
    accumulate_class_attention_ref(q, k, tw, ref, hw=(4, 6), scale=scale)
    block_c = max(16, 1 << (c - 1).bit_length())  # as the export sets it
    dtype_name = {torch.float32: "fp32", torch.float16: "fp16"}[dtype]
    _, consts = plugin_constants(dtype_name, scale, l_tokens, d, block_c)
    assert consts["LONG"] is long_text and consts["BLOCK_C"] <= 64
    out = torch.full((b, c, n), float("nan"), device=DEVICE)
    grid = (b, -(-n // consts["BLOCK_N"]))
    tk.class_attention_maps_plugin[grid](q, k, tw, b, n, l_tokens, d, c, heads, out,
                                         num_warps=8, **consts)
    tol = 1e-5 if dtype == torch.float32 else 1e-4
    torch.testing.assert_close(out.view(b, c, 4, 6), ref, atol=tol, rtol=tol)


@needs_triton
def test_finalize_entry_point_matches_reference():
    from attnseg.engines import triton_kernels as tk

    g = torch.Generator().manual_seed(1)
    maps = torch.rand(2, 3, 5, 4, generator=g).to(DEVICE)
    ids = torch.tensor([[3, 7, 0], [12, 5, 9]], device=DEVICE)
    size, rules = (17, 13), dict(bg_const=0.8, bg_slope=-1.0, ignore_low=0.3, ignore_high=0.4)
    ref_lab, ref_rel = finalize_masks_ref(maps, ids, size=size, normalize="minmax",
                                          mode="bicubic", **rules)
    norm = normalize_maps(maps, "minmax").contiguous()
    iy, wy = interp_taps(5, size[0], "bicubic", device=DEVICE)
    ix, wx = interp_taps(4, size[1], "bicubic", device=DEVICE)
    lab = torch.empty(2, *size, dtype=torch.uint8, device=DEVICE)
    rel = torch.empty_like(lab)
    grid = (2, -(-(size[0] * size[1]) // 256))
    tk.finalize_masks_aot[grid](norm, ids, iy, wy, ix, wx, lab, rel, 2, 3, 5, 4, *size,
                                *(_bits(rules[k]) for k in ("bg_const", "bg_slope", "ignore_low",
                                                            "ignore_high")),
                                KY=4, KX=4, BLOCK_P=256, num_warps=4)
    assert bool((lab == ref_lab).all())
    assert (rel.int() - ref_rel.int()).abs().max() == 0


def test_plugin_kernel_compiles_to_ptx_for_hopper_without_a_gpu():
    """What the TensorRT plugin's aot_impl returns: PTX of the single-source kernel, whose
    parameters are exactly TensorRT's AOT convention (3 inputs, 6 int32 args, 1 output: Triton's
    scratch pointers dropped), assembled by ptxas for sm_90a, at fp16 and bf16."""
    script = textwrap.dedent("""
        import re, subprocess, sys, tempfile
        try:
            from triton.backends.nvidia.compiler import get_ptxas
            ptxas = get_ptxas(90).path
        except Exception as exc:
            print(f"no NVIDIA backend/ptxas: {exc!r}")
            sys.exit(77)
        from attnseg.engines.aot import plugin_ptx
        for dtype in ("fp16", "bf16"):
            name, ptx, threads, shared, block_n = plugin_ptx(dtype, 40 ** -0.5, 77, 40, 16, 90)
            assert name == "class_attention_maps_plugin", name
            assert ".entry class_attention_maps_plugin" in ptx and ".target sm_90" in ptx
            entry = re.search(r"\\.entry class_attention_maps_plugin\\((.*?)\\)", ptx, re.S)
            params = [p for p in entry.group(1).split(",") if p.strip()]
            kinds = [".ptr" in p for p in params]
            assert kinds == [True] * 3 + [False] * 6 + [True], params
            with tempfile.TemporaryDirectory() as tmp:
                open(f"{tmp}/k.ptx", "w").write(ptx)
                subprocess.run([ptxas, "-arch=sm_90a", f"{tmp}/k.ptx", "-o", f"{tmp}/k.cubin"],
                               check=True)
        print("ok", threads, shared, block_n)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ok, threads, shared, block_n = proc.stdout.split()[-4:]
    assert ok == "ok" and int(threads) == 256 and int(block_n) == 64


def test_trim_entry_params_refuses_a_kernel_that_reads_them():
    from attnseg.engines.aot import trim_entry_params

    ptx = (".visible .entry k(\n\t.param .u64 k_param_0,\n\t.param .u32 k_param_1,\n"
           "\t.param .u64 k_param_2\n)\n{\n\tld.param.b64 %rd1, [k_param_0];\n}\n")
    trimmed = trim_entry_params(ptx, "k", 2)
    assert "k_param_2" not in trimmed and "k_param_1" in trimmed
    assert trimmed.endswith("{\n\tld.param.b64 %rd1, [k_param_0];\n}\n")
    with pytest.raises(RuntimeError, match="reads k_param_0"):
        trim_entry_params(ptx, "k", 0)
    with pytest.raises(RuntimeError, match="no .entry"):
        trim_entry_params(ptx, "other", 1)
