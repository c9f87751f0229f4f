"""A human-readable view of a synthetic dataset: PNG contact sheet and an HTML page."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ...kernels.labels import BACKGROUND_LABEL, IGNORE_LABEL
from ..files import atomic_write_bytes
from .writer import encode_png, read_manifest_records, voc_palette


def _colour_mask(label: np.ndarray) -> np.ndarray:
    pal = np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)
    return pal[label]


def overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """The image with its label map blended on top (background and ignore left unblended)."""
    colour = _colour_mask(label).astype(np.float32)
    out = image.astype(np.float32)
    fg = ((label != BACKGROUND_LABEL) & (label != IGNORE_LABEL))[..., None]
    out = np.where(fg, (1 - alpha) * out + alpha * colour, out)
    out[label == 255] = 0.5 * out[label == 255] + 0.5 * 255.0  # ignore band: washed out
    return out.round().astype(np.uint8)


def _load(root: Path, name: str):
    image = np.asarray(Image.open(root / "JPEGImages" / f"{name}.jpg").convert("RGB"))
    label = np.asarray(Image.open(root / "SegmentationClass" / f"{name}.png"))
    rel = np.asarray(Image.open(root / "Reliability" / f"{name}.png"))
    return image, label, rel


def _write_sheet(path: Path, cells: list[np.ndarray], captions: list[str], title: str,
                 per_row: int = 4) -> None:
    """Grid of (image | overlay | reliability) triplets, `per_row` per row, captioned."""
    cap_h, gap = 14, 6
    ch = max(c.shape[0] for c in cells) + cap_h
    cw = max(c.shape[1] for c in cells) + gap
    rows = -(-len(cells) // per_row)
    header = 18
    sheet = Image.new("RGB", (per_row * cw, header + rows * ch), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 3), title, fill=(0, 0, 0))
    for i, (cell, caption) in enumerate(zip(cells, captions, strict=True)):
        x, y = (i % per_row) * cw, header + (i // per_row) * ch
        draw.text((x + 2, y), caption, fill=(0, 0, 0))
        sheet.paste(Image.fromarray(cell), (x, y + cap_h))
    atomic_write_bytes(path, encode_png(np.asarray(sheet)))


def write_report(root: str | Path, max_samples: int = 24, notice: str | None = None) -> Path:
    """Write `report/contact_sheet.png`, per-sample overlays and `report/index.html` under root.

    Each contact-sheet cell is one sample: image | mask overlay | reliability.
    """
    root = Path(root)
    records = read_manifest_records(root)[:max_samples]
    out = root / "report"
    out.mkdir(exist_ok=True)
    rows = []
    cells = []
    for rec in records:
        image, label, rel = _load(root, rec["name"])
        over = overlay(image, label)
        atomic_write_bytes(out / f"{rec['name']}_overlay.png", encode_png(over))
        rel_rgb = np.repeat(rel[..., None], 3, axis=2)
        cells.append(np.concatenate([image, over, rel_rgb], axis=1))
        words = ", ".join(f"{c['name']} ({c['word']})" for c in rec["classes"])
        rows.append(
            f"<tr><td>{rec['name']}</td><td>{html.escape(rec['prompt'])}</td>"
            f"<td>{html.escape(words)}</td>"
            f"<td><img src='../JPEGImages/{rec['name']}.jpg'></td>"
            f"<td><img src='{rec['name']}_overlay.png'></td>"
            f"<td><img src='../Reliability/{rec['name']}.png'></td></tr>"
        )
    if cells:
        title = "image | mask overlay | reliability" + (f"   ({notice})" if notice else "")
        captions = [r["classes"][0]["name"] for r in records]
        _write_sheet(out / "contact_sheet.png", cells, captions, title)
    banner = f"<p class='notice'><b>Note:</b> {html.escape(notice)}</p>" if notice else ""
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>attnseg dataset: {html.escape(root.name)}</title>
<style>body{{font-family:sans-serif}} img{{width:160px;image-rendering:pixelated}}
td{{padding:4px;vertical-align:middle}} .notice{{background:#fff3cd;padding:8px}}</style>
</head><body><h1>attnseg synthetic dataset</h1>{banner}
<p>{len(records)} samples shown. Mask colours follow the PASCAL VOC palette; white-washed
pixels are the ignore band (255). Reliability: brighter is more reliable.</p>
<p><img src="contact_sheet.png" style="width:auto;max-width:100%"></p>
<table><tr><th>name</th><th>prompt</th><th>classes (word)</th><th>image</th><th>mask</th>
<th>reliability</th></tr>
{"".join(rows)}
</table></body></html>
"""
    atomic_write_bytes(out / "index.html", page.encode())
    return out / "index.html"
