"""`attnseg report` on a dataset folder: every class on the contact sheet, per-class statistics
recomputed from the label files, a title that fits, an overlay that shows the shape, and bad
folders refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from attnseg.pipeline.cli import main
from attnseg.pipeline.synth.report import _wrapped, overlay, pick_samples
from attnseg.pipeline.synth.writer import read_manifest_records


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Three classes, three samples each, written by `attnseg synth` on the tiny model."""
    out = tmp_path_factory.mktemp("report") / "ds"
    assert main(["synth", "--model", "tiny", "--classes", "aeroplane,dog,cat",
                 "--num-per-class", "3", "--steps", "1", "--height", "64", "--width", "64",
                 "--out", str(out), "--no-progress"]) == 0
    return out


def test_report_shows_every_class_and_its_statistics(dataset, capsys):
    capsys.readouterr()
    assert main(["report", str(dataset), "--show-per-class", "1"]) == 0
    printed = capsys.readouterr().out
    report = dataset / "report"
    page = (report / "index.html").read_text()
    records = read_manifest_records(dataset)
    # One sample of each class on the sheet and the page: the first of each class.
    shown = [r["name"] for r in pick_samples(records, 1)]
    assert len(shown) == 3 and {r["classes"][0]["name"] for r in records
                                if r["name"] in shown} == {"aeroplane", "dog", "cat"}
    assert [n for n in (r["name"] for r in records) if f"<td>{n}</td>" in page] == shown
    assert Image.open(report / "contact_sheet.png").width == 3 * (3 * 64 + 6)
    # The statistics cover every sample and are what the label files hold.
    stats = {s["name"]: s for s in json.loads((report / "class_stats.json").read_text())}
    assert set(stats) == {"aeroplane", "dog", "cat"}
    for name, s in stats.items():
        mine = [r for r in records if any(c["name"] == name for c in r["classes"])]
        cid = mine[0]["classes"][0]["id"]
        labels = [np.asarray(Image.open(dataset / "SegmentationClass" / f"{r['name']}.png"))
                  for r in mine]
        rels = [np.asarray(Image.open(dataset / "Reliability" / f"{r['name']}.png"))
                for r in mine]
        assert s["samples"] == len(mine) == 3
        assert s["pixel_share"] == pytest.approx(np.mean([(lab == cid).mean() for lab in labels]))
        assert s["unsure_share"] == pytest.approx(np.mean([(lab == 255).mean() for lab in labels]))
        assert s["empty_masks"] == sum(int(not (lab == cid).any()) for lab in labels)
        pixels = sum(int((lab == cid).sum()) for lab in labels)
        if pixels:
            want = sum(float(r[lab == cid].sum()) for lab, r in zip(labels, rels, strict=True))
            assert s["mean_reliability"] == pytest.approx(want / 255.0 / pixels)
        assert name in printed
    assert "report:" in printed


def test_every_class_is_picked_whatever_the_order():
    recs = [{"name": f"{i}", "classes": [{"id": 1 + (i >= 40) + (i >= 70), "name": "x"}]}
            for i in range(72)]
    picked = pick_samples(recs, 4)
    assert [r["classes"][0]["id"] for r in picked] == [1] * 4 + [2] * 4 + [3] * 2
    assert [r["name"] for r in picked[:4]] == ["0", "1", "2", "3"]


def test_a_long_title_is_wrapped_to_the_sheet():
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title = "image | mask overlay | reliability (" + "a long notice " * 20 + ")"
    lines = _wrapped(draw, title, 300)
    assert len(lines) > 2 and " ".join(lines) == " ".join(title.split())
    assert all(draw.textlength(line) <= 300 for line in lines)


def test_the_overlay_tints_and_outlines_so_the_shape_shows():
    image = np.full((8, 8, 3), 100, dtype=np.uint8)
    label = np.zeros((8, 8), dtype=np.uint8)
    label[2:6, 2:6] = 1
    label[0, 7] = 255
    out = overlay(image, label).astype(int)
    red = np.array([128, 0, 0])  # VOC colour of class 1
    assert (out[3, 3] == np.round(0.7 * 100 + 0.3 * red)).all()  # inside: image shows
    assert (out[2, 3] == red).all() and (out[5, 5] == red).all()  # outline: the class colour
    assert (out[0, 0] == 100).all()  # background untouched
    assert (out[0, 7] == round(0.5 * 100 + 0.5 * 255)).all()  # ignore band washed out


def test_bad_folders_are_one_line(tmp_path, capsys):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "train-00000.tar").write_bytes(b"")
    (tmp_path / "empty" / "SegmentationClass").mkdir(parents=True)
    for folder, message in ((tmp_path / "none", "is not a folder"),
                            (tmp_path / "shards", "WebDataset shards (1 .tar files)"),
                            (tmp_path / "empty", "holds no finished samples")):
        capsys.readouterr()
        assert main(["report", str(folder)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "empty" / "report").exists()
    assert not Path(tmp_path / "shards" / "report").exists()
