"""What the trainer feeds on: augmentation, the dataset mixing several sources, and the seeded
sample stream.

Several sources (`data`) mix into one :class:`SegmentationDataset`: every source's label ids
are mapped *by class name* into the run's class list (`data.class_mapping`). Augmentation
(:func:`augment`) is plain torch, applied with the same random draw to image, label,
reliability and the valid-pixel mask: random scale, random crop (padding with ignore),
horizontal flip, colour jitter. Its randomness comes from a generator seeded by
``(seed, stream position)``, so a sample's augmentation does not depend on worker count,
batch size or resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..settings import PositiveFloat, PositiveInt, UnitFloat
from .sources import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CorruptSample,
    RawSample,
    SegSource,
    class_mapping,
    default_ignore_index,
)


@dataclass
class AugmentConfig:
    """Training augmentation (mmsegmentation's usual recipe, in plain torch).

    The image is first rescaled so that it fits ``base_scale = (long, short)`` (keeping its
    aspect ratio; ``None`` keeps its size), then by a random factor in ``scale_range``, then a
    ``crop_size`` window is cut at a random place (padded with ignore where the image is
    smaller), flipped horizontally with probability ``flip``, and its colours jittered.
    """

    crop_size: tuple[PositiveInt, PositiveInt] = (512, 512)
    base_scale: tuple[PositiveInt, PositiveInt] | None = (2048, 512)
    scale_range: tuple[PositiveFloat, PositiveFloat] = (0.5, 2.0)
    flip: UnitFloat = 0.5
    brightness: UnitFloat = 0.125  # add U(-b, b) * 255
    contrast: UnitFloat = 0.25  # scale around the mean by U(1 - c, 1 + c)
    saturation: UnitFloat = 0.25  # blend with the grey image by U(1 - s, 1 + s)

    def validate(self) -> None:
        if min(self.crop_size) < 1:
            raise UserError(f"augment.crop_size {self.crop_size} must be positive")
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise UserError(f"augment.scale_range {self.scale_range} must satisfy 0 < lo <= hi")
        if not 0 <= self.flip <= 1:
            raise UserError("augment.flip must be a probability")


def rescale_size(h: int, w: int, scale: tuple[int, int] | None) -> tuple[int, int]:
    """Size after fitting (h, w) into ``scale = (long, short)`` keeping the aspect ratio
    (mmsegmentation's ``Resize(keep_ratio=True)``)."""
    if scale is None:
        return h, w
    long_max, short_max = max(scale), min(scale)
    factor = min(long_max / max(h, w), short_max / min(h, w))
    return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=gen).item()


def to_tensors(sample: RawSample, lut: np.ndarray, target_ignore: int):
    """Image float [3, H, W] (0..255), label int64 [H, W] in the run's ids, reliability float
    [H, W] (ones when the source has none)."""
    image = torch.from_numpy(np.array(sample.image)).permute(2, 0, 1).float()
    label = torch.from_numpy(lut[np.minimum(sample.label, len(lut) - 1)])
    if sample.reliability is None:
        rel = torch.ones(label.shape, dtype=torch.float32)
    else:
        rel = torch.from_numpy(np.array(sample.reliability, dtype=np.float32))
    return image, label, rel


def normalize_image(image: torch.Tensor) -> torch.Tensor:
    """(x - ImageNet mean) / std for a float [..., 3, H, W] image in 0..255."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype, device=image.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype, device=image.device)[:, None, None]
    return (image - mean) / std


def augment(image: torch.Tensor, label: torch.Tensor, rel: torch.Tensor, cfg: AugmentConfig,
            gen: torch.Generator, ignore_index: int):
    """One random training view: rescale, crop (pad with ignore), flip, colour jitter.

    Returns the normalised image [3, h, w], label [h, w], reliability [h, w] and ``valid``
    [h, w] (False on padding). One draw of ``gen`` decides the geometry for all four maps.
    """
    _, h, w = image.shape
    bh, bw = rescale_size(h, w, cfg.base_scale)
    factor = _uniform(gen, *cfg.scale_range)
    nh, nw = max(1, int(bh * factor + 0.5)), max(1, int(bw * factor + 0.5))
    if (nh, nw) != (h, w):
        image = F.interpolate(image[None], size=(nh, nw), mode="bilinear",
                              align_corners=False)[0]
        rel = F.interpolate(rel[None, None], size=(nh, nw), mode="bilinear",
                            align_corners=False)[0, 0]
        # Label ids (< 2^24) survive the float round trip exactly. "nearest-exact" samples at
        # pixel centres, as bilinear does, so label and image stay aligned.
        label = F.interpolate(label[None, None].float(), size=(nh, nw),
                              mode="nearest-exact")[0, 0].long()
    ch, cw = cfg.crop_size
    y0 = int(torch.randint(0, max(nh - ch, 0) + 1, (), generator=gen))
    x0 = int(torch.randint(0, max(nw - cw, 0) + 1, (), generator=gen))
    image = image[:, y0 : y0 + ch, x0 : x0 + cw]
    label = label[y0 : y0 + ch, x0 : x0 + cw]
    rel = rel[y0 : y0 + ch, x0 : x0 + cw]
    valid = torch.ones(label.shape, dtype=torch.bool)
    ph, pw = ch - label.shape[0], cw - label.shape[1]
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph), value=0.0)
        label = F.pad(label, (0, pw, 0, ph), value=ignore_index)
        rel = F.pad(rel, (0, pw, 0, ph), value=0.0)
        valid = F.pad(valid, (0, pw, 0, ph), value=False)
    if torch.rand((), generator=gen).item() < cfg.flip:
        image, label, rel, valid = (image.flip(-1), label.flip(-1), rel.flip(-1),
                                    valid.flip(-1))
    image = colour_jitter(image, cfg, gen)
    return normalize_image(image), label, rel, valid


def colour_jitter(image: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation jitter of a float [3, H, W] image in 0..255."""
    draws = torch.rand(3, generator=gen).tolist()
    x = image + (2 * draws[0] - 1) * cfg.brightness * 255.0
    mean = x.mean()
    x = (x - mean) * (1 + (2 * draws[1] - 1) * cfg.contrast) + mean
    grey = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
    x = (x - grey) * (1 + (2 * draws[2] - 1) * cfg.saturation) + grey
    return x.clamp(0.0, 255.0)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends only on ``parts`` (e.g. run seed, stream position)."""
    state = np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(2)
    return int(state[0]) | (int(state[1]) & 0x7FFFFFFF) << 32


class SegmentationDataset(torch.utils.data.Dataset):
    """Several sources mixed into one list, labels mapped into the run's classes.

    ``dataset[(position, index)]`` is sample ``index`` augmented with the randomness of stream
    ``position`` (see :class:`StreamSampler`), or a :class:`Skipped` marker for a corrupt
    sample. Bad label values come back as a :class:`Failed` marker (the loader's main process
    raises it as a one-line UserError; an exception inside a worker would lose that form).
    """

    def __init__(self, sources: list[SegSource], class_names: list[str], augment_cfg:
                 AugmentConfig | None, seed: int = 0):
        if not sources:
            raise UserError("no data sources given")
        self.sources = sources
        self.class_names = list(class_names)
        self.ignore_index = default_ignore_index(len(class_names))
        self.luts = [class_mapping(s.class_names, self.class_names, s.ignore_index,
                                   self.ignore_index, f"data {s.root}") for s in sources]
        self.offsets = np.cumsum([0] + [len(s) for s in sources])
        if self.offsets[-1] == 0:
            raise UserError("the data sources hold no samples")
        self.augment_cfg = augment_cfg
        self.seed = seed

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        k = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return k, index - int(self.offsets[k])

    def load(self, index: int):
        """(image, label, reliability) tensors in the run's label ids, unaugmented."""
        k, i = self.locate(index)
        sample = self.sources[k].load(i)
        return (*to_tensors(sample, self.luts[k], self.ignore_index), sample.name)

    def __getitem__(self, key):
        position, index = key
        try:
            image, label, rel, _ = self.load(index)
        except CorruptSample as e:
            return Skipped(str(e))
        except UserError as e:
            return Failed(str(e))
        gen = torch.Generator().manual_seed(derive_seed(self.seed, position))
        image, label, rel, valid = augment(image, label, rel, self.augment_cfg, gen,
                                           self.ignore_index)
        return {"image": image, "label": label, "reliability": rel, "valid": valid}


@dataclass
class Skipped:
    """A sample that could not be read (missing or undecodable file)."""

    reason: str


@dataclass
class Failed:
    """A sample with invalid label values: the run must stop with this message."""

    message: str


def collate_train(items: list) -> dict:
    """Stack the readable samples and list the skipped ones. A failure is passed on as
    ``batch["failed"]`` (this may run in a worker process, where an exception would reach the
    main process wrapped in a traceback); :func:`check_batch` raises it."""
    failed = [it.message for it in items if isinstance(it, Failed)]
    good = [it for it in items if isinstance(it, dict)]
    skipped = [it.reason for it in items if isinstance(it, Skipped)]
    batch = {"skipped": skipped, "size": len(good), "failed": failed[0] if failed else None}
    if good:
        for key in ("image", "label", "reliability", "valid"):
            batch[key] = torch.stack([g[key] for g in good])
    return batch


def check_batch(batch: dict) -> dict:
    """Raise a batch's first bad-label failure as a UserError (in the main process)."""
    if batch.get("failed"):
        raise UserError(batch["failed"])
    return batch


class StreamSampler(torch.utils.data.Sampler):
    """An endless stream of ``(position, index)`` pairs from ``start``: position ``p`` holds
    sample ``perm_e[p mod N]`` where ``perm_e`` is epoch ``e = p // N``'s shuffle, seeded by
    (seed, e). Resuming at a position replays exactly the same stream."""

    def __init__(self, size: int, seed: int, start: int = 0):
        self.size, self.seed, self.start = size, seed, start

    def permutation(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(derive_seed(self.seed, 0x5EED, epoch))
        return torch.randperm(self.size, generator=gen)

    def __iter__(self):
        p = self.start
        epoch, perm = -1, None
        while True:
            e = p // self.size
            if e != epoch:
                epoch, perm = e, self.permutation(e)
            yield (p, int(perm[p % self.size]))
            p += 1
