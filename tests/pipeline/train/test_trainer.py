"""Training loop: exact resume, schedules, checkpoints, models (random and pretrained)."""

from __future__ import annotations

import csv
import json
import math
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from attnseg.pipeline.errors import UserError
from attnseg.pipeline.prompts import load_classes
from attnseg.pipeline.synth.writer import DatasetWriter
from attnseg.pipeline.train.segmodels import build_model
from attnseg.pipeline.train.trainer import (
    TrainConfig,
    load_model,
    lr_factor,
    run_training,
    train_config_from,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    """Six 32x32 images of coloured squares with matching masks and reliability."""
    root = tmp_path_factory.mktemp("shapes")
    w = DatasetWriter(root, {"model": "test", "model_hash": "x", "preset": "none", "mask": {}},
                      load_classes("red,green,"))
    rng = np.random.default_rng(0)
    for i in range(6):
        img = rng.integers(0, 60, (32, 32, 3)).astype(np.uint8)
        lab = np.zeros((32, 32), np.uint8)
        for c in (1, 2):
            y, x = rng.integers(0, 20, 2)
            lab[y : y + 12, x : x + 12] = c
            img[y : y + 12, x : x + 12, c - 1] = 220
        lab[0, :4] = 255
        rel = rng.integers(0, 256, (32, 32)).astype(np.uint8)
        w.write(i, f"{i:08d}", img, lab, rel, {"prompt": "p"})
    w.finish()
    return root


def _cfg(data, out, **kw):
    values = dict(data=[str(data)], out=str(out), model="segformer-tiny", steps=6,
                  batch_size=2, lr=2e-3, warmup_steps=2, workers=0, seed=3, log_every=1,
                  checkpoint_every=2, progress=False,
                  augment={"crop_size": [32, 32], "base_scale": None, "scale_range": [0.8, 1.2]},
                  loss={"name": "cotrain", "boundary_width": 1, "peer_warmup": 3})
    values.update(kw)
    return train_config_from(values)


def _weights(run):
    return load_file(str(run / "model.safetensors"))


def _losses(run):
    with open(run / "log.csv") as f:
        return [(r["step"], r["loss"], r["lr"]) for r in csv.DictReader(f)]


def _last_seconds(run):
    with open(run / "log.csv") as f:
        return float(list(csv.DictReader(f))[-1]["seconds"])


def test_resume_reproduces_an_uninterrupted_run(shapes_data, tmp_path):
    straight = run_training(_cfg(shapes_data, tmp_path / "a"))
    assert straight["new_steps"] == 6 and straight["final"]["step"] == 6
    # "Killed" after 3 steps: the newest checkpoint is step 2, so step 3 is redone.
    first = run_training(_cfg(shapes_data, tmp_path / "b", stop_after=3))
    assert first["final"] is None and not (tmp_path / "b" / "model.safetensors").exists()
    with safe_open(str(tmp_path / "b" / "checkpoints" / "step_00000002.safetensors"),
                   "pt") as f:
        seconds_at_2 = json.loads(f.metadata()["counters"])["seconds"]
    # The resumed call may use another worker count: data and augmentation do not depend on
    # it.
    second = run_training(_cfg(shapes_data, tmp_path / "b", workers=1))
    assert second["resumed_from"] == 2 and second["new_steps"] == 4
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    # The run's training seconds add up over the processes that trained it: the resumed
    # run's are its checkpoint's plus the second call's (the log's seconds are per call).
    assert straight["final"]["seconds"] == pytest.approx(_last_seconds(tmp_path / "a"),
                                                         abs=0.01)
    assert seconds_at_2 > 0
    assert second["final"]["seconds"] == pytest.approx(
        seconds_at_2 + _last_seconds(tmp_path / "b"), abs=0.01)
    # A different seed gives different weights (the comparison above can fail).
    run_training(_cfg(shapes_data, tmp_path / "c", seed=4, steps=2))
    c = load_file(str(tmp_path / "c" / "model.safetensors"))
    assert not all(torch.equal(a[k], c[k]) for k in a)
    # Only the newest checkpoints are kept; a finished run is not trained again.
    kept = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    assert kept == ["step_00000004.safetensors", "step_00000006.safetensors"]
    again = run_training(_cfg(shapes_data, tmp_path / "a"))
    assert again["new_steps"] == 0 and again["final"] == straight["final"]


def test_training_lowers_the_loss_and_loads_back(shapes_data, tmp_path):
    cfg = _cfg(shapes_data, tmp_path / "r", steps=25, loss={"name": "ce"}, lr=5e-3,
               warmup_steps=0, head_lr_mult=1.0, checkpoint_every=100)
    run_training(cfg)
    losses = [float(x[1]) for x in _losses(tmp_path / "r")]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    model = load_model(tmp_path / "r")
    assert model.class_names == ["background", "red", "green"]
    x = torch.randn(1, 3, 32, 32)
    # The saved model equals the last checkpoint's network 0.
    from_ckpt = load_model(tmp_path / "r" / "checkpoints" / "step_00000025.safetensors")
    assert torch.equal(model(x)[0], from_ckpt(x)[0])


def test_upernet_with_aux_head_sgd_cosine(shapes_data, tmp_path):
    cfg = _cfg(shapes_data, tmp_path / "u", model="upernet-tiny", steps=2, optimizer="sgd",
               schedule="cosine", lr=0.01, loss={"name": "reliability-weighted"},
               accum_steps=2)
    summary = run_training(cfg)
    assert summary["final"]["step"] == 2
    model = load_model(tmp_path / "u")
    logits, aux = model(torch.randn(1, 3, 32, 32))
    assert logits.shape == aux.shape == (1, 3, 32, 32)


def test_a_different_run_in_the_same_folder_is_refused(shapes_data, tmp_path):
    run_training(_cfg(shapes_data, tmp_path / "r", steps=1))
    with pytest.raises(UserError, match="holds a different run"):
        run_training(_cfg(shapes_data, tmp_path / "r", steps=1, lr=1.0))
    # Settings that do not change the weights may differ.
    run_training(_cfg(shapes_data, tmp_path / "r", steps=1, log_every=5, workers=1))


def test_lr_schedule_values():
    cfg = TrainConfig(data=["x"], lr=1.0, steps=100, warmup_steps=10, warmup_ratio=0.0,
                      poly_power=1.0)
    assert lr_factor(cfg, 0) == 0.0
    assert lr_factor(cfg, 5) == pytest.approx(0.95 * 0.5)
    assert lr_factor(cfg, 10) == pytest.approx(0.9)
    assert lr_factor(cfg, 60) == pytest.approx(0.4)
    cfg.schedule, cfg.warmup_steps, cfg.min_lr = "cosine", 0, 0.1
    assert lr_factor(cfg, 50) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(cfg, 0) == pytest.approx(1.0)


def test_config_errors():
    with pytest.raises(UserError, match="unknown train setting"):
        train_config_from({"data": ["x"], "stepz": 3})
    with pytest.raises(UserError, match="unknown loss setting"):
        train_config_from({"data": ["x"], "loss": {"gamma": 2}})
    with pytest.raises(UserError, match="optimizer"):
        train_config_from({"data": ["x"], "optimizer": "lamb"}).validate()
    with pytest.raises(UserError, match="at least one --data"):
        TrainConfig().validate()
    with pytest.raises(UserError, match="unknown model"):
        build_model("segformer-b9", ["a", "b"])


def test_pretrained_folders(tmp_path):
    from transformers import ConvNextBackbone, ConvNextConfig

    names = ["background", "a", "b"]
    donor = build_model("segformer-tiny", ["x"] * 5 + ["y"])
    donor.net.save_pretrained(tmp_path / "seg")
    m = build_model("segformer-tiny", names, pretrained=str(tmp_path / "seg"))
    enc_a = donor.net.segformer.state_dict()
    enc_b = m.net.segformer.state_dict()
    assert all(torch.equal(enc_a[k], enc_b[k]) for k in enc_a)
    assert m.net.decode_head.classifier.out_channels == 3
    # A ConvNeXt backbone folder becomes the backbone of a new UperNet.
    backbone = ConvNextBackbone(ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                                               out_features=["stage1", "stage2", "stage3",
                                                             "stage4"]))
    backbone.save_pretrained(tmp_path / "convnext")
    u = build_model("upernet-tiny", names, pretrained=str(tmp_path / "convnext"))
    bb = backbone.state_dict()
    assert all(torch.equal(bb[k], u.net.backbone.state_dict()[k]) for k in bb)
    # Its spec rebuilds the same architecture without the folder.
    spec = json.loads(json.dumps(u.spec()))
    from attnseg.pipeline.train.segmodels import model_from_spec

    model_from_spec(spec).load_state_dict(u.state_dict())
    with pytest.raises(UserError, match="not a SegFormer"):
        build_model("segformer-tiny", names, pretrained=str(tmp_path / "convnext"))
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text('{"model_type": "segformer"}')
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="only pickle weights"):
        build_model("segformer-tiny", names, pretrained=str(tmp_path / "pickled"))


def test_tensorboard_events_hold_the_logged_losses(shapes_data, tmp_path):
    """tensorboard is in the [dev] set, so this runs in CI: the event files are read back."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_training(_cfg(shapes_data, tmp_path / "r", steps=2, loss={"name": "ce"}))
    events = EventAccumulator(str(tmp_path / "r" / "tb"))
    events.Reload()
    assert "train/loss" in events.Tags()["scalars"], events.Tags()
    # The event files hold the losses the CSV log holds, step for step.
    with open(tmp_path / "r" / "log.csv", newline="") as f:
        logged = {int(row["step"]): float(row["loss"]) for row in csv.DictReader(f)}
    scalars = events.Scalars("train/loss")
    assert [e.step for e in scalars] == sorted(logged)
    for e in scalars:
        assert math.isfinite(e.value) and e.value == pytest.approx(logged[e.step], rel=1e-6)


def test_without_tensorboard_training_keeps_csv_logs_only(shapes_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    run_training(_cfg(shapes_data, tmp_path / "r", steps=2, loss={"name": "ce"}))
    assert not (tmp_path / "r" / "tb").exists()
    assert (tmp_path / "r" / "log.csv").read_text().count("\n") >= 2
