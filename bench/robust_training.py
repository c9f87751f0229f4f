"""Does reliability-aware training beat plain cross-entropy on attention-like noisy masks?

A procedurally generated dataset with known clean masks: 64x64 images holding 1-3 shapes
(ellipses, rectangles, triangles) of three textured classes ("stripes", "checks", "dots") on a
smooth random background. The training masks are made the way attnseg makes pseudo-masks from
attention: each present class gets a low-resolution score map (stride 4) built from its clean
mask and then corrupted like cross-attention is -

* erosion or dilation of the object (attention spreads past or falls short of the edge),
* blur (coarse attention resolution; halos),
* dropped parts (a part of the object gets weak attention),
* false blobs (attention to a wrong region),
* noise,

and ``kernels.finalize.finalize_masks`` (attnseg's own op, with the default preset's
thresholds) turns the maps into a label map with an ignore band and the reliability map (gap
between the two best scores). Segmenters (the trainer's tiny SegFormer) are trained on those
noisy masks with each loss and scored on the *clean* masks of held-out images, over several
seeds; seeds are interleaved so machine noise hits every loss alike.

    attnseg bench robust-training --out bench/results/robust_training   # ~20 min, 1 thread
    attnseg bench robust-training --set quick=true                        # smoke run

Results: OUT.json and OUT.md (default OUT: attnseg-bench/robust_training).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from attnseg.kernels.finalize import finalize_masks_ref
from attnseg.pipeline.config import MaskConfig
from attnseg.pipeline.files import atomic_write_bytes
from attnseg.pipeline.prompts import load_classes
from attnseg.pipeline.settings import NonNegativeInt, PositiveInt
from attnseg.pipeline.synth.writer import DatasetWriter

from .common import output_base, with_suffix

CLASSES = ("stripes", "checks", "dots")
SIZE = 64
STRIDE = 4  # attention-map pixels are 4x4 image pixels here


# --------------------------------------------------------------------------------------------
# clean images and masks
# --------------------------------------------------------------------------------------------


def _grid(size: int):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _shape_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = _grid(size)
    kind = rng.integers(0, 3)
    cy, cx = rng.uniform(0.2, 0.8, 2) * size
    if kind == 0:  # ellipse
        ry, rx = rng.uniform(0.12, 0.3, 2) * size
        return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    if kind == 1:  # rotated rectangle
        hy, hx = rng.uniform(0.1, 0.25, 2) * size
        a = rng.uniform(0, math.pi)
        u = (yy - cy) * math.cos(a) + (xx - cx) * math.sin(a)
        v = -(yy - cy) * math.sin(a) + (xx - cx) * math.cos(a)
        return (np.abs(u) <= hy) & (np.abs(v) <= hx)
    # triangle: three random half-planes around the centre
    r = rng.uniform(0.15, 0.32) * size
    a0 = rng.uniform(0, 2 * math.pi)
    pts = [(cy + r * math.sin(a0 + k * 2.1), cx + r * math.cos(a0 + k * 2.1)) for k in range(3)]
    inside = np.ones((size, size), bool)
    for k in range(3):
        (y1, x1), (y2, x2) = pts[k], pts[(k + 1) % 3]
        side = (x2 - x1) * (yy - y1) - (y2 - y1) * (xx - x1)
        y3, x3 = pts[(k + 2) % 3]
        ref = (x2 - x1) * (y3 - y1) - (y2 - y1) * (x3 - x1)
        inside &= side * ref >= 0
    return inside


def _texture(rng: np.random.Generator, cls: int, size: int) -> np.ndarray:
    """A class-specific pattern in [0, 1] with random phase, scale and colour."""
    yy, xx = _grid(size)
    if cls == 1:  # stripes at a random angle
        a = rng.uniform(0, math.pi)
        period = rng.uniform(8, 12)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * (yy * math.cos(a) + xx * math.sin(a)) / period)
    elif cls == 2:  # checks
        p = rng.uniform(6, 9)
        oy, ox = rng.uniform(0, p, 2)
        t = ((np.floor((yy + oy) / p) + np.floor((xx + ox) / p)) % 2).astype(np.float32)
    else:  # dots
        p = rng.uniform(8, 11)
        oy, ox = rng.uniform(0, p, 2)
        dy = ((yy + oy) % p) - p / 2
        dx = ((xx + ox) % p) - p / 2
        t = (dy * dy + dx * dx <= (0.3 * p) ** 2).astype(np.float32)
    # Each class has a colour family (red, green, blue ink) as well as its pattern, so a tiny
    # network learns it in a few hundred steps; shades vary per object.
    ink = np.full(3, 0.15) + rng.uniform(0.0, 0.15, 3)
    ink[cls - 1] = rng.uniform(0.7, 1.0)
    base = rng.uniform(0.35, 0.65, 3)
    return base[:, None, None] * (1 - t) + ink[:, None, None] * t


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    # Smooth, low-saturation clutter: grey levels vary a lot, hues little.
    grey = rng.uniform(0, 1, (1, 1, 4, 4))
    tint = rng.uniform(-0.08, 0.08, (1, 3, 4, 4))
    coarse = torch.from_numpy((grey + tint).astype(np.float32))
    smooth = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0]
    return np.clip(smooth.numpy() + rng.normal(0, 0.05, (3, size, size)), 0, 1)


def make_clean(rng: np.random.Generator, size: int = SIZE):
    """(image uint8 [H, W, 3], clean label uint8 [H, W], present class ids)."""
    image = _background(rng, size)
    label = np.zeros((size, size), np.uint8)
    present = []
    for _ in range(int(rng.integers(1, 4))):
        cls = int(rng.integers(1, len(CLASSES) + 1))
        mask = _shape_mask(rng, size)
        image = np.where(mask[None], _texture(rng, cls, size), image)
        label[mask] = cls
        present.append(cls)
    present = sorted(set(int(c) for c in np.unique(label) if c))
    img = (np.clip(image, 0, 1).transpose(1, 2, 0) * 255).round().astype(np.uint8)
    return img, label, present


# --------------------------------------------------------------------------------------------
# attention-like corruption
# --------------------------------------------------------------------------------------------


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-t * t / (2 * sigma * sigma))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))


def _morph(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Dilate (radius > 0) or erode (radius < 0) a [1, 1, H, W] float mask."""
    if radius == 0:
        return mask
    k = 2 * abs(radius) + 1
    if radius > 0:
        return F.max_pool2d(mask, k, 1, abs(radius))
    return -F.max_pool2d(-mask, k, 1, abs(radius))


def attention_maps(rng: np.random.Generator, label: np.ndarray, present: list[int],
                   size: int = SIZE) -> torch.Tensor:
    """Corrupted per-class score maps [C, size/STRIDE, size/STRIDE] for the present classes."""
    yy, xx = _grid(size)
    maps = []
    for cls in present:
        m = torch.from_numpy((label == cls).astype(np.float32))[None, None]
        # Attention spreads past the object (or stops short of it) by a few pixels.
        m = _morph(m, int(rng.integers(-2, 5)))
        m = m[0, 0].numpy().copy()
        # A part of the object gets weak attention: a random half-plane through it.
        ys, xs = np.nonzero(label == cls)
        if len(ys) and rng.random() < 0.6:
            cy, cx = ys.mean(), xs.mean()
            a = rng.uniform(0, 2 * math.pi)
            side = (yy - cy) * math.cos(a) + (xx - cx) * math.sin(a) > rng.uniform(0, 6)
            m = np.where(side, m * rng.uniform(0.15, 0.4), m)
        # Attention to a wrong region: a Gaussian blob elsewhere.
        for _ in range(int(rng.poisson(0.8))):
            by, bx = rng.uniform(0, size, 2)
            s = rng.uniform(3, 7)
            m = m + rng.uniform(0.4, 0.8) * np.exp(-((yy - by) ** 2 + (xx - bx) ** 2) / (2 * s * s))
        m = torch.from_numpy(m.astype(np.float32))[None, None]
        m = _blur(m, float(rng.uniform(1.5, 3.5)))
        # Coarse attention resolution: average down to the map grid.
        m = F.avg_pool2d(m, STRIDE)
        m = m + torch.from_numpy(rng.normal(0, 0.04, m.shape).astype(np.float32))
        maps.append(m[0, 0].clamp_min(0))
    return torch.stack(maps)


def pseudo_mask(maps: torch.Tensor, present: list[int], size: int = SIZE):
    """Label and reliability maps from corrupted maps with attnseg's finalize op and the
    default preset's thresholds."""
    cfg = MaskConfig()
    labels, rel = finalize_masks_ref(
        maps[None], torch.tensor([present]), size=(size, size), normalize=cfg.normalize,
        bg_const=cfg.bg_const, bg_slope=cfg.bg_slope, ignore_low=cfg.ignore_low,
        ignore_high=cfg.ignore_high, mode=cfg.upsample_mode)
    return labels[0].numpy(), rel[0].numpy()


def write_datasets(root: Path, n_train: int, n_val: int, data_seed: int) -> dict:
    """The noisy training set, its clean twin, and the clean validation set; returns the
    pseudo-masks' mIoU against the clean masks (``attnseg eval --pseudo`` semantics)."""
    from attnseg.pipeline.train.evaluate import evaluate_pseudo

    classes = load_classes(",".join(CLASSES))
    job = {"model": "procedural", "model_hash": "-", "preset": "attnseg", "mask": {}}
    rng = np.random.default_rng(data_seed)
    train = DatasetWriter(root / "train", job, classes)
    clean_train = DatasetWriter(root / "train_clean", job, classes)
    full = np.full((SIZE, SIZE), 255, np.uint8)
    for i in range(n_train):
        img, label, present = make_clean(rng)
        noisy, rel = pseudo_mask(attention_maps(rng, label, present), present)
        train.write(i, f"{i:08d}", img, noisy, rel, {"prompt": "procedural"})
        clean_train.write(i, f"{i:08d}", img, label, full, {"prompt": "procedural"})
    train.finish()
    clean_train.finish()
    val = DatasetWriter(root / "val", job, classes)
    for i in range(n_val):
        img, label, _ = make_clean(rng)
        val.write(i, f"{i:08d}", img, label, full, {"prompt": "procedural"})
    val.finish()
    report = evaluate_pseudo(root / "train", root / "train_clean")
    return {"pseudo_mask_mIoU": report["mIoU"], "pseudo_mask_unsure_frac":
            report["unlabelled_frac"]}


# --------------------------------------------------------------------------------------------
# training runs
# --------------------------------------------------------------------------------------------

# Each loss with its library defaults; co-training's hand-over warm-up is scaled to this
# short run (half of it).
def loss_settings(steps: int) -> dict[str, dict]:
    return {
        "ce": {"name": "ce"},
        "ignore-band": {"name": "ignore-band"},
        "reliability-weighted": {"name": "reliability-weighted"},
        "cotrain": {"name": "cotrain", "peer_warmup": steps // 2},
    }


def train_one(root: Path, data: str, loss: dict, seed: int, steps: int, model: str,
              workers: int = 1) -> dict:
    """Train on ``root/data`` with ``loss``; mIoU on the clean validation set."""
    from attnseg.pipeline.train.trainer import run_training, train_config_from

    out = root / "runs" / f"{data}-{loss['name']}-{seed}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = train_config_from(dict(
        data=[str(root / data)], val_data=str(root / "val"), val_dataset="synthetic",
        val_split="train", out=str(out), model=model, steps=steps, batch_size=8, lr=2e-3,
        head_lr_mult=1.0, warmup_steps=20, workers=workers, seed=seed, log_every=50,
        checkpoint_every=steps, progress=False, loss=loss,
        augment={"crop_size": [SIZE, SIZE], "base_scale": None, "scale_range": [0.75, 1.25]},
    ))
    t0 = time.perf_counter()
    summary = run_training(cfg)
    return {"mIoU": summary["final"]["val"]["mIoU"], "seconds": time.perf_counter() - t0}


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "values": values}


def summarize(runs: dict[str, dict[int, float]], seeds: list[int]) -> dict:
    """Per loss: mean/sd/min/max over seeds, and the paired (same seed) gain over CE."""
    out = {}
    for name, by_seed in runs.items():
        values = [by_seed[s] for s in seeds if s in by_seed]
        entry = _stats(values)
        if name not in ("ce", "clean-labels"):
            gains = [by_seed[s] - runs["ce"][s] for s in seeds]
            entry["gain_over_ce"] = _stats(gains)
        out[name] = entry
    robust = [n for n in out if n not in ("ce", "clean-labels")]
    best = max(robust, key=lambda n: out[n]["mean"])
    gap = out[best]["mean"] - out["ce"]["mean"]
    # One seed has no spread: then no gain can be shown to exceed it.
    sds = [sd for sd in (out["ce"]["sd"], out[best]["sd"]) if sd is not None]
    spread = max(sds) if sds else None
    out["verdict"] = {
        "best": best, "gain": gap, "spread_sd": spread,
        "ce_range": out["ce"]["max"] - out["ce"]["min"],
        "target_met": spread is not None and gap > spread,
        "beats_ce_range": gap > out["ce"]["max"] - out["ce"]["min"],
        "best_beats_ce_every_seed": all(g > 0 for g in out[best]["gain_over_ce"]["values"]),
    }
    if "clean-labels" in out:
        denom = out["clean-labels"]["mean"] - out["ce"]["mean"]
        out["verdict"]["gap_closed"] = gap / denom if denom > 0 else None
    return out


def write_results(doc: dict, out: str) -> list[str]:
    """Write OUT.json and OUT.md; the paths written."""
    base = output_base(out)
    base.parent.mkdir(parents=True, exist_ok=True)
    files = [with_suffix(base, ".json"), with_suffix(base, ".md")]
    atomic_write_bytes(files[0], json.dumps(doc, indent=1).encode())
    atomic_write_bytes(files[1], render_markdown(doc).encode())
    return [str(f) for f in files]


def render_markdown(doc: dict) -> str:
    s = doc["summary"]
    v = s["verdict"]
    names = [n for n in s if n != "verdict"]
    lines = [
        "# Robust training on attention-like noisy masks",
        "",
        f"Procedural {SIZE}x{SIZE} shapes, {doc['n_train']} training images with simulated "
        f"attention pseudo-masks (pseudo-mask mIoU {100 * doc['data']['pseudo_mask_mIoU']:.1f} "
        f"vs the clean masks), {doc['n_val']} clean validation images; model "
        f"`{doc['model']}`, {doc['steps']} steps x batch 8; seeds {doc['seeds']} "
        f"(data seed {doc['data_seed']}). mIoU on the clean validation masks, %:",
        "",
        "| loss | runs | mean | sd | min | max | gain over CE (paired, mean ± sd) |",
        "|---|---|---|---|---|---|---|",
    ]

    def pct(x):
        return "-" if x is None else f"{100 * x:.2f}"

    for n in names:
        e = s[n]
        gain = e.get("gain_over_ce")
        g = f"{100 * gain['mean']:+.2f} ± {pct(gain['sd'])}" if gain else "-"
        lines.append(f"| {n} | {len(e['values'])} | {pct(e['mean'])} | {pct(e['sd'])} | "
                     f"{pct(e['min'])} | {pct(e['max'])} | {g} |")
    lines += [
        "",
        f"Best reliability-aware loss: **{v['best']}**, {100 * v['gain']:+.2f} mIoU over plain "
        f"CE; seed-to-seed spread (larger sd of the two) {pct(v['spread_sd'])}; CE's "
        f"range {100 * v['ce_range']:.2f}. Target (gain > spread): "
        f"**{'met' if v['target_met'] else 'not met'}**; gain > CE's whole range: "
        f"{'yes' if v['beats_ce_range'] else 'no'}; better than CE on every seed: "
        f"{'yes' if v['best_beats_ce_every_seed'] else 'no'}.",
    ]
    if v.get("gap_closed") is not None:
        lines.append(f"It closes {100 * v['gap_closed']:.0f} % of the gap between CE on the "
                     "noisy masks and CE on the clean masks (`clean-labels`, the upper bound).")
    lines += ["", f"Command: `{doc['command']}`; {doc['seconds']:.0f} s on {doc['machine']}.", ""]
    return "\n".join(lines)


@dataclass
class RobustTrainingConfig:
    """One `attnseg bench robust-training` run."""

    seeds: PositiveInt = 3  # training seeds per loss
    steps: PositiveInt = 800
    train: PositiveInt = 400  # training images
    val: PositiveInt = 100  # clean validation images
    data_seed: int = 1
    model: str = "segformer-tiny"
    threads: NonNegativeInt = 1  # torch threads (a tiny model gains nothing from more)
    clean_seeds: NonNegativeInt = 1  # seeds of the clean-label reference run (its spread is small)
    workers: NonNegativeInt = 1  # data loader processes per run
    quick: bool = False  # smoke run: 2 seeds, 30 steps, 32 + 8 images
    out: str = "attnseg-bench/robust_training"  # OUT.json, OUT.md; "" writes nothing


def run_robust_training(cfg: RobustTrainingConfig, command: str = "") -> dict:
    """Train every loss on the noisy masks over the seeds; the report (also written to OUT)."""
    if cfg.quick:
        cfg = replace(cfg, seeds=2, steps=30, train=32, val=8, clean_seeds=1)
    torch.set_num_threads(cfg.threads)
    seeds = list(range(cfg.seeds))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_datasets(root, cfg.train, cfg.val, cfg.data_seed)
        print(f"pseudo-mask mIoU vs clean: {100 * data['pseudo_mask_mIoU']:.2f}", flush=True)
        losses = loss_settings(cfg.steps)
        runs: dict[str, dict[int, float]] = {n: {} for n in losses}
        if cfg.clean_seeds:
            runs["clean-labels"] = {}
        seconds: dict[str, list[float]] = {n: [] for n in runs}
        for seed in seeds:  # interleaved: every loss sees the same machine conditions
            for name, loss in losses.items():
                r = train_one(root, "train", loss, seed, cfg.steps, cfg.model, cfg.workers)
                runs[name][seed] = r["mIoU"]
                seconds[name].append(r["seconds"])
                print(f"seed {seed} {name:<22} mIoU {100 * r['mIoU']:.2f} "
                      f"({r['seconds']:.0f} s)", flush=True)
            if seed < cfg.clean_seeds:
                r = train_one(root, "train_clean", {"name": "ce"}, seed, cfg.steps, cfg.model,
                              cfg.workers)
                runs["clean-labels"][seed] = r["mIoU"]
                seconds["clean-labels"].append(r["seconds"])
                print(f"seed {seed} {'clean-labels':<22} mIoU {100 * r['mIoU']:.2f}", flush=True)
    summary = summarize(runs, seeds)
    doc = {
        "command": command or "attnseg bench robust-training",
        "machine": f"{platform.processor() or platform.machine()}, {cfg.threads} torch "
                   f"thread(s), torch {torch.__version__}",
        # Other work on the machine slows every run alike (runs are interleaved by seed).
        "load_average_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "seconds": time.perf_counter() - t0, "model": cfg.model, "steps": cfg.steps,
        "n_train": cfg.train, "n_val": cfg.val, "seeds": seeds, "data_seed": cfg.data_seed,
        "data": data, "losses": loss_settings(cfg.steps), "summary": summary,
        "seconds_per_run": {n: statistics.fmean(v) for n, v in seconds.items() if v},
    }
    doc["files"] = write_results(doc, cfg.out) if cfg.out else []
    return doc
