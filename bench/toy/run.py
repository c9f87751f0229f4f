"""`attnseg bench toy`: every experiment in order, one report (overview: bench/toy/__init__.py)."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from attnseg.pipeline.config import get_preset
from attnseg.pipeline.device import resolve_device, resolve_dtype
from attnseg.pipeline.models.loading import load_pipeline
from attnseg.pipeline.prompts import load_classes

from ..common import machine_info, output_base, with_suffix
from .config import ToyBenchConfig
from .downstream import ablations, choose_protocol, downstream, scaling
from .pseudo_masks import (
    _mean_spread,
    _pseudo_miou,
    _pseudo_scores,
    _render,
    _seed_rows,
    _with_layers,
    crf_cost,
    localisation_by_heads,
    localisation_by_layers,
    trivial_baselines,
    two_object_localisation,
    which_object,
)
from .report import write_report


def run_toy_bench(cfg: ToyBenchConfig) -> dict:
    """Run the toy-world benchmark; writes OUT.json and OUT.md and returns the report."""
    cfg.validate()
    base = output_base(cfg.out)
    work = Path(cfg.work) if cfg.work else with_suffix(base, ".work")
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    classes = load_classes("toy")
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    pipe = load_pipeline(cfg.model, device, dtype)
    for layers in cfg.layer_candidates:  # refused now, not an hour into the run
        _with_layers(get_preset("attnseg", pipe.vae_scale_factor), layers,
                     pipe.vae_scale_factor)
    val = _render(work, f"val-{cfg.val_seed}", cfg.val_seed, cfg)
    test = _render(work, f"test-{cfg.test_seed}", cfg.test_seed, cfg)
    report: dict = {"benchmark": "toy", "config": asdict(cfg), "machine": machine_info(device),
                    "model": cfg.model}
    report["baselines"] = trivial_baselines(val, test, cfg.thresholds)
    tuning = {",".join(map(str, c)): _pseudo_miou(pipe, "attnseg", c, cfg, cfg.tune_seed, val,
                                                  classes)
              for c in cfg.noise_candidates}
    chosen = max(cfg.noise_candidates, key=lambda c: tuning[",".join(map(str, c))])
    report["labeller"] = {"val_mIoU_by_noise_levels": tuning, "chosen": list(chosen),
                          "template": cfg.template}
    report["pseudo_masks"] = {
        p: _seed_rows([_pseudo_scores(pipe, p, chosen, cfg, s, test, classes)
                       for s in cfg.seeds]) for p in cfg.presets}
    on_val = {bg: _pseudo_miou(pipe, "attnseg", chosen, cfg, cfg.tune_seed, val, classes, bg)
              for bg in cfg.bg_candidates}
    best = max(on_val, key=on_val.get)
    report["tuned_threshold"] = {
        "preset": "attnseg", "bg_const": best, "val_mIoU_by_bg": on_val,
        "test": _mean_spread([_pseudo_miou(pipe, "attnseg", chosen, cfg, s, test, classes, best)
                              for s in cfg.seeds])}
    if cfg.crf_iterations:
        # Each preset with and without the CRF (the one the published run lacks is run here).
        by_preset = {}
        for p in cfg.presets:
            has = get_preset(p).mask.crf_iterations > 0
            other = _seed_rows([_pseudo_scores(pipe, p, chosen, cfg, s, test, classes,
                                               crf=0 if has else cfg.crf_iterations)
                                for s in cfg.seeds])
            published = report["pseudo_masks"][p]
            by_preset[p] = {"without": other if has else published,
                            "with": published if has else other,
                            "iterations": get_preset(p).mask.crf_iterations if has
                            else cfg.crf_iterations}
        cost = [crf_cost(cfg.size, 4, cfg.crf_iterations)]
        if cfg.crf_cost_size:
            cost.append(crf_cost(cfg.crf_cost_size, 21, cfg.crf_iterations, repeats=1,
                                 exact=False))
        report["crf"] = {"by_preset": by_preset, "cost": cost}
    report["localisation"] = two_object_localisation(pipe, cfg, chosen, test, classes)
    report["localisation_by_layers"] = (localisation_by_layers(pipe, cfg, chosen, val, test,
                                                               classes)
                                        if cfg.layer_candidates else None)
    report["localisation_by_heads"] = (localisation_by_heads(pipe, cfg, chosen, val, test,
                                                             classes)
                                       if cfg.head_candidates else None)
    report["which_object"] = (which_object(pipe, cfg, chosen, test, classes)
                              if cfg.error_probe_draws else None)
    report["protocol"] = None
    if cfg.downstream_images and cfg.train_candidates:
        cfg, report["protocol"] = choose_protocol(cfg, pipe, work, val)
    report["downstream"] = (downstream(cfg, pipe, work, test, chosen) if cfg.downstream_images
                            else None)
    report["ablations"] = report["scaling"] = None
    if report["downstream"]:
        report["ablations"] = ablations(cfg, pipe, work, test, report["downstream"], chosen)
        report["scaling"] = scaling(cfg, pipe, work, test, report["downstream"])
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["files"] = write_report(report, base)
    return report
