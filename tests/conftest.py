"""Shared fixtures: the tiny random Stable Diffusion pipeline, built once per session."""

import os

import pytest
import torch

# Triton kernels run on CPU through the interpreter when there is no GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_pipe():
    from attnseg.pipeline.tiny import build_tiny_pipeline

    return build_tiny_pipeline(seed=0)
