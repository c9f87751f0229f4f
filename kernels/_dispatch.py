"""Choosing an implementation (ref / triton / numba) for the fused kernels.

Triton and numba are optional: both are imported behind guards so that the kernel modules
import (and the reference path works) on a machine that has neither.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

IMPLS = ("ref", "triton", "numba")
ENV_VAR = "ATTNSEG_KERNEL_IMPL"


@functools.cache
def triton_modules():
    """Return ``(triton, triton.language)`` or ``None`` when triton cannot be imported."""
    try:
        import triton
        import triton.language as tl
    except Exception:  # any import failure (missing, broken install) means "no triton"
        return None
    return triton, tl


@functools.cache
def numba_module():
    """Return the ``numba`` module or ``None`` when it cannot be imported."""
    try:
        import numba
    except Exception:
        return None
    return numba


@contextlib.contextmanager
def torch_threads_kept(threads: int | None = None):
    """Run numba kernels with torch's thread count (or `threads`, at most numba's), and leave
    torch's as it was.

    numba's OpenMP threading layer shares the OpenMP runtime with torch, and a parallel numba
    call sets the runtime's thread count to numba's own: torch's count changed under it, and
    with it the summation order (so the bits) of every later torch reduction, e.g. the images
    generated while harvesting on a CPU."""
    nb = numba_module()
    kept = torch.get_num_threads()
    if nb is not None:
        want = kept if threads is None else threads
        nb.set_num_threads(max(1, min(want, nb.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        if torch.get_num_threads() != kept:
            torch.set_num_threads(kept)


def triton_interpreting() -> bool:
    """True when triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    mods = triton_modules()
    if mods is None:
        return False
    try:
        return bool(mods[0].knobs.runtime.interpret)
    except AttributeError:  # older triton without knobs
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_impl(impl: str | None, device: torch.device) -> str:
    """Pick the implementation for tensors on ``device``.

    An explicit ``impl`` wins, then the ``ATTNSEG_KERNEL_IMPL`` environment variable, then the
    device: CUDA -> triton, CPU -> numba; a missing backend falls back to ``"ref"`` only in
    this automatic choice (a forced one that is unavailable raises).
    """
    forced = impl
    if forced is None:
        forced = os.environ.get(ENV_VAR, "").strip().lower() or None
    if forced is not None:
        if forced not in IMPLS:
            raise ValueError(f"unknown kernel impl {forced!r}; expected one of {IMPLS}")
        if forced == "triton":
            if triton_modules() is None:
                raise RuntimeError("impl='triton' requested but triton cannot be imported")
            if device.type != "cuda" and not triton_interpreting():
                raise RuntimeError(
                    "impl='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton "
                    "is imported")
        if forced == "numba" and numba_module() is None:
            raise RuntimeError("impl='numba' requested but numba cannot be imported")
        return forced
    if device.type == "cuda":
        return "triton" if triton_modules() is not None else "ref"
    return "numba" if numba_module() is not None else "ref"
