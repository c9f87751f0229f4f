"""On-disk engine folders: the key that says what an engine was built from, its manifest, and
the reuse-or-rebuild decision.

An engine folder holds the backend's files (ONNX models, TensorRT plans, a timing cache) and
`engine.json`: the key, the I/O description of every sub-network, the UNet's map layout and the
size and SHA-256 of every file. A folder is reused when its key equals the requested one and
every file is intact; otherwise it is rebuilt. Folders are written under a temporary name and
renamed into place, so a crash never leaves a half-built engine behind a valid manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..pipeline.errors import UserError
from ..pipeline.files import file_sha256, remove_stale_temporaries, tmp_name

MANIFEST = "engine.json"
# Bumped when the folder layout or the meaning of a manifest field changes.
FORMAT_VERSION = 1


def attnseg_version() -> str:
    try:
        from importlib.metadata import version

        return version("attnseg")
    except Exception:  # running from a source tree that is not installed
        return "0+unknown"


def lora_fingerprint(folder: str | Path) -> str:
    """SHA-256 over a LoRA folder's safetensors files (names and contents)."""
    folder = Path(folder)
    files = [folder] if folder.is_file() else sorted(folder.rglob("*.safetensors"))
    if not files:
        raise UserError(f"LoRA {folder} has no .safetensors file")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine's files depend on; two builds with equal keys are interchangeable."""

    backend: str
    model: str
    model_hash: str  # fingerprint of the weights the engine holds (LoRA merged)
    base_model_hash: str  # fingerprint before the LoRA
    loras: tuple[tuple[str, str], ...]  # (path, content fingerprint)
    height: int
    width: int
    max_batch: int
    max_classes: int
    dtype: str
    opset: int
    maps: dict = field(hash=False)  # MapGraphSpec.to_dict()
    attnseg_version: str = ""
    toolchain: dict = field(default_factory=dict, hash=False)  # library versions, GPU arch

    def to_dict(self) -> dict:
        return {
            "backend": self.backend, "model": self.model, "model_hash": self.model_hash,
            "base_model_hash": self.base_model_hash, "loras": [list(x) for x in self.loras],
            "height": self.height, "width": self.width, "max_batch": self.max_batch,
            "max_classes": self.max_classes, "dtype": self.dtype, "opset": self.opset,
            "maps": self.maps, "attnseg_version": self.attnseg_version,
            "toolchain": self.toolchain,
        }

    @classmethod
    def from_dict(cls, d: dict) -> EngineKey:
        return cls(
            backend=d["backend"], model=d["model"], model_hash=d["model_hash"],
            base_model_hash=d["base_model_hash"],
            loras=tuple((str(a), str(b)) for a, b in d["loras"]), height=int(d["height"]),
            width=int(d["width"]), max_batch=int(d["max_batch"]),
            max_classes=int(d["max_classes"]), dtype=d["dtype"], opset=int(d["opset"]),
            maps=d["maps"], attnseg_version=d.get("attnseg_version", ""),
            toolchain=d.get("toolchain", {}),
        )

    def digest(self) -> str:
        """A short hash of the key (names cache folders)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def differences(self, other: EngineKey) -> list[str]:
        """Names of the fields in which `other` differs, for error messages."""
        a, b = self.to_dict(), other.to_dict()
        return [k for k in a if a[k] != b.get(k)]


def default_cache_root() -> Path:
    """Where `attnseg synth --backend X` keeps engines: $ATTNSEG_ENGINE_CACHE or
    ~/.cache/attnseg/engines."""
    env = os.environ.get("ATTNSEG_ENGINE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "attnseg" / "engines"


def read_manifest(folder: Path) -> dict:
    """The folder's manifest; a UserError naming the folder if it is missing or unreadable."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise UserError(f"{folder} is not an attnseg engine folder (no {MANIFEST}); build one "
                        "with `attnseg engine build`")
    try:
        manifest = json.loads(path.read_text())
        EngineKey.from_dict(manifest["key"])
        manifest["parts"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"engine manifest {path} is corrupt ({type(e).__name__}: {e}); "
                        "rebuild with `attnseg engine build`") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise UserError(f"engine {folder} has format {manifest.get('format')}, this attnseg "
                        f"reads format {FORMAT_VERSION}; rebuild with `attnseg engine build`")
    return manifest


def check_engine_job(folder: str | Path, backend: str, height: int, width: int,
                     batch_size: int) -> EngineKey:
    """The key of engine `folder` after checking that a synth job with these settings can run
    on it (read from its manifest alone: no model is loaded, so a mismatch is refused at once).
    `backend` "torch" means "whatever the engine is"."""
    folder = Path(folder).expanduser()
    key = EngineKey.from_dict(read_manifest(folder)["key"])
    if backend not in ("torch", key.backend):
        raise UserError(f"--backend {backend} contradicts engine {folder}, which is a "
                        f"{key.backend} engine")
    if (height, width) != (key.height, key.width):
        raise UserError(f"engine {folder} is built for {key.height}x{key.width} images, the job "
                        f"asks for {height}x{width}; pass --height {key.height} --width "
                        f"{key.width} or rebuild the engine")
    if key.backend == "tensorrt" and batch_size > key.max_batch:
        raise UserError(f"engine {folder} takes at most {key.max_batch} images per call; pass "
                        f"--batch-size {key.max_batch} or rebuild it with a larger one")
    return key


def check_files(folder: Path, manifest: dict, full: bool = True) -> None:
    """Every file the manifest lists exists with its recorded size (and SHA-256 if `full`)."""
    for rel, info in manifest.get("files", {}).items():
        path = Path(folder) / rel
        if not path.is_file():
            raise UserError(f"engine file {path} is missing; rebuild with `attnseg engine build`")
        if path.stat().st_size != info["size"] or (full and file_sha256(path) != info["sha256"]):
            raise UserError(f"engine file {path} is corrupt (size or checksum differs from "
                            f"{MANIFEST}); rebuild with `attnseg engine build`")


def stale_reason(folder: Path, key: EngineKey) -> str | None:
    """None when `folder` holds a valid engine for `key`, else why it must be (re)built."""
    folder = Path(folder)
    if not (folder / MANIFEST).exists():
        return "no engine there yet"
    try:
        manifest = read_manifest(folder)
        have = EngineKey.from_dict(manifest["key"])
        diff = have.differences(key)
        if diff:
            return "built with other " + ", ".join(diff)
        check_files(folder, manifest)
    except UserError as e:
        return str(e)
    return None


def prepare_output(folder: Path) -> Path:
    """A fresh temporary folder next to `folder`; refuses a non-empty folder that is not an
    engine (so a typo never overwrites a user's files). Temporary folders that killed builds
    left there (GBs each for SD-sized engines) are removed first."""
    folder = Path(folder)
    if folder.exists():
        if not folder.is_dir():
            raise UserError(f"engine output {folder} exists and is not a folder")
        if any(folder.iterdir()) and not (folder / MANIFEST).exists():
            raise UserError(f"engine output {folder} is a non-empty folder that is not an "
                            "attnseg engine; choose another --out")
    tmp = tmp_name(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(folder.parent, recursive=False)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as e:
        raise UserError(f"cannot write engine folder {folder}: {e.strerror}") from None
    return tmp


def commit_output(tmp: Path, folder: Path, manifest: dict) -> None:
    """Record file sizes/hashes, write the manifest, and move `tmp` into place atomically
    (an older engine at `folder` is replaced only once the new one is complete)."""
    files = {}
    for p in sorted(tmp.rglob("*")):
        if p.is_file():
            files[str(p.relative_to(tmp))] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
    manifest = dict(manifest, format=FORMAT_VERSION, files=files)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    folder = Path(folder)
    old = None
    if folder.exists():
        old = tmp_name(folder.with_name(f"{folder.name}.old"))
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
