"""The training loop: data stream, model(s), optimiser, schedule, checkpoints, logs.

A run lives in one folder::

    RUN/run.json                       settings, classes, model description (a resume must
                                       match the settings)
    RUN/checkpoints/step_XXXXXXXX.safetensors
                                       full state: weights of every network, optimiser state,
                                       AMP scaler, counters (the last ``keep_checkpoints``)
    RUN/model.safetensors              final weights of network 0, with its description in
                                       the metadata (what `attnseg eval` loads)
    RUN/log.csv  RUN/val.csv           one row per logged / validated step
    RUN/tb/                            TensorBoard events (when tensorboard is installed)

Determinism: the sample at stream position ``p`` and its augmentation depend only on
``(seed, p)`` (see ``samples.StreamSampler``), and the global torch RNG (dropout, drop-path) is
re-seeded from ``(seed, step)`` before every optimiser step. So a run killed at any point and
started again with the same command continues from its last checkpoint and ends with exactly
the weights of an uninterrupted run (on CPU; GPU kernels may add non-determinism of their own).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..device import resolve_device
from ..errors import UserError
from ..files import (
    atomic_write_bytes,
    check_output_dir,
    hold_output,
    holding_output,
    holds_same_run,
)
from ..optim_state import load_optimizer_tensors, optimizer_tensors
from ..settings import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    UnitFloat,
    config_from,
)
from ..signals import StopSignals
from .evaluate import InferenceConfig, evaluate_model, inference_for
from .losses import LossConfig, segmentation_loss
from .samples import (
    AugmentConfig,
    SegmentationDataset,
    StreamSampler,
    check_batch,
    collate_train,
    derive_seed,
)
from .segmodels import TINY_MODELS, SegModel, build_model, model_from_spec
from .sources import default_ignore_index, open_source

CHECKPOINT_FORMAT = "attnseg-train-1"
MODEL_FORMAT = "attnseg-segmodel-1"
# Settings that do not change the trained weights: a resume may change them.
RUNTIME_FIELDS = ("workers", "progress", "checkpoint_every", "keep_checkpoints", "log_every",
                  "val_every", "val_limit", "device", "compile", "stop_after")


@dataclass
class TrainConfig:
    """One training run (`attnseg train`). Nested sections: ``loss``, ``augment``."""

    data: list[str] = field(default_factory=list)
    dataset: str = "auto"  # reader for every --data folder (auto: detect from the layout)
    split: str = "train"
    # The run's classes: None = the first data folder's; else a data folder whose classes to
    # use, or "voc" / "cityscapes".
    classes: str | None = None
    val_data: str | None = None
    val_dataset: str = "auto"
    val_split: str = "val"
    # steps between validations (0: only at the end, if val_data is set)
    val_every: NonNegativeInt = 0
    val_limit: PositiveInt | None = None  # validate on the first N images only
    model: str = "segformer-b0"
    # A head predicting at the input's resolution (segmodels.FullResolutionHead).
    full_res_head: bool = False
    pretrained: str | None = None
    out: str = "runs/train"
    steps: PositiveInt = 20000
    batch_size: PositiveInt = 8
    accum_steps: PositiveInt = 1
    optimizer: str = "adamw"
    lr: PositiveFloat = 6e-5
    head_lr_mult: PositiveFloat = 10.0  # decoder heads learn this much faster (SegFormer's recipe)
    weight_decay: NonNegativeFloat = 0.01
    momentum: UnitFloat = 0.9  # SGD only
    schedule: str = "poly"
    poly_power: NonNegativeFloat = 1.0
    min_lr: NonNegativeFloat = 0.0
    warmup_steps: NonNegativeInt = 1500
    warmup_ratio: UnitFloat = 1e-6  # the first step's lr, as a fraction of the scheduled lr
    amp: str = "auto"  # auto (bf16/fp16 on GPU, off on CPU), off, fp16, bf16
    compile: bool = False
    workers: NonNegativeInt = 2
    seed: int = 0
    device: str = "auto"
    log_every: PositiveInt = 10
    checkpoint_every: PositiveInt = 1000
    keep_checkpoints: PositiveInt = 2
    progress: bool = True
    stop_after: PositiveInt | None = None  # stop (as if killed) after this many steps of this call
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self) -> None:
        if not self.data:
            raise UserError("give at least one --data folder")
        for name in ("steps", "batch_size", "accum_steps", "log_every", "checkpoint_every",
                     "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1")
        if self.optimizer not in ("adamw", "sgd"):
            raise UserError(f"optimizer must be 'adamw' or 'sgd', not {self.optimizer!r}")
        if self.schedule not in ("poly", "cosine", "constant"):
            raise UserError(f"schedule must be 'poly', 'cosine' or 'constant', not "
                            f"{self.schedule!r}")
        if self.amp not in ("auto", "off", "fp16", "bf16"):
            raise UserError(f"amp must be auto, off, fp16 or bf16, not {self.amp!r}")
        if self.lr <= 0:
            raise UserError("lr must be > 0")
        if self.warmup_steps < 0 or self.workers < 0 or self.val_every < 0:
            raise UserError("warmup_steps, workers and val_every must be >= 0")
        self.loss.validate()
        self.augment.validate()
        if min(self.augment.crop_size) < 32:
            raise UserError(f"crop {list(self.augment.crop_size)} is below 32 px: the networks "
                            "downsample by 32")


def train_config_from(values: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from a dict (config file merged with flags); sections are dicts."""
    values = dict(values)
    if isinstance(values.get("data"), str):
        values["data"] = [values["data"]]
    return config_from(TrainConfig, values, "train")


def config_dict(cfg: TrainConfig) -> dict:
    """The settings as JSON-able data (tuples become lists, as they read back)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Learning-rate multiplier at optimiser step ``step`` (0-based): the schedule over all
    steps times a linear warm-up (mmsegmentation's form: the warm-up scales the scheduled lr
    from ``warmup_ratio`` up to 1)."""
    t = step / cfg.steps
    if cfg.schedule == "poly":
        base = (1.0 - t) ** cfg.poly_power
    elif cfg.schedule == "cosine":
        base = 0.5 * (1.0 + math.cos(math.pi * t))
    else:
        base = 1.0
    floor = cfg.min_lr / cfg.lr
    base = floor + (1.0 - floor) * base
    if step < cfg.warmup_steps:
        base *= 1.0 - (1.0 - step / cfg.warmup_steps) * (1.0 - cfg.warmup_ratio)
    return base


def _amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.amp == "off" or device.type != "cuda":
        if cfg.amp in ("fp16", "bf16") and device.type != "cuda":
            raise UserError(f"--amp {cfg.amp} needs a CUDA device")
        return None
    if cfg.amp == "fp16":
        return torch.float16
    if cfg.amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def _class_names(cfg: TrainConfig, first) -> list[str]:
    from .sources import CITYSCAPES_CLASS_NAMES, VOC_CLASS_NAMES

    if cfg.classes is None:
        return list(first.class_names)
    if cfg.classes == "voc":
        return list(VOC_CLASS_NAMES)
    if cfg.classes == "cityscapes":
        return list(CITYSCAPES_CLASS_NAMES)
    return list(open_source(cfg.classes, "auto", cfg.split).class_names)


def _optimizer(cfg: TrainConfig, models: list[SegModel]) -> torch.optim.Optimizer:
    groups = []
    for m in models:
        heads = m.head_parameter_names()
        body = [p for n, p in m.named_parameters() if n not in heads and p.requires_grad]
        head = [p for n, p in m.named_parameters() if n in heads and p.requires_grad]
        groups.append({"params": body, "lr_mult": 1.0})
        groups.append({"params": head, "lr_mult": cfg.head_lr_mult})
    for g in groups:
        g["lr"] = cfg.lr * g["lr_mult"]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


# --------------------------------------------------------------------------------------------
# checkpoints (safetensors: tensors + string metadata; nothing is ever unpickled)
# --------------------------------------------------------------------------------------------


def save_checkpoint(path: Path, models: list[SegModel], opt, scaler, counters: dict) -> None:
    """Everything a resume needs, written atomically as one safetensors file."""
    from safetensors.torch import save

    tensors = {}
    for k, m in enumerate(models):
        for name, value in m.state_dict().items():
            tensors[f"model.{k}.{name}"] = value.detach().cpu().contiguous().clone()
    opt_tensors, opt_meta = optimizer_tensors(opt, "optim.")
    tensors.update(opt_tensors)
    meta = {"format": CHECKPOINT_FORMAT, "optimizer": json.dumps(opt_meta),
            "scaler": json.dumps(scaler.state_dict() if scaler is not None else {}),
            "counters": json.dumps(counters),
            "model_spec": json.dumps(models[0].spec())}
    atomic_write_bytes(path, save(tensors, metadata=meta))


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read checkpoint {path}: {e}") from None
    return tensors, meta


def load_checkpoint(path: Path, models: list[SegModel], opt, scaler) -> dict:
    """Restore models, optimiser and scaler from ``path``; returns the counters."""
    tensors, meta = _read_safetensors(path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not an attnseg training checkpoint")
    for k, m in enumerate(models):
        prefix = f"model.{k}."
        m.load_state_dict({n[len(prefix):]: v for n, v in tensors.items()
                           if n.startswith(prefix)})
    load_optimizer_tensors(opt, tensors, json.loads(meta["optimizer"]), "optim.")
    scaler_state = json.loads(meta["scaler"])
    if scaler is not None and scaler_state:
        scaler.load_state_dict(scaler_state)
    return json.loads(meta["counters"])


def save_model(path: Path, model: SegModel, extra: dict | None = None) -> None:
    """Network weights plus the description needed to rebuild it (what `attnseg eval` reads)."""
    from safetensors.torch import save

    tensors = {n: v.detach().cpu().contiguous().clone() for n, v in model.state_dict().items()}
    meta = {"format": MODEL_FORMAT, "model_spec": json.dumps(model.spec()),
            "extra": json.dumps(extra or {})}
    atomic_write_bytes(path, save(tensors, metadata=meta))


def load_model(checkpoint: str | Path, device: torch.device | str = "cpu") -> SegModel:
    """A trained network from a run folder (its model.safetensors, else its newest
    checkpoint), a model file or a training checkpoint file."""
    p = Path(checkpoint)
    if p.is_dir():
        if (p / "model.safetensors").is_file():
            p = p / "model.safetensors"
        else:
            ckpts = sorted((p / "checkpoints").glob("step_*.safetensors"))
            if not ckpts:
                raise UserError(f"run folder {checkpoint} has no model.safetensors and no "
                                "checkpoints")
            p = ckpts[-1]
    elif not p.is_file():
        raise UserError(f"checkpoint {checkpoint} does not exist")
    if p.suffix != ".safetensors":
        raise UserError(f"checkpoint {p} is not a .safetensors file (pickle files are not "
                        "loaded)")
    tensors, meta = _read_safetensors(p)
    if meta.get("format") not in (MODEL_FORMAT, CHECKPOINT_FORMAT):
        raise UserError(f"{p} is not an attnseg model or training checkpoint")
    model = model_from_spec(json.loads(meta["model_spec"]))
    if meta["format"] == CHECKPOINT_FORMAT:
        tensors = {n[len("model.0."):]: v for n, v in tensors.items()
                   if n.startswith("model.0.")}
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise UserError(f"{p}: weights do not fit the described model ({e})") from None
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------
# logs
# --------------------------------------------------------------------------------------------


class CsvLog:
    """A CSV log that, on resume, drops rows past the resumed step (so a resumed run's log
    reads like an uninterrupted one's) and then appends."""

    def __init__(self, path: Path, columns: list[str], resume_step: int):
        self.path, self.columns = path, columns
        rows = []
        if path.exists() and resume_step > 0:
            with open(path, newline="") as f:
                for row in csv.DictReader(f):
                    try:
                        if int(row["step"]) <= resume_step:
                            rows.append(row)
                    except (KeyError, ValueError):
                        continue
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        atomic_write_bytes(path, buf.getvalue().encode())

    def write(self, row: dict) -> None:
        buf = io.StringIO()
        csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore").writerow(row)
        with open(self.path, "a", newline="") as f:
            f.write(buf.getvalue())


def _tensorboard(folder: Path):
    """A SummaryWriter when tensorboard is installed, else None (logs stay in CSV)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is an optional dependency
        return None
    return SummaryWriter(str(folder))


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------


def _prepare_out(cfg: TrainConfig, run_doc: dict) -> tuple[Path, bool]:
    """Create the run folder or check that it holds this same run; True when resuming."""
    out = Path(cfg.out)
    check_output_dir(out)

    def weights_relevant(doc):  # settings that change the weights; not e.g. workers or device
        c = dict(doc.get("config", {})) if isinstance(doc, dict) else {}
        for k in RUNTIME_FIELDS:
            c.pop(k, None)
        return {"config": c, "classes": doc.get("classes") if isinstance(doc, dict) else None}

    hold_output(out)  # a second process training into the folder is refused
    if holds_same_run(out, "run.json", run_doc, "run folder", "run", key=weights_relevant):
        return out, True
    try:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"run folder {out} cannot be written: {e.strerror}") from None
    atomic_write_bytes(out / "run.json", json.dumps(run_doc, indent=1).encode())
    return out, False


def _latest_checkpoint(out: Path) -> Path | None:
    ckpts = sorted((out / "checkpoints").glob("step_*.safetensors"))
    return ckpts[-1] if ckpts else None


@holding_output
def run_training(cfg: TrainConfig) -> dict:
    """Train as configured (resuming a killed run in the same folder); returns a summary."""
    cfg.validate()
    device = resolve_device(cfg.device)
    amp_dtype = _amp_dtype(cfg, device)
    sources = [open_source(d, cfg.dataset, cfg.split) for d in cfg.data]
    class_names = _class_names(cfg, sources[0])
    dataset = SegmentationDataset(sources, class_names, cfg.augment, cfg.seed)
    ignore_index = default_ignore_index(len(class_names))
    val_source = None
    if cfg.val_data:
        val_source = open_source(cfg.val_data, cfg.val_dataset, cfg.val_split)

    models = _build_models(cfg, class_names, device)
    run_doc = {"config": config_dict(cfg), "classes": class_names,
               "model_spec": models[0].spec(),
               "tiny_model": cfg.model in TINY_MODELS}
    out, resuming = _prepare_out(cfg, run_doc)
    opt = _optimizer(cfg, models)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    counters = {"step": 0, "images": 0, "skipped": 0}
    ckpt = _latest_checkpoint(out) if resuming else None
    if ckpt is not None:
        counters = load_checkpoint(ckpt, models, opt, scaler)
    start = counters["step"]
    if start >= cfg.steps and (out / "model.safetensors").is_file():
        return {"out": str(out), "steps": cfg.steps, "resumed_from": start, "new_steps": 0,
                "seconds": 0.0, "images_per_s": None, "skipped": counters["skipped"],
                "final": read_final(out)}

    forward = [torch.compile(m) if cfg.compile else m for m in models]
    loader = _loader(cfg, dataset, start, device)
    logs = _RunLogs(cfg, out, start)
    infer = _val_inference(cfg)
    for m in models:
        m.train()
    t0 = time.perf_counter()
    images_this_call = 0
    last_val = None
    stream = iter(loader)
    step = start
    saved = start  # the newest step whose checkpoint is on disk
    val_pending = counters.pop("val_pending", False)
    committed = dict(counters)  # the counters as of `step` (a step cut short adds nothing)
    cost = _CpuCost(cfg, device, logs)
    # Training seconds over every process of the run (kept in each checkpoint's counters),
    # so a finished run still tells what it cost after being stopped and resumed; None for
    # a run resumed from a checkpoint that does not have them.
    seconds_before = counters.get("seconds", 0.0 if start == 0 else None)
    stop = StopSignals()
    try:
        stop.install()
        if val_pending and val_source is not None:
            # Interrupted while validating this step: validate it now.
            last_val = evaluate_model(models[0], val_source, infer, cfg.val_limit)
            logs.validation(step, last_val)
        while step < cfg.steps:
            if cfg.stop_after is not None and step - start >= cfg.stop_after:
                break
            factor = lr_factor(cfg, step)
            for g in opt.param_groups:
                g["lr"] = cfg.lr * g["lr_mult"] * factor
            torch.manual_seed(derive_seed(cfg.seed, 0xD80, step))
            opt.zero_grad(set_to_none=True)
            loss_sum, parts, used = _accumulate_gradients(
                cfg, stream, models, forward, scaler, amp_dtype, device, ignore_index, step,
                counters)
            if used == 0 and counters["skipped"] >= len(dataset) and counters["images"] == 0:
                raise UserError(f"none of the {len(dataset)} training samples could be read")
            with stop.held():  # the update, its count and its log row are one step
                if used:
                    if scaler is not None:
                        scaler.step(opt)
                        scaler.update()
                    else:
                        opt.step()
                step += 1
                counters["step"] = step
                counters["images"] += used
                images_this_call += used
                elapsed = time.perf_counter() - t0
                if seconds_before is not None:
                    counters["seconds"] = round(seconds_before + elapsed, 3)
                rate = images_this_call / elapsed if elapsed > 0 else 0.0
                logs.step(step, cfg.lr * factor, loss_sum, parts, counters, rate, elapsed)
                committed = dict(counters)
            cost.step_done(step)
            if val_source is not None and (
                    (cfg.val_every and step % cfg.val_every == 0) or step == cfg.steps):
                committed["val_pending"] = True
                last_val = evaluate_model(models[0], val_source, infer, cfg.val_limit)
                logs.validation(step, last_val)
                committed.pop("val_pending")
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                _save_step_checkpoint(cfg, out, step, models, opt, scaler, counters)
                saved = step
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (`Terminated`)
        # Keep what this call trained (the checkpoint interval may be hours on a CPU); the
        # same command resumes from it. A second signal while it is written leaves the
        # previous checkpoint (the write is atomic).
        if step > saved:
            logs.close()
            path = _save_step_checkpoint(cfg, out, step, models, opt, scaler, committed)
            print(f"attnseg: stopped after step {step} of {cfg.steps}; saved checkpoint {path}",
                  file=sys.stderr)
        raise
    finally:
        stop.restore()
        logs.close()
        del stream
    elapsed = time.perf_counter() - t0
    final = None
    if step >= cfg.steps:
        final = {"step": step, "val": _val_summary(last_val),
                 "seconds": counters.get("seconds")}
        save_model(out / "model.safetensors", models[0], {"run": str(out), **final})
    return {"out": str(out), "steps": cfg.steps, "resumed_from": start,
            "new_steps": step - start, "seconds": round(elapsed, 3),
            "images_per_s": round(images_this_call / elapsed, 3) if elapsed > 0 else None,
            "skipped": counters["skipped"], "final": final, "device": str(device),
            "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "off"}


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


class _CpuCost:
    """On a CPU, what the run's settings cost: after this call's first `MEASURED_STEPS` + 1
    steps, the measured time of a step (the mean past the first, which starts the loader; one
    step alone carries the allocator's and the threads' warm-up) and of the steps left, with
    what would cost less, when the rest takes more than `NOTE_ABOVE_S` (the defaults are a
    GPU recipe: on a CPU, 512x512 crops of batch 8 take tens of seconds a step)."""

    NOTE_ABOVE_S = 600.0
    MEASURED_STEPS = 5

    def __init__(self, cfg: TrainConfig, device, logs: _RunLogs):
        self.cfg, self.logs = cfg, logs
        self.pending = device.type == "cpu"
        self.first: tuple[int, float] | None = None

    def step_done(self, step: int) -> None:
        if not self.pending:
            return
        now = time.perf_counter()
        if self.first is None:  # the first step also starts the loader: timed from its end
            self.first = (step, now)
            return
        if step - self.first[0] < self.MEASURED_STEPS:
            return
        self.pending = False
        per_step = (now - self.first[1]) / (step - self.first[0])
        left = self.cfg.steps - step
        if per_step * left <= self.NOTE_ABOVE_S:
            return
        h, w = self.cfg.augment.crop_size
        # Half the side is a quarter of the pixels; below 32 a crop holds too little context.
        smaller = f"--crop {h // 2},{w // 2} (a quarter of the pixels), " \
            if min(h, w) >= 64 else ""
        self.logs.note(
            f"note: on the CPU a step takes {per_step:.1f} s "
            f"({self.cfg.batch_size * self.cfg.accum_steps} crops of {h}x{w}), so the {left} "
            "steps left take about "
            f"{_duration(per_step * left)}; a CUDA GPU is many times faster, {smaller}"
            "fewer --steps cost less, and Ctrl-C (or kill) saves a checkpoint to resume from")


def _build_models(cfg: TrainConfig, class_names: list[str], device) -> list:
    """The run's network(s), seeded: co-training needs two differently initialised ones."""
    torch.manual_seed(cfg.seed)
    models = []
    for k in range(cfg.loss.networks):
        torch.manual_seed(derive_seed(cfg.seed, 0x1A17, k))
        models.append(build_model(cfg.model, class_names, cfg.pretrained,
                                  cfg.full_res_head).to(device))
    return models


def _loader(cfg: TrainConfig, dataset, start: int, device):
    """The data loader, continuing the seeded sample stream at step `start`."""
    per_step = cfg.batch_size * cfg.accum_steps
    sampler = StreamSampler(len(dataset), cfg.seed, start=start * per_step)
    return torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate_train,
        num_workers=cfg.workers, pin_memory=device.type == "cuda",
        persistent_workers=cfg.workers > 0,
    )


def _accumulate_gradients(cfg: TrainConfig, stream, models, forward, scaler, amp_dtype, device,
                          ignore_index: int, step: int, counters: dict):
    """One optimiser step's micro-batches: forward, loss, backward. Returns the mean loss,
    the loss's parts (for the log) and how many images were used (skipped samples aside)."""
    loss_sum, parts, used = 0.0, {}, 0
    for _ in range(cfg.accum_steps):
        batch = check_batch(next(stream))
        counters["skipped"] += len(batch["skipped"])
        if batch["size"] == 0:
            continue
        batch = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
                 for k, v in batch.items()}
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            outputs = [f(batch["image"]) for f in forward]
        loss, parts = segmentation_loss(
            cfg.loss, [o[0] for o in outputs], batch, ignore_index, step,
            aux=[o[1] for o in outputs], aux_weight=models[0].aux_weight)
        scaled = loss / cfg.accum_steps
        if scaler is not None:
            scaler.scale(scaled).backward()
        else:
            scaled.backward()
        loss_sum += float(loss.detach()) / cfg.accum_steps
        used += batch["size"]
    return loss_sum, parts, used


def _save_step_checkpoint(cfg: TrainConfig, out: Path, step: int, models, opt, scaler,
                          counters: dict) -> Path:
    """Checkpoint this step; keep the newest `keep_checkpoints`."""
    path = out / "checkpoints" / f"step_{step:08d}.safetensors"
    save_checkpoint(path, models, opt, scaler, counters)
    for old in sorted((out / "checkpoints").glob("step_*.safetensors"))[: -cfg.keep_checkpoints]:
        old.unlink(missing_ok=True)
    return path


class _RunLogs:
    """Where a run reports: log.csv and val.csv (rows past a resumed step are rewritten),
    TensorBoard when installed, and the progress bar."""

    def __init__(self, cfg: TrainConfig, out: Path, start: int):
        columns = ["step", "lr", "loss", "images", "images_per_s", "seconds", "skipped"]
        extra = (["loss_net0", "loss_net1", "reliable_frac", "peer_frac0", "peer_frac1", "rho"]
                 if cfg.loss.name == "cotrain" else ["weight_frac"])
        self.cfg = cfg
        self.log = CsvLog(out / "log.csv", columns + extra, start)
        self.val_log = CsvLog(out / "val.csv", ["step", "mIoU", "mAcc", "aAcc"], start)
        self.tb = _tensorboard(out / "tb")
        self.bar = None
        if cfg.progress:
            from ..progress import progress_bar

            self.bar = progress_bar(total=cfg.steps, initial=start, unit="step", desc="train")

    def step(self, step: int, lr: float, loss: float, parts: dict, counters: dict, rate: float,
             elapsed: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f}, {rate:.1f} img/s")
            self.bar.update(1)
        if step % self.cfg.log_every == 0 or step == self.cfg.steps:
            self.log.write({"step": step, "lr": f"{lr:.6g}", "loss": f"{loss:.6f}",
                            "images": counters["images"], "images_per_s": f"{rate:.3f}",
                            "seconds": f"{elapsed:.2f}", "skipped": counters["skipped"],
                            **{k: f"{v:.6g}" for k, v in parts.items()}})
            if self.tb is not None:
                self.tb.add_scalar("train/loss", loss, step)
                self.tb.add_scalar("train/lr", lr, step)
                self.tb.add_scalar("train/images_per_s", rate, step)

    def validation(self, step: int, result: dict) -> None:
        self.val_log.write({"step": step, "mIoU": result["mIoU"], "mAcc": result["mAcc"],
                            "aAcc": result["aAcc"]})
        if self.tb is not None and result["mIoU"] is not None:
            self.tb.add_scalar("val/mIoU", result["mIoU"], step)

    def note(self, line: str) -> None:
        """A line for the user that leaves the progress bar whole."""
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line)

    def close(self) -> None:  # may be called twice (an interrupt closes the logs first)
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _val_inference(cfg: TrainConfig) -> InferenceConfig:
    if not cfg.val_data:
        return InferenceConfig()
    from .sources import detect_kind

    kind = cfg.val_dataset if cfg.val_dataset != "auto" else detect_kind(cfg.val_data)
    return inference_for(kind)


def _val_summary(report: dict | None) -> dict | None:
    if report is None:
        return None
    return {k: report[k] for k in ("mIoU", "mAcc", "aAcc", "images", "skipped")}


def read_final(out: Path) -> dict:
    """A finished run's last step, its last validation and its training seconds over every
    process that trained it (None where not recorded), as its model file holds them."""
    _, meta = _read_safetensors(out / "model.safetensors")
    extra = json.loads(meta.get("extra", "{}"))
    return {k: extra.get(k) for k in ("step", "val", "seconds")}
