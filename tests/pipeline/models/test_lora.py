"""LoRAs at synthesis on the tiny model: diffusers loading, fusing, several LoRAs, checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from attnseg.pipeline.cli import main
from attnseg.pipeline.errors import UserError
from attnseg.pipeline.models.loading import load_pipeline
from attnseg.pipeline.models.lora import LoraSpec, parse_lora_spec
from attnseg.pipeline.models.tiny import build_tiny_pipeline

from ..lora_helpers import CPU, generate, unet_out


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
    torch.testing.assert_close(unet_out(fused), unet_out(unfused), rtol=1e-4, atol=1e-5)
    img_b, _ = generate(base)
    img_u, lab_u = generate(unfused)
    img_f, lab_f = generate(fused)
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
    torch.testing.assert_close(unet_out(fused), unet_out(unfused), rtol=1e-4, atol=1e-5)
    one = load_pipeline("tiny", CPU, torch.float32, specs[:1])
    assert (unet_out(one) - unet_out(fused)).abs().max() > 1e-4

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
