"""`attnseg bench crf` end to end through the CLI at a small size (the path and the report's
shape; the figures come from `bench/results/crf.*`)."""

from __future__ import annotations

import json

from attnseg.pipeline.cli import main


def test_bench_crf_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "crf"
    assert main(["bench", "crf", "--out", str(out), "--set", "sizes=[16, 24]", "--set",
                 "repeats=2", "--set", "labels=3", "--set", "iterations=2",
                 "--no-progress"]) == 0
    report = json.loads((tmp_path / "crf.json").read_text())
    assert [r["size"] for r in report["rows"]] == [16, 24]
    for row in report["rows"]:
        names = list(row["variants"])
        ours = [n for n in names if n.startswith("attnseg")]
        assert ours == ["attnseg lattice (1 thread)", "attnseg lattice (2 threads)"]
        assert all(len(v["seconds"]) == 2 and v["median_s"] > 0
                   for v in row["variants"].values())
        assert row["variants"][ours[0]]["one_thread_over_this"]["median"] == 1.0
        if report["pydensecrf"]:  # the same lattice: equal to float32 rounding
            assert names[0].startswith("pydensecrf2")
            assert all(row["variants"][n]["max_abs_diff_vs_pydensecrf"] < 1e-5 for n in ours)
    assert "| 24x24 | attnseg lattice (2 threads) |" in capsys.readouterr().out
