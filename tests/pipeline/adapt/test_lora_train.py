"""LoRA training on the tiny model: loss, diffusers-loadable output, resume, CLI, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from attnseg.pipeline.adapt.lora_train import LoraTrainer, find_training_images, train_lora
from attnseg.pipeline.cli import main
from attnseg.pipeline.errors import UserError
from attnseg.pipeline.models.loading import load_pipeline
from attnseg.pipeline.models.lora import LORA_WEIGHTS, LoraSpec
from attnseg.pipeline.models.tiny import build_tiny_pipeline

from ..lora_helpers import ENV, generate, lora_config, unet_out, write_images


def test_training_lowers_loss_and_writes_a_diffusers_lora(trained):
    cfg, summary = trained
    assert summary["steps"] == 12 and summary["new_steps"] == 12
    assert summary["probe_loss_end"] < 0.97 * summary["probe_loss_start"]
    history = json.loads((Path(cfg.out) / "history.json").read_text())
    assert len(history["loss"]) == 12 and set(history["probe_loss"]) == {"0", "6", "12"}
    weights = Path(cfg.out) / LORA_WEIGHTS
    assert weights.is_file() and summary["weights"] == str(weights)

    pipe = build_tiny_pipeline()
    before = unet_out(pipe)
    pipe.load_lora_weights(cfg.out)  # diffusers accepts the folder as it is
    after = unet_out(pipe)
    assert (after - before).abs().max() > 1e-3
    # The loaded LoRA is the trained one, scale (alpha / rank = 2) included: it reproduces the
    # probe loss measured at the end of training.
    images = find_training_images(cfg.images, cfg.caption)
    probe = LoraTrainer(pipe, images, cfg, cfg.crop).probe_loss()
    assert probe == pytest.approx(summary["probe_loss_end"], rel=1e-4)

def test_resume_follows_the_uninterrupted_run(trained, tmp_path):
    cfg, summary = trained
    out = tmp_path / "resumed"
    first = train_lora(lora_config(Path(cfg.images), out, steps=6), progress=False)
    assert first["steps"] == 6
    # Leftovers of a run killed while writing its next checkpoint are ignored and removed.
    (out / "checkpoints" / "step-00000009").mkdir()
    (out / "checkpoints" / "step-00000012.tmp-attnseg-999").mkdir()
    second = train_lora(lora_config(Path(cfg.images), out), progress=False)
    assert (second["resumed_from"], second["new_steps"], second["steps"]) == (6, 6, 12)
    assert not list(out.rglob("*.tmp-attnseg-*"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-00000006", "step-00000012"]
    a = load_file(str(Path(cfg.out) / LORA_WEIGHTS))
    b = load_file(str(out / LORA_WEIGHTS))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    ha = json.loads((Path(cfg.out) / "history.json").read_text())
    hb = json.loads((out / "history.json").read_text())
    np.testing.assert_allclose(ha["loss"], hb["loss"], rtol=1e-5)
    # Started again when done: nothing to train, and nothing written: the LoRA file keeps
    # its bytes (a dataset synthesised with it recorded their hash), in this process or
    # another, whose string hashing orders peft's target-module set differently.
    weights = out / LORA_WEIGHTS
    before = (weights.read_bytes(), weights.stat().st_mtime_ns)
    again = train_lora(lora_config(Path(cfg.images), out), progress=False)
    assert again["new_steps"] == 0 and again["resumed_from"] == 12
    assert again["probe_loss_end"] == second["probe_loss_end"]
    # ... and still tells what training cost, summed over the processes that trained it.
    assert 0 < first["train_seconds"] < second["train_seconds"] == again["train_seconds"]
    assert (weights.read_bytes(), weights.stat().st_mtime_ns) == before
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    modules = meta["unet.target_modules"]
    assert modules == sorted(modules) and len(modules) > 1
    # Other settings in the same folder are refused.
    with pytest.raises(UserError, match="holds a different LoRA training run"):
        train_lora(lora_config(Path(cfg.images), out, lr=1e-3), progress=False)

@pytest.mark.usefixtures("default_signal_handlers")
@pytest.mark.parametrize("signum,where,saved", [
    (signal.SIGTERM, "loss", 8),  # while step 9 computes its loss: steps 1-8 are whole
    (signal.SIGINT, "update", 3),  # inside step 3's update: it ends first
    (signal.SIGTERM, "probe", 6),  # during step 6's probe loss: measured on resuming
])
def test_a_stopped_run_saves_its_last_whole_step_and_resumes(trained, tmp_path, monkeypatch,
                                                             signum, where, saved):
    """Ctrl-C or SIGTERM between checkpoints (6 and 12 here) saves a checkpoint of the last
    whole step; the same command resumes from it to the uninterrupted run's LoRA and losses."""
    from attnseg.pipeline.errors import Terminated

    cfg, _ = trained
    calls = {"loss": 0, "update": 0, "probe": 0}
    # the call that gets the signal: step 9's loss, step 3's update, the second probe (step 6)
    nth = {"loss": saved + 1, "update": saved, "probe": 2}[where]

    def sending(name, method):
        def wrapped(self, *args, **kwargs):
            calls[name] += 1
            if name == where and calls[name] == nth:
                if signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler):
                    pytest.fail("the run did not take the signal over")  # else it ends pytest
                os.kill(os.getpid(), signum)
            return method(self, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(LoraTrainer, "step_loss", sending("loss", LoraTrainer.step_loss))
    monkeypatch.setattr(LoraTrainer, "probe_loss", sending("probe", LoraTrainer.probe_loss))
    monkeypatch.setattr(torch.optim.AdamW, "step", sending("update", torch.optim.AdamW.step))
    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt) as e:
        train_lora(lora_config(Path(cfg.images), out), progress=False)
    assert type(e.value) is (Terminated if signum == signal.SIGTERM else KeyboardInterrupt)
    expected = {f"step-{saved:08d}"} | ({"step-00000006"} if saved > 6 else set())
    assert {p.name for p in (out / "checkpoints").iterdir()} == expected
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the run put them back
    monkeypatch.undo()
    resumed = train_lora(lora_config(Path(cfg.images), out), progress=False)
    assert resumed["resumed_from"] == saved and resumed["new_steps"] == 12 - saved
    a, b = load_file(str(Path(cfg.out) / LORA_WEIGHTS)), load_file(str(out / LORA_WEIGHTS))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    ha = json.loads((Path(cfg.out) / "history.json").read_text())
    hb = json.loads((out / "history.json").read_text())
    np.testing.assert_allclose(ha["loss"], hb["loss"], rtol=1e-5)
    assert ha["probe_loss"].keys() == hb["probe_loss"].keys()
    np.testing.assert_allclose(list(ha["probe_loss"].values()),
                               [hb["probe_loss"][k] for k in ha["probe_loss"]], rtol=1e-5)


def test_lora_train_cli_end_to_end(tmp_path):
    images = write_images(tmp_path / "images", n=2)
    out = tmp_path / "lora"
    r = subprocess.run(
        [sys.executable, "-m", "attnseg.pipeline.cli", "lora", "train", "--images", str(images),
         "--caption", "a street", "--out", str(out), "--steps", "3", "--crop", "64",
         "--rank", "2", "--target-modules", "to_k,to_v", "--noise-offset", "0.1",
         "--no-progress"],
        env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "trained LoRA to step 3" in r.stdout and "probe loss" in r.stdout
    assert "noise" in r.stdout  # the tiny-model notice
    keys = load_file(str(out / LORA_WEIGHTS)).keys()
    assert keys and all(".to_k." in k or ".to_v." in k for k in keys)
    assert json.loads((out / "lora_train.json").read_text())["noise_offset"] == 0.1

def test_lora_on_resnet_convolutions_trains_and_fuses(tmp_path):
    """Targets may be the ResNet blocks' convolutions beside the attention projections: the
    file holds both kinds, loads through the same --lora path, and changes the UNet's output."""
    images = write_images(tmp_path / "images", n=2)
    out = tmp_path / "lora"
    summary = train_lora(lora_config(images, out, steps=4, target_modules=(
        "to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")), progress=False)
    assert summary["probe_loss_end"] < summary["probe_loss_start"]
    keys = load_file(str(out / LORA_WEIGHTS)).keys()
    assert any(".conv1." in k for k in keys) and any(".to_q." in k for k in keys)
    pipe = load_pipeline("tiny", torch.device("cpu"), torch.float32)
    plain = unet_out(pipe)
    fused = load_pipeline("tiny", torch.device("cpu"), torch.float32, [LoraSpec(str(out))])
    assert (unet_out(fused) - plain).abs().max() > 1e-4


def test_noise_offset_adds_a_constant_per_image_and_channel(tmp_path):
    """--noise-offset shifts each (image, channel) of the training noise by one constant, so
    the LoRA must read a domain's mean colour from the caption, not the noisy latent; all
    other draws of a step stay those of a plain run, and a plain run's job (and so its
    resume) is as it was before the setting existed."""
    images = write_images(tmp_path / "images", n=2)
    pipe = build_tiny_pipeline()
    found = find_training_images(str(images), "a street scene")
    seen = {}
    for offset in (0.0, 0.5):
        trainer = LoraTrainer(pipe, found, lora_config(images, tmp_path / "o",
                                                       noise_offset=offset), 64)
        trainer.loss = lambda latents, cond, noise, ts, _o=offset: seen.__setitem__(
            _o, (latents, noise, ts))
        trainer.step_loss(3)
    (lat0, plain, ts0), (lat1, offset_noise, ts1) = seen[0.0], seen[0.5]
    assert torch.equal(lat0, lat1) and torch.equal(ts0, ts1)
    shift = offset_noise - plain
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6)
    assert shift[:, :, 0, 0].abs().min() > 0 and shift.abs().max() < 0.5 * 5

    out = tmp_path / "lora"
    train_lora(lora_config(images, out, steps=2, checkpoint_every=2), progress=False)
    assert "noise_offset" not in json.loads((out / "lora_train.json").read_text())
    with pytest.raises(UserError, match="holds a different LoRA training run"):
        train_lora(lora_config(images, out, steps=4, noise_offset=0.1), progress=False)
    summary = train_lora(lora_config(images, tmp_path / "offset", steps=2, checkpoint_every=2,
                                     noise_offset=0.1), progress=False)
    assert summary["steps"] == 2
    job = json.loads((tmp_path / "offset" / "lora_train.json").read_text())
    assert job["noise_offset"] == 0.1


@pytest.mark.parametrize("change, message", [
    ({"images": "/no/such/folder"}, "image folder /no/such/folder does not exist"),
    ({"caption": None}, "has no caption file 1.txt and no --caption"),
    ({"target_modules": ("to_q", "to_qq")}, "--target-modules ['to_qq'] match no Linear or Conv2d"),
    ({"crop": 60}, "--crop 60 is not a positive multiple of 8"),
    ({"dtype": "fp16"}, "fp16 training would need loss scaling"),
    ({"noise_offset": -0.1}, "--noise-offset must be between 0 and 1"),
])
def test_lora_train_bad_input(tmp_path, change, message):
    change = dict(change)
    images = change.pop("images", None) or write_images(tmp_path / "images", n=2)
    out = tmp_path / "lora"
    with pytest.raises(UserError) as info:
        train_lora(lora_config(images, out, steps=1, **change), progress=False)
    assert message in str(info.value)
    assert not out.exists()

def test_lora_train_cli_error_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["lora", "train", "--images", str(tmp_path / "empty"), "--out",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("attnseg: error: image folder")
    assert "holds no images" in err[0]

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_and_fused_synthesis_on_gpu(tmp_path):
    """bf16 frozen weights with fp32 LoRA weights on GPU; fused into an fp16 pipeline."""
    images = write_images(tmp_path / "images")
    summary = train_lora(lora_config(images, tmp_path / "lora", device="cuda"), progress=False)
    assert summary["dtype"] == "bfloat16"
    assert summary["probe_loss_end"] < summary["probe_loss_start"]
    cuda = torch.device("cuda")
    fused = load_pipeline("tiny", cuda, torch.float16, [LoraSpec(str(tmp_path / "lora"))])
    unfused = load_pipeline("tiny", cuda, torch.float16)
    unfused.load_lora_weights(str(tmp_path / "lora"))
    img_f, _ = generate(fused)
    img_u, _ = generate(unfused)
    assert np.abs(img_f - img_u).mean() < 1.0  # fp16 fusing rounds differently, not more
