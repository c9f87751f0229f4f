"""`attnseg engine build|verify|info` and `attnseg synth --engine/--backend` end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from attnseg.engines import cache
from attnseg.pipeline.cli import main

from .conftest import MAX_BATCH, SIZE

pytest.importorskip("onnxruntime")

SYNTH = ["--model", "tiny", "--classes", "dog,cat", "--num-per-class", "2", "--steps", "3",
         "--height", str(SIZE[0]), "--width", str(SIZE[1]), "--batch-size", str(MAX_BATCH),
         "--no-progress"]


def _no_export(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the engine should have been reused, not exported again")

    monkeypatch.setattr("attnseg.engines.build.export_onnx", refuse)


def test_build_cli_reuses_an_up_to_date_engine_and_verify_passes(ort_engine, tmp_path,
                                                                  monkeypatch, capsys):
    folder, _, _ = ort_engine
    copy = tmp_path / "eng"
    shutil.copytree(folder, copy)
    _no_export(monkeypatch)
    rc = main(["engine", "build", "--model", "tiny", "--backend", "onnxruntime", "--out",
               str(copy), "--height", str(SIZE[0]), "--width", str(SIZE[1]), "--batch-size",
               str(MAX_BATCH), "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0 and "reused onnxruntime engine" in out and "built-in random model" in out
    rc = main(["engine", "verify", str(copy), "--steps", "3", "--device", "cpu", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["ok"], report
    assert report["image_max_abs_diff"] <= 1e-4 and report["label_agreement"] == 1.0
    assert report["reliability_max_abs_diff"] <= 1  # uint8 rounding of maps ~1e-7 apart
    rc = main(["engine", "info", str(copy), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert rc == 0 and set(info["parts"]) == {"text_encoder", "unet", "vae_decoder"}
    rc = main(["engine", "info", str(copy)])
    text = capsys.readouterr().out
    assert rc == 0 and text.startswith(f"onnxruntime engine {copy}")
    assert f"{SIZE[0]}x{SIZE[1]} images" in text and len(text.splitlines()) <= 6


def test_engine_info_into_a_closed_pipe_ends_quietly(ort_engine):
    """`attnseg engine info DIR | head -1`: no BrokenPipeError traceback."""
    folder, _, _ = ort_engine
    r = subprocess.run(f"{sys.executable} -m attnseg.pipeline.cli engine info {folder} --json "
                       "| head -c 1", shell=True, capture_output=True, text=True, timeout=120)
    assert r.stdout == "{" and "Traceback" not in r.stderr and "Error" not in r.stderr, r.stderr


def test_stale_build_folders_of_dead_processes_go(tmp_path):
    """A killed build leaves its temporary folder (GBs for SD-sized engines); the next build
    next to it removes it, and leaves a live process's alone."""
    from attnseg.pipeline.files import tmp_name

    target = tmp_path / "eng"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = tmp_path / tmp_name(target).name.replace(f"-{os.getpid()}", f"-{dead}")
    live = tmp_path / tmp_name(tmp_path / "other").name
    for d in (stale, live):
        (d / "unet").mkdir(parents=True)
        (d / "unet" / "model.onnx").write_bytes(b"x" * 1000)
    tmp = cache.prepare_output(target)
    assert tmp.is_dir() and not any(tmp.iterdir())
    assert not stale.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([tmp.name, live.name])


def test_engine_build_into_an_unwritable_folder_is_one_line(tmp_path, capsys):
    """--out under a read-only place (here: under a file, which root cannot write into
    either): one line, exit 2, before the model is loaded."""
    (tmp_path / "file").write_text("x")
    rc = main(["engine", "build", "--backend", "onnxruntime", "--out",
               str(tmp_path / "file" / "eng")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("attnseg: error:") and err.count("\n") == 1
    from attnseg.engines import cache as engine_cache

    def no_write(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path / "ro"))

    with pytest.MonkeyPatch.context() as mp:  # a read-only folder, as a non-root user sees it
        mp.setattr(engine_cache.Path, "mkdir", no_write)
        with pytest.raises(engine_cache.UserError, match="cannot write engine folder"):
            engine_cache.prepare_output(tmp_path / "ro" / "eng")


def _labels(root):
    return {p.name: np.asarray(Image.open(p)) for p in sorted((root / "SegmentationClass")
                                                               .iterdir())}


def _images(root):
    return {p.name: np.asarray(Image.open(p)).astype(int)
            for p in sorted((root / "JPEGImages").iterdir())}


def test_synth_with_engine_and_with_cached_backend_match_torch(ort_engine, tmp_path,
                                                               monkeypatch, capsys):
    folder, pipe, preset = ort_engine
    assert main(["synth", *SYNTH, "--out", str(tmp_path / "torch")]) == 0
    assert main(["synth", *SYNTH, "--engine", str(folder), "--out", str(tmp_path / "eng")]) == 0
    # The run says which backend it generated with.
    assert f"onnxruntime engine in {folder}" in capsys.readouterr().out
    # --backend onnxruntime finds the engine in the cache (a copy of the fixture's, which has
    # the key a synth job with these settings asks for) and does not export again.
    from attnseg.engines.build import EngineOptions, engine_key
    from attnseg.pipeline.models.loading import model_fingerprint

    opts = EngineOptions(backend="onnxruntime", height=SIZE[0], width=SIZE[1],
                         max_batch=MAX_BATCH, harvest=preset.harvest)
    key = engine_key(pipe, opts, pipe.unet.dtype, model_fingerprint(pipe), [])
    root = tmp_path / "cache"
    shutil.copytree(folder, root / f"onnxruntime-{key.digest()}")
    monkeypatch.setenv("ATTNSEG_ENGINE_CACHE", str(root))
    _no_export(monkeypatch)
    assert main(["synth", *SYNTH, "--backend", "onnxruntime", "--out",
                 str(tmp_path / "cached")]) == 0
    capsys.readouterr()
    ref_labels, ref_images = _labels(tmp_path / "torch"), _images(tmp_path / "torch")
    assert len(ref_labels) == 4
    for name in ("eng", "cached"):
        labels, images = _labels(tmp_path / name), _images(tmp_path / name)
        assert labels.keys() == ref_labels.keys()
        equal = np.mean([np.mean(labels[k] == ref_labels[k]) for k in labels])
        assert equal == 1.0
        # Same pixels up to JPEG re-encoding of values that differ by < 1e-4 before rounding.
        assert max(np.abs(images[k] - ref_images[k]).max() for k in images) <= 2
        assert (tmp_path / name / "manifest.jsonl").read_text().count("\n") == 4


def test_engine_errors_are_one_line_and_write_nothing(ort_engine, tmp_path, capsys):
    folder, _, _ = ort_engine
    # No TensorRT here: a one-line error naming what to install.
    rc = main(["engine", "build", "--backend", "tensorrt", "--out", str(tmp_path / "t")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("attnseg: error: backend 'tensorrt'")
    assert "install" in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "t").exists()
    rc = main(["engine", "refit", str(folder), "--lora", str(tmp_path)])
    assert rc == 2 and "tensorrt" in capsys.readouterr().err
    rc = main(["synth", *SYNTH, "--backend", "tensorrt", "--out", str(tmp_path / "s1")])
    assert rc == 2 and "tensorrt" in capsys.readouterr().err
    assert not (tmp_path / "s1").exists()
    # An engine for another image size: refused before anything is written, and before the
    # model is loaded (from the engine's manifest alone).
    other = [a if a != str(SIZE[1]) else "64" for a in SYNTH]
    with pytest.MonkeyPatch.context() as mp:
        def no_load(*a, **k):
            raise AssertionError("the model was loaded before the job was checked")

        mp.setattr("attnseg.pipeline.synth.job.load_pipeline", no_load)
        rc = main(["synth", *other, "--engine", str(folder), "--out", str(tmp_path / "s2")])
    err = capsys.readouterr().err
    assert rc == 2 and "built for 64x48" in err and err.count("\n") == 1
    assert not (tmp_path / "s2").exists()
    # A damaged engine file.
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    with open(bad / "vae_decoder.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\0" * 16)
    rc = main(["synth", *SYNTH, "--engine", str(bad), "--out", str(tmp_path / "s3")])
    err = capsys.readouterr().err
    assert rc == 2 and "vae_decoder.onnx is corrupt" in err and err.count("\n") == 1
    assert not (tmp_path / "s3").exists()
    # Not an engine folder at all, and an output folder holding other files.
    rc = main(["engine", "verify", str(tmp_path)])
    assert rc == 2 and "not an attnseg engine folder" in capsys.readouterr().err
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine")
    rc = main(["engine", "build", "--backend", "onnxruntime", "--out", str(tmp_path / "user"),
               "--height", "64", "--width", "48", "--device", "cpu"])
    assert rc == 2 and "not an attnseg engine" in capsys.readouterr().err
    assert (tmp_path / "user" / "notes.txt").read_text() == "mine"
    assert cache.read_manifest(folder)["key"]["backend"] == "onnxruntime"
