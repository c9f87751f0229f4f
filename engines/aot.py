"""Ahead-of-time compilation of the Triton kernels: C sources with embedded cubins for the
C-ABI library (run by CMakeLists.txt), and PTX for the TensorRT plugin.

    python -m attnseg.engines.aot --out build/aot --archs 80,90

runs triton's own AOT compiler (`triton.tools.compile.compile_kernel`, what `python -m
triton.tools.compile` runs) once per kernel variant and architecture, and writes
`attnseg_aot_index.h`, which maps stable names (`ATTNSEG_CA_F16_SM90`, ...) to the generated,
hash-suffixed entry points. No GPU is needed. Two adaptations, both checked:

- triton 3.9's tool asks the *active* driver for the C type names and the default target even
  when `--target` is given, and without a GPU there is no active driver; a stand-in driver that
  answers only those two questions (with the NVIDIA backend's own type map) is installed then.
- the generated loader calls `exit()` when the CUDA driver reports an error; in a library that
  would kill the host process, so the call is replaced by recording the error, which the
  library's entry points return (`attnseg_kernels.c`).
"""

from __future__ import annotations

import argparse
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

KERNEL_FILE = Path(__file__).with_name("triton_kernels.py")
NUM_WARPS = 8  # as the JIT launchers in attnseg.kernels use


@dataclass(frozen=True)
class Variant:
    """One specialisation: stable name, kernel, triton signature, launch grid."""

    name: str
    kernel: str
    signature: str
    grid: str
    num_warps: int = NUM_WARPS


# Class-token maps: q/k fp16 (tensor-core dots) or fp32 (exact-fp32 dots); up to 128 tokens,
# 16 classes, any head dim (walked in BLOCK_D-wide chunks). Tile sizes as attnseg.kernels
# picks them (its attn_blocks: no register spills at sm_80/sm_90).
_CA_SIG = "*{t}, *{t}, *fp32, *fp32, i32, i32, i32, i32, i32, i32, i32, {bn}, 128, {bd}, 16, {f32}"
_CA_GRID = "B, (N + {bn} - 1) / {bn}, 1"


def _ca_variant(name: str, triton_type: str, f32: int) -> Variant:
    import torch

    from ..kernels.class_attention import attn_blocks

    b = attn_blocks(128, 64, 16, torch.float32 if f32 else torch.float16)
    return Variant(name, "class_attention_maps_aot",
                   _CA_SIG.format(t=triton_type, bn=b["BLOCK_N"], bd=b["BLOCK_D"], f32=f32),
                   _CA_GRID.format(bn=b["BLOCK_N"]))


_FZ_SIG = ("*fp32, *i64, *i32, *fp32, *i32, *fp32, *u8, *u8, i32, i32, i32, i32, i32, i32, "
           "i32, i32, i32, i32, {k}, {k}, 256")
_FZ_GRID = "B, (H * W + 255) / 256, 1"

VARIANTS = (
    _ca_variant("ATTNSEG_CA_F16", "fp16", 0),
    _ca_variant("ATTNSEG_CA_F32", "fp32", 1),
    # Finalize with 1 (nearest / same size), 2 (bilinear) and 4 (bicubic) taps per axis.
    Variant("ATTNSEG_FZ_K1", "finalize_masks_aot", _FZ_SIG.format(k=1), _FZ_GRID, 4),
    Variant("ATTNSEG_FZ_K2", "finalize_masks_aot", _FZ_SIG.format(k=2), _FZ_GRID, 4),
    Variant("ATTNSEG_FZ_K4", "finalize_masks_aot", _FZ_SIG.format(k=4), _FZ_GRID, 4),
)

_EXIT_CALL = "    exit(code);\n"
_EXIT_REPLACEMENT = ("    attnseg_record_cuda_error(code);  /* patched by attnseg.engines.aot:"
                     " no exit() in a library */\n    return;\n")


class _TargetOnlyDriver:
    """The driver triton's AOT tool asks for its target: the requested architecture, whether or
    not a GPU (of any architecture) is present."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.driver import ty_to_cpp

        self._target = GPUTarget("cuda", arch, 32)
        self.map_python_to_cpp_type = ty_to_cpp

    def get_current_target(self):
        return self._target

    def is_active(self):
        return False


@contextmanager
def _targeting(arch: int):
    """Compile for sm_`arch` through the active-driver route of triton's AOT tool, not its
    `--target` string: triton 3.7's tool passes the architecture parsed from that string as a
    str, which its ptxas lookup compares with an int (TypeError). The real driver, where a GPU
    machine has one, is put back afterwards."""
    import triton

    drv = triton.runtime.driver
    try:
        previous = drv.active
    except RuntimeError:  # no GPU driver on this machine
        previous = None
    drv.set_active(_TargetOnlyDriver(arch))
    try:
        yield
    finally:
        if previous is None:
            drv._active = None  # triton has no public way back to "no driver"
        else:
            drv.set_active(previous)


def compile_variant(v: Variant, arch: int, out_dir: Path) -> tuple[str, list[Path]]:
    """C source + header for one variant on sm_`arch`; returns (entry point, files)."""
    from triton.tools.compile import CompileArgs, compile_kernel

    stem = f"{v.name.lower()}_sm{arch}"
    args = CompileArgs(path=str(KERNEL_FILE), kernel_name=v.kernel, signature=v.signature,
                       grid=v.grid, target=None, num_warps=v.num_warps,
                       num_stages=3, out_name=stem, out_path=out_dir / stem)
    with _targeting(arch):
        func, generated = compile_kernel(args)
    files = []
    for g in generated:
        # Fixed names (the tool appends a signature hash), so the build knows its outputs.
        f = out_dir / f"{stem}{g.suffix}"
        g.replace(f)
        files.append(f)
        if f.suffix == ".c":
            text = f.read_text()
            if _EXIT_CALL not in text:
                raise RuntimeError(f"{f}: the triton AOT template changed (no exit() call to "
                                   "patch); update attnseg.engines.aot")
            text = text.replace(_EXIT_CALL, _EXIT_REPLACEMENT)
            text = text.replace("#include <cuda.h>\n",
                                "#include <cuda.h>\nvoid attnseg_record_cuda_error(CUresult);\n",
                                1)
            f.write_text(text)
    return func, files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="AOT-compile attnseg's Triton kernels to C.")
    ap.add_argument("--out", required=True, help="folder for the generated sources")
    ap.add_argument("--archs", default="80,90", help="SM architectures, e.g. 80,90")
    ap.add_argument("--list", action="store_true",
                    help="only print the C sources that would be generated (for CMake)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    archs = [int(a) for a in args.archs.replace(";", ",").split(",") if a.strip()]
    if args.list:
        print(";".join(f"{v.name.lower()}_sm{a}.c" for a in archs for v in VARIANTS))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    lines = ["/* Generated by python -m attnseg.engines.aot: stable names of the AOT kernels. */",
             "#pragma once"]
    for arch in archs:
        for v in VARIANTS:
            func, files = compile_variant(v, arch, out)
            for f in files:
                if f.suffix == ".h":
                    lines.append(f'#include "{f.name}"')
            lines.append(f"#define {v.name}_SM{arch} {func}")
            print(f"compiled {v.name} for sm_{arch}: {func}")
    lines.append(f"#define ATTNSEG_AOT_ARCHS \"{','.join(map(str, archs))}\"")
    (out / "attnseg_aot_index.h").write_text("\n".join(lines) + "\n")
    return 0


def trim_entry_params(ptx: str, name: str, keep: int) -> str:
    """`ptx` with the parameters of entry `name` after the first `keep` removed.

    Triton appends scratch-memory pointers (global_scratch, profile_scratch) to every kernel's
    parameters. TensorRT launches an AOT plugin kernel with exactly (inputs, extra int32 args,
    outputs), so a kernel that declares more reads parameters that were never passed. A
    kernel that uses no scratch memory never reads them: they are dropped; one that does is
    refused."""
    m = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\((.*?)\)", ptx, re.S)
    if m is None:
        raise RuntimeError(f"no .entry {name} in the PTX")
    params = [p.strip() for p in m.group(1).split(",") if p.strip()]
    if len(params) < keep:
        raise RuntimeError(f"{name} has {len(params)} parameters, fewer than {keep}")
    body = ptx[m.end():]
    used = [p.split()[-1] for p in params[keep:]
            if re.search(r"\b" + re.escape(p.split()[-1]) + r"\b", body)]
    if used:
        raise RuntimeError(f"{name} reads {', '.join(used)} (Triton scratch memory), which a "
                           "TensorRT AOT plugin cannot pass")
    signature = "\n\t" + ",\n\t".join(params[:keep]) + "\n"
    return ptx[:m.start(1)] + signature + ptx[m.end(1):]


# Parameters of class_attention_maps_plugin: q, k, token_weights, B, N, L, D, C, H, maps.
PLUGIN_PARAMS = 10
# Classes per prompt the plugin takes: one class tile. Two tiles in one kernel spilled 8-100
# bytes at sm_80/sm_90 (ptxas -v), whether unrolled or looped with a runtime class offset.
PLUGIN_MAX_CLASSES = 64


def plugin_constants(dtype: str, scale: float, l_tokens: int, head_dim: int,
                     block_c: int) -> tuple[dict, dict]:
    """(signature of the runtime arguments, compile-time constants) of
    `class_attention_maps_plugin` for these shapes: the tiles and kernel (one key tile or the
    two sweeps) that the launcher in attnseg.kernels picks, for one class tile of `block_c`
    (at most `PLUGIN_MAX_CLASSES`: the export refuses more)."""
    import torch

    from ..kernels.class_attention import attn_tiles

    if block_c > PLUGIN_MAX_CLASSES:
        raise ValueError(f"the plugin takes at most {PLUGIN_MAX_CLASSES} classes, not {block_c}")
    tdt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    long_text, blocks = attn_tiles(l_tokens, head_dim, block_c, tdt)
    if long_text and not blocks["F32_DOT"]:
        # Inside this wrapper ptxas keeps the two sweeps' half-precision tiles to 128 registers
        # and spilled 40-48 bytes with 64 rows and 16 classes or 32 rows and 32 classes
        # (sm_80, sm_90): half the rows there.
        blocks["BLOCK_N"] = min(blocks["BLOCK_N"], 32 if blocks["BLOCK_C"] <= 16 else 16)
    sig = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "tw_ptr": "*fp32", "B": "i32",
           "N": "i32", "L": "i32", "D": "i32", "C": "i32", "H": "i32", "dst_ptr": "*fp32"}
    return sig, {"SCALE": float(scale), **blocks, "LONG": long_text}


def plugin_ptx(dtype: str, scale: float, l_tokens: int, head_dim: int, block_c: int,
               arch: int) -> tuple[str, str, int, int, int]:
    """PTX of `class_attention_maps_plugin` for TensorRT: (kernel name, ptx, threads per
    block, shared memory bytes, BLOCK_N). Its parameters are exactly TensorRT's AOT-plugin
    convention (see `trim_entry_params`)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from . import triton_kernels as tk

    sig, constexprs = plugin_constants(dtype, scale, l_tokens, head_dim, block_c)
    sig.update({k: "constexpr" for k in constexprs})
    src = triton.compiler.ASTSource(fn=tk.class_attention_maps_plugin, signature=sig,
                                    constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": NUM_WARPS})
    name = compiled.metadata.name
    if not re.fullmatch(r"[A-Za-z_]\w*", name):
        raise RuntimeError(f"unexpected kernel name {name!r}")
    for what in ("global_scratch_size", "profile_scratch_size"):
        if getattr(compiled.metadata, what, 0):
            raise RuntimeError(f"{name} needs Triton {what.replace('_', ' ')} "
                               f"({getattr(compiled.metadata, what)} B), which a TensorRT "
                               "AOT plugin cannot provide")
    ptx = trim_entry_params(compiled.asm["ptx"], name, PLUGIN_PARAMS)
    return (name, ptx, compiled.metadata.num_warps * 32, compiled.metadata.shared,
            constexprs["BLOCK_N"])


if __name__ == "__main__":
    sys.exit(main())
