"""Shared fixtures of the pipeline tests."""

from __future__ import annotations

import signal
from dataclasses import replace

import pytest

from attnseg.pipeline.adapt.lora_train import train_lora

from .lora_helpers import lora_config, write_images


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One 12-step training run (checkpoints at 6 and 12): its config and summary."""
    root = tmp_path_factory.mktemp("lora")
    cfg = lora_config(write_images(root / "images"), root / "lora")
    summary = train_lora(replace(cfg), progress=False)
    return cfg, summary


@pytest.fixture
def default_signal_handlers():
    """SIGINT and SIGTERM at Python's defaults for the test, whatever this process was started
    with (an ignored SIGINT where the suite runs in the background of a script): those are
    what a training run takes over. The handlers found are put back after."""
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, signal.SIG_DFL),
                signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler)}
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)
