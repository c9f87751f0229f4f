"""`attnseg bench writing`: does writing hold the generator back?

The same `attnseg synth` job three ways, interleaved over repeats in one run: generation alone
(the job's batches through the same `Synthesizer`, dropped: the ceiling; it skips the job's
setup, so the other ratios are if anything understated), generation with writing inline
(`write_workers=0`), and with the write pool (`write_workers=N`, the default 2). Reported as
images/s and as ratios to generation alone; the spread (min-max over repeats) says when a
ratio is within the noise. At few-step rates (1-4 steps) encoding and fsync are a large share of
each image's time, which is where the pool matters.

With `refine`, the job is also timed with its masks refined by a dense CRF (the psa kernels the
diffumask and attn2mask presets run, `CRF_PSA`), inline (the CRF on the generation's critical
path) and on the write pool (the CRF beside the next batch's generation): the pool's
throughput with refinement over without is reported per repeat (each repeat runs both, so the
machine's load falls on the pair alike), as the median of those ratios and their min-max.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from attnseg.pipeline.config import CRF_PSA, SynthConfig
from attnseg.pipeline.device import resolve_device, resolve_dtype
from attnseg.pipeline.models.loading import RANDOM_MODELS, load_pipeline, set_scheduler
from attnseg.pipeline.prompts import default_prompts, load_classes
from attnseg.pipeline.settings import NonNegativeFloat, NonNegativeInt, PositiveInt
from attnseg.pipeline.synth.job import Synthesizer, plan_samples, run_synth

from .common import machine_info, output_base, write_json_and_markdown


@dataclass
class WritingBenchConfig:
    """One `attnseg bench writing` run: an `attnseg synth` job, timed three ways."""

    model: str = "tiny"
    classes: str = "dog,cat,bus,car"
    num_per_class: PositiveInt = 8
    batch_size: PositiveInt = 8
    steps: PositiveInt = 1
    guidance: NonNegativeFloat = 0.0
    scheduler: str | None = None
    height: PositiveInt = 256
    width: PositiveInt = 256
    write_workers: NonNegativeInt = 2
    refine: bool = False  # also with a dense CRF on the masks: inline and on the pool
    inline: bool = True  # also time writing inline (False: generation alone and the pool only)
    torch_threads: NonNegativeInt = 0  # torch's intra-op threads for the run (0: torch's own)
    repeats: PositiveInt = 3
    device: str = "auto"
    dtype: str = "auto"
    out: str = "attnseg-bench/writing"
    progress: bool = True  # a line per timed run on stderr (`--no-progress`: none)


# The plain variants write the default preset's masks without its dense CRF: the CRF variants
# add psa's, so "with the CRF over without" is one CRF against none.
PLAIN = {"mask": {"crf_iterations": 0}}


def _generate_only(pipe, cfg: WritingBenchConfig) -> tuple[float, int]:
    """Seconds to generate the job's batches (images, labels, reliability) and drop them."""
    classes = load_classes(cfg.classes)
    samples = plan_samples(classes, default_prompts(classes), cfg.num_per_class, 0)
    preset = SynthConfig(model=cfg.model, overrides=PLAIN).resolve_preset(pipe.vae_scale_factor)
    synth = Synthesizer(pipe, preset, cfg.height, cfg.width, cfg.steps, cfg.guidance)
    try:
        t0 = time.perf_counter()
        for start in range(0, len(samples), cfg.batch_size):
            synth.generate(samples[start : start + cfg.batch_size])
        return time.perf_counter() - t0, len(samples)
    finally:
        synth.harvester.remove()


def run_writing_bench(cfg: WritingBenchConfig) -> dict:
    """Time the job with no writing, inline writing and the pool; writes OUT.json / OUT.md."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    pipe = load_pipeline(cfg.model, device, dtype)
    set_scheduler(pipe, cfg.scheduler)
    base = SynthConfig(model=cfg.model, classes=cfg.classes, num_per_class=cfg.num_per_class,
                       batch_size=cfg.batch_size, steps=cfg.steps, guidance=cfg.guidance,
                       height=cfg.height, width=cfg.width, device=cfg.device, dtype=cfg.dtype)
    pool = f"write pool ({cfg.write_workers} threads)"
    crf = {"mask": dict(CRF_PSA)}
    variants = {"generate only": (None, PLAIN)}
    if cfg.inline:
        variants["write inline"] = (0, PLAIN)
    variants[pool] = (cfg.write_workers, PLAIN)
    pairs = [("write inline", "write inline + CRF")] if cfg.inline else []
    pairs.append((pool, f"{pool} + CRF"))
    if cfg.refine:
        for off, on in pairs:
            variants[on] = (0 if off == "write inline" else cfg.write_workers, crf)
    # Each CRF variant right after its plain one, the pair's order swapped every other round:
    # the load of a shared machine drifts less within a pair than over a round.
    order = list(variants)
    if cfg.refine:
        order = ["generate only", *(name for pair in pairs for name in pair)]
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    images = 0
    kept_threads = torch.get_num_threads()
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(cfg.repeats + 1):  # the first round warms up
            names = order if r % 2 or not cfg.refine else \
                ["generate only", *(name for pair in pairs for name in pair[::-1])]
            for name in names:
                workers, overrides = variants[name]
                i = order.index(name)
                if workers is None:
                    elapsed, images = _generate_only(pipe, cfg)
                else:
                    out = Path(tmp) / f"{r}-{i}"
                    t0 = time.perf_counter()
                    run_synth(replace(base, out=str(out), write_workers=workers,
                                      overrides=overrides), progress=False, pipe=pipe)
                    elapsed = time.perf_counter() - t0
                    shutil.rmtree(out, ignore_errors=True)
                if r:
                    seconds[name].append(elapsed)
                if cfg.progress:
                    what = f"repeat {r}/{cfg.repeats}" if r else "warm-up"
                    print(f"  {what}, {name}: {elapsed:.2f} s", file=sys.stderr, flush=True)
    report_threads = torch.get_num_threads()
    torch.set_num_threads(kept_threads)
    ceiling = float(np.median(seconds["generate only"]))
    rows = []
    for name, s in seconds.items():
        med = float(np.median(s))
        rows.append({"variant": name, "seconds": s, "median_s": med,
                     "images_per_s": images / med, "vs_generate_only": ceiling / med,
                     "spread": (max(s) - min(s)) / med})
    refinement = None
    if cfg.refine:
        # Throughput with refinement over without, repeat by repeat (time off / time on).
        refinement = {}
        for off, on in pairs:
            where = "inline" if off == "write inline" else "pool"
            paired = [a / b for a, b in zip(seconds[off], seconds[on], strict=True)]
            refinement[where] = {"paired": paired, "median": float(np.median(paired)),
                                 "min": min(paired), "max": max(paired)}
    report = {"benchmark": "writing", "config": asdict(cfg), "machine": machine_info(device),
              "images": images, "rows": rows, "torch_threads": report_threads,
              "refinement": refinement,
              "model_note": "built-in random weights" if cfg.model in RANDOM_MODELS
              else "real weights"}
    report["files"] = write_json_and_markdown(report, output_base(cfg.out), markdown(report))
    return report


def markdown(report: dict) -> str:
    c = report["config"]
    spread = max(r["spread"] for r in report["rows"])
    lines = [f"# Writing beside generation: `{c['model']}`", "",
             f"`attnseg synth` of {report['images']} images at {c['height']}x{c['width']}, "
             f"{c['steps']} step(s), guidance {c['guidance']}, batch {c['batch_size']}, on "
             f"{report['machine'].get('device', '?')} with {report['torch_threads']} torch "
             f"thread(s); median of {c['repeats']} interleaved "
             f"runs (after one warm-up round).", "",
             "| variant | images/s | vs generation alone | spread (min-max / median) |",
             "|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['variant']} | {r['images_per_s']:.2f} | "
                     f"{r['vs_generate_only']:.3f}x | {100 * r['spread']:.0f} % |")
    if report.get("refinement"):
        lines += ["", "Throughput with the dense CRF over without (psa's kernels, 10 iterations; "
                  "per repeat, median and min-max):", "",
                  "| CRF runs | with / without | min-max |", "|---|---|---|"]
        for where, v in report["refinement"].items():
            label = ("inline, after each batch" if where == "inline" else
                     "on the write pool, beside the next batch")
            lines.append(f"| {label} | {v['median']:.3f}x | {v['min']:.3f}-{v['max']:.3f}x |")
    lines += ["", f"Ratios closer to 1.000x than the largest spread ({100 * spread:.0f} %) are "
              "within this machine's noise."]
    if report["model_note"].startswith("built-in"):
        lines.append(f"Model `{c['model']}` has random weights: its images are noise (JPEGs "
                     "of noise are larger than of photos, so writing is dearer than usual).")
    return "\n".join(lines) + "\n"
