"""The synthetic dataset on disk: VOC layout plus reliability maps and a manifest.

    OUT/JPEGImages/<name>.jpg                 generated image
    OUT/SegmentationClass/<name>.png          palette PNG: 0 background, class ids, 255 ignore
    OUT/Reliability/<name>.png                8-bit reliability (255 = most reliable)
    OUT/ImageSets/Segmentation/train.txt      sample names, one per line
    OUT/manifest.jsonl                        one JSON record per finished sample
                                              (shard i of n: manifest.shard-IIIII-of-NNNNN.jsonl)
    OUT/job.json                              the job's settings (a resume must match them:
                                              `check_job`)
    OUT/classes.json                          class ids and names

Crash safety: every file is written to a temporary name and renamed into place; a sample's
manifest line is appended (and fsynced) only after its three files are in place, so the
manifest is the list of finished samples. A run killed at any point and started again with the
same arguments skips the finished samples, rewrites any unfinished one, and ends with the same
dataset as an uninterrupted run.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from ...kernels.labels import BACKGROUND_LABEL, IGNORE_LABEL
from ..errors import UserError
from ..files import (
    OutputLock,
    append_line,
    atomic_write_bytes,
    differing_settings,
    folder_lock,
    holds_same_run,
    remove_stale_temporaries,
)
from ..jsonfile import read_json

_MANIFEST_GLOB = "manifest*.jsonl"


def manifest_name(shard: tuple[int, int]) -> str:
    """Each shard appends to its own manifest, so concurrent shards never share a file
    (appends from several hosts to one file are not atomic on network filesystems)."""
    i, n = shard
    return "manifest.jsonl" if n == 1 else f"manifest.shard-{i:05d}-of-{n:05d}.jsonl"


def _complete_lines(data: bytes, path: Path) -> list[dict]:
    """The records of a manifest's complete lines (a torn last line is left out, and cut off
    by the writer that owns it). A damaged complete line is refused in one line naming it: it
    is not the last line's torn write, so something else changed the file."""
    keep = data[: data.rfind(b"\n") + 1]
    records = []
    for number, line in enumerate(keep.split(b"\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode())
        except ValueError:
            rec = None
        if not (isinstance(rec, dict) and isinstance(rec.get("index"), int)
                and isinstance(rec.get("name"), str)):
            raise UserError(f"{path}, line {number}: not a manifest record (the file was "
                            "damaged); delete that line (its sample is then written again) and "
                            "run the same command again")
        records.append(rec)
    return records


def read_manifest_records(root: str | Path) -> list[dict]:
    """Every finished sample of a dataset folder, from all its manifests, in index order."""
    by_index = {}
    for path in sorted(Path(root).glob(_MANIFEST_GLOB)):
        for rec in _complete_lines(path.read_bytes(), path):
            by_index[rec["index"]] = rec
    return [by_index[i] for i in sorted(by_index)]


def read_job(root: str | Path) -> dict | None:
    """`root/job.json` as recorded, None when there is none; one line when it is damaged."""
    path = Path(root) / "job.json"
    if not path.exists():
        return None
    return read_json(path, hint="its samples cannot be matched to a job: use another --out")


def stored_model_hash(root: str | Path) -> str | None:
    """The weights' hash recorded in `root`'s job.json, None if there is none."""
    job = read_job(root)
    return None if job is None else job.get("model_hash")


# What a folder's job record holds besides its settings: how the folder came to be (the
# per-class counts it grew through, its shard count). The last two are recorded only when they
# are not the plain case (one count, one shard), so the job files of such jobs keep their bytes.
_HISTORY_KEYS = ("num_per_class", "grown_from", "shards")
_SHARD_COUNT = re.compile(r"(?:manifest|\.lock)\.shard-\d+-of-(\d+)(?:\.jsonl)?$")


def folder_shard_count(root: str | Path, stored: dict) -> int:
    """How many shards write `root`: its job record's `shards` (absent: one), or for a folder
    from before the count was recorded, the count its manifests' (else its locks') names show."""
    if "shards" in stored:
        return stored["shards"]
    root = Path(root)

    def counts(names) -> set[int]:
        return {1 if n == "manifest.jsonl" else int(m.group(1))
                for n in names if n == "manifest.jsonl" or (m := _SHARD_COUNT.match(n))}

    written = counts(p.name for p in root.glob("manifest*.jsonl"))
    if len(written) > 1:
        raise UserError(f"output folder {root} holds manifests of runs with different shard "
                        f"counts ({', '.join(map(str, sorted(written)))}), so samples may be "
                        "listed twice; use another --out")
    locked = counts(p.name for p in root.glob(".lock.shard-*"))
    return next(iter(written or (locked if len(locked) == 1 else {1})))


def _shards_text(count: int) -> str:
    return "without --shard" if count == 1 else f"with --shard i/{count} ({count} shards)"


def check_job(root: str | Path, job: dict, shard: tuple[int, int]) -> list[int] | None:
    """How the folder `root` stands to the synthesis job `job` (its settings as run_synth
    builds them) run as shard `shard`: None when it holds no job yet; else the per-class counts
    its samples are planned with, oldest first and ending with `job`'s. One count, unless the
    folder grows: `--num-per-class` may grow on a folder with otherwise identical settings (the
    samples there are kept, the new ones take the next indices; see `SamplePlan`).

    Refused in one line: a folder of a different job (naming the settings that differ), of
    another shard count (each shard of a VOC folder appends to its own manifest; a WebDataset
    chunk is one tar whatever the sharding, so those folders take any count), of more samples
    per class (a dataset does not shrink), or a WebDataset folder to grow whose last chunk is
    short (a chunk is a finished tar). The model hash is compared only when `job` has one (it
    needs the model loaded)."""
    root = Path(root)
    stored = read_job(root)
    if stored is None:
        return None
    job = json.loads(json.dumps(job))  # as it reads back (tuples -> lists, int keys -> str)
    skip = set(_HISTORY_KEYS) | ({"model_hash"} if "model_hash" not in job else set())
    there = {k: v for k, v in stored.items() if k not in skip}
    here = {k: v for k, v in job.items() if k not in skip}
    if there != here:
        raise UserError(f"output folder {root} holds a different job (its job.json differs "
                        f"from these settings{differing_settings(there, here)}); use another "
                        "--out")
    count = shard[1] if job.get("format") == "webdataset" else folder_shard_count(root, stored)
    if count != shard[1]:
        run = "runs without --shard" if shard[1] == 1 else f"runs --shard {shard[0]}/{shard[1]}"
        raise UserError(f"output folder {root} is written {_shards_text(count)}; this one "
                        f"{run}: give every run on the folder the same shard count, or use "
                        "another --out")
    counts = [*stored.get("grown_from", []), stored["num_per_class"]]
    n = job["num_per_class"]
    if n < counts[-1]:
        raise UserError(f"output folder {root} holds {counts[-1]} images per class; "
                        f"--num-per-class {n} would shrink it (a dataset only grows): give "
                        f"{counts[-1]} or more, or use another --out")
    if n > counts[-1]:
        total = len(stored["class_names"]) * counts[-1]
        if stored.get("format") == "webdataset" and total % stored["samples_per_tar"]:
            raise UserError(f"output folder {root} holds {total} samples, which end inside a "
                            f"finished tar chunk (--samples-per-tar "
                            f"{stored['samples_per_tar']}): a WebDataset folder grows only "
                            "from whole chunks; use another --out")
        counts.append(n)
    return counts


def open_job(root: Path, job: dict, classes, shard: tuple[int, int],
             counts: list[int] | None) -> tuple[OutputLock, dict]:
    """Start writing shard `shard` of the synthesis job `job` into `root`: under the folder's
    lock, check the folder again (`check_job`: it must plan the samples as `counts`, what the
    caller planned with), take this shard's `OutputLock`, and record the job (a new folder's
    job.json, or a grown count: job.json replaced atomically, the samples there kept). Returns
    the lock (the caller releases it) and the job as the folder records it."""
    with folder_lock(root):
        now = check_job(root, job, shard)
        plain = [job["num_per_class"]]
        if (now or plain) != (counts or plain):
            raise UserError(f"output folder {root} changed while this run started (another run "
                            "began or grew it); run the same command again")
        lock = OutputLock(root, shard)  # a second writer of this folder and shard is refused
        try:
            stored = read_job(root)
            if stored is not None:  # kept as recorded (a folder from before `shards` too)
                grown = {**stored, "num_per_class": now[-1]}
                if len(now) > 1:
                    grown["grown_from"] = now[:-1]
                if grown != stored:
                    atomic_write_bytes(root / "job.json",
                                       json.dumps(grown, indent=1, sort_keys=True).encode())
                job = grown
            job = prepare_output(root, job, classes)
        except BaseException:
            lock.release()
            raise
    return lock, job


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (256 RGB triples, flattened): bits of the id spread over RGB."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def encode_png(array: np.ndarray, palette: list[int] | None = None) -> bytes:
    img = Image.fromarray(array)
    if palette is not None:
        img = img.convert("P")
        img.putpalette(palette)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def encode_jpeg(array: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_split(root: str | Path) -> None:
    """Write ImageSets/Segmentation/train.txt: every finished sample of all shards, in order."""
    names = [r["name"] for r in read_manifest_records(root)]
    split = Path(root) / "ImageSets" / "Segmentation" / "train.txt"
    split.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(split, "".join(n + "\n" for n in names).encode())


def prepare_output(root: Path, job: dict, classes, subdirs: tuple[str, ...] = ()) -> dict:
    """Create the output folder, check or record the job, and return the job as stored.

    A folder that already holds a different job (job.json) is refused.
    """
    job = json.loads(json.dumps(job))  # as it reads back (tuples -> lists, int keys -> str)
    try:
        root.mkdir(parents=True, exist_ok=True)
        for sub in subdirs:
            (root / sub).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"output folder {root} cannot be written: {e.strerror}") from None
    remove_stale_temporaries(root)
    if not holds_same_run(root, "job.json", job, "output folder", "job"):
        # job.json last: its presence means the folder's metadata is complete.
        classes_doc = {str(BACKGROUND_LABEL): "background", str(IGNORE_LABEL): "ignore"}
        classes_doc.update({str(c.id): c.name for c in classes})
        atomic_write_bytes(root / "classes.json", json.dumps(classes_doc).encode())
        atomic_write_bytes(root / "job.json", json.dumps(job, indent=1, sort_keys=True).encode())
    return job


class DatasetWriter:
    """Writes samples into the VOC layout atomically; knows which samples are already done."""

    def __init__(self, root: str | Path, job: dict, classes, shard: tuple[int, int] = (0, 1)):
        self.root = Path(root)
        self.job = prepare_output(self.root, job, classes, (
            "JPEGImages", "SegmentationClass", "Reliability", "ImageSets/Segmentation"))
        self.manifest = self.root / manifest_name(shard)
        self._repair_manifest()
        self.done = {r["index"] for r in read_manifest_records(self.root)}
        self._palette = voc_palette()

    def _repair_manifest(self) -> None:
        """Cut a torn last line (a kill mid-append) off this writer's own manifest."""
        if not self.manifest.exists():
            return
        data = self.manifest.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep != len(data):
            with open(self.manifest, "r+b") as f:
                f.truncate(keep)

    def write(self, index: int, name: str, image: np.ndarray, label: np.ndarray,
              reliability: np.ndarray, record: dict) -> None:
        """Write one finished sample (its files, then its manifest line)."""
        self.write_files(name, image, label, reliability)
        self.record(index, name, record)

    def write_files(self, name: str, image: np.ndarray, label: np.ndarray,
                    reliability: np.ndarray) -> None:
        """A sample's image, label and reliability files (safe to call from several threads);
        the sample counts as written only once `record` has added its manifest line."""
        atomic_write_bytes(self.root / "JPEGImages" / f"{name}.jpg", encode_jpeg(image))
        atomic_write_bytes(self.root / "SegmentationClass" / f"{name}.png",
                           encode_png(label, self._palette))
        atomic_write_bytes(self.root / "Reliability" / f"{name}.png", encode_png(reliability))

    def record(self, index: int, name: str, record: dict) -> None:
        """Append a written sample's manifest line (one thread, in sample order)."""
        entry = {"index": index, "name": name, **record, "model": self.job["model"],
                 "model_hash": self.job["model_hash"], "preset": self.job["preset"],
                 "thresholds": self.job["mask"]}
        append_line(self.manifest, (json.dumps(entry, sort_keys=True) + "\n").encode())
        self.done.add(index)

    def finish(self) -> None:
        write_split(self.root)
