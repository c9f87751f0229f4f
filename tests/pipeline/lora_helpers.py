"""Helpers of the LoRA tests (test_lora.py, test_lora_train.py)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from attnseg.pipeline.adapt.lora_train import LoraTrainConfig
from attnseg.pipeline.config import get_preset
from attnseg.pipeline.prompts import PromptSpec, load_classes
from attnseg.pipeline.synth.job import Sample, Synthesizer

ENV = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
CPU = torch.device("cpu")


def write_images(folder: Path, n: int = 4) -> Path:
    """Smooth colour patterns (a 'target domain' the tiny model can fit), 80x64 pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:64, 0:80] / 64.0
    for i in range(n):
        img = np.stack([np.sin(3 * x + i), np.cos(4 * y - i), np.sin(2 * (x + y) + i)], -1)
        Image.fromarray(((img * 0.5 + 0.5) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    (folder / "0.txt").write_text("a wavy pattern\n")  # a per-image caption for one image
    return folder


def lora_config(images: Path | str, out: Path, **kw) -> LoraTrainConfig:
    base = dict(images=str(images), model="tiny", out=str(out), caption="a street scene",
                rank=4, alpha=8.0, steps=12, lr=1e-2, batch_size=2, crop=64, seed=0,
                checkpoint_every=6, device="cpu")
    return LoraTrainConfig(**{**base, **kw})


def unet_out(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    e = torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([10, 600]), e).sample


def generate(pipe, n=2, size=64):
    preset = get_preset("attnseg")
    dog = load_classes("dog,")[0]
    synth = Synthesizer(pipe, preset, size, size, steps=3, guidance=7.5)
    samples = [Sample(i, PromptSpec("a photo of a dog", ((dog, "dog"),)), 100 + i)
               for i in range(n)]
    images, labels, _ = synth.generate(samples)
    synth.harvester.remove()
    return images.astype(np.int16), labels
