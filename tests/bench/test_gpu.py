"""`attnseg bench gpu`: the GPU proof's orchestration, run as its CPU dry run (--smoke), through
the CLI and through bench/gpu_proof.sh (the bootstrap for a machine without the project)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from attnseg.pipeline.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_bench_gpu_smoke_through_the_cli(tmp_path, capsys, torch_one_thread):
    out = tmp_path / "gpu"
    rc = main(["bench", "gpu", "--smoke", "--phases", "parity,kbench,throughput,families",
               "--out", str(out)])
    assert rc == 0
    report = json.loads((tmp_path / "gpu.json").read_text())
    parity = report["steps"]["parity"]
    assert parity["ok"] and parity["images_max_abs_diff"] <= 1e-5
    assert max(parity["maps_max_rel_diff_vs_reference"].values()) < 1e-4
    assert report["steps"]["kbench"] == {"skipped": "needs a GPU"}
    runs = report["steps"]["throughput"]["runs"]
    assert runs["1"]["rc"] == 0 and {r["variant"] for r in runs["1"]["summary"]} >= {
        "stock", "harvest"}
    families = report["steps"]["families"]["runs"]
    assert {r["variant"] for r in families["flux"]["summary"]} == {
        "stock", "harvest", "store_every_map"}
    assert families["sdxl"]["rc"] == 0
    assert {r["variant"] for r in families["writing"]["summary"]} >= {"generate only",
                                                                     "write inline"}
    md = (tmp_path / "gpu.md").read_text()
    assert "| parity | ok" in md and "| families flux | torch | harvest |" in md
    assert "| write inline |" in md
    assert main(["bench", "gpu", "--phases", "nonsense", "--out", str(out)]) == 2
    assert "unknown phase" in capsys.readouterr().err


def test_bench_gpu_toy_step_trains_and_packs_the_model(tmp_path):
    rc = main(["bench", "gpu", "--smoke", "--phases", "toy", "--out", str(tmp_path / "gpu")])
    assert rc == 0
    toy = json.loads((tmp_path / "gpu.json").read_text())["steps"]["toy"]
    # Trained to its end (2 VAE + 3 UNet steps), then packed into one file to bring back.
    assert toy["ok"] and (toy["steps_before"], toy["steps"]) == (0, 5), toy
    assert toy["last_unet_loss"] > 0
    with tarfile.open(tmp_path / "gpu-toy-model.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"toy-model/unet/diffusion_pytorch_model.safetensors", "toy-model/loss.json",
            "toy-model/attnseg_toy_model.json"} <= names
    assert "| toy | ok (toy model steps 0 -> 5" in (tmp_path / "gpu.md").read_text()


def test_gpu_proof_script_runs_from_a_bare_checkout(tmp_path):
    # No wheel folder, no install: the script puts the checkout on the path itself.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PY=sys.executable, SITE=str(tmp_path / "site"), ROOT=str(tmp_path / "root"),
               OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", "bench/gpu_proof.sh", str(tmp_path), "--smoke", "--phases",
                           "parity", "--out", str(tmp_path / "gpu")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "carried wheels unpacked: none needed" in proc.stdout
    assert json.loads((tmp_path / "gpu.json").read_text())["steps"]["parity"]["ok"]
    assert (tmp_path / "root" / "attnseg" / "kernels").is_symlink()
