"""Device and dtype names from configs and flags: one set of rules for every command.

Kept free of heavy imports so that `attnseg train`/`eval` do not load the synthesis stack.
"""

from __future__ import annotations

import os

import torch

from .errors import UserError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    """"auto" (the GPU of this process's LOCAL_RANK when CUDA is present, else the CPU),
    "cpu", "cuda", "cuda:1", ...; a one-line error for an unknown or absent device."""
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        # Under torchrun/accelerate each process takes the GPU of its local rank.
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for, but no CUDA device is available")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """fp16 on GPU and fp32 on CPU unless asked otherwise ("fp32", "fp16", "bf16")."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]
