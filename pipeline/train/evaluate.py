"""mIoU evaluation with mmsegmentation's definition, model inference, and pseudo-mask scoring.

Metric (mmsegmentation's ``IoUMetric`` / ``total_area_to_metrics``): one confusion matrix is
accumulated over the whole dataset from the pixels whose ground truth is not the ignore index;
for class c, ``intersect_c`` is its diagonal entry, ``area_pred_c`` / ``area_label_c`` its column
/ row sums, ``union_c = area_pred_c + area_label_c - intersect_c``, and

    IoU_c = intersect_c / union_c      Acc_c = intersect_c / area_label_c
    mIoU  = nan-mean of IoU_c          (classes with union 0 are skipped)
    mAcc  = nan-mean of Acc_c          aAcc = sum_c intersect_c / sum_c area_label_c

A class that never occurs in the ground truth but is predicted somewhere has IoU 0 and counts.

Inference is whole-image (optionally rescaled to fit ``scale = (long, short)`` first, as
mmsegmentation's test pipelines do) or sliding-window (``crop`` windows every ``stride``
pixels, overlapping logits averaged). Logits are resized back to the label's size before the
argmax, so the metric is computed at the annotation's resolution.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...kernels.labels import IGNORE_LABEL
from ..errors import UserError
from ..files import atomic_write_bytes
from .samples import normalize_image, rescale_size, to_tensors
from .sources import (
    DECODE_ERRORS,
    CorruptSample,
    SegSource,
    check_label_values,
    class_mapping,
    generic_names,
    normalize_name,
    read_class_names,
)

MIN_SIDE = 32


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int,
                     ignore_index: int, extra_column: bool = False) -> torch.Tensor:
    """``[num_classes, num_classes]`` int64 counts, rows = ground truth, columns = prediction,
    over the pixels whose label is not ``ignore_index``. With ``extra_column`` there is one
    more column, ``num_classes``, for pixels that received no class at all."""
    keep = label != ignore_index
    gt = label[keep].long()
    pr = pred[keep].long()
    cols = num_classes + int(extra_column)
    if gt.numel() and (int(gt.min()) < 0 or int(gt.max()) >= num_classes):
        raise ValueError(f"label values outside 0..{num_classes - 1} besides {ignore_index}")
    if pr.numel() and (int(pr.min()) < 0 or int(pr.max()) >= cols):
        raise ValueError(f"predictions outside 0..{cols - 1}")
    return torch.bincount(gt * cols + pr, minlength=num_classes * cols).view(
        num_classes, cols).cpu()


def metrics_from_confusion(hist: torch.Tensor, class_names: list[str]) -> dict:
    """mIoU, mAcc, aAcc and the per-class table (IoU/Acc ``None`` where undefined).

    ``hist`` is [n, n], or [n, n + 1] whose last column counts pixels with no prediction
    (they add to their class's label area but to no prediction)."""
    h = hist.double()
    n = h.shape[0]
    intersect = torch.diag(h[:, :n])
    area_label = h.sum(dim=1)
    area_pred = h[:, :n].sum(dim=0)
    union = area_pred + area_label - intersect
    iou = intersect / union  # 0/0 -> nan: skipped by the nan-mean
    acc = intersect / area_label
    total_label = float(area_label.sum())
    per_class = []
    for i, name in enumerate(class_names):
        per_class.append({
            "id": i, "name": name,
            "iou": None if math.isnan(iou[i]) else float(iou[i]),
            "acc": None if math.isnan(acc[i]) else float(acc[i]),
            "pixels": int(area_label[i]),
        })
    return {
        "mIoU": _nanmean(iou), "mAcc": _nanmean(acc),
        "aAcc": float(intersect.sum()) / total_label if total_label else None,
        "pixels": int(total_label), "per_class": per_class,
    }


def _nanmean(x: torch.Tensor) -> float | None:
    ok = ~torch.isnan(x)
    return float(x[ok].mean()) if ok.any() else None


class MetricAccumulator:
    """Accumulates one confusion matrix over many (prediction, label) pairs."""

    def __init__(self, class_names: list[str], ignore_index: int, extra_column: bool = False):
        self.class_names = list(class_names)
        self.ignore_index = ignore_index
        self.extra_column = extra_column
        n = len(class_names)
        self.hist = torch.zeros(n, n + int(extra_column), dtype=torch.int64)

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        self.hist += confusion_matrix(pred, label, len(self.class_names), self.ignore_index,
                                      self.extra_column)

    def result(self) -> dict:
        return metrics_from_confusion(self.hist, self.class_names)


@dataclass
class InferenceConfig:
    """How a model is run on an evaluation image.

    ``scale``: fit the image into (long, short) first, keeping its aspect ratio (None: as is).
    ``mode``: "whole" or "slide"; ``crop`` / ``stride``: the sliding window, in pixels of the
    rescaled image.
    """

    mode: str = "whole"
    scale: tuple[int, int] | None = None
    crop: tuple[int, int] = (512, 512)
    stride: tuple[int, int] = (341, 341)

    def validate(self) -> None:
        if self.mode not in ("whole", "slide"):
            raise UserError(f"inference mode must be 'whole' or 'slide', not {self.mode!r}")
        if min(self.crop) < 1 or min(self.stride) < 1:
            raise UserError("crop and stride must be positive")


# Test-time settings of mmsegmentation's configs for each benchmark.
DATASET_INFERENCE = {
    "voc": InferenceConfig(mode="whole", scale=(2048, 512)),
    "cityscapes": InferenceConfig(mode="slide", scale=(2048, 1024), crop=(1024, 1024),
                                  stride=(768, 768)),
    "imagenet-s": InferenceConfig(mode="whole", scale=(1024, 256)),
    "synthetic": InferenceConfig(mode="whole", scale=None),
}


def inference_for(kind: str) -> InferenceConfig:
    """A fresh copy of the standard inference settings for a dataset kind (as `open_source`
    names them: "voc", "imagenet-s50", ...); whole-image for kinds without a standard."""
    import dataclasses

    family = "imagenet-s" if kind.startswith("imagenet-s") else kind
    return dataclasses.replace(DATASET_INFERENCE.get(family, InferenceConfig()))


def slide_logits(model, pixels: torch.Tensor, num_classes: int, crop: tuple[int, int],
                 stride: tuple[int, int]) -> torch.Tensor:
    """Average of the logits of ``crop`` windows placed every ``stride`` pixels (the last
    window of a row/column is shifted back to end at the border; smaller images are one
    window)."""
    _, _, h, w = pixels.shape
    ch, cw = min(crop[0], h), min(crop[1], w)
    sh, sw = stride
    rows = max(math.ceil((h - ch) / sh), 0) + 1
    cols = max(math.ceil((w - cw) / sw), 0) + 1
    total = pixels.new_zeros((pixels.shape[0], num_classes, h, w), dtype=torch.float32)
    count = pixels.new_zeros((1, 1, h, w), dtype=torch.float32)
    for r in range(rows):
        for c in range(cols):
            y0 = min(r * sh, h - ch)
            x0 = min(c * sw, w - cw)
            logits, _ = model(pixels[:, :, y0 : y0 + ch, x0 : x0 + cw])
            total[:, :, y0 : y0 + ch, x0 : x0 + cw] += logits.float()
            count[:, :, y0 : y0 + ch, x0 : x0 + cw] += 1
    return total / count


@torch.no_grad()
def predict_logits(model, image: torch.Tensor, cfg: InferenceConfig,
                   out_size: tuple[int, int] | None = None,
                   resize: bool = True) -> torch.Tensor:
    """Logits [1, C, H, W] at ``out_size`` (default: the image's) for one float image
    [3, h, w] in 0..255; with ``resize=False``, at the size the network saw."""
    _, h, w = image.shape
    device = next(model.parameters()).device
    x = image[None].to(device)
    nh, nw = rescale_size(h, w, cfg.scale)
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)
    x = normalize_image(x)
    # The networks downsample by 32: smaller images are padded (with the mean colour, 0 after
    # normalisation) and the logits cropped back.
    ph, pw = max(0, MIN_SIDE - nh), max(0, MIN_SIDE - nw)
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    if cfg.mode == "slide":
        logits = slide_logits(model, x, len(model.class_names), cfg.crop, cfg.stride)
    else:
        logits, _ = model(x)
    logits = logits[..., :nh, :nw]
    if not resize:
        return logits.float()
    size = out_size or (h, w)
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    return logits.float()


def model_to_dataset_channels(model_names: list[str], data_names: list[str],
                              allow_missing: bool = False) -> torch.Tensor:
    """For each dataset class, the model output channel of the same name.

    A model trained with a background class (attnseg's synthetic data) evaluated on Cityscapes
    (no background) keeps only the 19 Cityscapes channels for its argmax. A dataset class the
    model lacks is an error, or with ``allow_missing`` gets channel -1: never predicted.
    """
    if [normalize_name(n) for n in model_names] == [normalize_name(n) for n in data_names]:
        return torch.arange(len(data_names))
    if generic_names(data_names) or generic_names(model_names):
        if len(model_names) != len(data_names):
            raise UserError(f"the model has {len(model_names)} classes and the dataset "
                            f"{len(data_names)}; their names cannot be matched")
        return torch.arange(len(data_names))
    index = {normalize_name(n): i for i, n in enumerate(model_names)}
    missing = [n for n in data_names if normalize_name(n) not in index]
    if missing and not allow_missing:
        raise UserError(f"the model has no output for dataset class(es) {missing[:6]}")
    if len(missing) == len(data_names):
        raise UserError(f"the model shares no class with the dataset ({data_names[:5]}...)")
    return torch.tensor([index.get(normalize_name(n), -1) for n in data_names])


# Above this many logit values per image (C x H x W), labels are taken by argmax at the network's
# resolution and resized with nearest neighbours (as mmsegmentation does for ImageNet-S's large
# images), instead of resizing C full-size logit maps.
MAX_LOGIT_VALUES = 1 << 27


def _dataset_logits(logits: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """[C_data, H, W] logits of the first image in the dataset's class order; -inf for the
    classes the model lacks."""
    picked = logits[0, channels.clamp(min=0).to(logits.device)]
    missing = (channels < 0).to(logits.device)
    if missing.any():
        picked = picked.masked_fill(missing[:, None, None], float("-inf"))
    return picked


def predict_labels(model, image: torch.Tensor, cfg: InferenceConfig, channels: torch.Tensor,
                   size: tuple[int, int]) -> torch.Tensor:
    """Predicted dataset class ids [H, W] (CPU) at ``size`` for one image; ``channels`` picks
    the model outputs of the dataset's classes (-1: a class the model lacks, never predicted)."""
    if len(channels) * size[0] * size[1] <= MAX_LOGIT_VALUES:
        logits = predict_logits(model, image, cfg, out_size=size)
        return _dataset_logits(logits, channels).argmax(dim=0).cpu()
    logits = predict_logits(model, image, cfg, resize=False)
    pred = _dataset_logits(logits, channels).argmax(dim=0)
    pred = F.interpolate(pred[None, None].float(), size=size, mode="nearest-exact")
    return pred[0, 0].long().cpu()


def evaluate_model(model, source: SegSource, cfg: InferenceConfig, limit: int | None = None,
                   progress: bool = False, allow_missing: bool = False) -> dict:
    """mIoU report of ``model`` on ``source`` in the dataset's own classes.

    Unreadable samples are skipped and counted (``skipped``); bad label values raise. With
    ``allow_missing``, dataset classes the model lacks are scored as never predicted and
    listed in ``classes_the_model_lacks``; otherwise they are an error.
    """
    cfg.validate()
    channels = model_to_dataset_channels(model.class_names, source.class_names, allow_missing)
    lut = class_mapping(source.class_names, source.class_names, source.ignore_index,
                        source.ignore_index, f"data {source.root}")
    acc = MetricAccumulator(source.class_names, source.ignore_index)
    n = len(source) if limit is None else min(limit, len(source))
    skipped: list[str] = []
    was_training = model.training
    model.eval()
    bar = None
    if progress:
        from ..progress import progress_bar

        bar = progress_bar(total=n, unit="img", desc="eval")
    try:
        for i in range(n):
            try:
                sample = source.load(i)
            except CorruptSample as e:
                skipped.append(str(e))
                if bar is not None:
                    bar.update(1)
                continue
            image, label, _ = to_tensors(sample, lut, source.ignore_index)
            acc.update(predict_labels(model, image, cfg, channels, tuple(label.shape)), label)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    report = acc.result()
    report.update({"images": n - len(skipped), "skipped": len(skipped),
                   "skipped_files": skipped[:20], "ignore_index": source.ignore_index,
                   "classes_the_model_lacks": [
                       name for name, c in zip(source.class_names, channels.tolist(),
                                               strict=True) if c < 0],
                   "inference": {"mode": cfg.mode, "scale": cfg.scale, "crop": cfg.crop,
                                 "stride": cfg.stride}})
    return report


_LABEL_SUFFIXES = ("_gtFine_labelTrainIds", "_leftImg8bit")


def _label_files(root: Path) -> dict[str, Path]:
    """Label PNGs under a folder (its ``SegmentationClass/`` when it is a dataset), by stem
    (Cityscapes suffixes removed so predictions and ground truth match)."""
    folder = root / "SegmentationClass" if (root / "SegmentationClass").is_dir() else root
    if not folder.is_dir():
        raise UserError(f"label folder {root} does not exist")
    files = {}
    for p in sorted(folder.rglob("*.png")):
        stem = p.stem
        for s in _LABEL_SUFFIXES:
            stem = stem.removesuffix(s)
        files[stem] = p
    if not files:
        raise UserError(f"no label PNGs under {folder}")
    return files


def _read_label(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode == "RGB":  # ImageNet-S: class = R + 256 G
                rgb = np.asarray(im).astype(np.int64)
                return rgb[..., 0] + 256 * rgb[..., 1]
            return np.asarray(im).astype(np.int64)
    except DECODE_ERRORS as e:
        raise CorruptSample(f"{path}: unreadable ({type(e).__name__})") from None


def _classes_of(root: Path) -> list[str] | None:
    f = root / "classes.json"
    return read_class_names(f) if f.is_file() else None


def evaluate_pseudo(pseudo: str | Path, gt: str | Path, num_classes: int | None = None,
                    ignore_index: int = IGNORE_LABEL, class_names: list[str] | None = None) -> dict:
    """mIoU of pseudo-masks against ground truth, files matched by name.

    Every pseudo-mask needs a ground-truth file; ground truth without a pseudo-mask is left
    out (and counted). Pseudo-mask pixels labelled ``ignore_index`` ("unsure") count as
    wrong: they add to their ground-truth class's area but to no prediction (the metric only
    ignores the ground truth's ignore pixels); ``unlabelled_frac`` reports how many there
    were. When the pseudo folder has a classes.json and ``class_names`` (the
    ground truth's) are given, pseudo ids are mapped to ground-truth ids by class name.
    """
    pseudo, gt = Path(pseudo), Path(gt)
    pred_files, gt_files = _label_files(pseudo), _label_files(gt)
    if not set(pred_files) & set(gt_files):  # two unrelated datasets: nothing to score
        raise UserError(f"{pseudo} and {gt} share no sample names (e.g. {next(iter(pred_files))} "
                        f"and {next(iter(gt_files))}): the ground truth is not of these images")
    missing = [k for k in pred_files if k not in gt_files]
    if missing:
        raise UserError(f"{len(missing)} pseudo-mask(s) have no ground truth in {gt} "
                        f"(e.g. {missing[0]})")
    pseudo_names = _classes_of(pseudo)
    if class_names is None:
        class_names = _classes_of(gt) or pseudo_names
    if class_names is None:
        if num_classes is None:
            raise UserError("give --num-classes (no classes.json in either folder)")
        class_names = [f"class{i}" for i in range(num_classes)]
    if num_classes is not None and num_classes != len(class_names):
        raise UserError(f"--num-classes {num_classes} disagrees with the {len(class_names)} "
                        "classes found")
    n = len(class_names)
    lut = None
    if pseudo_names is not None and pseudo_names != class_names:
        lut = class_mapping(pseudo_names, class_names, ignore_index, ignore_index,
                            f"pseudo-masks {pseudo}")
    acc = MetricAccumulator(class_names, ignore_index, extra_column=True)
    skipped, unlabelled, total = [], 0, 0
    for key, pred_path in pred_files.items():
        try:
            pred = _read_label(pred_path)
            label = _read_label(gt_files[key])
        except CorruptSample as e:
            skipped.append(str(e))
            continue
        if pred.shape != label.shape:
            raise UserError(f"{pred_path} is {pred.shape[1]}x{pred.shape[0]} but its ground "
                            f"truth is {label.shape[1]}x{label.shape[0]}")
        check_label_values(label, n, ignore_index, gt_files[key])
        if lut is None:
            check_label_values(pred, n, ignore_index, pred_path)
        else:
            check_label_values(pred, len(pseudo_names), ignore_index, pred_path)
            pred = lut[pred]
        label_t = torch.from_numpy(label)
        # A pseudo pixel marked ignore ("unsure") gave no class: it goes to the extra column,
        # so it counts against its ground-truth class instead of vanishing from the metric.
        pred_t = torch.from_numpy(np.where(pred == ignore_index, n, pred))
        counted = label_t != ignore_index
        unlabelled += int((counted & (pred_t == n)).sum())
        total += int(counted.sum())
        acc.update(pred_t, label_t)
    report = acc.result()
    report.update({"images": len(pred_files) - len(skipped), "skipped": len(skipped),
                   "skipped_files": skipped[:20],
                   "gt_without_pseudo": len(set(gt_files) - set(pred_files)),
                   "unlabelled_frac": unlabelled / total if total else None,
                   "ignore_index": ignore_index})
    return report


def format_table(report: dict) -> str:
    """The per-class table and summary as aligned text."""
    width = max(8, *(len(c["name"]) for c in report["per_class"]))
    lines = [f"{'class':<{width}}  {'IoU %':>7}  {'Acc %':>7}  {'pixels':>12}"]
    for c in report["per_class"]:
        iou = "-" if c["iou"] is None else f"{100 * c['iou']:.2f}"
        acc = "-" if c["acc"] is None else f"{100 * c['acc']:.2f}"
        lines.append(f"{c['name']:<{width}}  {iou:>7}  {acc:>7}  {c['pixels']:>12}")

    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}"

    lines.append(f"mIoU {pct(report['mIoU'])} %  mAcc {pct(report['mAcc'])} %  "
                 f"aAcc {pct(report['aAcc'])} %  ({report['images']} images, "
                 f"{report['skipped']} skipped)")
    return "\n".join(lines)


# The JSON reports keep metrics as fractions (what programs compute with); the console shows
# percent. The report says which, so nobody compares 0.43 with 43.
UNITS = "mIoU, mAcc, aAcc, iou, acc and unlabelled_frac are fractions in [0, 1]; the console " \
    "prints them as percent"


def write_report(path: str | Path, report: dict) -> Path:
    """Write the JSON report atomically (with a `units` note)."""
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(p, json.dumps({"units": UNITS, **report}, indent=1).encode())
    except OSError as e:
        raise UserError(f"cannot write report {p}: {e.strerror}") from None
    return p
