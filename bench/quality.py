"""`attnseg bench quality`: how good the pseudo-masks are, and what training on them yields.

One run, one report (JSON + markdown), for one model and preset:

1. **Synthesis**: a dataset of `num_per_class` images per class is generated (resuming in the
   work folder); its images/s is recorded, next to a short `bench throughput` measurement of the
   same model (stock vs harvesting vs store-every-map) or an earlier one given with
   `--throughput FILE.json`.
2. **Pseudo-masks against ground truth**, when a labelled set is given:
   - `--labelled DIR` (VOC, Cityscapes, ImageNet-S or attnseg layout): every real image is put
     through the same harvesting (`pipeline.real_images`: noised latents, one UNet call per noise
     level, prompt naming the classes its ground truth contains) and scored with the mIoU of
     `attnseg eval`; pixels a pseudo-mask leaves unsure (255) or calls background in a set
     without a background class count as wrong.
   - `--pseudo-gt DIR`: labels drawn for the generated images themselves (same file names);
     scored as `attnseg eval --pseudo`.
3. **Downstream**: a segmenter is trained on the generated dataset through the trainer
   (`attnseg train`; `--train-steps`, `--train-model`, `--set train.KEY=VALUE`) and its mIoU is
   measured on the labelled set.

Everything heavy lives in the work folder (default: `<out>.work`): a rerun resumes the dataset
and the training run instead of starting over.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from attnseg.pipeline.config import SynthConfig, get_preset
from attnseg.pipeline.device import resolve_device, resolve_dtype
from attnseg.pipeline.errors import UserError
from attnseg.pipeline.files import atomic_write_bytes
from attnseg.pipeline.harvest.real_images import RealImageConfig, RealImageLabeller
from attnseg.pipeline.models.loading import RANDOM_MODELS, default_size, load_pipeline
from attnseg.pipeline.prompts import ClassInfo, load_classes
from attnseg.pipeline.settings import PositiveInt
from attnseg.pipeline.synth.job import run_synth
from attnseg.pipeline.train.evaluate import (
    MetricAccumulator,
    evaluate_model,
    evaluate_pseudo,
    inference_for,
)
from attnseg.pipeline.train.sources import (
    CorruptSample,
    SegSource,
    detect_kind,
    normalize_name,
    open_source,
)

from .common import machine_info, output_base, pct, with_suffix
from .throughput import ThroughputConfig, run_throughput


@dataclass
class QualityConfig:
    """One `attnseg bench quality` run."""

    model: str = "tiny"
    classes: str = "voc"
    preset: str = "attnseg"
    num_per_class: PositiveInt = 2
    steps: PositiveInt | None = None  # denoising steps (None: the preset's, else 20)
    height: PositiveInt | None = None  # None: 128 for tiny, else 512
    width: PositiveInt | None = None
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    labelled: str | None = None
    labelled_kind: str = "auto"
    labelled_split: str = "val"
    limit: PositiveInt | None = None  # score the first N labelled images only
    real: RealImageConfig = field(default_factory=RealImageConfig)
    pseudo_gt: str | None = None
    train_steps: int = 200  # 0: no downstream training
    train_model: str = "segformer-b0"
    train: dict = field(default_factory=dict)  # further TrainConfig fields (`--set train.K=V`)
    throughput: str | None = None  # "" skips the throughput part; a path embeds that result
    work: str | None = None  # None: <out>.work
    out: str = "attnseg-bench/quality"  # path without suffix: OUT.json, OUT.md
    progress: bool = True

    def validate(self) -> None:
        if self.num_per_class < 1:
            raise UserError("--num-per-class must be >= 1")
        if self.train_steps < 0:
            raise UserError("--train-steps must be >= 0")
        if self.limit is not None and self.limit < 1:
            raise UserError("--limit must be >= 1")
        if self.labelled is not None and not Path(self.labelled).is_dir():
            raise UserError(f"labelled set {self.labelled} does not exist")
        if self.pseudo_gt is not None and not Path(self.pseudo_gt).is_dir():
            raise UserError(f"--pseudo-gt folder {self.pseudo_gt} does not exist")
        if self.throughput and not Path(self.throughput).is_file():
            raise UserError(f"throughput result {self.throughput} does not exist")
        self.real.validate()
        get_preset(self.preset)


def class_set_names(classes: list[ClassInfo]) -> list[str]:
    """Names indexed by label id: 0 background, then the class set's ids (gaps get
    placeholders)."""
    names = ["background"] + [f"class{i}" for i in range(1, max(c.id for c in classes) + 1)]
    for c in classes:
        names[c.id] = c.name
    return names


def score_real_pseudo_masks(labeller: RealImageLabeller, classes: list[ClassInfo],
                            source: SegSource, limit: int | None = None,
                            progress: bool = False) -> dict:
    """mIoU of the pseudo-masks of `source`'s real images, in the source's own classes.

    Each image is prompted with the classes its ground truth contains (those the class set
    has); classes the class set lacks are never predicted and are listed in
    `classes_not_in_class_set`. A pseudo pixel that names no class of the source (unsure, or
    background in a set without one) goes to the metric's "no prediction" column.
    """
    by_name = {normalize_name(c.name): c for c in classes}
    n_src = len(source.class_names)
    # Class-set ids -> source ids; anything the source lacks -> n_src ("no prediction").
    lut = np.full(256, n_src, dtype=np.int64)
    matched = 0
    src_index = {normalize_name(n): i for i, n in enumerate(source.class_names)}
    for cid, name in enumerate(class_set_names(classes)):
        j = src_index.get(normalize_name(name))
        if j is not None:
            lut[cid] = j
            matched += cid > 0
    if matched == 0:
        raise UserError(f"the labelled set {source.root} shares no class names with the class "
                        f"set ({[c.name for c in classes[:5]]}...)")
    acc = MetricAccumulator(source.class_names, source.ignore_index, extra_column=True)
    n = len(source) if limit is None else min(limit, len(source))
    lacking: Counter = Counter()
    skipped: list[str] = []
    unsure = counted = 0
    bar = None
    if progress:
        from attnseg.pipeline.progress import progress_bar

        bar = progress_bar(total=n, unit="img", desc="pseudo-masks (real)")
    t0 = time.perf_counter()
    for i in range(n):
        try:
            sample = source.load(i)
        except CorruptSample as e:
            skipped.append(str(e))
            continue
        finally:
            if bar is not None:
                bar.update(1)
        present = []
        for sid in np.unique(sample.label):
            if sid == source.ignore_index:
                continue
            cls = by_name.get(normalize_name(source.class_names[sid]))
            if cls is not None:
                present.append(cls)
            elif normalize_name(source.class_names[sid]) != "background":
                lacking[source.class_names[sid]] += 1
        labels, _ = labeller.label(sample.image, present, i)
        pred = torch.from_numpy(lut[labels.astype(np.int64)])
        gt = torch.from_numpy(sample.label)
        keep = gt != source.ignore_index
        unsure += int((keep & (pred == n_src)).sum())
        counted += int(keep.sum())
        acc.update(pred, gt)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    report = acc.result()
    report.update(foreground_split(acc.hist, source.class_names))
    report.update({
        "images": n - len(skipped), "skipped": len(skipped), "skipped_files": skipped[:20],
        "unlabelled_frac": unsure / counted if counted else None,
        "classes_not_in_class_set": dict(lacking), "seconds": round(seconds, 3),
        "method": "image-level labels from the ground truth; latents noised to "
                  f"{list(labeller.cfg.noise_levels)} of the training timesteps, one UNet call "
                  "each; the preset's maps and mask rule",
    })
    return report


def foreground_split(hist: torch.Tensor, class_names: list[str]) -> dict:
    """Where a labeller's mIoU is lost, from its confusion matrix (rows: truth; columns:
    prediction, a last "no prediction" column allowed): `foreground_iou`, the IoU of
    "some object" against background, and `class_accuracy_on_foreground`, the share of pixels
    that are an object in both truth and prediction given the right class. A low first is the
    outline; a low second, words bound to the wrong objects. None where there is no
    background class (at index 0)."""
    if not class_names or normalize_name(class_names[0]) != "background":
        return {"foreground_iou": None, "class_accuracy_on_foreground": None}
    h = hist.double()
    n = len(class_names)
    both = float(h[1:n, 1:n].sum())
    truth, predicted = float(h[1:n].sum()), float(h[:, 1:n].sum())
    union = truth + predicted - both
    return {"foreground_iou": both / union if union else None,
            "class_accuracy_on_foreground": float(h[1:n, 1:n].diagonal().sum()) / both
            if both else None}


def work_folder(cfg: QualityConfig) -> Path:
    """Where the dataset and training run live: `cfg.work`, else `<out>.work`."""
    return Path(cfg.work) if cfg.work else with_suffix(output_base(cfg.out), ".work")


def _synthesise(cfg: QualityConfig, pipe, work: Path) -> dict:
    """Generate (or resume) the dataset; its synthesis figures, kept across reruns."""
    synth_cfg = SynthConfig(
        model=cfg.model, classes=cfg.classes, preset=cfg.preset, num_per_class=cfg.num_per_class,
        steps=cfg.steps, height=cfg.height, width=cfg.width, seed=cfg.seed, device=cfg.device,
        dtype=cfg.dtype, out=str(work / "dataset"),
    )
    summary = run_synth(synth_cfg, progress=cfg.progress, pipe=pipe)
    record = work / "synthesis.json"
    if summary["new"] == 0 and record.is_file():
        # Everything was already there: report the run that made it.
        return {**json.loads(record.read_text()), "resumed": True}
    atomic_write_bytes(record, json.dumps(summary, indent=1).encode())
    return summary


def _train_downstream(cfg: QualityConfig, work: Path, source: SegSource | None,
                      kind: str | None) -> dict:
    from attnseg.pipeline.train.trainer import load_model, run_training, train_config_from

    values = dict(
        data=[str(work / "dataset")], out=str(work / "train"), model=cfg.train_model,
        steps=cfg.train_steps, warmup_steps=min(1500, cfg.train_steps // 10),
        checkpoint_every=max(1, min(1000, cfg.train_steps // 2)), progress=cfg.progress,
        seed=cfg.seed, device=cfg.device,
    )
    for key, value in cfg.train.items():
        if isinstance(value, dict):
            values.setdefault(key, {}).update(value)
        else:
            values[key] = value
    train_cfg = train_config_from(values)
    summary = run_training(train_cfg)
    result = {"model": train_cfg.model, "steps": train_cfg.steps,
              "loss": train_cfg.loss.name, "train": summary, "eval": None}
    if source is not None:
        model = load_model(Path(train_cfg.out), resolve_device(cfg.device))
        # A class set smaller than the labelled set's: its other classes score as missed.
        result["eval"] = evaluate_model(model, source, inference_for(kind), cfg.limit,
                                        progress=cfg.progress, allow_missing=True)
    return result


def read_throughput_result(path: str) -> dict:
    """The summary of an earlier `attnseg bench throughput` run, to embed in the report."""
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read throughput result {path}: {e}") from None
    if not isinstance(result, dict) or result.get("benchmark") != "throughput":
        raise UserError(f"{path} is not an `attnseg bench throughput` result")
    return {"source": path, "config": result["config"], "summary": result["summary"]}


def _measure_throughput(cfg: QualityConfig, pipe, work: Path) -> dict:
    """A short `bench throughput` of the same model and preset: batch 1, 2 repeats."""
    tcfg = ThroughputConfig(model=cfg.model, batch_sizes=(1,), height=cfg.height,
                            width=cfg.width, steps=cfg.steps
                            or get_preset(cfg.preset).steps or 20, repeats=2, warmup=1,
                            preset=cfg.preset, device=cfg.device, dtype=cfg.dtype,
                            out=str(work / "throughput"), plots=False, progress=False)
    result = run_throughput(tcfg, pipe=pipe)
    return {"source": "measured in this run", "config": result["config"],
            "summary": result["summary"]}


def run_quality(cfg: QualityConfig) -> dict:
    """Run the quality benchmark; writes `cfg.out`.{json,md} and returns the report."""
    cfg.validate()
    earlier = read_throughput_result(cfg.throughput) if cfg.throughput else None
    cfg = replace(cfg, height=cfg.height or default_size(cfg.model),
                  width=cfg.width or default_size(cfg.model))
    for flag, v in (("--height", cfg.height), ("--width", cfg.width)):
        if v <= 0 or v % 8:
            raise UserError(f"{flag} {v} is not a positive multiple of 8")
    work = work_folder(cfg)
    work.mkdir(parents=True, exist_ok=True)
    classes = load_classes(cfg.classes)
    source = kind = None
    if cfg.labelled:
        kind = cfg.labelled_kind if cfg.labelled_kind != "auto" else detect_kind(cfg.labelled)
        source = open_source(cfg.labelled, kind, cfg.labelled_split)
        if len(source) == 0:
            raise UserError(f"labelled set {cfg.labelled} has no images in split "
                            f"{cfg.labelled_split!r}")
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    pipe = load_pipeline(cfg.model, device, dtype)
    report: dict = {
        "benchmark": "quality", "config": asdict(cfg),
        "model_note": ("built-in random weights: the figures show the path works, not accuracy"
                       if cfg.model in RANDOM_MODELS else "real weights"),
        "machine": machine_info(device), "dtype": str(dtype).replace("torch.", ""),
    }
    report["synthesis"] = _synthesise(cfg, pipe, work)
    if cfg.throughput is None:
        report["throughput"] = _measure_throughput(cfg, pipe, work)
    else:  # "" (left out) or an earlier result
        report["throughput"] = earlier
    report["pseudo_masks_real"] = None
    if source is not None:
        # Real images go through the UNet at the generation size and the run's seed.
        real = replace(cfg.real, size=max(cfg.height, cfg.width), seed=cfg.seed)
        preset = get_preset(cfg.preset, pipe.vae_scale_factor)
        with RealImageLabeller(pipe, preset, real) as labeller:
            report["pseudo_masks_real"] = score_real_pseudo_masks(
                labeller, classes, source, cfg.limit, cfg.progress)
    report["pseudo_masks_generated"] = None
    if cfg.pseudo_gt:
        report["pseudo_masks_generated"] = evaluate_pseudo(work / "dataset", cfg.pseudo_gt)
    del pipe  # the trainer wants the memory
    report["downstream"] = (_train_downstream(cfg, work, source, kind)
                            if cfg.train_steps else None)
    report["files"] = write_report(report, output_base(cfg.out))
    return report


def markdown(report: dict) -> str:
    """The report as a markdown summary and per-class table."""
    cfg = report["config"]
    m = report["machine"]
    syn = report["synthesis"]
    lines = [f"{cfg['model']} ({report['model_note']}), preset {cfg['preset']}, "
             f"{syn['size'][0]}x{syn['size'][1]}, {syn['steps']} steps, {report['dtype']} on "
             f"{m.get('gpu', m['device'])}", "", "| measure | value |", "|---|---|"]
    ips = syn.get("images_per_s")
    lines.append(f"| synthesis: {syn['samples']} images | "
                 f"{'-' if ips is None else f'{ips:.3f} images/s'} |")
    tp = report.get("throughput")
    if tp:
        for row in tp["summary"]:
            lines.append(f"| throughput ({tp['source']}): {row['backend']} batch "
                         f"{row['batch_size']} {row['variant']} | {row['images_per_s']:.3f} "
                         f"images/s, {row['time_vs_stock']:.3f}x stock time |")
    real = report.get("pseudo_masks_real")
    if real:
        lines.append(f"| pseudo-mask mIoU, real labelled set ({real['images']} images) | "
                     f"{pct(real['mIoU'])} (unsure {pct(real['unlabelled_frac'])} %) |")
    gen = report.get("pseudo_masks_generated")
    if gen:
        lines.append(f"| pseudo-mask mIoU, annotated generated images ({gen['images']}) | "
                     f"{pct(gen['mIoU'])} (unsure {pct(gen['unlabelled_frac'])} %) |")
    down = report.get("downstream")
    if down:
        ev = down["eval"]
        value = "- (no labelled set)" if ev is None else pct(ev["mIoU"])
        lines.append(f"| downstream mIoU: {down['model']}, {down['steps']} steps, "
                     f"{down['loss']} loss | {value} |")
    tables = [("pseudo (real)", real), ("pseudo (generated)", gen),
              ("downstream", down["eval"] if down else None)]
    tables = [(name, r) for name, r in tables if r]
    if tables:
        lines += ["", "| class | " + " | ".join(f"{name} IoU" for name, _ in tables) + " |",
                  "|---|" + "---|" * len(tables)]
        names = [c["name"] for c in tables[0][1]["per_class"]]
        for k, name in enumerate(names):
            cells = []
            for _, r in tables:
                row = r["per_class"][k] if k < len(r["per_class"]) else None
                cells.append("-" if row is None or row["name"] != name else pct(row["iou"]))
            if any(c != "-" for c in cells):  # leave out classes no table scored
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, base: Path) -> list[str]:
    """Write BASE.json and BASE.md; the paths written."""
    base.parent.mkdir(parents=True, exist_ok=True)
    files = [with_suffix(base, ".json"), with_suffix(base, ".md")]
    atomic_write_bytes(files[0], (json.dumps(report, indent=1) + "\n").encode())
    atomic_write_bytes(files[1], markdown(report).encode())
    return [str(f) for f in files]
