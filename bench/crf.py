"""`attnseg bench crf`: the CPU dense CRF (attnseg's lattice) against pydensecrf, side by side.

At each size, a batch of `batch` copies of one photo (matplotlib's sample photo where matplotlib
is installed, else a seeded scene of flat shapes) with smooth random unaries over `labels`
labels, `iterations` mean-field iterations, the kernels of pydensecrf's README example (those of
the presets' `CRF_PSA`). Per repeat every variant runs once, interleaved (pydensecrf2, one image
after another on one thread, where it imports; attnseg's `dense_crf(impl="lattice")` on the
batch with torch at each thread count in `threads`: an image runs on one thread, more threads
split the batch's images where they are large enough), so that the load of a shared machine
falls on all of them alike.
Reported: the median seconds per image, the spread (min-max over the repeats / median),
pydensecrf's time over attnseg's (>= 1: attnseg at least as fast) and the one-thread time over
each thread count's (>= 1: more threads not slower), and the largest difference of the outputs.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from attnseg.kernels.crf import dense_crf
from attnseg.pipeline.errors import UserError
from attnseg.pipeline.settings import PositiveInt

from .common import machine_info, output_base, write_json_and_markdown

# pydensecrf's kernels as DenseCRF2D examples use them (addPairwiseGaussian(sxy=3, compat=3),
# addPairwiseBilateral(sxy=80, srgb=13, compat=10)), in attnseg's names.
KERNELS = dict(w_app=10.0, sxy_app=80.0, srgb=13.0, w_smooth=3.0, sxy_smooth=3.0)


@dataclass
class CrfBenchConfig:
    """One `attnseg bench crf` run."""

    sizes: tuple[PositiveInt, ...] = (64, 128, 256, 512)
    labels: PositiveInt = 21
    iterations: PositiveInt = 10
    threads: tuple[PositiveInt, ...] = (1, 2)
    batch: PositiveInt = 2
    repeats: PositiveInt = 5
    seed: int = 0
    out: str = "attnseg-bench/crf"
    progress: bool = True  # a line per size and repeat on stderr

    def validate(self) -> None:
        if not self.sizes or not self.threads:
            raise UserError("bench crf needs at least one size and one thread count")


def _photo(size: int, seed: int) -> tuple[np.ndarray, str]:
    """An RGB uint8 [size, size, 3] photo, and what it is."""
    try:
        from matplotlib import cbook
        from PIL import Image

        with cbook.get_sample_data("grace_hopper.jpg") as f:
            im = Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR)
        return np.array(im), "matplotlib sample photo grace_hopper.jpg, resized"
    except Exception:  # no matplotlib (or its sample data): a scene of flat shapes and noise
        g = np.random.default_rng(seed)
        yy, xx = np.mgrid[:size, :size] / size
        img = np.stack([200 * xx, 180 * yy, 120 + 0 * xx], -1)
        for _ in range(8):
            cy, cx, r = g.random(3) * [1, 1, 0.3]
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = g.integers(0, 256, 3)
        img += g.normal(0, 6, img.shape)
        return np.clip(img, 0, 255).astype(np.uint8), "seeded scene (matplotlib missing)"


def _unaries(size: int, labels: int, seed: int) -> torch.Tensor:
    """Smooth random label probabilities [1, labels, size, size]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, labels, 8, 8, generator=g) * 3
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear",
                                           align_corners=False).softmax(1)


def _pydensecrf_runner():
    try:
        from pydensecrf import densecrf
    except ImportError:
        return None

    def run(probs: torch.Tensor, rgb: np.ndarray, iterations: int) -> np.ndarray:
        c, h, w = probs.shape[1:]
        d = densecrf.DenseCRF2D(w, h, c)
        p = probs[0].numpy().astype(np.float32)
        d.setUnaryEnergy(np.ascontiguousarray(-np.log(np.maximum(p, 1e-5)).reshape(c, -1)))
        d.addPairwiseGaussian(sxy=KERNELS["sxy_smooth"], compat=KERNELS["w_smooth"])
        d.addPairwiseBilateral(sxy=KERNELS["sxy_app"], srgb=KERNELS["srgb"], rgbim=rgb,
                               compat=KERNELS["w_app"])
        return np.array(d.inference(iterations)).reshape(c, h, w)

    return run


def run_crf_bench(cfg: CrfBenchConfig) -> dict:
    cfg.validate()
    pdc = _pydensecrf_runner()
    kept = torch.get_num_threads()
    rows = []
    photo_note = ""
    try:
        for size in cfg.sizes:
            rgb, photo_note = _photo(size, cfg.seed)
            rgb = np.ascontiguousarray(rgb)
            image = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float()
            probs = _unaries(size, cfg.labels, cfg.seed)
            images = image.expand(cfg.batch, -1, -1, -1).contiguous()
            batch = probs.expand(cfg.batch, -1, -1, -1).contiguous()
            variants = {}
            if pdc is not None:
                variants["pydensecrf2 (1 thread)"] = None
            for t in cfg.threads:
                variants[f"attnseg lattice ({t} thread{'s' if t > 1 else ''})"] = t
            seconds: dict[str, list[float]] = {v: [] for v in variants}
            outs = {}
            for r in range(cfg.repeats + 1):  # the first round warms up (numba's compile)
                for name, t in variants.items():
                    t0 = time.perf_counter()
                    if t is None:
                        for _ in range(cfg.batch):
                            out = pdc(probs, rgb, cfg.iterations)
                    else:
                        torch.set_num_threads(t)
                        out = dense_crf(batch, images, iterations=cfg.iterations,
                                        impl="lattice", **KERNELS)[-1].numpy()
                        torch.set_num_threads(kept)
                    elapsed = (time.perf_counter() - t0) / cfg.batch
                    outs[name] = out
                    if r:
                        seconds[name].append(elapsed)
                if cfg.progress:
                    what = f"repeat {r}/{cfg.repeats}" if r else "warm-up"
                    times = ", ".join(f"{n}: {s[-1]:.3f} s" for n, s in seconds.items() if r)
                    print(f"  {size}x{size} {what} {times}", file=sys.stderr, flush=True)
            names = list(variants)
            ours = [n for n in names if variants[n] is not None]
            row = {"size": size, "variants": {}}
            for name in names:
                s = seconds[name]
                med = float(np.median(s))
                row["variants"][name] = {"seconds": s, "median_s": med,
                                         "spread": (max(s) - min(s)) / med}
            for name in ours:
                v = row["variants"][name]
                # Ratios repeat by repeat (the runs of one repeat share the machine's load),
                # their median and min-max.
                v["one_thread_over_this"] = _paired(seconds[ours[0]], seconds[name])
                if pdc is not None:
                    v["pydensecrf_over_this"] = _paired(seconds[names[0]], seconds[name])
                    v["max_abs_diff_vs_pydensecrf"] = float(np.abs(outs[name]
                                                                   - outs[names[0]]).max())
            rows.append(row)
    finally:
        torch.set_num_threads(kept)
    report = {"benchmark": "crf", "config": asdict(cfg), "machine": machine_info(
        torch.device("cpu")), "kernels": KERNELS, "image": photo_note,
        "pydensecrf": _pydensecrf_version(), "rows": rows}
    report["files"] = write_json_and_markdown(report, output_base(cfg.out), markdown(report))
    return report


def _paired(a: list[float], b: list[float]) -> dict:
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    return {"median": float(np.median(ratios)), "min": min(ratios), "max": max(ratios)}


def _ratio(r: dict | None) -> str:
    return "" if r is None else f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})"


def _pydensecrf_version() -> str | None:
    try:
        import importlib.metadata

        return importlib.metadata.version("pydensecrf2")
    except Exception:
        return None


def markdown(report: dict) -> str:
    c = report["config"]
    lines = ["# Dense CRF on a CPU: attnseg's lattice against pydensecrf", "",
             f"{c['labels']} labels, {c['iterations']} mean-field iterations, kernels "
             f"{report['kernels']}; {report['image']}, in batches of {c['batch']}; seconds per "
             f"image, median of {c['repeats']} interleaved runs (after one warm-up round) on "
             f"{report['machine'].get('cpu_count')} cores. "
             f"pydensecrf2 {report['pydensecrf'] or 'not installed: its rows are missing'}.", "",
             "| size | variant | median s / image | spread (min-max / median) | "
             "pydensecrf / this | 1 thread / this | max abs diff vs pydensecrf |",
             "|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        for name, v in row["variants"].items():
            over = v.get("pydensecrf_over_this")
            diff = v.get("max_abs_diff_vs_pydensecrf")
            one = v.get("one_thread_over_this")
            lines.append(f"| {row['size']}x{row['size']} | {name} | {v['median_s']:.4f} | "
                         f"{100 * v['spread']:.0f} % | {_ratio(over)} | {_ratio(one)} | "
                         f"{'' if diff is None else f'{diff:.1e}'} |")
    lines += ["", "Ratios are taken repeat by repeat (the runs of a repeat share the machine's "
              "load): their median and, in brackets, min-max; a ratio whose range holds 1.00x is "
              "within this machine's noise. An image runs on one thread whatever the count; more "
              "threads split a batch's images where they have at least "
              "`kernels.crf.CRF_PARALLEL_MIN_PIXELS` pixels (`crf_threads`), below it the "
              "batch runs on one thread."]
    return "\n".join(lines) + "\n"
