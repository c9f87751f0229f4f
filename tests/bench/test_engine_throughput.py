"""The engine throughput benchmark: refuses clearly without a GPU; its harness runs on CPU."""

from __future__ import annotations

import json

import pytest
import torch

from attnseg.bench.engine_throughput import main


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_without_a_gpu_it_says_so_and_writes_nothing(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "r")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_harness_runs_on_the_tiny_model(tmp_path, capsys):
    out = tmp_path / "smoke"
    assert main(["--model", "tiny", "--device", "cpu", "--size", "64", "--batches", "2",
                 "--steps", "2", "--repeats", "1", "--variants", "stock,eager,store_every_map",
                 "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert set(report["results"]) == {"2"}
    for r in report["results"].values():
        assert set(r["status"].values()) == {"ok"}
        for v in ("stock", "eager", "store_every_map"):
            assert r["images_per_s"][v] > 0
            assert r["steps_per_s"][v] == pytest.approx(2 / r["median_s"][v], rel=1e-2)
        # The old pattern really kept every map (both CFG halves, every step and layer).
        assert r["stored_attention_bytes"]["store_every_map"] > 0
    assert "| 2 | store_every_map |" in out.with_suffix(".md").read_text()
