"""Every command that writes a folder holds its lock (`files.OutputLock`, as synth does): while
another process holds it, the command is refused in one line, exit 2, with nothing written;
once it is free, the same command completes, each item written once."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from attnseg.pipeline.cli import main
from attnseg.pipeline.files import OutputLock

from ..lora_helpers import write_images

pytestmark = pytest.mark.usefixtures("torch_one_thread")

LOCK = ".lock.shard-00000-of-00001"


def _refused_while_held(out: Path, argv: list[str], capsys) -> None:
    """`attnseg ARGV` while another process holds `out`'s lock: one line, exit 2, and the
    folder holds nothing but the lock file (which the holder made)."""
    held = OutputLock(out)  # as another process writing the folder holds it
    try:
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(
            f"attnseg: error: another process is writing {out}; wait for it"), err
        assert sorted(p.name for p in out.iterdir()) == [LOCK]  # nothing written
    finally:
        held.release()


def _manifest_indices(out: Path) -> list[int]:
    return [json.loads(x)["index"] for x in (out / "manifest.jsonl").read_text().splitlines()]


def test_toy_render_holds_its_folder(tmp_path, capsys):
    out = tmp_path / "toy"
    argv = ["toy", "render", "--out", str(out), "--num-images", "3", "--no-progress"]
    _refused_while_held(out, argv, capsys)
    assert main(argv) == 0
    assert _manifest_indices(out) == [0, 1, 2]  # every scene once
    assert main(argv) == 0 and _manifest_indices(out) == [0, 1, 2]


def test_train_holds_its_run_folder(tmp_path, capsys):
    data = tmp_path / "scenes"
    assert main(["toy", "render", "--out", str(data), "--num-images", "4", "--no-progress"]) == 0
    run = tmp_path / "run"
    argv = ["train", "--data", str(data), "--out", str(run), "--model", "segformer-tiny",
            "--steps", "2", "--batch-size", "2", "--crop", "64", "--workers", "0",
            "--warmup-steps", "1", "--log-every", "1", "--no-progress"]
    _refused_while_held(run, argv, capsys)
    assert main(argv) == 0
    with open(run / "log.csv") as f:
        steps = [int(row["step"]) for row in csv.DictReader(f)]
    assert steps == [1, 2]  # each step's row once
    assert (run / "model.safetensors").is_file()


def test_toy_train_model_holds_its_folder(tmp_path, capsys):
    out = tmp_path / "model"
    _refused_while_held(out, ["toy", "train-model", "--out", str(out), "--no-progress"], capsys)


def test_lora_train_holds_its_folder(tmp_path, capsys):
    images = write_images(tmp_path / "images", n=2)
    out = tmp_path / "lora"
    _refused_while_held(out, ["lora", "train", "--images", str(images), "--caption", "a street",
                              "--out", str(out), "--steps", "1", "--crop", "64", "--rank", "2",
                              "--no-progress"], capsys)


def test_a_finished_folder_keeps_no_lock_file(tmp_path, capsys):
    out = tmp_path / "toy"
    assert main(["toy", "render", "--out", str(out), "--num-images", "2", "--no-progress"]) == 0
    assert not [p.name for p in out.iterdir() if p.name.startswith(".lock")]


def test_a_lock_taken_on_a_removed_lock_file_is_taken_again(tmp_path, monkeypatch):
    """The holder lets go (removing the file) between a waiter's open and its flock: the
    waiter must not keep the removed file's lock, but lock the file now at the path."""
    import fcntl

    from attnseg.pipeline import files

    path = tmp_path / ".lock.shard-00000-of-00001"
    real_flock = fcntl.flock
    calls = []

    def flock_after_the_holder_left(fd, op):
        if not calls:  # the first try: the holder removes the file just before our flock
            os.unlink(path)
        calls.append(fd)
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock_after_the_holder_left)
    fd = files._try_lock_file(path)
    assert len(calls) == 2  # taken again
    assert (os.fstat(fd).st_dev, os.fstat(fd).st_ino) == (path.stat().st_dev, path.stat().st_ino)
    monkeypatch.setattr(fcntl, "flock", real_flock)
    assert files._try_lock_file(path) is None  # the lock at the path is held
    files._unlock_file(fd, path)
    assert not path.exists()
