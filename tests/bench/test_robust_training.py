"""The robust-training bench's data: clean masks, attention-like corruption, summary maths."""

from __future__ import annotations

import numpy as np
import pytest

from attnseg.bench.robust_training import (
    CLASSES,
    SIZE,
    attention_maps,
    make_clean,
    pseudo_mask,
    render_markdown,
    summarize,
    write_datasets,
)
from attnseg.pipeline.train.sources import open_source

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_clean_samples_are_deterministic_and_labelled():
    a = make_clean(np.random.default_rng(7))
    b = make_clean(np.random.default_rng(7))
    assert all(np.array_equal(x, y) for x, y in zip(a[:2], b[:2], strict=True))
    img, label, present = a
    assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8
    assert set(np.unique(label).tolist()) == {0, *present}
    assert set(present) <= set(range(1, len(CLASSES) + 1))


def test_pseudo_masks_are_noisy_but_informative():
    rng = np.random.default_rng(0)
    agree, rel_right, rel_wrong = [], [], []
    for _ in range(20):
        _, label, present = make_clean(rng)
        maps = attention_maps(rng, label, present)
        assert maps.shape == (len(present), SIZE // 4, SIZE // 4)
        noisy, rel = pseudo_mask(maps, present)
        assert set(np.unique(noisy).tolist()) <= {0, 255, *present}
        keep = noisy != 255
        agree.append(np.mean(noisy[keep] == label[keep]))
        rel_right.append(rel[keep & (noisy == label)].mean())
        if np.any(keep & (noisy != label)):
            rel_wrong.append(rel[keep & (noisy != label)].mean())
    # Wrong but not useless, and reliability is lower where the pseudo-label is wrong.
    assert 0.75 < np.mean(agree) < 0.99
    assert np.mean(rel_wrong) < 0.6 * np.mean(rel_right)


def test_written_datasets_read_back(tmp_path):
    data = write_datasets(tmp_path, n_train=6, n_val=3, data_seed=0)
    assert 0.2 < data["pseudo_mask_mIoU"] < 0.99
    train, val = open_source(tmp_path / "train"), open_source(tmp_path / "val")
    assert len(train) == 6 and len(val) == 3
    assert train.class_names == ["background", *CLASSES]
    clean = open_source(tmp_path / "train_clean").load(2)
    noisy = train.load(2)
    assert np.array_equal(clean.image, noisy.image)
    assert not np.array_equal(clean.label, noisy.label)


def test_summary_and_verdict():
    runs = {"ce": {0: 0.70, 1: 0.72, 2: 0.71},
            "reliability-weighted": {0: 0.75, 1: 0.76, 2: 0.74},
            "cotrain": {0: 0.69, 1: 0.74, 2: 0.72},
            "clean-labels": {0: 0.80, 1: 0.81, 2: 0.79}}
    s = summarize(runs, [0, 1, 2])
    v = s["verdict"]
    assert v["best"] == "reliability-weighted"
    assert v["gain"] == pytest.approx(0.04)
    assert v["spread_sd"] == pytest.approx(0.01)
    assert v["target_met"] and v["best_beats_ce_every_seed"] and v["beats_ce_range"]
    assert v["gap_closed"] == pytest.approx(0.04 / 0.09)
    assert s["cotrain"]["gain_over_ce"]["values"] == pytest.approx([-0.01, 0.02, 0.01])
    doc = {"summary": s, "n_train": 1, "n_val": 1, "model": "m", "steps": 1, "seeds": [0, 1, 2],
           "data_seed": 0, "data": {"pseudo_mask_mIoU": 0.5}, "command": "c", "seconds": 1,
           "machine": "x"}
    md = render_markdown(doc)
    assert "| reliability-weighted | 3 | 75.00 | 1.00 |" in md and "**met**" in md
    one = summarize({**runs, "clean-labels": {0: 0.8}}, [0, 1, 2])
    assert one["clean-labels"]["sd"] is None and one["verdict"]["gap_closed"] == pytest.approx(
        0.04 / (0.8 - 0.71))


def test_cli_end_to_end_with_the_common_config_path(tmp_path, capsys):
    """`attnseg bench robust-training` takes --config and --set like every command."""
    import json

    from attnseg.pipeline.cli import main

    config = tmp_path / "rt.json"
    config.write_text(json.dumps({"seeds": 1, "steps": 2, "train": 8, "val": 4,
                                  "clean_seeds": 0}))
    out = tmp_path / "rt"
    assert main(["bench", "robust-training", "--config", str(config), "--set", "workers=0",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["steps"] == 2 and doc["n_train"] == 8 and doc["seeds"] == [0]
    assert set(doc["summary"]) >= {"ce", "verdict"} and "results:" in printed
    assert doc["command"].startswith("attnseg ")
    assert main(["bench", "robust-training", "--set", "nonsense=1", "--out", str(out)]) == 2
    assert "unknown bench robust-training setting" in capsys.readouterr().err
