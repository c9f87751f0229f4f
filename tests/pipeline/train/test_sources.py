"""Readers on small fake datasets in every layout, class mapping across mixed sources,
corrupt samples, bad label values, and augmentation consistency."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from attnseg.pipeline.errors import UserError
from attnseg.pipeline.prompts import load_classes
from attnseg.pipeline.synth.writer import DatasetWriter, voc_palette
from attnseg.pipeline.train.samples import (
    AugmentConfig,
    SegmentationDataset,
    Skipped,
    StreamSampler,
    augment,
    check_batch,
    collate_train,
)
from attnseg.pipeline.train.sources import CorruptSample, detect_kind, open_source

NO_JITTER = dict(brightness=0.0, contrast=0.0, saturation=0.0)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _save(path, array, mode=None, palette=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array.astype(np.uint8))
    if palette:
        img = img.convert("P")
        img.putpalette(voc_palette())
    img.save(path)


def _label(h, w, values, seed=0):
    rng = np.random.default_rng(seed)
    return rng.choice(values, size=(h, w))


def make_synthetic(root, classes="dog,cat", n=3, size=(12, 16)):
    w = DatasetWriter(root, {"model": "tiny", "model_hash": "x", "preset": "attnseg",
                             "mask": {}}, load_classes(classes))
    labels = []
    for i in range(n):
        lab = _label(*size, [0, 1, 2, 255], seed=i).astype(np.uint8)
        rel = np.full(size, 10 * (i + 1), np.uint8)
        w.write(i, f"{i:08d}", np.full((*size, 3), 100, np.uint8), lab, rel, {"prompt": "p"})
        labels.append(lab)
    w.finish()
    return labels


def make_voc(root, names=("2007_000032", "2007_000039"), size=(10, 14), split="val"):
    base = root / "VOCdevkit" / "VOC2012"
    labels = {}
    for i, name in enumerate(names):
        _save(base / "JPEGImages" / f"{name}.jpg", np.full((*size, 3), 50 * i, np.uint8))
        lab = _label(*size, [0, 5, 12, 20, 255], seed=i)
        _save(base / "SegmentationClass" / f"{name}.png", lab, palette=True)
        labels[name] = lab
    (base / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return labels


def make_cityscapes(root, size=(8, 16)):
    labels = {}
    for city, k in (("aachen", 0), ("bonn", 1)):
        stem = f"{city}_000000_00001{k}"
        _save(root / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png",
              np.full((*size, 3), 7, np.uint8))
        lab = _label(*size, [0, 7, 18, 255], seed=k)
        _save(root / "gtFine" / "val" / city / f"{stem}_gtFine_labelTrainIds.png", lab)
        labels[stem] = lab
    return labels


def make_imagenet_s(root, size=(9, 11)):
    lab = _label(*size, [0, 3, 50, 1000])
    rgb = np.stack([lab % 256, lab // 256, np.zeros_like(lab)], axis=-1)
    _save(root / "validation-segmentation" / "n01443537" / "ILSVRC2012_val_00000236.png", rgb)
    _save(root / "validation" / "n01443537" / "ILSVRC2012_val_00000236.JPEG",
          np.full((*size, 3), 9, np.uint8))
    return lab


def test_synthetic_reader(tmp_path):
    labels = make_synthetic(tmp_path / "syn")
    src = open_source(tmp_path / "syn")
    assert src.kind == "synthetic" and len(src) == 3
    assert src.class_names == ["background", "dog", "cat"] and src.ignore_index == 255
    s = src.load(1)
    assert np.array_equal(s.label, labels[1]) and s.image.shape == (12, 16, 3)
    assert np.allclose(s.reliability, 20 / 255)


def test_synthetic_reader_without_split_file_uses_manifest(tmp_path):
    make_synthetic(tmp_path / "syn")
    (tmp_path / "syn" / "ImageSets" / "Segmentation" / "train.txt").unlink()
    with open(tmp_path / "syn" / "manifest.jsonl", "a") as f:
        f.write('{"index": 3, "na')  # a run still writing: torn last line
    assert len(open_source(tmp_path / "syn")) == 3


def test_voc_reader_from_any_parent(tmp_path):
    labels = make_voc(tmp_path)
    for root in (tmp_path, tmp_path / "VOCdevkit", tmp_path / "VOCdevkit" / "VOC2012"):
        assert detect_kind(root) == "voc"
        src = open_source(root, split="val")
        assert src.num_classes == 21 and len(src) == 2
        s = src.load(1)
        assert np.array_equal(s.label, labels["2007_000039"]) and s.reliability is None
    with pytest.raises(UserError, match="split file .*train.txt does not exist"):
        open_source(tmp_path, split="train")


def test_cityscapes_reader(tmp_path):
    labels = make_cityscapes(tmp_path / "cs")
    src = open_source(tmp_path / "cs", split="val")
    assert src.kind == "cityscapes" and src.num_classes == 19 and len(src) == 2
    s = src.load(1)
    assert s.name == "bonn_000000_000011"
    assert np.array_equal(s.label, labels["bonn_000000_000011"])


def test_cityscapes_without_train_ids_is_explained(tmp_path):
    make_cityscapes(tmp_path / "cs")
    for p in (tmp_path / "cs" / "gtFine").rglob("*.png"):
        p.unlink()
    with pytest.raises(UserError, match="createTrainIdLabelImgs"):
        open_source(tmp_path / "cs", split="val")


def test_imagenet_s_reader(tmp_path):
    lab = make_imagenet_s(tmp_path / "ImageNetS50")
    src = open_source(tmp_path / "ImageNetS50", split="val")
    assert src.kind == "imagenet-s" and src.num_classes == 51 and src.ignore_index == 1000
    assert np.array_equal(src.load(0).label, lab)
    with pytest.raises(UserError, match="subset"):
        open_source(tmp_path / "ImageNetS50", "imagenet-s", "val").__class__(
            tmp_path / "ImageNetS50", "val", subset=51)


def test_imagenet_s_value_above_subset_is_an_error(tmp_path):
    make_imagenet_s(tmp_path / "ImageNetS300")
    make_imagenet_s(tmp_path / "small")  # same files, read as the 50-class subset
    assert open_source(tmp_path / "ImageNetS300", split="val").load(0).label.max() == 1000
    src = open_source(tmp_path / "small", "imagenet-s50", "val")
    lab = src.labels[0]
    rgb = np.asarray(Image.open(lab)).copy()
    rgb[0, 0] = (51, 0, 0)
    Image.fromarray(rgb).save(lab)
    with pytest.raises(UserError, match=r"ILSVRC2012_val_00000236.png has value\(s\) \[51\]"):
        src.load(0)


def test_bad_label_value_names_the_file(tmp_path):
    make_voc(tmp_path)
    path = tmp_path / "VOCdevkit/VOC2012/SegmentationClass/2007_000032.png"
    lab = np.asarray(Image.open(path)).copy()
    lab[2, 3] = 30
    _save(path, lab, palette=True)
    src = open_source(tmp_path, split="val")
    with pytest.raises(UserError, match=r"2007_000032.png has value\(s\) \[30\] that are "
                       r"neither a class id \(0..20\) nor the ignore index 255"):
        src.load(0)
    # Inside a data loader the error still reaches the main process as one UserError.
    ds = SegmentationDataset([src], src.class_names, AugmentConfig(crop_size=(8, 8)))
    batch = collate_train([ds[(0, 1)], ds[(1, 0)]])
    assert batch["size"] == 1
    with pytest.raises(UserError, match="2007_000032.png"):
        check_batch(batch)


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    make_voc(tmp_path, names=("a", "b", "c"))
    base = tmp_path / "VOCdevkit/VOC2012"
    (base / "JPEGImages/a.jpg").write_bytes(b"\xff\xd8not a jpeg")
    (base / "SegmentationClass/c.png").unlink()
    src = open_source(tmp_path, split="val")
    with pytest.raises(CorruptSample):
        src.load(0)
    ds = SegmentationDataset([src], src.class_names,
                             AugmentConfig(crop_size=(8, 8), base_scale=None))
    items = [ds[(p, i)] for p, i in enumerate(range(3))]
    assert isinstance(items[0], Skipped) and isinstance(items[2], Skipped)
    batch = collate_train(items)
    assert batch["size"] == 1 and len(batch["skipped"]) == 2
    assert batch["image"].shape == (1, 3, 8, 8)


def test_mixing_sources_maps_classes_by_name(tmp_path):
    syn_labels = make_synthetic(tmp_path / "syn")
    make_voc(tmp_path / "voc")
    syn, voc = open_source(tmp_path / "syn"), open_source(tmp_path / "voc", split="val")
    ds = SegmentationDataset([syn, voc], voc.class_names, AugmentConfig())
    assert len(ds) == 5 and ds.ignore_index == 255
    _, label, rel, _ = ds.load(0)
    expected = np.select([syn_labels[0] == 1, syn_labels[0] == 2, syn_labels[0] == 255],
                         [12, 8, 255], 0)  # dog -> 12, cat -> 8 in VOC ids
    assert np.array_equal(label.numpy(), expected)
    assert torch.allclose(rel, torch.full_like(rel, 10 / 255))
    _, label, rel, _ = ds.load(4)
    assert torch.all(rel == 1.0)  # real data has no reliability map: fully reliable
    # Into Cityscapes' classes: background has no counterpart and becomes ignore.
    cs = make_cityscapes(tmp_path / "cs")
    del cs
    city = open_source(tmp_path / "cs", split="val")
    make_synthetic(tmp_path / "street", classes="road,car,")
    street = open_source(tmp_path / "street")
    mixed = SegmentationDataset([street, city], city.class_names, AugmentConfig())
    lab = mixed.load(0)[1].numpy()
    raw = street.load(0).label
    assert np.array_equal(lab, np.select([raw == 1, raw == 2], [0, 13], 255))
    with pytest.raises(UserError, match="shares no class names"):
        SegmentationDataset([syn], city.class_names, AugmentConfig())


def test_mixing_imagenet_s_uses_ignore_1000(tmp_path):
    make_imagenet_s(tmp_path / "ImageNetS50")
    src = open_source(tmp_path / "ImageNetS50", split="val")
    ds = SegmentationDataset([src], src.class_names, AugmentConfig())
    assert ds.ignore_index == 255  # 51 classes fit below 255: ignore is remapped
    lab = ds.load(0)[1]
    assert set(lab.unique().tolist()) <= {0, 3, 50, 255}


def test_augment_moves_image_label_and_reliability_together():
    # Large constant blocks: every map must show the same block at the same place.
    blocks = np.kron(np.arange(12).reshape(3, 4) % 5, np.ones((16, 16), np.int64))
    label = torch.from_numpy(blocks)
    image = torch.stack([label.float() * 40, label.float() * 10, 255 - label.float() * 50])
    rel = label.float() / 10
    cfg = AugmentConfig(crop_size=(40, 56), base_scale=None, scale_range=(0.75, 1.5),
                        flip=0.5, **NO_JITTER)
    for seed in range(12):
        gen = torch.Generator().manual_seed(seed)
        img, lab, r, valid = augment(image, label, rel, cfg, gen, 255)
        red = img[0] * 58.395 + 123.675
        interior = valid & (lab != 255)
        # Away from block edges bilinear (image, reliability) and nearest (label) agree.
        lab_f = lab.float()[None, None]
        flat = (torch.nn.functional.max_pool2d(lab_f, 5, 1, 2)
                == -torch.nn.functional.max_pool2d(-lab_f, 5, 1, 2))[0, 0]
        keep = interior & flat
        keep[:2] = keep[-2:] = keep[:, :2] = keep[:, -2:] = False  # window cut by the crop
        assert keep.sum() > 100
        assert torch.allclose(red[keep], lab[keep].float() * 40, atol=1e-3)
        assert torch.allclose(r[keep], lab[keep].float() / 10, atol=1e-5)
        assert torch.all(lab[~valid] == 255) and torch.all(r[~valid] == 0)
    # The same generator state gives the same view; another gives another.
    a = augment(image, label, rel, cfg, torch.Generator().manual_seed(5), 255)
    b = augment(image, label, rel, cfg, torch.Generator().manual_seed(5), 255)
    c = augment(image, label, rel, cfg, torch.Generator().manual_seed(6), 255)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_crop_larger_than_image_pads_with_ignore():
    label = torch.ones(6, 5, dtype=torch.long)
    image = torch.full((3, 6, 5), 100.0)
    rel = torch.ones(6, 5)
    cfg = AugmentConfig(crop_size=(8, 9), base_scale=None, scale_range=(1, 1), flip=0,
                        **NO_JITTER)
    img, lab, r, valid = augment(image, label, rel, cfg, torch.Generator().manual_seed(0), 255)
    assert valid.sum() == 30 and lab.shape == (8, 9)
    assert torch.all(lab[:6, :5] == 1) and torch.all(lab[6:] == 255) and torch.all(r[:, 5:] == 0)


def test_stream_sampler_resumes_the_same_stream():
    full = list(itertools.islice(iter(StreamSampler(7, seed=3)), 30))
    resumed = list(itertools.islice(iter(StreamSampler(7, seed=3, start=11)), 19))
    assert resumed == full[11:]
    # Each epoch is a permutation of all samples.
    for e in range(4):
        epoch = [i for p, i in full if e * 7 <= p < (e + 1) * 7]
        if len(epoch) == 7:
            assert sorted(epoch) == list(range(7))
    assert [i for _, i in full[:7]] != [i for _, i in full[7:14]]


def test_unknown_layout_and_kind(tmp_path):
    with pytest.raises(UserError, match="cannot tell the dataset layout"):
        detect_kind(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        open_source(tmp_path / "nope")
    with pytest.raises(UserError, match="unknown dataset kind"):
        open_source(tmp_path, "coco")
