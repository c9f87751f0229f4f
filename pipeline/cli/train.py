"""`attnseg train` and `attnseg eval`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ...kernels.labels import IGNORE_LABEL
from .. import cli_args
from ..errors import UserError

TINY_MODEL_NOTICE = ("model {name} is a tiny test-size network: it exercises the code, its "
                     "accuracy means nothing")


def _pair(text: str) -> tuple[int, int]:
    parts = text.replace("x", ",").split(",")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not N or H,W") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not N or H,W with positive values")
    return values[0], values[1]


def _scale_arg(text: str):
    """--scale: 'none' (keep the image size) or LONG,SHORT."""
    return "none" if text.lower() in ("none", "0") else _pair(text)


def _add_train_args(p: argparse.ArgumentParser) -> None:
    cli_args.add_config(p, "train")
    p.add_argument("--data", action="append", default=None, metavar="DIR",
                   help="training data folder; repeat to mix several (synthetic, VOC, "
                   "Cityscapes or ImageNet-S layouts are detected); required")
    p.add_argument("--dataset", help="reader for the --data folders: auto (default), "
                   "synthetic, webdataset, voc, cityscapes, imagenet-s[50|300|919]")
    p.add_argument("--split", help="split to train on (default: train)")
    p.add_argument("--classes", help="the run's classes: 'voc', 'cityscapes' or a data folder "
                   "(default: the first --data folder's); other sources map by class name")
    p.add_argument("--val-data", help="validation folder (mIoU every --val-every steps; "
                   "default: none)")
    p.add_argument("--val-dataset", help="reader for --val-data (default: auto)")
    p.add_argument("--val-split", help="validation split (default: val)")
    p.add_argument("--val-every", type=int, help="steps between validations (0: at the end; "
                   "default: 0)")
    p.add_argument("--val-limit", type=int, help="validate on the first N images only "
                   "(default: all)")
    p.add_argument("--model", help="segformer-b0..b5, upernet-convnext-tiny/small/base/large/"
                   "xlarge, or segformer-tiny/upernet-tiny (test size) (default: segformer-b0)")
    p.add_argument("--pretrained", help="local folder with a SegFormer / UperNet / ConvNeXt "
                   "config.json and safetensors weights (default: random initialisation)")
    p.add_argument("--loss", help="ce, ignore-band, reliability-weighted, cotrain (default: ce)")
    p.add_argument("--out", help="run folder (default: runs/train); a killed run resumes")
    p.add_argument("--steps", type=int, help="optimiser steps (default: 20000)")
    p.add_argument("--batch-size", type=int, help="images per micro-batch (default: 8)")
    p.add_argument("--accum-steps", type=int, help="micro-batches per optimiser step "
                   "(default: 1)")
    p.add_argument("--optimizer", help="adamw (default) or sgd")
    p.add_argument("--lr", type=float, help="peak learning rate (default: 6e-5)")
    p.add_argument("--weight-decay", type=float, help="AdamW/SGD weight decay (default: 0.01)")
    p.add_argument("--schedule", help="poly (default), cosine or constant")
    p.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default: 1500)")
    p.add_argument("--crop", type=_pair, metavar="N|H,W", help="training crop (default: 512 on "
                   "every device: the crop is part of the recipe the weights, and a resume on "
                   "another machine, depend on; on a CPU a step of 8 crops of 512 takes tens of "
                   "seconds, so there the run prints, after its second step, the measured time "
                   "of a step and of the steps left when that is over 10 minutes; 256 costs about "
                   "a quarter)")
    p.add_argument("--amp", help="auto (default: bf16/fp16 on GPU, off on CPU), off, fp16, bf16")
    p.add_argument("--full-res-head", action="store_true", default=None,
                   help="add a head that predicts at the input's own resolution (SegFormer and "
                   "UperNet predict at a quarter of it: outlines of small images suffer)")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the networks (slow first step, faster after)")
    p.add_argument("--workers", type=int, help="data loader processes (default: 2)")
    p.add_argument("--seed", type=int, help="seed of data order, augmentation and init "
                   "(default: 0)")
    cli_args.add_device(p)
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints "
                   "(default: 1000; Ctrl-C or kill (SIGTERM) also saves one, and the same "
                   "command resumes)")
    p.add_argument("--log-every", type=int, help="steps between log rows (default: 10)")
    cli_args.add_set(p, "loss.band_threshold=0.3 --set augment.scale_range=[0.5,2.0] --set "
                     "head_lr_mult=1", sections="loss, augment")
    cli_args.add_no_progress(p)


_FLAG_FIELDS = ("data", "dataset", "split", "classes", "val_data", "val_dataset", "val_split",
                "val_every", "val_limit", "model", "full_res_head", "pretrained", "out", "steps",
                "batch_size", "accum_steps", "optimizer", "lr", "weight_decay", "schedule",
                "warmup_steps", "amp", "compile", "workers", "seed", "device",
                "checkpoint_every", "log_every")


def train_config_from_args(args):
    from ..settings import apply_set, config_values
    from ..train.trainer import train_config_from

    values = config_values(args, _FLAG_FIELDS)
    if args.loss is not None:
        values.setdefault("loss", {})["name"] = args.loss
    if args.crop is not None:
        values.setdefault("augment", {})["crop_size"] = list(args.crop)
    if args.no_progress:
        values["progress"] = False
    apply_set(values, args.set)
    cfg = train_config_from(values)
    if "warmup_steps" not in values and cfg.warmup_steps >= cfg.steps:
        # The default warm-up (1500 steps) is for full runs; a short run would spend all its
        # steps warming up, so it gets a tenth of its steps, and is told so.
        cfg.warmup_steps = cfg.steps // 10
        print(f"note: {cfg.steps} steps are fewer than the default warm-up; warming up over "
              f"{cfg.warmup_steps} steps instead (--warmup-steps sets it)")
    elif cfg.warmup_steps >= cfg.steps:
        print(f"note: the warm-up ({cfg.warmup_steps} steps) lasts the whole run "
              f"({cfg.steps} steps): the learning rate never reaches its peak")
    return cfg


def cmd_train(args) -> int:
    from ..train.trainer import run_training

    cfg = train_config_from_args(args)
    summary = run_training(cfg)
    print_train_summary(summary, cfg.model)
    return 0


def print_train_summary(summary: dict, model: str) -> None:
    from ..train.segmodels import TINY_MODELS

    if summary["new_steps"] == 0 and summary["resumed_from"] >= summary["steps"]:
        print(f"run {summary['out']} is already complete ({summary['steps']} steps)")
    else:
        resumed = (f", resumed from step {summary['resumed_from']}"
                   if summary["resumed_from"] else "")
        rate = summary["images_per_s"]
        print(f"trained {summary['new_steps']} steps{resumed} in {summary['seconds']:.1f} s"
              + (f", {rate:.1f} images/s" if rate else "")
              + f" on {summary['device']} (amp {summary['amp']}); run folder {summary['out']}")
    if summary["skipped"]:
        print(f"skipped {summary['skipped']} unreadable sample(s)")
    final = summary.get("final") or {}
    if final.get("val") and final["val"].get("mIoU") is not None:
        print(f"validation mIoU {100 * final['val']['mIoU']:.2f}")
    if summary["new_steps"] and final == {}:
        print("stopped before the last step; run the same command again to continue")
    if model in TINY_MODELS:
        print("note: " + TINY_MODEL_NOTICE.format(name=model))


def cmd_eval(args) -> int:
    from ..train.evaluate import format_table, write_report

    if args.pseudo or args.gt:
        if not (args.pseudo and args.gt):
            raise UserError("--pseudo and --gt go together")
        if args.checkpoint:
            raise UserError("give either --checkpoint or --pseudo/--gt, not both")
        report = eval_pseudo_from_args(args)
        left = report["gt_without_pseudo"]
        if left:  # scored on the names the two folders share only: say so
            total = report["images"] + report["skipped"] + left
            print(f"note: scored {report['images']} of the {total} ground-truth samples in "
                  f"{args.gt}: {left} have no pseudo-mask in {args.pseudo}", file=sys.stderr)
        print(format_table(report))
        if report.get("unlabelled_frac"):
            print(f"pseudo-mask pixels marked ignore (counted as wrong): "
                  f"{100 * report['unlabelled_frac']:.2f} %")
        print(f"report: {write_report(args.out or Path(args.pseudo) / 'eval-pseudo.json', report)}")
        return 0
    if not args.checkpoint or not args.data:
        raise UserError("give --checkpoint RUN and --data ROOT (or --pseudo DIR --gt DIR)")
    report = eval_checkpoint_from_args(args)
    print(format_table(report))
    out = args.out
    if out is None and Path(args.checkpoint).is_dir():
        out = Path(args.checkpoint) / f"eval-{report['dataset']}-{report['split']}.json"
    if out:
        print(f"report: {write_report(out, report)}")
    if report.get("tiny_model"):
        print("note: " + TINY_MODEL_NOTICE.format(name=report["model"]))
    return 0


def eval_checkpoint_from_args(args) -> dict:

    import torch

    from ..device import resolve_device
    from ..train.evaluate import evaluate_model, inference_for
    from ..train.segmodels import TINY_MODELS
    from ..train.sources import detect_kind, open_source
    from ..train.trainer import load_model

    device = resolve_device(args.device or "auto")
    model = load_model(args.checkpoint, device)
    kind = args.dataset or "auto"
    kind = detect_kind(args.data) if kind == "auto" else kind
    # attnseg synth writes one split, train: evaluating a synthetic set means that one.
    split = args.split or ("train" if kind in ("synthetic", "webdataset") else "val")
    source = open_source(args.data, kind, split)
    infer = inference_for(kind)
    if args.mode:
        infer.mode = args.mode
    if args.scale is not None:
        infer.scale = None if args.scale == "none" else args.scale
    if args.crop:
        infer.crop = args.crop
    if args.stride:
        infer.stride = args.stride
    infer.validate()
    with torch.inference_mode():
        report = evaluate_model(model, source, infer, args.limit, progress=not args.no_progress)
    report.update({"checkpoint": str(args.checkpoint), "data": str(args.data),
                   "dataset": kind, "split": split, "model": model.name,
                   "tiny_model": model.name in TINY_MODELS})
    return report


def eval_pseudo_from_args(args) -> dict:
    from ..train.evaluate import evaluate_pseudo
    from ..train.sources import CITYSCAPES_CLASS_NAMES, VOC_CLASS_NAMES

    names = {"voc": VOC_CLASS_NAMES, "cityscapes": CITYSCAPES_CLASS_NAMES}.get(args.dataset)
    if args.dataset and args.dataset not in ("voc", "cityscapes") and names is None:
        raise UserError("--pseudo mode knows the classes of --dataset voc or cityscapes; "
                        "otherwise give --num-classes")
    ignore = args.ignore_index if args.ignore_index is not None else IGNORE_LABEL
    report = evaluate_pseudo(args.pseudo, args.gt, args.num_classes, ignore, names)
    report.update({"pseudo": str(args.pseudo), "gt": str(args.gt)})
    return report


def demo_train_eval(dataset: str | Path, test: str | Path | None = None, steps: int = 12,
                    progress: bool = True) -> dict:
    """The demo's last stages: `steps` co-training steps of the tiny SegFormer on the demo
    dataset, then its mIoU on `test` (rendered toy scenes with exact labels, synthetic
    layout), or without one on the demo images themselves (`attnseg demo`)."""
    import torch

    dataset = Path(dataset)
    run = dataset / "run"
    # One thread: a network this small gains nothing from more, and on a busy machine OpenMP
    # threads waiting for each other make it many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _demo_train_eval(dataset, test, steps, run, progress)
    finally:
        torch.set_num_threads(threads)


def _demo_train_eval(dataset: Path, test, steps: int, run: Path, progress: bool) -> dict:
    from ..train.evaluate import evaluate_model, format_table, inference_for, write_report
    from ..train.sources import open_source
    from ..train.trainer import load_model, run_training, train_config_from

    cfg = train_config_from(dict(
        data=[str(dataset)], out=str(run), model="segformer-tiny", steps=steps,
        batch_size=4 if test is None else 8, lr=1e-3 if test is None else 2e-3,
        warmup_steps=max(2, steps // 10), head_lr_mult=1.0, workers=0,
        checkpoint_every=max(1, steps // 2), log_every=max(1, steps // 4), progress=progress,
        augment={"crop_size": [64, 64], "base_scale": None},
        loss={"name": "cotrain", "peer_warmup": max(1, steps // 2)},
    ))
    summary = run_training(cfg)
    print_train_summary(summary, cfg.model)
    source = open_source(test or dataset, "synthetic", "train")
    report = evaluate_model(load_model(run), source, inference_for("synthetic"))
    print(format_table(report))
    what = ("mIoU of the tiny model on its own noise training images: it shows the path works, "
            "not accuracy") if test is None else (
        f"the segmenter, trained only on the toy model's images and pseudo-masks, scored on "
        f"{len(source)} rendered scenes with exact labels")
    print(f"eval report: {write_report(run / 'eval-demo.json', report)} ({what})")
    return report


def register(sub) -> None:
    """Add `train` and `eval` to the `attnseg` parser."""
    p = sub.add_parser("train", help="train a segmentation model (reliability-aware losses)",
                       description="Train a SegFormer or UperNet segmenter on generated "
                       "(pseudo-mask) data, labelled datasets or a mix, with plain or "
                       "reliability-aware losses. Checkpoints as it goes; the same command "
                       "resumes a killed or finished run.")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("eval", help="mIoU of a trained model, or of pseudo-masks vs ground truth",
                       description="Score a trained model (--checkpoint RUN --data ROOT) on a "
                       "dataset's split, or pseudo-masks against ground-truth masks matched by "
                       "file name (--pseudo DIR --gt DIR); prints the per-class table and writes "
                       "a JSON report.")
    p.add_argument("--checkpoint", help="run folder, model .safetensors or training "
                   "checkpoint (default: none; or --pseudo/--gt)")
    p.add_argument("--data", help="dataset root (VOCdevkit, Cityscapes, ImageNetS50, an "
                   "attnseg synthetic dataset ...); required with --checkpoint")
    p.add_argument("--dataset", help="auto (default), synthetic, voc, cityscapes, "
                   "imagenet-s[50|300|919]")
    p.add_argument("--split", help="split (default: train for an attnseg synthetic dataset, "
                   "which has no other, else val)")
    p.add_argument("--mode", choices=("whole", "slide"), help="whole-image or sliding-window "
                   "inference (default: the benchmark's usual one)")
    p.add_argument("--scale", type=_scale_arg, help="rescale to fit LONG,SHORT first, or 'none' "
                   "(default: the benchmark's usual one)")
    p.add_argument("--crop", type=_pair, metavar="N|H,W", help="sliding-window size (default: "
                   "the benchmark's)")
    p.add_argument("--stride", type=_pair, metavar="N|H,W", help="sliding-window stride "
                   "(default: the benchmark's)")
    p.add_argument("--limit", type=int, help="evaluate the first N images only (default: all)")
    p.add_argument("--pseudo", help="folder of pseudo-mask PNGs (or a synthetic dataset; "
                   "default: none)")
    p.add_argument("--gt", help="folder of ground-truth PNGs matched by file name "
                   "(default: none)")
    p.add_argument("--num-classes", type=int, help="--pseudo mode: number of classes "
                   "(default: from classes.json)")
    p.add_argument("--ignore-index", type=int, help="--pseudo mode: ignore value "
                   "(default: 255)")
    p.add_argument("--out", help="JSON report path (default for --checkpoint RUN: "
                   "RUN/eval-<dataset>-<split>.json; for --pseudo DIR: DIR/eval-pseudo.json)")
    cli_args.add_device(p)
    cli_args.add_no_progress(p)
    p.set_defaults(func=cmd_eval)
