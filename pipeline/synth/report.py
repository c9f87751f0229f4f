"""A human-readable view of a synthetic dataset: per-class statistics, a PNG contact sheet
and an HTML page."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ...kernels.labels import BACKGROUND_LABEL, IGNORE_LABEL
from ..errors import UserError
from ..files import atomic_write_bytes
from .writer import encode_png, read_manifest_records, voc_palette


def _colour_mask(label: np.ndarray) -> np.ndarray:
    pal = np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)
    return pal[label]


def overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.3) -> np.ndarray:
    """The image with its label map on top: each region lightly tinted in its class colour
    and outlined in it, so that the shape under the mask stays visible; the ignore band
    washed out; background left as it is."""
    colour = _colour_mask(label).astype(np.float32)
    out = image.astype(np.float32)
    fg = (label != BACKGROUND_LABEL) & (label != IGNORE_LABEL)
    out = np.where(fg[..., None], (1 - alpha) * out + alpha * colour, out)
    out[label == IGNORE_LABEL] = 0.5 * out[label == IGNORE_LABEL] + 0.5 * 255.0
    edge = fg & _boundary(label)
    out[edge] = colour[edge]
    return out.round().astype(np.uint8)


def _boundary(label: np.ndarray) -> np.ndarray:
    """Pixels whose 4-neighbourhood holds another label (the image border is no boundary)."""
    edge = np.zeros(label.shape, dtype=bool)
    edge[1:, :] |= label[1:, :] != label[:-1, :]
    edge[:-1, :] |= label[:-1, :] != label[1:, :]
    edge[:, 1:] |= label[:, 1:] != label[:, :-1]
    edge[:, :-1] |= label[:, :-1] != label[:, 1:]
    return edge


def _load(root: Path, name: str):
    image = np.asarray(Image.open(root / "JPEGImages" / f"{name}.jpg").convert("RGB"))
    label = np.asarray(Image.open(root / "SegmentationClass" / f"{name}.png"))
    rel = np.asarray(Image.open(root / "Reliability" / f"{name}.png"))
    return image, label, rel


def _wrapped(draw: ImageDraw.ImageDraw, text: str, width: int) -> list[str]:
    """`text` broken at spaces into lines no wider than `width` pixels."""
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return [*lines, line] if line else lines


def _write_sheet(path: Path, cells: list[np.ndarray], captions: list[str], title: str,
                 per_row: int = 4) -> None:
    """Grid of (image | overlay | reliability) triplets, `per_row` per row, captioned; the
    title wrapped to the sheet's width."""
    cap_h, gap, line_h = 14, 6, 13
    ch = max(c.shape[0] for c in cells) + cap_h
    cw = max(c.shape[1] for c in cells) + gap
    per_row = min(per_row, len(cells))
    rows = -(-len(cells) // per_row)
    width = per_row * cw
    title_lines = _wrapped(ImageDraw.Draw(Image.new("RGB", (1, 1))), title, width - 8)
    header = 5 + line_h * len(title_lines)
    sheet = Image.new("RGB", (width, header + rows * ch), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, line in enumerate(title_lines):
        draw.text((4, 3 + i * line_h), line, fill=(0, 0, 0))
    for i, (cell, caption) in enumerate(zip(cells, captions, strict=True)):
        x, y = (i % per_row) * cw, header + (i // per_row) * ch
        draw.text((x + 2, y), caption, fill=(0, 0, 0))
        sheet.paste(Image.fromarray(cell), (x, y + cap_h))
    atomic_write_bytes(path, encode_png(np.asarray(sheet)))


def pick_samples(records: list[dict], per_class: int) -> list[dict]:
    """Up to `per_class` samples of each class (a sample counts for the first class its
    prompt names), in class order, then index order: every class is shown, however the
    samples are ordered in the folder."""
    by_class: dict[int, list[dict]] = {}
    for rec in records:
        if rec["classes"]:
            by_class.setdefault(rec["classes"][0]["id"], []).append(rec)
    return [rec for cid in sorted(by_class) for rec in by_class[cid][:per_class]]


def class_statistics(root: str | Path, records: list[dict]) -> list[dict]:
    """Per class, over every sample whose prompt names it: how many samples, the mean share of
    their pixels labelled with it, the share left unsure (the ignore band) in those images,
    the mean reliability of its pixels (0-1), and how many of those samples got none of it."""
    root = Path(root)
    acc: dict[int, dict] = {}
    for rec in records:
        label = np.asarray(Image.open(root / "SegmentationClass" / f"{rec['name']}.png"))
        rel = np.asarray(Image.open(root / "Reliability" / f"{rec['name']}.png"))
        unsure = float((label == IGNORE_LABEL).mean())
        for c in rec["classes"]:
            a = acc.setdefault(c["id"], {"id": c["id"], "name": c["name"], "samples": 0,
                                         "share": 0.0, "unsure": 0.0, "rel_sum": 0.0,
                                         "pixels": 0, "empty": 0})
            mine = label == c["id"]
            n = int(mine.sum())
            a["samples"] += 1
            a["share"] += n / label.size
            a["unsure"] += unsure
            a["pixels"] += n
            a["rel_sum"] += float(rel[mine].sum()) / 255.0
            a["empty"] += n == 0
    stats = []
    for cid in sorted(acc):
        a = acc[cid]
        stats.append({"id": cid, "name": a["name"], "samples": a["samples"],
                      "pixel_share": a["share"] / a["samples"],
                      "unsure_share": a["unsure"] / a["samples"],
                      "mean_reliability": a["rel_sum"] / a["pixels"] if a["pixels"] else None,
                      "empty_masks": a["empty"]})
    return stats


def format_class_statistics(stats: list[dict]) -> str:
    """The per-class statistics as a plain-text table."""
    lines = [f"{'class':14s} {'samples':>7s} {'pixels %':>9s} {'unsure %':>9s} "
             f"{'reliability':>11s} {'empty':>6s}"]
    for s in stats:
        rel = "-" if s["mean_reliability"] is None else f"{s['mean_reliability']:.2f}"
        lines.append(f"{s['name'][:14]:14s} {s['samples']:7d} {100 * s['pixel_share']:9.1f} "
                     f"{100 * s['unsure_share']:9.1f} {rel:>11s} {s['empty_masks']:6d}")
    return "\n".join(lines)


def _stat_row(s: dict) -> str:
    rel = "-" if s["mean_reliability"] is None else f"{s['mean_reliability']:.2f}"
    return (f"<tr><td>{html.escape(s['name'])}</td><td>{s['samples']}</td>"
            f"<td>{100 * s['pixel_share']:.1f}</td><td>{100 * s['unsure_share']:.1f}</td>"
            f"<td>{rel}</td><td>{s['empty_masks']}</td></tr>")


def write_report(root: str | Path, per_class: int = 4, notice: str | None = None) -> Path:
    """Write `report/contact_sheet.png`, per-sample overlays, `report/class_stats.json` and
    `report/index.html` under root.

    Each contact-sheet cell is one sample: image | mask overlay | reliability; up to
    `per_class` samples of every class are shown. The statistics cover every sample.
    """
    root = Path(root)
    records = read_manifest_records(root)
    if not records:
        raise UserError(f"{root} holds no finished samples (no manifest lines): nothing to "
                        "report")
    shown = pick_samples(records, per_class)
    stats = class_statistics(root, records)
    out = root / "report"
    out.mkdir(exist_ok=True)
    rows = []
    cells = []
    for rec in shown:
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
        title = "image | mask overlay | reliability" + (f" ({notice})" if notice else "")
        captions = [r["classes"][0]["name"] for r in shown]
        _write_sheet(out / "contact_sheet.png", cells, captions, title)
    atomic_write_bytes(out / "class_stats.json", (json.dumps(stats, indent=1) + "\n").encode())
    stat_rows = "".join(_stat_row(s) for s in stats)
    banner = f"<p class='notice'><b>Note:</b> {html.escape(notice)}</p>" if notice else ""
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>attnseg dataset: {html.escape(root.name)}</title>
<style>body{{font-family:sans-serif}} img{{width:160px;image-rendering:pixelated}}
td,th{{padding:4px;vertical-align:middle}} .notice{{background:#fff3cd;padding:8px}}</style>
</head><body><h1>attnseg synthetic dataset</h1>{banner}
<h2>Per class ({len(records)} samples)</h2>
<p>Over the samples whose prompt names the class: the share of their pixels labelled with it,
the share left unsure (the ignore band, 255), the mean reliability of its pixels (0-1), and
how many of them got no pixel of it.</p>
<table><tr><th>class</th><th>samples</th><th>pixels %</th><th>unsure %</th>
<th>reliability</th><th>empty masks</th></tr>
{stat_rows}
</table>
<h2>Samples ({len(shown)} of {len(records)} shown, up to {per_class} per class)</h2>
<p>Mask colours follow the PASCAL VOC palette (each region tinted and outlined); white-washed
pixels are the ignore band (255). Reliability: brighter is more reliable.</p>
<p><img src="contact_sheet.png" style="width:auto;max-width:100%"></p>
<table><tr><th>name</th><th>prompt</th><th>classes (word)</th><th>image</th><th>mask</th>
<th>reliability</th></tr>
{"".join(rows)}
</table></body></html>
"""
    atomic_write_bytes(out / "index.html", page.encode())
    return out / "index.html"
