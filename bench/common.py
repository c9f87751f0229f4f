"""What every benchmark shares: the machine it ran on, run-to-run spread and when a ratio is
within it, and where and how its report (BASE.json, BASE.md) is written."""

from __future__ import annotations

import json
import platform
import statistics
from pathlib import Path

import psutil
import torch

from attnseg.pipeline.files import atomic_write_bytes


def machine_info(device: torch.device) -> dict:
    import diffusers
    import transformers

    info = {
        "platform": platform.platform(), "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(), "cpu_count": psutil.cpu_count(),
        "torch_threads": torch.get_num_threads(), "memory_gib": round(
            psutil.virtual_memory().total / 2**30, 1),
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def spread_summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def relative_spread(spread: dict) -> float:
    """(max - min) / median of a `spread_summary`."""
    return (spread["max"] - spread["min"]) / spread["median"]


def ratio_within_spread(ratio: float, a: dict, b: dict) -> bool:
    """Whether a ratio of two medians differs from 1 by less than the run-to-run spread of
    either side (or rests on one run each): then it says nothing on this machine."""
    if a["n"] < 2 or b["n"] < 2:
        return True
    return abs(ratio - 1.0) < max(relative_spread(a), relative_spread(b))


def spread_note(rows: list[dict]) -> str:
    """What a ratio marked ~ means."""
    return (f"{len(rows)} ratio(s) differ from 1.000x by less than the run-to-run spread "
            "(min-max over the repeats, relative to the median) of the variant or of stock: "
            "on this machine they are not meaningful (more --repeats or a quieter machine)")


def output_base(out: str | Path) -> Path:
    """A benchmark's `--out` as a path without suffix: "x", "x.json" and "x.md" all mean the
    files x.json, x.md (and x.png). A dot elsewhere in the name is kept ("run.v2")."""
    out = Path(out).expanduser()
    return out.with_suffix("") if out.suffix in (".json", ".md", ".png") else out


def with_suffix(base: Path, suffix: str) -> Path:
    """`base` + suffix, without replacing a dot already in the name (unlike Path.with_suffix)."""
    return base.with_name(base.name + suffix)


def write_json_and_markdown(report: dict, base: Path, markdown_text: str) -> list[str]:
    """BASE.json (the report, with the list of files written) and BASE.md; those paths."""
    base.parent.mkdir(parents=True, exist_ok=True)
    files = [str(with_suffix(base, ".json")), str(with_suffix(base, ".md"))]
    atomic_write_bytes(Path(files[0]), json.dumps(report | {"files": files}, indent=1,
                                                  default=str).encode())
    atomic_write_bytes(Path(files[1]), markdown_text.encode())
    return files


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"
