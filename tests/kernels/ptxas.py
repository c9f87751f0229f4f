"""The tiles the Triton launchers in attnseg.kernels ship, and what ptxas makes of them.

`shipped_launches()` calls the launchers themselves (class attention with its resize, finalize,
the exact CRF) over the shapes of the model families, each kernel replaced by a recorder: every
(kernel, argument types, compile-time constants, warps) a launcher would compile on a GPU is one
`Launch`, so a tile a launcher newly picks is covered without a hand-kept list. The TensorRT
plugin's kernel is added with the constants its PTX is built with (`plugin_launches`).
`ptxas_reports` compiles launches for sm_80/sm_90 in a fresh interpreter (no TRITON_INTERPRET,
no GPU needed) and returns what ptxas -v reports for each cubin (registers, spill bytes) and
the MMA instructions of its PTX.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import os
import subprocess
import sys
import textwrap

import torch

from attnseg.kernels import _dispatch

# Shapes the launchers see from the model families. Text keys: CLIP's 77, two or three CLIP
# chunks (154, 226), T5 contexts (PixArt 300 is covered by 333's tile; SD3 256 and 333; Flux
# 512), and padded T5 prompts, whose samples run on their valid prefix (any length: 9, 20, 40
# stand for the 16-, 32- and 64-key tiles). Head dims: SD 1.x 40/80/160, SD 2.x/SDXL/SD3 64,
# PixArt 72, Flux 128. Classes: labelled words per prompt (more than 64 are walked in 64-wide
# tiles; 100 checks that). Map widths: 8-128 (wider maps resize in torch).
KEY_LENGTHS = (9, 20, 40, 77, 154, 226, 256, 333, 512)
HEAD_DIMS = (40, 64, 72, 80, 128, 160)
CLASSES = (1, 20, 40, 100)
MAP_WIDTHS = (8, 16, 32, 64, 96, 128, 256)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The exact CRF's channels: its channel tile is the count's next power of two, at most 64 (more
# channels are walked in tiles of 64: 100 checks that).
CRF_CHANNELS = (2, 21, 64, 100)
FINALIZE_MODES = ("nearest", "bilinear", "bicubic")

ARCHS = (80, 90)

_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
          torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8"}


@dataclasses.dataclass(frozen=True)
class Launch:
    """One compile a launcher asks for: kernel (module, name), signature of the runtime
    arguments, compile-time constants, warps."""

    module: str
    kernel: str
    signature: tuple  # ((name, triton type), ...)
    constexprs: tuple  # ((name, value), ...)
    num_warps: int

    @property
    def dtype(self) -> str:
        """Element type of the first pointer argument (q for the attention kernels)."""
        return next((t[1:] for _, t in self.signature if t.startswith("*")), "")

    def __str__(self):
        consts = "-".join(f"{k.replace('BLOCK_', '')}{int(v) if isinstance(v, bool) else v}"
                          for k, v in self.constexprs)
        return f"{self.kernel}-{self.dtype}-{consts}-w{self.num_warps}"


def _triton_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no triton type for {type(value).__name__}")


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kw)` records a Launch."""

    def __init__(self, module: str, name: str, jit_fn, sink: list):
        self.module, self.name, self.sink = module, name, sink
        fn = getattr(jit_fn, "fn", jit_fn)
        params = inspect.signature(fn).parameters
        self.params = list(params)
        self.constexpr = {n for n, p in params.items() if "constexpr" in str(p.annotation)}

    def __getitem__(self, grid):
        return self._record

    def _record(self, *args, num_warps=4, num_stages=3, **constexprs):
        bound = dict(zip(self.params, args, strict=False))
        bound.update(constexprs)
        signature = tuple((n, _triton_type(bound[n])) for n in self.params
                          if n not in self.constexpr)
        consts = tuple((n, bound[n]) for n in self.params if n in self.constexpr)
        self.sink.append(Launch(self.module, self.name, signature, consts, int(num_warps)))


@contextlib.contextmanager
def _recording(sink: list):
    """Replace the launchers' kernels with recorders and answer "no interpreter" to the tile
    choices (as on a GPU), for the duration."""
    from attnseg.kernels import class_attention as ca
    from attnseg.kernels import crf, finalize

    kernels = [(ca, "class_attn_kernel"), (ca, "class_attn_long_kernel"),
               (ca, "_resize_acc_kernel"), (finalize, "finalize_kernel"),
               (crf, "crf_messages_kernel"), (crf, "lattice_blur_kernel")]
    saved = [(mod, name, getattr(mod, name)) for mod, name in kernels]
    saved_interp = ca.triton_interpreting
    try:
        for mod, name, fn in saved:
            setattr(mod, name, _Recorder(mod.__name__, name, fn, sink))
        ca.triton_interpreting = lambda: False
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)
        ca.triton_interpreting = saved_interp


@functools.cache
def shipped_launches() -> tuple[Launch, ...]:
    """Every distinct Launch the launchers make over the shapes above (empty without triton)."""
    if _dispatch.triton_modules() is None:
        return ()
    from attnseg.kernels import class_attention as ca
    from attnseg.kernels import crf, finalize

    sink: list = []
    with _recording(sink), torch.no_grad():
        for dtype in DTYPES:
            for l_tokens in KEY_LENGTHS:
                for d in HEAD_DIMS:
                    q = torch.empty(1, 2, 16, d, dtype=dtype)
                    k = torch.empty(1, 2, l_tokens, d, dtype=dtype)
                    for c in CLASSES:
                        tw = torch.empty(1, l_tokens, c)
                        # direct (with and without clamp), and into a buffer for the resize
                        for mode, clamp, size in (("none", False, (4, 4)),
                                                  ("none", True, (4, 4)),
                                                  ("bilinear", False, (8, 8))):
                            ca.accumulate_class_attention_triton(
                                q, k, tw, torch.empty(1, c, *size), hw=(4, 4), scale=0.1,
                                mode=mode, clamp=clamp)
        for w in MAP_WIDTHS:
            for clamp in (False, True):
                q = torch.empty(1, 2, 2 * w, 64, dtype=torch.float16)
                k = torch.empty(1, 2, 77, 64, dtype=torch.float16)
                ca.accumulate_class_attention_triton(
                    q, k, torch.empty(1, 77, 2), torch.empty(1, 2, 4, 2 * w), hw=(2, w),
                    scale=0.1, mode="bilinear", clamp=clamp)
        for mode in FINALIZE_MODES:
            finalize.finalize_masks_triton(torch.rand(1, 3, 4, 4), torch.tensor([[1, 2, 0]]),
                                           size=(8, 8), mode=mode)
        for channels in CRF_CHANNELS:
            crf.dense_crf_triton(torch.full((1, channels, 4, 4), 1.0 / channels),
                                 torch.zeros(1, 3, 4, 4), iterations=1)
            # The GPU lattice's blur (one launch per axis; the recorder runs nothing).
            crf.lattice_blur_triton(torch.zeros(9, channels),
                                    [(torch.zeros(8, dtype=torch.int64),) * 2])
        sink.extend(plugin_launches())
    return tuple(dict.fromkeys(sink))  # distinct, in first-seen order


def plugin_launches() -> list[Launch]:
    """The TensorRT plugin's kernel as `engines.aot.plugin_ptx` compiles it for the model
    families' shapes: its export passes the key length, the head dim and a class tile of the
    class count's next power of two (16 at least). Scores are scaled by a compile-time
    constant there; one value stands for every head dim (it changes no tile)."""
    from attnseg.engines.aot import NUM_WARPS, PLUGIN_MAX_CLASSES, plugin_constants

    launches = []
    for dtype in DTYPES:
        for l_tokens in KEY_LENGTHS:
            for d in HEAD_DIMS:
                for c in (c for c in CLASSES if c <= PLUGIN_MAX_CLASSES):  # the export's limit
                    block_c = max(16, 1 << (c - 1).bit_length())
                    sig, consts = plugin_constants(_TYPES[dtype], 0.125, l_tokens, d, block_c)
                    launches.append(Launch("attnseg.engines.triton_kernels",
                                           "class_attention_maps_plugin", tuple(sig.items()),
                                           tuple(consts.items()), NUM_WARPS))
    return launches


# Exit status of the compile script when this machine cannot compile for NVIDIA GPUs.
CANNOT_COMPILE = 77

_SCRIPT = r"""
import contextlib, importlib, io, json, multiprocessing, os, re, subprocess, sys, tempfile
from concurrent.futures import ProcessPoolExecutor
try:
    import triton
    from triton import knobs
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    get_ptxas(90)
    assert "nvidia" in backends
except Exception as exc:
    print(f"cannot compile for NVIDIA GPUs here: {exc!r}")
    sys.exit(%(skip)d)

MMA = re.compile(r"\b(?:wgmma\.mma_async|mma\.sync\.aligned)[\w.]*")


def ptxas_log(compiled, arch):
    # ptxas -v of the PTX, as triton itself assembles it; only where triton's own log
    # (knobs.nvidia.dump_ptxas_log) did not come
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(compiled.asm["ptx"])
        out = subprocess.run([get_ptxas(arch).path, "-v", "-lineinfo", "--regAllocOptLevel=2",
                              f"--gpu-name=sm_{arch}{suffix}", path, "-o", "/dev/null"],
                             capture_output=True, text=True)
    return out.stdout + out.stderr


def one(job):
    launch, arch = job
    fn = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    consts = dict(launch["constexprs"])
    sig = dict(launch["signature"], **{name: "constexpr" for name in consts})
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts)
    log = io.StringIO()
    with contextlib.suppress(AttributeError):  # triton's own ptxas -v log, where it has one
        knobs.nvidia.dump_ptxas_log = True
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": launch["num_warps"]})
    report = log.getvalue()
    if "Used" not in report:
        report = ptxas_log(compiled, arch)
    regs = int(re.search(r"Used (\d+) registers", report).group(1))
    stores = int(re.search(r"(\d+) bytes spill stores", report).group(1))
    loads = int(re.search(r"(\d+) bytes spill loads", report).group(1))
    mma = sorted(set(MMA.findall(compiled.asm["ptx"])))
    return {"regs": regs, "spill_stores": stores, "spill_loads": loads, "mma": mma}


jobs = json.load(sys.stdin)
workers = max(1, min(len(os.sched_getaffinity(0)), len(jobs)))
with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
    results = list(pool.map(one, jobs, chunksize=1))
print("REPORTS" + json.dumps(results))
"""


def ptxas_reports(launches, archs=ARCHS, cache_dir=None) -> dict:
    """{(launch, arch): {"regs", "spill_stores", "spill_loads", "mma"}} for sm_<arch> cubins,
    compiled in one fresh interpreter (processes as many as the CPUs). Raises CannotCompile
    where no NVIDIA backend or ptxas is available."""
    jobs = [(launch, arch) for launch in launches for arch in archs]
    payload = json.dumps([(dataclasses.asdict(launch), arch) for launch, arch in jobs])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if cache_dir is not None:  # a private cache: really compile, and leave nothing behind
        env["TRITON_CACHE_DIR"] = str(cache_dir)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_SCRIPT % {
        "skip": CANNOT_COMPILE})], input=payload, env=env, capture_output=True, text=True,
        timeout=1800)
    if proc.returncode == CANNOT_COMPILE:
        raise CannotCompile(proc.stdout.strip())
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-4000:] + proc.stderr[-4000:])
    line = next(x for x in proc.stdout.splitlines() if x.startswith("REPORTS"))
    return dict(zip(jobs, json.loads(line[len("REPORTS"):]), strict=True))


class CannotCompile(RuntimeError):
    """No NVIDIA backend or ptxas on this machine."""


if __name__ == "__main__":  # a table of every shipped tile: python -m tests.kernels.ptxas
    import tempfile

    os.environ.setdefault("TRITON_INTERPRET", "1")
    launches = shipped_launches()
    with tempfile.TemporaryDirectory() as tmp:
        reports = ptxas_reports(launches, cache_dir=tmp)
    for launch in launches:
        cells = []
        for arch in ARCHS:
            r = reports[(launch, arch)]
            cells.append(f"sm_{arch}: {r['regs']:3d} regs, spill {r['spill_stores']}/"
                         f"{r['spill_loads']} B {','.join(m.split('.')[0] for m in r['mma'])}")
        print(f"{launch!s:70s} " + " | ".join(cells))
