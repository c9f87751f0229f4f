"""Launchers: a Slurm array script, torchrun and Ray Data give the single-process dataset."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from attnseg.pipeline.cli import main
from attnseg.pipeline.config import parse_shard

SYNTH = ["--model", "tiny", "--classes", "dog,cat", "--num-per-class", "3", "--steps", "2",
         "--height", "64", "--width", "64", "--batch-size", "2"]
ENV = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.parent.name in ("JPEGImages", "SegmentationClass",
                                                  "Reliability", "Segmentation")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ds"
    assert main(["synth", *SYNTH, "--no-progress", "--out", str(out)]) == 0
    return _files(out)


def test_parse_shard_from_launcher_environment(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert parse_shard("auto") == (3, 8)
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    assert parse_shard("auto") == (1, 2)
    assert parse_shard(None) == (0, 1) and parse_shard("2/5") == (2, 5)


def test_slurm_array_script(tmp_path, reference, capsys):
    out = tmp_path / "ds"
    script = tmp_path / "job.sbatch"
    assert main(["launch", "slurm", "--array", "2", "--script", str(script), "--",
                 *SYNTH, "--out", str(out)]) == 0
    text = script.read_text()
    assert "#SBATCH --array=0-1" in text and '--shard "${SLURM_ARRAY_TASK_ID}/2"' in text
    for task in ("1", "0"):  # what Slurm does, one array task at a time
        r = subprocess.run(["bash", str(script)], env={**ENV, "SLURM_ARRAY_TASK_ID": task},
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    assert _files(out) == reference
    assert main(["launch", "slurm", "--array", "2", "--", *SYNTH, "--shard", "0/2"]) == 2
    assert "leave --shard out" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--partition", "--job-name", "--time"])
def test_slurm_values_cannot_inject_commands(tmp_path, capsys, flag):
    """An #SBATCH value with a line break would put its rest into the script as a command."""
    script = tmp_path / "job.sbatch"
    rc = main(["launch", "slurm", "--array", "2", flag, "x\necho INJECTED", "--script",
               str(script), "--", *SYNTH, "--out", str(tmp_path / "ds")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and flag in err[0] and not script.exists()
    rc = main(["launch", "slurm", "--array", "2", flag, "gpu-a100_1:2", "--", *SYNTH,
               "--out", str(tmp_path / "ds")])
    assert rc == 0 and "echo" not in capsys.readouterr().out


def test_torchrun_two_processes(tmp_path, reference):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    out = tmp_path / "ds"
    # torchrun gives each process one thread unless told otherwise; CPU results are
    # bit-identical only at equal thread counts (reduction order), so match the reference's.
    env = {**ENV, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "-m", "attnseg.pipeline.cli", "synth", *SYNTH, "--shard", "auto",
                        "--no-progress", "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(list(out.glob("manifest.shard-*-of-00002.jsonl"))) == 2
    assert _files(out) == reference


def test_ray_two_workers(tmp_path, reference):
    pytest.importorskip("ray.data", reason="Ray is an optional extra: pip install 'ray[data]'")
    out = tmp_path / "ds"
    r = subprocess.run([sys.executable, "-m", "attnseg.pipeline.cli", "launch", "ray",
                        "--workers", "2", "--cpus-per-worker", str(torch.get_num_threads()),
                        "--", *SYNTH, "--out", str(out)],
                       env=ENV, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "6 new samples" in r.stdout
    assert _files(out) == reference
