"""Shared fixtures of the pipeline tests."""

from __future__ import annotations

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
