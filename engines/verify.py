"""`attnseg engine verify`: the same samples generated on the torch path and through an
engine folder, and their differences against the tolerance of the engine's precision."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..pipeline.config import HarvestConfig, SynthConfig
from ..pipeline.errors import UserError
from . import cache
from .backends import DTYPE_NAMES
from .build import fuse_loras
from .harvest import EngineHarvester, check_engine_model, load_engines

# Parity bounds per engine precision: images (max abs difference, pixel values in [0, 1]) and
# label maps (fraction of equal labels).
TOLERANCES = {"fp32": (1e-4, 0.999), "fp16": (2e-2, 0.99), "bf16": (5e-2, 0.98)}


def compare_paths(reference, candidate) -> dict:
    """Differences between two `Synthesizer.generate_float` results."""
    img_a, lab_a, rel_a, res_a = reference
    img_b, lab_b, rel_b, res_b = candidate
    maps = {}
    for stride, a in res_a.maps.items():
        b = res_b.maps[stride].to(a.device)
        maps[f"s{stride}"] = float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))
    if res_a.self_attention is not None:
        a, b = res_a.self_attention, res_b.self_attention.to(res_a.self_attention.device)
        maps["self"] = float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))
    return {
        "image_max_abs_diff": float(np.abs(np.asarray(img_a) - np.asarray(img_b)).max()),
        "label_agreement": float((lab_a == lab_b).mean()),
        "reliability_max_abs_diff": int(np.abs(np.asarray(rel_a, np.int16)
                                               - np.asarray(rel_b, np.int16)).max()),
        "map_max_rel_diff": maps,
    }


def verify_engines(folder: Path, steps: int = 4, device: str = "auto", log=print) -> dict:
    """Generate the same samples on the torch path and through the engine folder; report the
    differences and whether they are within `TOLERANCES` for the engine's precision."""
    from ..pipeline.device import resolve_device
    from ..pipeline.models.loading import load_pipeline
    from ..pipeline.prompts import default_prompts, load_classes
    from ..pipeline.synth.job import Synthesizer, plan_samples

    folder = Path(folder)
    manifest = cache.read_manifest(folder)
    key = cache.EngineKey.from_dict(manifest["key"])
    source = manifest.get("source") or {}
    if not source.get("model"):
        raise UserError(f"engine {folder} does not record the model it was built from; verify "
                        "needs it (build it with `attnseg engine build`)")
    dev = resolve_device(device)
    dtype = {v: k for k, v in DTYPE_NAMES.items()}[key.dtype]
    pipe = load_pipeline(source["model"], dev, dtype)
    fuse_loras(pipe, [f"{p}:{s}" for p, s in source.get("loras", [])])
    check_engine_model(key, pipe, folder)
    preset = SynthConfig(preset=source.get("preset", "attnseg"),
                         overrides=source.get("overrides", {})).resolve_preset(
        pipe.vae_scale_factor)
    preset.harvest = HarvestConfig.from_record(manifest["harvest"])
    # The engine's maps are verified: the masks before the dense CRF (the same code on both
    # paths), which can turn a rounding difference into a flipped pixel.
    preset = preset.without_crf()
    classes = load_classes("dog,cat,aeroplane")
    batch = max(1, min(key.max_batch, 2))
    samples = plan_samples(classes, default_prompts(classes), 1, 0)[:batch]
    size = (key.height, key.width)
    t0 = time.perf_counter()
    ref_synth = Synthesizer(pipe, preset, *size, steps, 7.5)
    reference = ref_synth.generate_float(samples)
    ref_synth.harvester.remove()
    t1 = time.perf_counter()
    engines = load_engines(folder, pipe)
    harvester = EngineHarvester(pipe, engines, preset.harvest)
    try:
        candidate = Synthesizer(pipe, preset, *size, steps, 7.5,
                                harvester).generate_float(samples)
    finally:
        harvester.remove()
    t2 = time.perf_counter()
    report = compare_paths(reference, candidate)
    img_tol, label_tol = TOLERANCES[key.dtype]
    report.update(
        engine=str(folder), backend=key.backend, dtype=key.dtype, samples=len(samples),
        steps=steps, size=list(size), torch_seconds=round(t1 - t0, 2),
        engine_seconds=round(t2 - t1, 2), image_tolerance=img_tol, label_tolerance=label_tol,
        ok=report["image_max_abs_diff"] <= img_tol and report["label_agreement"] >= label_tol,
    )
    return report
