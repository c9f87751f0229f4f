"""LoRA training on the tiny model, resume, diffusers loading, fusing into synthesis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from attnseg.pipeline.cli import main
from attnseg.pipeline.config import LoraTrainConfig, get_preset
from attnseg.pipeline.errors import UserError
from attnseg.pipeline.lora import LORA_WEIGHTS, LoraSpec, parse_lora_spec
from attnseg.pipeline.lora_train import LoraTrainer, find_training_images, train_lora
from attnseg.pipeline.models import load_pipeline
from attnseg.pipeline.prompts import PromptSpec, load_classes
from attnseg.pipeline.synth import Sample, Synthesizer
from attnseg.pipeline.tiny import build_tiny_pipeline

ENV = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
CPU = torch.device("cpu")


def _write_images(folder: Path, n: int = 4) -> Path:
    """Smooth colour patterns (a 'target domain' the tiny model can fit), 80x64 pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:64, 0:80] / 64.0
    for i in range(n):
        img = np.stack([np.sin(3 * x + i), np.cos(4 * y - i), np.sin(2 * (x + y) + i)], -1)
        Image.fromarray(((img * 0.5 + 0.5) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    (folder / "0.txt").write_text("a wavy pattern\n")  # a per-image caption for one image
    return folder


def _config(images: Path | str, out: Path, **kw) -> LoraTrainConfig:
    base = dict(images=str(images), model="tiny", out=str(out), caption="a street scene",
                rank=4, alpha=8.0, steps=12, lr=1e-2, batch_size=2, crop=64, seed=0,
                checkpoint_every=6, device="cpu")
    return LoraTrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 12-step training run (checkpoints at 6 and 12): its config and summary."""
    root = tmp_path_factory.mktemp("lora")
    cfg = _config(_write_images(root / "images"), root / "lora")
    summary = train_lora(replace(cfg), progress=False)
    return cfg, summary


def _unet_out(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    e = torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([10, 600]), e).sample


def test_training_lowers_loss_and_writes_a_diffusers_lora(trained):
    cfg, summary = trained
    assert summary["steps"] == 12 and summary["new_steps"] == 12
    assert summary["probe_loss_end"] < 0.97 * summary["probe_loss_start"]
    history = json.loads((Path(cfg.out) / "history.json").read_text())
    assert len(history["loss"]) == 12 and set(history["probe_loss"]) == {"0", "6", "12"}
    weights = Path(cfg.out) / LORA_WEIGHTS
    assert weights.is_file() and summary["weights"] == str(weights)

    pipe = build_tiny_pipeline()
    before = _unet_out(pipe)
    pipe.load_lora_weights(cfg.out)  # diffusers accepts the folder as it is
    after = _unet_out(pipe)
    assert (after - before).abs().max() > 1e-3
    # The loaded LoRA is the trained one, scale (alpha / rank = 2) included: it reproduces the
    # probe loss measured at the end of training.
    images = find_training_images(cfg.images, cfg.caption)
    probe = LoraTrainer(pipe, images, cfg, cfg.crop).probe_loss()
    assert probe == pytest.approx(summary["probe_loss_end"], rel=1e-4)


def test_resume_follows_the_uninterrupted_run(trained, tmp_path):
    cfg, summary = trained
    out = tmp_path / "resumed"
    first = train_lora(_config(Path(cfg.images), out, steps=6), progress=False)
    assert first["steps"] == 6
    # Leftovers of a run killed while writing its next checkpoint are ignored and removed.
    (out / "checkpoints" / "step-00000009").mkdir()
    (out / "checkpoints" / "step-00000012.tmp-attnseg-999").mkdir()
    second = train_lora(_config(Path(cfg.images), out), progress=False)
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
    # Started again when done: nothing to train, same weights.
    again = train_lora(_config(Path(cfg.images), out), progress=False)
    assert again["new_steps"] == 0 and again["resumed_from"] == 12
    # Other settings in the same folder are refused.
    with pytest.raises(UserError, match="holds a different LoRA training run"):
        train_lora(_config(Path(cfg.images), out, lr=1e-3), progress=False)


def _generate(pipe, n=2, size=64):
    preset = get_preset("attnseg")
    dog = load_classes("dog,")[0]
    synth = Synthesizer(pipe, preset, size, size, steps=3, guidance=7.5)
    samples = [Sample(i, PromptSpec("a photo of a dog", ((dog, "dog"),)), 100 + i)
               for i in range(n)]
    images, labels, _ = synth.generate(samples)
    synth.harvester.remove()
    return images.astype(np.int16), labels


def test_fused_generation_equals_unfused(trained):
    cfg, _ = trained
    base = load_pipeline("tiny", CPU, torch.float32)
    unfused = load_pipeline("tiny", CPU, torch.float32)
    unfused.load_lora_weights(cfg.out, adapter_name="x")
    unfused.set_adapters(["x"], adapter_weights=[0.7])
    fused = load_pipeline("tiny", CPU, torch.float32, [LoraSpec(cfg.out, 0.7)])
    # Fused: plain Linear layers with merged weights, nothing of peft left.
    attn = fused.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    assert type(attn.to_q) is torch.nn.Linear
    torch.testing.assert_close(_unet_out(fused), _unet_out(unfused), rtol=1e-4, atol=1e-5)
    img_b, _ = _generate(base)
    img_u, lab_u = _generate(unfused)
    img_f, lab_f = _generate(fused)
    assert np.abs(img_f - img_u).max() <= 1  # uint8 images: rounding only
    assert (lab_f == lab_u).mean() >= 0.99
    assert np.abs(img_b - img_f).max() > 1  # and the LoRA does change the images


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_several_loras_with_weights(trained):
    cfg, _ = trained
    early = Path(cfg.out) / "checkpoints" / "step-00000006"
    specs = [LoraSpec(cfg.out, 0.5), LoraSpec(str(early), -1.0)]
    fused = load_pipeline("tiny", CPU, torch.float32, specs)
    unfused = build_tiny_pipeline()
    unfused.load_lora_weights(cfg.out, adapter_name="a")
    unfused.load_lora_weights(str(early), adapter_name="b")
    unfused.set_adapters(["a", "b"], adapter_weights=[0.5, -1.0])
    torch.testing.assert_close(_unet_out(fused), _unet_out(unfused), rtol=1e-4, atol=1e-5)
    one = load_pipeline("tiny", CPU, torch.float32, specs[:1])
    assert (_unet_out(one) - _unet_out(fused)).abs().max() > 1e-4


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_text_encoder_lora_is_fused_too(trained, tmp_path):
    """A LoRA that also adapts the text encoder (common for community LoRAs) is fused there."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    cfg, _ = trained
    ref = build_tiny_pipeline()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ref.text_encoder.add_adapter(LoraConfig(
            r=2, lora_alpha=2, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
            init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path / "te"), text_encoder_lora_layers=get_peft_model_state_dict(ref.text_encoder))
    ids = ref.tokenizer(["a dog"], padding="max_length", max_length=77,
                        return_tensors="pt").input_ids
    fused = load_pipeline("tiny", CPU, torch.float32,
                          [LoraSpec(cfg.out, 0.5), LoraSpec(str(tmp_path / "te"))])
    plain = build_tiny_pipeline()
    with torch.no_grad():
        got, want = fused.text_encoder(ids)[0], ref.text_encoder(ids)[0]
        base = plain.text_encoder(ids)[0]
    assert (got - base).abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not any("lora" in n for n, _ in fused.text_encoder.named_modules())


def test_lora_spec_and_file_checks(tmp_path, trained):
    assert parse_lora_spec("out/lora:0.8") == LoraSpec("out/lora", 0.8)
    assert parse_lora_spec("out/lora", 0.5) == LoraSpec("out/lora", 0.5)
    assert parse_lora_spec("/a:b/lora") == LoraSpec("/a:b/lora", 1.0)
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "pytorch_lora_weights.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="no .safetensors file .*pickle"):
        load_pipeline("tiny", CPU, torch.float32, [LoraSpec(str(tmp_path / "pickled"))])
    (tmp_path / "x.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="is not a .safetensors file"):
        load_pipeline("tiny", CPU, torch.float32, [LoraSpec(str(tmp_path / "x.bin"))])
    foreign = tmp_path / "foreign.safetensors"
    save_file({"unet.no_such_block.to_q.lora_A.weight": torch.zeros(4, 32),
               "unet.no_such_block.to_q.lora_B.weight": torch.zeros(32, 4)}, str(foreign))
    with pytest.raises(UserError, match="LoRA .*foreign.safetensors"):
        load_pipeline("tiny", CPU, torch.float32, [LoraSpec(str(foreign))])


def test_incompatible_peft_is_one_line_naming_versions(trained, tmp_path, monkeypatch, capsys):
    """A user's own environment pairs a transformers with a peft older than it needs (as a
    fresh unpinned install did: transformers 5.24 with peft 0.21.2): one line, the versions."""
    from importlib.metadata import version

    import transformers.integrations.peft as tp

    cfg, _ = trained
    monkeypatch.setattr(tp, "MIN_PEFT_VERSION", "99.0")
    out = tmp_path / "ds"
    rc = main(["synth", "--model", "tiny", "--classes", "dog,", "--steps", "1", "--height",
               "64", "--width", "64", "--no-progress", "--out", str(out), "--lora", cfg.out])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert f"peft {version('peft')} is installed" in err[0]
    assert f"transformers {version('transformers')} needs peft >= 99.0" in err[0]
    assert "constraints.txt" in err[0] and not out.exists()


def test_synth_cli_records_loras_and_refuses_others(trained, tmp_path, capsys):
    cfg, _ = trained
    out = tmp_path / "ds"
    args = ["synth", "--model", "tiny", "--classes", "dog,", "--num-per-class", "1", "--steps",
            "2", "--height", "64", "--width", "64", "--no-progress", "--out", str(out)]
    assert main([*args, "--lora", f"{cfg.out}:0.5", "--lora", cfg.out, "--lora-scale",
                 "0.25"]) == 0
    job = json.loads((out / "job.json").read_text())
    assert [(x["path"], x["scale"]) for x in job["loras"]] == [(cfg.out, 0.5), (cfg.out, 0.25)]
    assert all(len(x["sha256"]) == 16 for x in job["loras"])
    assert main([*args, "--lora", f"{cfg.out}:0.5", "--lora", cfg.out, "--lora-scale",
                 "0.25"]) == 0  # the same job resumes (nothing to do)
    capsys.readouterr()
    assert main([*args, "--lora", f"{cfg.out}:0.6"]) == 2
    assert "holds a different job" in capsys.readouterr().err
    missing = tmp_path / "ds2"
    assert main([*args[:-1], str(missing), "--lora", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "LoRA" in err[0] and "does not exist" in err[0]
    assert not missing.exists()


def test_lora_train_cli_end_to_end(tmp_path):
    images = _write_images(tmp_path / "images", n=2)
    out = tmp_path / "lora"
    r = subprocess.run(
        [sys.executable, "-m", "attnseg.pipeline.cli", "lora", "train", "--images", str(images),
         "--caption", "a street", "--out", str(out), "--steps", "3", "--crop", "64",
         "--rank", "2", "--target-modules", "to_k,to_v", "--no-progress"],
        env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "trained LoRA to step 3" in r.stdout and "probe loss" in r.stdout
    assert "noise" in r.stdout  # the tiny-model notice
    keys = load_file(str(out / LORA_WEIGHTS)).keys()
    assert keys and all(".to_k." in k or ".to_v." in k for k in keys)


@pytest.mark.parametrize("change, message", [
    ({"images": "/no/such/folder"}, "image folder /no/such/folder does not exist"),
    ({"caption": None}, "has no caption file 1.txt and no --caption"),
    ({"target_modules": ("to_q", "to_qq")}, "--target-modules ['to_qq'] match no Linear"),
    ({"crop": 60}, "--crop 60 is not a positive multiple of 8"),
    ({"dtype": "fp16"}, "fp16 training would need loss scaling"),
])
def test_lora_train_bad_input(tmp_path, change, message):
    change = dict(change)
    images = change.pop("images", None) or _write_images(tmp_path / "images", n=2)
    out = tmp_path / "lora"
    with pytest.raises(UserError) as info:
        train_lora(_config(images, out, steps=1, **change), progress=False)
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
    images = _write_images(tmp_path / "images")
    summary = train_lora(_config(images, tmp_path / "lora", device="cuda"), progress=False)
    assert summary["dtype"] == "bfloat16"
    assert summary["probe_loss_end"] < summary["probe_loss_start"]
    cuda = torch.device("cuda")
    fused = load_pipeline("tiny", cuda, torch.float16, [LoraSpec(str(tmp_path / "lora"))])
    unfused = load_pipeline("tiny", cuda, torch.float16)
    unfused.load_lora_weights(str(tmp_path / "lora"))
    img_f, _ = _generate(fused)
    img_u, _ = _generate(unfused)
    assert np.abs(img_f - img_u).mean() < 1.0  # fp16 fusing rounds differently, not more
