"""Shared fixtures: the tiny random Stable Diffusion pipeline, built once per session."""

import os

# Under pytest-xdist (the README's test command: `-n auto`) each worker takes its share of the
# cores: torch's default, every core in every process, oversubscribes them, and OpenMP threads
# waiting on each other cost 10-50x. Set before torch loads; subprocesses inherit it.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

import pytest  # noqa: E402
import torch  # noqa: E402

if _WORKERS > 1:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Triton kernels run on CPU through the interpreter when there is no GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_pipe():
    from attnseg.pipeline.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline(seed=0)


@pytest.fixture
def torch_one_thread():
    """Run a test with one intra-op thread: tiny models gain nothing from more, and on a
    shared, oversubscribed machine OpenMP threads waiting on each other cost 10-50x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _global_torch_state_is_restored():
    """Fail the test that leaves autograd switched off, or changes the default dtype, instead
    of the unrelated training tests that would break after it."""
    grad, dtype = torch.is_grad_enabled(), torch.get_default_dtype()
    yield
    leaked = []
    if torch.is_grad_enabled() != grad:
        torch.set_grad_enabled(grad)
        leaked.append("autograd mode")
    if torch.get_default_dtype() != dtype:
        torch.set_default_dtype(dtype)
        leaked.append("default dtype")
    if leaked:
        pytest.fail(f"test changed global torch state: {', '.join(leaked)}")
