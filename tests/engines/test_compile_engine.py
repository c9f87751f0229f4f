"""The `compile` backend: torch.compile of the UNet with the harvesting inside one graph."""

from __future__ import annotations

import json

import pytest
import torch

from attnseg.engines.build import EngineOptions, engine_key
from attnseg.engines.harvest import compiled_engine_set
from attnseg.pipeline.cli import main
from attnseg.pipeline.config import get_preset
from attnseg.pipeline.models.loading import model_fingerprint
from attnseg.pipeline.models.tiny import build_tiny_pipeline
from attnseg.pipeline.prompts import default_prompts, load_classes
from attnseg.pipeline.synth.job import plan_samples

from .conftest import SIZE, torch_vs_engine


@pytest.mark.slow
def test_compile_backend_matches_torch_path(tmp_path, capsys):
    """One inductor compile (over a minute on 2 CPU cores the first time; cached after)."""
    pipe = build_tiny_pipeline(seed=0)
    preset = get_preset("attnseg")
    _assert_compile_matches_torch(pipe, preset, SIZE)

    # The CLI: a compile engine folder records key and I/O (compiling happens in the process
    # that runs it); synth --engine uses it and writes the dataset.
    folder = tmp_path / "compiled"
    assert main(["engine", "build", "--backend", "compile", "--out", str(folder), "--height",
                 str(SIZE[0]), "--width", str(SIZE[1]), "--device", "cpu"]) == 0
    manifest = json.loads((folder / "engine.json").read_text())
    assert manifest["key"]["backend"] == "compile" and set(manifest["parts"]) == {"unet"}
    assert main(["synth", "--model", "tiny", "--classes", "dog,", "--num-per-class", "2",
                 "--steps", "3", "--height", str(SIZE[0]), "--width", str(SIZE[1]),
                 "--batch-size", "2", "--no-progress", "--engine", str(folder), "--out",
                 str(tmp_path / "ds")]) == 0
    assert "wrote 2 samples" in capsys.readouterr().out


@pytest.mark.slow
def test_compile_backend_for_sdxl_matches_torch_path():
    """SDXL through the compile backend (its added conditioning is an input of the graph)."""
    from attnseg.pipeline.models.tiny import build_tiny_sdxl_pipeline

    pipe = build_tiny_sdxl_pipeline(seed=0)
    _assert_compile_matches_torch(pipe, get_preset("attnseg", pipe.vae_scale_factor), (64, 64))


def _assert_compile_matches_torch(pipe, preset, size):
    classes = load_classes("dog,cat,aeroplane")
    samples = plan_samples(classes, default_prompts(classes), 1, 0)[:2]
    opts = EngineOptions(backend="compile", height=size[0], width=size[1], max_batch=2,
                         harvest=preset.harvest)
    key = engine_key(pipe, opts, torch.float32, model_fingerprint(pipe), [])
    engines = compiled_engine_set(pipe, key)
    # fullgraph=True: a graph break (harvesting falling out of the graph) would raise.
    assert engines.engines["unet"].compiled is not None
    diff, _ = torch_vs_engine(pipe, preset, size, 3, 7.5, samples, engines)
    assert diff["image_max_abs_diff"] <= 1e-4, diff
    assert diff["label_agreement"] == 1.0, diff
    assert diff["reliability_max_abs_diff"] <= 1, diff  # uint8 rounding of maps ~1e-7 apart
    assert max(diff["map_max_rel_diff"].values()) < 1e-4, diff
