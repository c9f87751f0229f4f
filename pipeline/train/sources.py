"""Segmentation data on disk for training and evaluation: readers and class mapping.

A *source* is one dataset on disk behind a small interface (:class:`SegSource`): its length, its
class names (index = label id), its ignore index, and ``load(i)`` returning a
:class:`RawSample` (image, label ids, optional reliability). Readers:

=============  ==============================================================================
synthetic      attnseg's own output (VOC layout + ``Reliability/`` + ``manifest.jsonl`` +
               ``classes.json``), see ``pipeline/synth/writer.py``
voc            PASCAL VOC 2012 (``VOCdevkit/VOC2012``: ``JPEGImages``, ``SegmentationClass``
               palette PNGs, ``ImageSets/Segmentation/<split>.txt``; 21 classes, ignore 255)
cityscapes     ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with
               ``gtFine/<split>/<city>/*_gtFine_labelTrainIds.png`` (19 classes, ignore 255)
imagenet-s     ImageNet-S 50/300/919 (``validation/`` + ``validation-segmentation/`` or
               ``train-semi/`` + ``train-semi-segmentation/``; class = R + 256 G; 0 is
               "others"; ignore 1000)
=============  ==============================================================================

Another source (e.g. WebDataset shards) only needs ``__len__``, ``class_names``,
``ignore_index``, ``describe(i)`` and ``load(i)``.

Several sources mix into one :class:`SegmentationDataset`: every source's label ids are mapped
*by class name* into the run's class list (names compared without case, spaces, ``_`` or
``-``), and a source's classes that the run does not have become "ignore". Unreadable or corrupt
samples are skipped and counted (the training loop reports how many); a label value that is
neither a class of its source nor its ignore index is a :class:`UserError` naming the file.

What the trainer makes of the samples (augmentation, the mixed dataset, the seeded sample
stream) is `train.samples`.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ...kernels.labels import IGNORE_LABEL
from ..errors import UserError
from ..jsonfile import read_json
from ..synth.webdataset import WebDatasetIndex
from ..synth.writer import read_manifest_records

# SegFormer, ConvNeXt and mmsegmentation all normalise with the ImageNet statistics.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

VOC_CLASS_NAMES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
]
# Cityscapes train ids 0..18 in order (cityscapesscripts' labels.py, trainId column).
CITYSCAPES_CLASS_NAMES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
]
DATASET_KINDS = ("auto", "synthetic", "webdataset", "voc", "cityscapes", "imagenet-s",
                 "imagenet-s50", "imagenet-s300", "imagenet-s919")
# Errors that mean "this file cannot be decoded": the sample is skipped, not fatal.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class CorruptSample(Exception):
    """A sample whose files are missing or cannot be decoded; readers raise it, loaders count
    and skip it."""


@dataclass
class RawSample:
    """One decoded sample in its source's own label ids."""

    name: str
    image: np.ndarray  # uint8 [H, W, 3] RGB
    label: np.ndarray  # int64 [H, W]: class ids of the source, or its ignore index
    reliability: np.ndarray | None  # float32 [H, W] in [0, 1], None if the source has none


def normalize_name(name: str) -> str:
    """Class names compare without case, spaces, underscores or hyphens ("tv monitor" ==
    "tvmonitor", "traffic_light" == "traffic light")."""
    return re.sub(r"[\s_\-]+", "", name.lower())


def generic_names(names: list[str]) -> bool:
    """True for placeholder class names (``class<i>``): such classes can only match by id."""
    return all(re.fullmatch(r"class\d+", n) for n in names[1:])


def _open_rgb(path, data: bytes | None = None) -> np.ndarray:
    """An RGB image from `path`, or from `data` (then `path` only names it in messages)."""
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise CorruptSample(f"{path}: missing") from None
    except DECODE_ERRORS as e:
        raise CorruptSample(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def _open_index_png(path, data: bytes | None = None) -> np.ndarray:
    """A label PNG whose pixel values are class ids (palette "P" or grayscale "L"/"I")."""
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as im:
            if im.mode not in ("P", "L", "I", "I;16"):
                raise UserError(f"label file {path} has mode {im.mode}; expected a palette or "
                                "grayscale PNG of class ids")
            return np.asarray(im).astype(np.int64)
    except FileNotFoundError:
        raise CorruptSample(f"{path}: missing") from None
    except DECODE_ERRORS as e:
        raise CorruptSample(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def _open_rgb16_label(path: Path) -> np.ndarray:
    """ImageNet-S labels: RGB PNGs with class = R + 256 * G."""
    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB")).astype(np.int64)
    except FileNotFoundError:
        raise CorruptSample(f"{path}: missing") from None
    except DECODE_ERRORS as e:
        raise CorruptSample(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    return rgb[..., 0] + 256 * rgb[..., 1]


def check_label_values(label: np.ndarray, num_classes: int, ignore_index: int, path) -> None:
    """A clear error naming the file if a label value is neither a class id nor the ignore."""
    bad = (label >= num_classes) & (label != ignore_index) | (label < 0)
    if bad.any():
        values = np.unique(label[bad])[:8].tolist()
        raise UserError(
            f"label file {path} has value(s) {values} that are neither a class id "
            f"(0..{num_classes - 1}) nor the ignore index {ignore_index}"
        )


def _check_sizes(path: Path, image: np.ndarray, *others: np.ndarray) -> None:
    for other in others:
        if other.shape[:2] != image.shape[:2]:
            raise CorruptSample(f"{path}: size {other.shape[:2]} differs from its image's "
                                f"{image.shape[:2]}")


class SegSource:
    """A dataset on disk: ``len``, ``class_names`` (index = label id), ``ignore_index``,
    ``describe(i)`` (a path for messages) and ``load(i) -> RawSample``.

    ``load`` raises :class:`CorruptSample` for missing or undecodable files and
    :class:`UserError` for label values that are neither a class nor the ignore index.
    """

    kind = "?"
    root: Path
    class_names: list[str]
    ignore_index: int

    def __len__(self) -> int:
        raise NotImplementedError

    def describe(self, i: int) -> str:
        raise NotImplementedError

    def load(self, i: int) -> RawSample:
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _read_split(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"split file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"split file {path} is damaged: it is not UTF-8 text (one sample "
                        "name a line)") from None
    if "\0" in text:  # binary damage that happens to decode
        raise UserError(f"split file {path} is damaged: it holds NUL bytes (one sample name "
                        "a line)")
    return [line.split()[0] for line in text.splitlines() if line.strip()]


# Label ids a classes.json may name (the ImageNet-S ids, R + 256 G, stay far below).
_MAX_LABEL_ID = 1 << 16


def read_class_names(classes_file: Path) -> list[str]:
    """Class names by label id from a classes.json ({"id": "name", ...}; the ignore id 255
    left out, ids it skips named class<i>); a damaged file is refused in one line naming it."""
    doc = read_json(classes_file)
    try:
        ids = {int(k): v for k, v in doc.items()}
    except ValueError:
        raise UserError(f"{classes_file} is damaged: its keys must be label ids (\"0\", "
                        "\"1\", ...)") from None
    ids.pop(IGNORE_LABEL, None)
    if not ids:
        raise UserError(f"{classes_file} is damaged: it names no class")
    if not all(isinstance(v, str) for v in ids.values()):
        raise UserError(f"{classes_file} is damaged: its values must be class names (strings)")
    outside = [k for k in ids if not 0 <= k < _MAX_LABEL_ID]
    if outside:
        raise UserError(f"{classes_file} is damaged: label id {outside[0]} is outside "
                        f"0..{_MAX_LABEL_ID - 1}")
    return [ids.get(i, f"class{i}") for i in range(max(ids) + 1)]


def _synthetic_class_names(root: Path) -> list[str]:
    """Class names by label id from an attnseg output folder's classes.json."""
    classes_file = root / "classes.json"
    if not classes_file.is_file():
        raise UserError(f"{root} is not an attnseg synthetic dataset (no classes.json)")
    return read_class_names(classes_file)


class SyntheticSource(SegSource):
    """attnseg's synthetic output: JPEG, palette label PNG and reliability PNG per sample.

    The sample list is ``ImageSets/Segmentation/<split>.txt`` when it exists, else (for the
    training split of a dataset still being written) the finished samples in the manifest.
    """

    kind = "synthetic"

    def __init__(self, root: str | Path, split: str = "train"):
        self.root = Path(root)
        self.class_names = _synthetic_class_names(self.root)
        self.ignore_index = IGNORE_LABEL
        split_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if split_file.is_file():
            self.names = _read_split(split_file)
        elif split == "train" and any(self.root.glob("manifest*.jsonl")):
            self.names = [r["name"] for r in read_manifest_records(self.root)]
        else:
            raise UserError(f"split file {split_file} does not exist")

    def __len__(self) -> int:
        return len(self.names)

    def describe(self, i: int) -> str:
        return str(self.root / "SegmentationClass" / f"{self.names[i]}.png")

    def load(self, i: int) -> RawSample:
        name = self.names[i]
        image = _open_rgb(self.root / "JPEGImages" / f"{name}.jpg")
        label_path = self.root / "SegmentationClass" / f"{name}.png"
        label = _open_index_png(label_path)
        rel_path = self.root / "Reliability" / f"{name}.png"
        try:
            with Image.open(rel_path) as im:
                rel = np.asarray(im.convert("L")).astype(np.float32) / 255.0
        except FileNotFoundError:
            raise CorruptSample(f"{rel_path}: missing") from None
        except DECODE_ERRORS as e:
            raise CorruptSample(f"{rel_path}: unreadable ({type(e).__name__})") from None
        _check_sizes(label_path, image, label, rel)
        check_label_values(label, self.num_classes, self.ignore_index, label_path)
        return RawSample(name, image, label, rel)


class WebDatasetSource(SegSource):
    """attnseg's WebDataset output (`synth --format webdataset`): samples read straight out of
    the tar chunks by byte offset, so random access needs no unpacking."""

    kind = "webdataset"

    def __init__(self, root: str | Path, split: str = "train"):
        if split != "train":
            raise UserError(f"a WebDataset output has only the train split, not {split!r}")
        self.root = Path(root)
        self.class_names = _synthetic_class_names(self.root)
        self.ignore_index = IGNORE_LABEL
        self.index = WebDatasetIndex(self.root)

    def __len__(self) -> int:
        return len(self.index)

    def describe(self, i: int) -> str:
        return self.index.describe(i)

    def load(self, i: int) -> RawSample:
        name, parts = self.index.read(i)
        where = self.index.describe(i)
        if not {"jpg", "seg.png", "rel.png"} <= set(parts):
            raise CorruptSample(f"{where}: incomplete sample")
        image = _open_rgb(f"{where}.jpg", parts["jpg"])
        label = _open_index_png(f"{where}.seg.png", parts["seg.png"])
        rel = _open_index_png(f"{where}.rel.png", parts["rel.png"]).astype(np.float32) / 255.0
        _check_sizes(Path(f"{where}.seg.png"), image, label, rel)
        check_label_values(label, self.num_classes, self.ignore_index, f"{where}.seg.png")
        return RawSample(name, image, label, rel)


def _find_voc_root(root: Path) -> Path:
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir() and (cand / "ImageSets" / "Segmentation").is_dir():
            return cand
    raise UserError(f"{root} is not a PASCAL VOC 2012 folder (expected VOCdevkit/VOC2012 with "
                    "JPEGImages/ and ImageSets/Segmentation/)")


class VOCSource(SegSource):
    """PASCAL VOC 2012 segmentation (``root`` is ``VOCdevkit/VOC2012`` or a parent of it).

    Labels are palette PNGs in ``SegmentationClass/`` (``SegmentationClassAug/`` for the
    ``trainaug`` split when present); 0 is background, 255 the void border (ignored).
    """

    kind = "voc"

    def __init__(self, root: str | Path, split: str = "val"):
        self.root = _find_voc_root(Path(root))
        self.class_names = list(VOC_CLASS_NAMES)
        self.ignore_index = IGNORE_LABEL
        self.names = _read_split(self.root / "ImageSets" / "Segmentation" / f"{split}.txt")
        aug = self.root / "SegmentationClassAug"
        self.label_dir = aug if split == "trainaug" and aug.is_dir() else (
            self.root / "SegmentationClass")

    def __len__(self) -> int:
        return len(self.names)

    def describe(self, i: int) -> str:
        return str(self.label_dir / f"{self.names[i]}.png")

    def load(self, i: int) -> RawSample:
        name = self.names[i]
        image = _open_rgb(self.root / "JPEGImages" / f"{name}.jpg")
        label_path = self.label_dir / f"{name}.png"
        label = _open_index_png(label_path)
        _check_sizes(label_path, image, label)
        check_label_values(label, self.num_classes, self.ignore_index, label_path)
        return RawSample(name, image, label, None)


class CityscapesSource(SegSource):
    """Cityscapes fine annotations as train ids (``*_gtFine_labelTrainIds.png``, made by
    cityscapesscripts' ``createTrainIdLabelImgs``): 19 classes, 255 ignored."""

    kind = "cityscapes"

    def __init__(self, root: str | Path, split: str = "val"):
        self.root = Path(root)
        img_dir = self.root / "leftImg8bit" / split
        if not img_dir.is_dir():
            raise UserError(f"{self.root} is not a Cityscapes folder (no leftImg8bit/{split}/)")
        self.class_names = list(CITYSCAPES_CLASS_NAMES)
        self.ignore_index = IGNORE_LABEL
        self.images = sorted(img_dir.glob("*/*_leftImg8bit.png"))
        if not self.images:
            raise UserError(f"no *_leftImg8bit.png images under {img_dir}")
        self.labels = [
            self.root / "gtFine" / split / p.parent.name
            / p.name.replace("_leftImg8bit.png", "_gtFine_labelTrainIds.png")
            for p in self.images
        ]
        if not any(p.is_file() for p in self.labels[:50]):
            raise UserError(
                f"no *_gtFine_labelTrainIds.png under {self.root / 'gtFine' / split}; create "
                "them with cityscapesscripts' createTrainIdLabelImgs"
            )

    def __len__(self) -> int:
        return len(self.images)

    def describe(self, i: int) -> str:
        return str(self.labels[i])

    def load(self, i: int) -> RawSample:
        image = _open_rgb(self.images[i])
        label = _open_index_png(self.labels[i])
        _check_sizes(self.labels[i], image, label)
        check_label_values(label, self.num_classes, self.ignore_index, self.labels[i])
        return RawSample(self.images[i].name.replace("_leftImg8bit.png", ""), image, label, None)


_IMAGENET_S_SPLITS = {
    "val": ("validation", "validation-segmentation"),
    "validation": ("validation", "validation-segmentation"),
    "train-semi": ("train-semi", "train-semi-segmentation"),
    "train": ("train-semi", "train-semi-segmentation"),
}


class ImageNetSSource(SegSource):
    """ImageNet-S (50, 300 or 919 classes plus 0 = "others"): labels are RGB PNGs with
    class = R + 256 * G, and 1000 marks ignored pixels.

    ``root`` is the ``ImageNetS50``/``ImageNetS300``/``ImageNetS919`` folder; the subset is read
    from its name unless given. Class names come from a ``categories.txt`` (one per line, in id
    order, without "others") in the root when present, else they are ``class<i>``.
    """

    kind = "imagenet-s"

    def __init__(self, root: str | Path, split: str = "val", subset: int | None = None):
        self.root = Path(root)
        if subset is None:
            m = re.search(r"(50|300|919)$", self.root.name)
            if not m:
                raise UserError(f"cannot tell the ImageNet-S subset from the folder name "
                                f"{self.root.name!r}; use --dataset imagenet-s50/300/919")
            subset = int(m.group(1))
        if subset not in (50, 300, 919):
            raise UserError(f"ImageNet-S subset must be 50, 300 or 919, not {subset}")
        if split not in _IMAGENET_S_SPLITS:
            raise UserError(f"ImageNet-S split must be one of {sorted(_IMAGENET_S_SPLITS)}")
        img_sub, ann_sub = _IMAGENET_S_SPLITS[split]
        self.img_dir, self.ann_dir = self.root / img_sub, self.root / ann_sub
        if not self.ann_dir.is_dir():
            raise UserError(f"{self.root} is not an ImageNet-S folder (no {ann_sub}/)")
        self.ignore_index = 1000
        names = [f"class{i}" for i in range(subset + 1)]
        names[0] = "others"
        cats = self.root / "categories.txt"
        if cats.is_file():
            listed = [x.strip() for x in cats.read_text().splitlines() if x.strip()]
            if len(listed) != subset:
                raise UserError(f"{cats} lists {len(listed)} classes; expected {subset}")
            names[1:] = listed
        self.class_names = names
        self.labels = sorted(self.ann_dir.glob("*/*.png"))
        if not self.labels:
            raise UserError(f"no label PNGs under {self.ann_dir}")

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self, i: int) -> str:
        return str(self.labels[i])

    def load(self, i: int) -> RawSample:
        lab_path = self.labels[i]
        image = _open_rgb(self.img_dir / lab_path.parent.name / f"{lab_path.stem}.JPEG")
        label = _open_rgb16_label(lab_path)
        _check_sizes(lab_path, image, label)
        check_label_values(label, self.num_classes, self.ignore_index, lab_path)
        return RawSample(lab_path.stem, image, label, None)


def detect_kind(root: str | Path) -> str:
    """Which reader a folder needs, from its layout."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist")
    if (root / "classes.json").is_file() and (root / "SegmentationClass").is_dir():
        return "synthetic"
    if (root / "classes.json").is_file() and (root / "webdataset").is_dir():
        return "webdataset"
    if (root / "leftImg8bit").is_dir():
        return "cityscapes"
    if (root / "validation-segmentation").is_dir() or (root / "train-semi-segmentation").is_dir():
        return "imagenet-s"
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir() and (cand / "SegmentationClass").is_dir():
            return "voc"
    raise UserError(f"cannot tell the dataset layout of {root} (synthetic, VOC, Cityscapes or "
                    "ImageNet-S); pass --dataset")


def open_source(root: str | Path, kind: str = "auto", split: str = "train") -> SegSource:
    """The reader for one data folder (``kind`` "auto" detects the layout)."""
    if kind not in DATASET_KINDS:
        raise UserError(f"unknown dataset kind {kind!r}; choose from {list(DATASET_KINDS)}")
    if kind == "auto":
        kind = detect_kind(root)
    elif not Path(root).is_dir():
        raise UserError(f"data folder {root} does not exist")
    if kind == "synthetic":
        return SyntheticSource(root, split)
    if kind == "webdataset":
        return WebDatasetSource(root, split)
    if kind == "voc":
        return VOCSource(root, split)
    if kind == "cityscapes":
        return CityscapesSource(root, split)
    subset = int(kind[len("imagenet-s"):]) if kind != "imagenet-s" else None
    return ImageNetSSource(root, split, subset)


def class_mapping(source_names: list[str], target_names: list[str], source_ignore: int,
                  target_ignore: int, what: str) -> np.ndarray:
    """Lookup table from a source's label ids to the run's (by class name; classes the run
    lacks and the source's ignore map to ``target_ignore``).

    Generic names (``class<i>``, e.g. ImageNet-S without a categories file) match by id, which
    needs equal class counts.
    """
    size = max(len(source_names), source_ignore + 1)
    lut = np.full(size, target_ignore, dtype=np.int64)
    if source_names == target_names or generic_names(source_names) or generic_names(
            target_names):
        if len(source_names) != len(target_names):
            raise UserError(f"{what} has {len(source_names)} classes, the run has "
                            f"{len(target_names)}, and their names cannot be matched")
        lut[: len(source_names)] = np.arange(len(source_names))
        return lut
    index = {normalize_name(n): i for i, n in enumerate(target_names)}
    matched = 0
    for i, n in enumerate(source_names):
        j = index.get(normalize_name(n))
        if j is not None:
            lut[i] = j
            matched += 1
    if matched == 0:
        raise UserError(f"{what} shares no class names with the run's classes "
                        f"({target_names[:5]}...)")
    return lut


def default_ignore_index(num_classes: int) -> int:
    """255 when every class id fits below it, else 1000 (ImageNet-S's convention)."""
    if num_classes > 1000:
        raise UserError(f"{num_classes} classes: at most 1000 are supported")
    return IGNORE_LABEL if num_classes <= IGNORE_LABEL else 1000
