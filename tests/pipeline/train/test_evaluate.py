"""mIoU (mmsegmentation's definition) against independent computations; inference modes;
pseudo-mask scoring."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from attnseg.pipeline.errors import UserError
from attnseg.pipeline.train.evaluate import (
    InferenceConfig,
    MetricAccumulator,
    evaluate_model,
    evaluate_pseudo,
    format_table,
    predict_logits,
)
from attnseg.pipeline.train.sources import IMAGENET_MEAN, IMAGENET_STD, SegSource

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def independent_miou(pairs, n, ignore):
    """Per-class sums over the dataset with plain numpy masks; nan-mean over union > 0."""
    inter = np.zeros(n)
    area_pred = np.zeros(n)
    area_gt = np.zeros(n)
    for pred, gt in pairs:
        keep = gt != ignore
        for c in range(n):
            p = (pred == c) & keep
            g = gt == c
            inter[c] += np.sum(p & g)
            area_pred[c] += np.sum(p)
            area_gt[c] += np.sum(g)
    ious = [inter[c] / (area_pred[c] + area_gt[c] - inter[c]) for c in range(n)
            if area_pred[c] + area_gt[c] - inter[c] > 0]
    return float(np.mean(ious)), float(inter.sum() / area_gt.sum())


def _metrics(pairs, n, ignore=255):
    acc = MetricAccumulator([f"c{i}" for i in range(n)], ignore)
    for pred, gt in pairs:
        acc.update(torch.from_numpy(pred), torch.from_numpy(gt))
    return acc.result()


def test_hand_computed_case():
    gt = np.array([[0, 0, 1], [1, 255, 2]])
    pred = np.array([[0, 1, 1], [1, 0, 0]])
    r = _metrics([(pred, gt)], 4)
    # class 0: I 1, pred 2, gt 2 -> 1/3; class 1: I 2, pred 3, gt 2 -> 2/3; class 2: I 0,
    # gt 1 -> 0; class 3: union 0 -> skipped.
    ious = [c["iou"] for c in r["per_class"]]
    assert ious[:3] == pytest.approx([1 / 3, 2 / 3, 0.0]) and ious[3] is None
    assert r["mIoU"] == pytest.approx(1 / 3)
    assert r["aAcc"] == pytest.approx(3 / 5)
    assert r["per_class"][2]["acc"] == 0.0 and r["per_class"][3]["acc"] is None
    assert r["mAcc"] == pytest.approx((1 / 2 + 2 / 2 + 0) / 3)


def test_predicted_but_absent_class_counts_as_zero():
    gt = np.zeros((4, 4), np.int64)
    pred = gt.copy()
    pred[0, 0] = 2  # class 2 never occurs in the ground truth
    r = _metrics([(pred, gt)], 3)
    assert r["per_class"][2]["iou"] == 0.0
    assert r["per_class"][1]["iou"] is None  # neither predicted nor present: skipped
    assert r["mIoU"] == pytest.approx((15 / 16 + 0.0) / 2)


def test_ignore_pixels_and_all_ignore_images_do_not_count():
    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(3):
        gt = rng.integers(0, 4, (9, 7))
        gt[rng.random((9, 7)) < 0.3] = 255
        pairs.append((rng.integers(0, 4, (9, 7)), gt))
    base = _metrics(pairs, 4)
    all_ignore = (rng.integers(0, 4, (5, 5)), np.full((5, 5), 255))
    with_ignored = _metrics(pairs + [all_ignore], 4)
    assert with_ignored["mIoU"] == base["mIoU"] and with_ignored["pixels"] == base["pixels"]
    # Changing predictions under ignore pixels changes nothing.
    scrambled = [(np.where(g == 255, 3, p), g) for p, g in pairs]
    assert _metrics(scrambled, 4)["mIoU"] == base["mIoU"]
    only_ignore = _metrics([all_ignore], 4)
    assert only_ignore["mIoU"] is None and only_ignore["aAcc"] is None


@pytest.mark.parametrize("seed", range(5))
def test_random_datasets_match_independent_computation(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 7))
    ignore = 1000 if seed % 2 else 255
    pairs = []
    for _ in range(int(rng.integers(1, 5))):
        h, w = rng.integers(1, 12, 2)
        gt = rng.integers(0, n - 1, (h, w))  # the last class never occurs in the gt
        gt[rng.random((h, w)) < 0.2] = ignore
        pairs.append((rng.integers(0, n, (h, w)), gt))
    r = _metrics(pairs, n, ignore)
    miou, aacc = independent_miou(pairs, n, ignore)
    assert r["mIoU"] == pytest.approx(miou, abs=1e-12)
    assert r["aAcc"] == pytest.approx(aacc, abs=1e-12)


def test_dataset_level_accumulation_is_not_a_mean_of_images():
    a = (np.array([[0, 0, 0, 1]]), np.array([[0, 0, 0, 0]]))
    b = (np.array([[1]]), np.array([[1]]))
    r = _metrics([a, b], 2)
    # One confusion matrix: class 0 IoU 3/4, class 1 IoU 1/2 -> 0.625 (a per-image mean
    # would give ((3/4 + 0)/2 + 1)/2 = 0.6875).
    assert r["mIoU"] == pytest.approx(0.625)
    assert r["mIoU"] == pytest.approx(independent_miou([a, b], 2, 255)[0])
    assert "mIoU 62.50" in format_table({**r, "images": 2, "skipped": 0})


class ColourOracle(torch.nn.Module):
    """A pixelwise 'model': class c scores high where the red channel is 40 c (undoing the
    input normalisation)."""

    def __init__(self, n):
        super().__init__()
        self.class_names = [f"class{i}" for i in range(n)]
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        red = x[:, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
        centres = 40.0 * torch.arange(len(self.class_names), dtype=x.dtype)
        return -(red[:, None] - centres[None, :, None, None]).abs(), None


class ArraySource(SegSource):
    kind = "test"

    def __init__(self, labels, n, broken=()):
        from pathlib import Path

        self.root = Path("memory")
        self.labels = labels
        self.class_names = [f"class{i}" for i in range(n)]
        self.ignore_index = 255
        self.broken = set(broken)

    def __len__(self):
        return len(self.labels)

    def describe(self, i):
        return f"label{i}"

    def load(self, i):
        from attnseg.pipeline.train.sources import CorruptSample, RawSample

        if i in self.broken:
            raise CorruptSample(f"label{i}: unreadable")
        lab = self.labels[i]
        img = np.zeros((*lab.shape, 3), np.uint8)
        img[..., 0] = (40 * np.where(lab == 255, 0, lab)).astype(np.uint8)
        return RawSample(f"s{i}", img, lab, None)


def test_oracle_model_whole_and_slide_inference():
    rng = np.random.default_rng(1)
    labels = [rng.integers(0, 3, (37, 50)) for _ in range(3)]
    labels[0][:5] = 255
    source = ArraySource(labels, 3, broken=[2])
    model = ColourOracle(3)
    whole = evaluate_model(model, source, InferenceConfig(mode="whole"))
    assert whole["mIoU"] == pytest.approx(1.0) and whole["skipped"] == 1
    assert whole["images"] == 2
    slide = evaluate_model(model, source, InferenceConfig(mode="slide", crop=(16, 16),
                                                          stride=(11, 11)))
    assert slide["mIoU"] == pytest.approx(1.0)
    image = torch.rand(3, 37, 50) * 255
    a = predict_logits(model, image, InferenceConfig(mode="whole"))
    b = predict_logits(model, image, InferenceConfig(mode="slide", crop=(16, 20), stride=(7, 9)))
    assert torch.allclose(a, b, atol=1e-4)


def test_classes_the_model_lacks_are_an_error_or_never_predicted():
    rng = np.random.default_rng(2)
    source = ArraySource([rng.integers(0, 4, (20, 30)) for _ in range(2)], 4)
    source.class_names = ["background", "cat", "dog", "bird"]
    model = ColourOracle(3)
    model.class_names = ["background", "cat", "dog"]
    with pytest.raises(UserError, match="no output for dataset class"):
        evaluate_model(model, source, InferenceConfig(mode="whole"))
    report = evaluate_model(model, source, InferenceConfig(mode="whole"), allow_missing=True)
    iou = {c["name"]: c["iou"] for c in report["per_class"]}
    assert iou["background"] == pytest.approx(1.0) and iou["cat"] == pytest.approx(1.0)
    assert iou["bird"] == 0.0  # never predicted: its pixels go to the nearest channel, dog
    assert 0.0 < iou["dog"] < 1.0
    assert report["classes_the_model_lacks"] == ["bird"]


def _png(path, array, mode="P"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8), mode="L").convert(mode).save(path)


def test_pseudo_against_ground_truth(tmp_path):
    rng = np.random.default_rng(3)
    pairs = []
    for i in range(3):
        gt = rng.integers(0, 3, (6, 8))
        gt[0, :2] = 255
        pred = rng.integers(0, 3, (6, 8))
        pred[1, :3] = 255  # unsure pseudo pixels: they count against the gt class
        _png(tmp_path / "pseudo" / "SegmentationClass" / f"{i:08d}.png", pred)
        _png(tmp_path / "gt" / f"{i:08d}.png", gt)
        pairs.append((pred, gt))
    _png(tmp_path / "gt" / "extra.png", np.zeros((6, 8)))
    r = evaluate_pseudo(tmp_path / "pseudo", tmp_path / "gt", num_classes=3)
    # Independent: an unsure pixel is a prediction of "no class" (value 3, never a class).
    miou, _ = independent_miou([(np.where(p == 255, 3, p), g) for p, g in pairs], 3, 255)
    assert r["mIoU"] == pytest.approx(miou)
    assert r["gt_without_pseudo"] == 1 and r["images"] == 3
    assert r["unlabelled_frac"] == pytest.approx(9 / (3 * 46))
    (tmp_path / "gt" / "00000001.png").unlink()
    with pytest.raises(UserError, match="have no ground truth"):
        evaluate_pseudo(tmp_path / "pseudo", tmp_path / "gt", num_classes=3)


def test_bad_ground_truth_value_names_the_file(tmp_path):
    _png(tmp_path / "p" / "a.png", np.zeros((4, 4)))
    gt = np.zeros((4, 4))
    gt[0, 0] = 7
    _png(tmp_path / "g" / "a.png", gt)
    with pytest.raises(UserError, match=r"g/a.png has value\(s\) \[7\]"):
        evaluate_pseudo(tmp_path / "p", tmp_path / "g", num_classes=3)


def test_nan_free_report_values_are_json_friendly():
    r = _metrics([(np.array([[0]]), np.array([[0]]))], 3)
    assert r["mIoU"] == 1.0
    assert all(c["iou"] is None or not math.isnan(c["iou"]) for c in r["per_class"])


def test_many_class_path_takes_argmax_before_resizing(monkeypatch):
    import attnseg.pipeline.train.evaluate as ev

    rng = np.random.default_rng(2)
    labels = [np.kron(rng.integers(0, 3, (6, 8)), np.ones((8, 8), np.int64))]
    source = ArraySource(labels, 3)
    cfg = InferenceConfig(mode="whole", scale=(32, 24))  # the network sees 24x32
    direct = evaluate_model(ColourOracle(3), source, cfg)
    monkeypatch.setattr(ev, "MAX_LOGIT_VALUES", 0)
    image = torch.from_numpy(source.load(0).image).permute(2, 0, 1).float()
    small = predict_logits(ColourOracle(3), image, cfg, resize=False)
    assert small.shape[-2:] == (24, 32)
    expect = torch.nn.functional.interpolate(small.argmax(1, keepdim=True).float(),
                                             size=(48, 64), mode="nearest-exact")[0, 0].long()
    got = ev.predict_labels(ColourOracle(3), image, cfg, torch.arange(3), (48, 64))
    assert torch.equal(got, expect)
    # Blocks of 8 px survive a 2x down- and up-sampling either way.
    assert evaluate_model(ColourOracle(3), source, cfg)["mIoU"] == pytest.approx(direct["mIoU"])
    assert direct["mIoU"] > 0.9
