"""Model loading: untrusted weights (pickles only on request), and load failures on one line."""

from __future__ import annotations

import json

import pytest

from attnseg.pipeline.cli import main
from attnseg.pipeline.errors import UserError
from attnseg.pipeline.models.loading import _load_failure, check_model_path

ARGS = ["synth", "--classes", "dog,", "--steps", "1", "--height", "64", "--width", "64",
        "--no-progress"]


@pytest.fixture(scope="module")
def pickle_folder(tmp_path_factory, tiny_pipe):
    """A diffusers folder whose UNet and VAE weights exist only as pickles (.bin)."""
    folder = tmp_path_factory.mktemp("models") / "pickled"
    tiny_pipe.save_pretrained(folder, safe_serialization=False)
    assert (folder / "unet" / "diffusion_pytorch_model.bin").exists()
    assert not list((folder / "unet").glob("*.safetensors"))
    return folder


def test_pickle_only_folder_is_refused_unless_asked_for(pickle_folder, tmp_path, capsys):
    with pytest.raises(UserError, match="holds only pickle weights .* unet, vae"):
        check_model_path(str(pickle_folder))
    out = tmp_path / "refused"
    assert main([*ARGS, "--model", str(pickle_folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--allow-pickle" in err[0] and not out.exists()
    # The user trusts the file and says so: it loads and generates.
    out = tmp_path / "allowed"
    assert main([*ARGS, "--model", str(pickle_folder), "--allow-pickle", "--out", str(out)]) == 0
    capsys.readouterr()
    assert json.loads((out / "job.json").read_text())["model"] == str(pickle_folder)


def test_pickle_checkpoint_file_is_refused_unless_asked_for(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not loaded")
    with pytest.raises(UserError, match="pickle checkpoints are not loaded.*--allow-pickle"):
        check_model_path(str(ckpt))
    assert check_model_path(str(ckpt), allow_pickle=True) == ckpt


def test_safetensors_are_required_even_past_the_folder_check(pickle_folder, monkeypatch):
    """Without --allow-pickle, diffusers itself is told to read safetensors only."""
    import torch

    from attnseg.pipeline.models import loading as models

    monkeypatch.setattr(models, "_pickle_only_parts", lambda folder: [])
    with pytest.raises(UserError, match="could not load model .*safetensors"):
        models.load_pipeline(str(pickle_folder), torch.device("cpu"), torch.float32)


def test_load_failure_names_the_cause_not_a_stack_trace():
    try:
        try:
            raise OSError("Error no file named model_index.json found in directory /m")
        except OSError as cause:
            raise OSError("Cannot load model /m: model is not cached locally and an error "
                          "occurred while trying to fetch metadata from the Hub. Please check "
                          "out the root cause in the stacktrace above.") from cause
    except OSError as e:
        line = _load_failure(e)
    assert "stacktrace" not in line and "no file named model_index.json" in line
