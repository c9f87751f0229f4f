"""Shared setup for the kernel tests.

Without a GPU the Triton kernels run in Triton's CPU interpreter, which is chosen when a kernel
is decorated, i.e. when ``attnseg.kernels`` is imported; so the variable must be set here,
before any test module imports the kernels (or triton).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Exit status the AOT script uses to say "cannot compile here" (no NVIDIA backend / ptxas).
AOT_SKIP = 77

_AOT_PRELUDE = rf"""
import subprocess
import sys
try:
    import triton
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget
except Exception as exc:
    print(f"triton unavailable: {{exc!r}}")
    sys.exit({AOT_SKIP})
if "nvidia" not in backends:
    print("the installed triton has no NVIDIA backend")
    sys.exit({AOT_SKIP})
try:
    from triton.backends.nvidia.compiler import get_ptxas
    get_ptxas(90)
except Exception as exc:
    print(f"no usable ptxas for sm_90: {{exc!r}}")
    sys.exit({AOT_SKIP})

TARGET = GPUTarget("cuda", 90, 32)


def aot(fn, signature, constexprs, num_warps=4):
    sig = dict(signature, **{{name: "constexpr" for name in constexprs}})
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    compiled = triton.compile(src, target=TARGET, options={{"num_warps": num_warps}})
    cubin = compiled.asm["cubin"]
    assert isinstance(cubin, bytes) and len(cubin) > 0, "empty cubin"
    print(fn.__name__, "cubin bytes", len(cubin))
"""


@pytest.fixture
def aot_compile(tmp_path):
    """Run ``body`` (python calling ``aot(fn, signature, constexprs, num_warps)``) in a fresh
    interpreter without TRITON_INTERPRET, compiling for sm_90 without a GPU; skip if it cannot
    compile."""

    def run(body: str) -> str:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        # A private cache makes the test really compile instead of reading an earlier cubin.
        env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        script = _AOT_PRELUDE + textwrap.dedent(body)
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                              text=True, timeout=300)
        if proc.returncode == AOT_SKIP:
            pytest.skip(proc.stdout.strip())
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    return run
