"""Shared engine fixtures: one ONNX Runtime engine of the tiny model, exported once per session
(the export is the slow part: ~30-60 s of CPU)."""

from __future__ import annotations

import pytest

from attnseg.pipeline.config import get_preset

# Non-square, so that the UNet's rounded-up levels are exercised (64x48 -> latent 8x6 -> 4x3
# -> 2x2 -> 1x1).
SIZE = (64, 48)
MAX_BATCH = 2


@pytest.fixture(scope="session")
def ort_engine(tmp_path_factory):
    """(folder, pipe, preset): an onnxruntime engine folder built from a fresh tiny pipeline."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from attnseg.engines.build import EngineOptions, build_engines
    from attnseg.pipeline.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0)
    # the masks before the default's dense CRF: the engine's maps are what is compared, and
    # the CRF can turn maps 1e-7 apart into a pixel of another label
    preset = get_preset("attnseg").without_crf()
    opts = EngineOptions(backend="onnxruntime", height=SIZE[0], width=SIZE[1],
                         max_batch=MAX_BATCH, max_classes=8, harvest=preset.harvest)
    folder = tmp_path_factory.mktemp("engines") / "ort"
    build_engines(pipe, opts, folder, source={"model": "tiny", "loras": [], "preset": "attnseg",
                                              "overrides": {}}, log=lambda msg: None)
    return folder, pipe, preset


def torch_vs_engine(pipe, preset, size, steps, guidance, samples, engines, inside=None):
    """Generate `samples` on the torch path, then through `engines` (an EngineSet: the
    pipeline's modules swapped for adapters; `inside(pipe)` runs while they are), and
    return (compare_paths differences, the torch path's result)."""
    from attnseg.engines.harvest import EngineHarvester
    from attnseg.engines.verify import compare_paths
    from attnseg.pipeline.synth.job import Synthesizer

    ref_synth = Synthesizer(pipe, preset, *size, steps, guidance)
    reference = ref_synth.generate_float(samples)
    ref_synth.harvester.remove()
    harvester = EngineHarvester(pipe, engines, preset.harvest)
    try:
        if inside is not None:
            inside(pipe)
        candidate = Synthesizer(pipe, preset, *size, steps, guidance,
                                harvester).generate_float(samples)
    finally:
        harvester.remove()
    return compare_paths(reference, candidate), reference
