"""DatasetWriter: layout, atomicity, torn manifest lines, job mismatch."""

from __future__ import annotations

import json
import os
import socket
import subprocess

import numpy as np
import pytest
from PIL import Image

from attnseg.pipeline.errors import UserError
from attnseg.pipeline.prompts import load_classes
from attnseg.pipeline.synth.writer import DatasetWriter, voc_palette

JOB = {"model": "tiny", "model_hash": "x", "preset": "attnseg", "mask": {"bg_const": 0.4},
       "size": (8, 8)}


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _write(w, i):
    img = np.full((8, 8, 3), i, np.uint8)
    lab = np.zeros((8, 8), np.uint8)
    lab[:4] = 1
    lab[0, 0] = 255
    w.write(i, f"{i:08d}", img, lab, np.full((8, 8), 200, np.uint8), {"prompt": "p"})


def test_layout_palette_and_split(tmp_path):
    w = DatasetWriter(tmp_path, JOB, load_classes("dog,"))
    for i in (1, 0):
        _write(w, i)
    w.finish()
    assert (tmp_path / "ImageSets/Segmentation/train.txt").read_text() == "00000000\n00000001\n"
    lab = Image.open(tmp_path / "SegmentationClass/00000000.png")
    assert lab.mode == "P" and lab.getpalette()[:6] == voc_palette()[:6] == [0, 0, 0, 128, 0, 0]
    arr = np.asarray(lab)
    assert arr[0, 0] == 255 and arr[1, 0] == 1 and arr[7, 7] == 0
    assert json.loads((tmp_path / "classes.json").read_text())["1"] == "dog"


def test_torn_manifest_line_is_dropped_and_redone(tmp_path):
    w = DatasetWriter(tmp_path, JOB, load_classes("dog,"))
    _write(w, 0)
    _write(w, 1)
    with open(tmp_path / "manifest.jsonl", "ab") as f:  # a kill in the middle of an append
        f.write(b'{"index": 2, "na')
    dead = _dead_pid()
    host = socket.gethostname()
    stale = tmp_path / "JPEGImages" / f"00000002.jpg.tmp-attnseg-{host}-{dead}"
    stale.write_bytes(b"partial")
    live = tmp_path / "JPEGImages" / f"00000003.jpg.tmp-attnseg-{host}-{os.getpid()}"
    live.write_bytes(b"another shard's file in progress")
    w2 = DatasetWriter(tmp_path, JOB, load_classes("dog,"))
    assert w2.done == {0, 1}
    assert not stale.exists() and live.exists()  # only dead processes' leftovers go
    _write(w2, 2)
    lines = (tmp_path / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(x)["index"] for x in lines] == [0, 1, 2]


def test_other_job_refused(tmp_path):
    DatasetWriter(tmp_path, JOB, load_classes("dog,"))
    with pytest.raises(UserError, match="holds a different job"):
        DatasetWriter(tmp_path, {**JOB, "model_hash": "y"}, load_classes("dog,"))
