"""Engines for the DiTs (PixArt, SD3, Flux): `TransformerWithMaps` harvests inside the
transformer's call, and the compile backend runs it. Each is compared with the torch harvester
on the same latents: images and labels equal, maps within float rounding."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from attnseg.engines.backends import TorchEngine
from attnseg.engines.build import EngineOptions, engine_key
from attnseg.engines.graph import MapGraphSpec, TransformerWithMaps
from attnseg.engines.harvest import EngineSet, compiled_engine_set
from attnseg.pipeline.cli import main
from attnseg.pipeline.config import get_preset
from attnseg.pipeline.errors import UserError
from attnseg.pipeline.models import tiny
from attnseg.pipeline.models.loading import model_family, model_fingerprint, token_stride
from attnseg.pipeline.prompts import default_prompts, load_classes
from attnseg.pipeline.synth.job import plan_samples

from .conftest import torch_vs_engine

SIZE = (64, 48)
BUILDERS = {"pixart": tiny.build_tiny_pixart_pipeline, "sd3": tiny.build_tiny_sd3_pipeline,
            "flux": tiny.build_tiny_flux_pipeline}
# Flux is guidance-distilled (no CFG half); PixArt and SD3 run with and without guidance.
GUIDANCE = {"pixart": (4.5, 1.0), "sd3": (4.5, 1.0), "flux": (3.5,)}


@pytest.fixture(scope="module")
def pipes():
    return {name: build(seed=0) for name, build in BUILDERS.items()}


def _samples():
    classes = load_classes("dog,cat,aeroplane")
    return plan_samples(classes, default_prompts(classes), 1, 0)[:2]


def _key(pipe, harvest, backend="compile"):
    opts = EngineOptions(backend=backend, height=SIZE[0], width=SIZE[1], max_batch=2,
                         harvest=harvest)
    return engine_key(pipe, opts, torch.float32, model_fingerprint(pipe), [])


def _eager_set(pipe, harvest, map_impl):
    """The graph module called eagerly (TorchEngine): what the compile backend compiles."""
    module = TransformerWithMaps(pipe.transformer, MapGraphSpec.from_harvest(harvest), SIZE,
                                 model_family(pipe), token_stride(pipe), map_impl=map_impl)
    engine = TorchEngine(module, "transformer", module.input_names, module.output_names, {},
                         torch.device("cpu"))
    return EngineSet(_key(pipe, harvest), {"transformer": engine}, module.layout, None, module)


def _assert_close(diff, image_tol=0.0):
    from attnseg.engines.verify import TOLERANCES

    assert diff["image_max_abs_diff"] <= image_tol, diff
    assert max(diff["map_max_rel_diff"].values()) < 1e-5, diff
    # The maps agree to 1e-5 (above); a pixel whose value sits on the mask threshold can still
    # flip with the CPU's summation order (seen on an AMD EPYC: 1 of 6,144 pixels), so labels
    # are held to the fp32 tolerance `attnseg engine verify` uses, not to exact equality.
    assert diff["label_agreement"] >= TOLERANCES["fp32"][1], diff


@pytest.mark.parametrize("map_impl", ["ref", "op"])
@pytest.mark.parametrize("family", list(BUILDERS))
def test_transformer_with_maps_equals_torch_harvester(pipes, family, map_impl,
                                                      torch_one_thread):
    """With and without the guidance half; "op" is the kernel custom op the GPU graph
    holds (numba here), except PixArt's masked layers, which take the masked reference."""
    pipe = pipes[family]
    preset = get_preset("attnseg", pipe.vae_scale_factor)
    for guidance in GUIDANCE[family]:
        engines = _eager_set(pipe, preset.harvest, map_impl)
        assert engines.layout[0].count == len(engines.unet_module.transformer_layers) > 0
        diff, _ = torch_vs_engine(pipe, preset, SIZE, 3, guidance, _samples(), engines)
        _assert_close(diff)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_joint_softmax_depth_and_common_stride_in_the_graph(pipes, family, torch_one_thread):
    """The DiT settings travel into the graph: softmax over the joint sequence, the later
    half of the layers, and accumulation at a common stride with clamping."""
    pipe = pipes[family]
    base = get_preset("attnseg", pipe.vae_scale_factor)
    for harvest in (replace(base.harvest, joint_softmax="joint", transformer_depth=(0.5, 1.0)),
                    replace(base.harvest, accumulate="common", combine_stride=8,
                            accumulate_mode="bilinear", clamp_each_step=True)):
        preset = replace(base, harvest=harvest)
        engines = _eager_set(pipe, harvest, "ref")
        diff, _ = torch_vs_engine(pipe, preset, SIZE, 2, GUIDANCE[family][0], _samples(),
                                  engines)
        _assert_close(diff)
    # Settings that change the maps change the engine key; the defaults keep older keys.
    default = MapGraphSpec.from_harvest(base.harvest).to_dict()
    assert "joint_softmax" not in default and "transformer_depth" not in default
    joint = MapGraphSpec.from_harvest(replace(base.harvest, joint_softmax="joint"))
    assert MapGraphSpec.from_dict(joint.to_dict()) == joint != MapGraphSpec.from_dict(default)


def test_dit_graph_refuses_what_it_cannot_harvest(pipes):
    pipe = pipes["sd3"]
    harvest = get_preset("attnseg", pipe.vae_scale_factor).harvest
    with pytest.raises(UserError, match="all at stride 16"):
        TransformerWithMaps(pipe.transformer, MapGraphSpec.from_harvest(
            replace(harvest, strides=(8, 32))), SIZE, "sd3", token_stride(pipe))
    with pytest.raises(UserError, match="refinement needs self-attention"):
        TransformerWithMaps(pipe.transformer, MapGraphSpec.from_harvest(
            replace(harvest, refine_power=2)), SIZE, "sd3", token_stride(pipe))
    # A refusal leaves the transformer's processors as they were.
    assert all(type(p).__name__ == "JointAttnProcessor2_0"
               for p in pipe.transformer.attn_processors.values())


@pytest.mark.slow
@pytest.mark.parametrize("family", list(BUILDERS))
def test_compile_backend_for_dits_matches_torch_path(pipes, family):
    """torch.compile(fullgraph=True) of each family's transformer with the harvesting inside
    (about 20-30 s of inductor per family on 2 CPU cores)."""
    pipe = pipes[family]
    preset = get_preset("attnseg", pipe.vae_scale_factor)
    engines = compiled_engine_set(pipe, _key(pipe, preset.harvest))
    assert engines.engines["transformer"].compiled is not None
    diff, _ = torch_vs_engine(pipe, preset, SIZE, 3, GUIDANCE[family][0], _samples(), engines)
    _assert_close(diff, image_tol=1e-4)


@pytest.mark.slow
def test_dit_compile_engine_through_the_cli(tmp_path, capsys):
    """`engine build --backend compile` records a DiT folder; `synth --engine` runs it."""
    folder = tmp_path / "pixart-compiled"
    size = ["--height", str(SIZE[0]), "--width", str(SIZE[1])]
    assert main(["engine", "build", "--model", "tiny-pixart", "--backend", "compile", "--out",
                 str(folder), *size, "--device", "cpu"]) == 0
    manifest = json.loads((folder / "engine.json").read_text())
    part = manifest["parts"]["transformer"]
    assert set(manifest["parts"]) == {"transformer"}
    assert part["inputs"][-1] == "token_weights" and part["layout"][0]["stride"] == 16
    assert main(["synth", "--model", "tiny-pixart", "--classes", "dog,cat", "--num-per-class",
                 "1", "--steps", "2", *size, "--batch-size", "2", "--no-progress", "--engine",
                 str(folder), "--out", str(tmp_path / "ds")]) == 0
    out = capsys.readouterr().out
    assert "wrote 2 samples" in out
    assert len(list((tmp_path / "ds" / "SegmentationClass").glob("*.png"))) == 2


@pytest.mark.parametrize("model", ["tiny-pixart", "tiny-sd3", "tiny-flux"])
def test_exported_engines_refuse_dits_in_one_line(tmp_path, capsys, model):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    assert main(["synth", "--model", model, "--classes", "dog,cat", "--backend", "onnxruntime",
                 "--out", str(tmp_path / "c"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "use --backend compile or torch" in err and model[5:] in err
    assert "Traceback" not in err
