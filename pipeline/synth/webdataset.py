"""WebDataset output for large runs: tar chunks of samples plus parquet metadata.

    OUT/webdataset/000012.tar       members <name>.jpg, <name>.seg.png, <name>.rel.png,
                                    <name>.json (the manifest record), in index order
    OUT/parquet/000012.parquet      one row per sample: index, name, prompt, classes, seed, ...

The segmentation member is an 8-bit greyscale PNG whose values are the class ids (0 background,
255 ignore), not a palette image: webdataset's stock decoders (`decode("l8")`, or "pil" then
any channel) give class ids, where a palette would give colours. The parquet files have a folder
of their own, so `pyarrow.parquet.read_table(OUT / "parquet")` reads them as one table.

Chunk j holds the consecutive global indices [j*K, (j+1)*K) (K = samples per tar), so a chunk's
bytes do not depend on how the job is sharded. A chunk is assembled under a temporary name and
renamed into place when complete (parquet first, tar last: the tar marks the chunk finished); a
killed run redoes only its unfinished chunks. Tar members carry fixed metadata (mtime 0, uid 0)
so equal samples give byte-identical tars.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UserError, naming_file
from ..files import tmp_name
from .writer import encode_jpeg, encode_png

SUBDIR = "webdataset"
PARQUET_SUBDIR = "parquet"


def chunk_paths(root: Path, chunk: int) -> tuple[Path, Path]:
    return (Path(root) / SUBDIR / f"{chunk:06d}.tar",
            Path(root) / PARQUET_SUBDIR / f"{chunk:06d}.parquet")


def require_pyarrow() -> None:
    """Refuse `--format webdataset` in one line where pyarrow (its parquet files) is missing;
    a job checks this before it loads the model or writes anything."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise UserError("--format webdataset needs pyarrow: pip install 'attnseg[scale]'") \
            from None


def finished_chunks(root: str | Path) -> set[int]:
    return {int(p.stem) for p in (Path(root) / SUBDIR).glob("*.tar") if p.stem.isdigit()}


class TarChunkWriter:
    """Collects one chunk's samples into a tar and a parquet file, published atomically."""

    def __init__(self, root: str | Path, chunk: int, job: dict):
        require_pyarrow()
        self.tar_path, self.parquet_path = chunk_paths(Path(root), chunk)
        self.tar_path.parent.mkdir(parents=True, exist_ok=True)
        self.parquet_path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp_tar = tmp_name(self.tar_path)
        self._tar = tarfile.open(self._tmp_tar, "w", format=tarfile.USTAR_FORMAT)
        self._rows: list[dict] = []
        self.job = job

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, index: int, name: str, image: np.ndarray, label: np.ndarray,
              reliability: np.ndarray, record: dict) -> None:
        entry = {"index": index, "name": name, **record, "model": self.job["model"],
                 "model_hash": self.job["model_hash"], "preset": self.job["preset"]}
        with naming_file(self.tar_path):
            self._add(f"{name}.jpg", encode_jpeg(image))
            self._add(f"{name}.seg.png", encode_png(label))
            self._add(f"{name}.rel.png", encode_png(reliability))
            self._add(f"{name}.json", json.dumps(entry, sort_keys=True).encode())
        self._rows.append(entry)

    def close(self) -> None:
        """Publish the chunk: parquet, then the tar (whose presence marks it finished)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        with naming_file(self.tar_path):
            self._tar.close()
            with open(self._tmp_tar, "rb+") as f:
                os.fsync(f.fileno())
        table = pa.table({
            "index": [r["index"] for r in self._rows],
            "name": [r["name"] for r in self._rows],
            "prompt": [r.get("prompt", "") for r in self._rows],
            "classes": [json.dumps(r.get("classes", [])) for r in self._rows],
            "seed": [r.get("seed", 0) for r in self._rows],
            "model_hash": [r["model_hash"] for r in self._rows],
            "preset": [r["preset"] for r in self._rows],
        })
        tmp_parquet = tmp_name(self.parquet_path)
        try:
            with naming_file(self.parquet_path):
                pq.write_table(table, tmp_parquet)
            os.replace(tmp_parquet, self.parquet_path)
        finally:
            tmp_parquet.unlink(missing_ok=True)
        os.replace(self._tmp_tar, self.tar_path)

    def abort(self) -> None:
        """Drop the unfinished chunk. Closing the tar flushes its buffer, which fails again on
        a full disk: that error is not the one to report, and the file goes either way."""
        try:
            self._tar.close()
        except OSError:
            pass
        self._tmp_tar.unlink(missing_ok=True)


class WebDatasetIndex:
    """Random access to the samples of a WebDataset output folder, in index order.

    Built once from the tar headers (member name, data offset, size); `read(i)` then seeks
    straight to the sample's bytes.
    """

    def __init__(self, root: str | Path):
        self.entries: list[tuple[Path, str, dict[str, tuple[int, int]]]] = []
        for tar_path in sorted((Path(root) / SUBDIR).glob("*.tar")):
            members: dict[str, dict[str, tuple[int, int]]] = {}
            try:
                with tarfile.open(tar_path) as tar:
                    for m in tar.getmembers():
                        if m.isfile():
                            stem, _, kind = m.name.partition(".")
                            members.setdefault(stem, {})[kind] = (m.offset_data, m.size)
            except (tarfile.TarError, OSError) as e:
                raise UserError(f"{tar_path} is not a readable tar ({e})") from None
            self.entries += [(tar_path, name, members[name]) for name in sorted(members)]

    def __len__(self) -> int:
        return len(self.entries)

    def describe(self, i: int) -> str:
        tar_path, name, _ = self.entries[i]
        return f"{tar_path}:{name}"

    def read(self, i: int) -> tuple[str, dict[str, bytes]]:
        """(sample name, {"jpg"|"seg.png"|"rel.png"|"json": bytes})."""
        tar_path, name, parts = self.entries[i]
        out = {}
        with open(tar_path, "rb") as f:
            for kind, (offset, size) in parts.items():
                f.seek(offset)
                out[kind] = f.read(size)
        return name, out


def iter_webdataset(root: str | Path) -> Iterator[dict]:
    """Samples of a WebDataset output folder in index order: dicts with name, record,
    image (uint8 HxWx3), label (uint8 HxW) and reliability (uint8 HxW)."""
    index = WebDatasetIndex(root)
    for i in range(len(index)):
        name, parts = index.read(i)
        if not {"jpg", "seg.png", "rel.png", "json"} <= set(parts):
            raise UserError(f"{index.describe(i)}: incomplete sample")
        yield {
            "name": name,
            "record": json.loads(parts["json"]),
            "image": np.asarray(Image.open(io.BytesIO(parts["jpg"])).convert("RGB")),
            "label": np.asarray(Image.open(io.BytesIO(parts["seg.png"]))),
            "reliability": np.asarray(Image.open(io.BytesIO(parts["rel.png"]))),
        }
