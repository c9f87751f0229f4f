"""Skip marks shared by the kernel tests."""

import pytest
import torch

from attnseg.kernels import _dispatch

HAS_CUDA = torch.cuda.is_available()
needs_numba = pytest.mark.skipif(_dispatch.numba_module() is None, reason="numba not installed")
needs_triton = pytest.mark.skipif(
    _dispatch.triton_modules() is None or not (HAS_CUDA or _dispatch.triton_interpreting()),
    reason="triton missing, or no GPU and TRITON_INTERPRET was not set before triton's import")
