"""`attnseg bench writing` end to end through the CLI on the tiny model (the path and the
report's shape; the figures come from `bench/results/writing.*`)."""

from __future__ import annotations

import json

from attnseg.pipeline.cli import main


def test_bench_writing_cli_end_to_end(tmp_path, capsys, torch_one_thread):
    out = tmp_path / "writing"
    assert main(["bench", "writing", "--out", str(out), "--set", "repeats=1",
                 "--set", "num_per_class=1", "--set", "batch_size=2", "--set", "height=64",
                 "--set", "width=64", "--set", "write_workers=3"]) == 0
    report = json.loads((tmp_path / "writing.json").read_text())
    names = [r["variant"] for r in report["rows"]]
    assert names == ["generate only", "write inline", "write pool (3 threads)"]
    assert report["images"] == 4
    assert all(r["images_per_s"] > 0 and len(r["seconds"]) == 1 for r in report["rows"])
    assert report["rows"][0]["vs_generate_only"] == 1.0
    captured = capsys.readouterr()
    assert "| write pool (3 threads) |" in captured.out
    # A line per timed run on stderr (warm-up round, then the repeat), as `--no-progress` stops.
    assert "warm-up, write inline:" in captured.err and "repeat 1/1, generate only:" in captured.err
