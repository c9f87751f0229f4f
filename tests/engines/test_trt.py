"""TensorRT backend. Building and running plans needs TensorRT and a GPU (skipped without
them); the build configuration, the plugin's ONNX nodes and the plugin graph's math are
checked everywhere."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
import torch

from attnseg.engines.graph import MapGraphSpec, UNetWithMaps
from attnseg.engines.trt import plan_config, plugin_onnx_translation
from attnseg.pipeline.config import HarvestConfig, get_preset
from attnseg.pipeline.models.tiny import build_tiny_pipeline

from .conftest import MAX_BATCH, SIZE


def _tensorrt_or_skip():
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # the bindings wheel without its libraries raises OSError
        pytest.skip(f"TensorRT is not installed here ({type(exc).__name__}); "
                    "the tensorrt backend is tested where it is")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")


def test_plan_config_follows_the_export_spec(ort_engine):
    folder, _, _ = ort_engine
    part = json.loads((folder / "engine.json").read_text())["parts"]["unet"]
    cfg = plan_config(part["io"], part["profiles"], refit=True)
    # fp32 export: TF32 allowed, not strongly typed; refit as asked.
    assert cfg.tf32 and not cfg.strongly_typed and cfg.refit
    lo, opt, hi = cfg.profile["sample"]
    lat = (SIZE[0] // 8, SIZE[1] // 8)
    assert lo == (2, 4, *lat) and hi == (2 * MAX_BATCH, 4, *lat)
    assert cfg.profile["token_weights"][0] == (1, 77, 1)
    assert cfg.profile["token_weights"][2] == (MAX_BATCH, 77, 8)
    assert "timestep" not in cfg.profile  # static input: no profile entry
    half = {k: dict(v, dtype="float16" if v["dtype"] == "float32" else v["dtype"])
            for k, v in part["io"].items()}
    cfg16 = plan_config(half, part["profiles"], refit=False)
    assert cfg16.strongly_typed and not cfg16.tf32


def test_plugin_onnx_nodes_carry_what_the_plugin_needs(tmp_path):
    class OneLayer(torch.nn.Module):
        def forward(self, q, k, tw):
            return torch.ops.attnseg.class_attention_maps(q, k, tw, 4, 6, 40 ** -0.5, 2, 40, 77,
                                                          16) * 2.0

    q, k = torch.randn(2, 2, 24, 40), torch.randn(2, 2, 77, 40)
    tw = torch.rand(2, 77, 3)
    path = tmp_path / "layer.onnx"
    torch.onnx.export(OneLayer(), (q, k, tw), str(path), dynamo=True, opset_version=18,
                      custom_translation_table=plugin_onnx_translation())
    model = onnx.load(str(path))
    nodes = [n for n in model.graph.node if n.op_type == "class_attention_maps"]
    assert len(nodes) == 1 and nodes[0].domain == "trt.plugins"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs["plugin_namespace"] == b"attnseg" and attrs["aot"] == 1
    assert (attrs["h"], attrs["w"], attrs["heads"], attrs["head_dim"], attrs["tokens"],
            attrs["block_c"]) == (4, 6, 2, 40, 77, 16)
    assert abs(attrs["scale"] - 40 ** -0.5) < 1e-7


def test_plugin_graph_computes_the_same_maps_as_the_reference_graph():
    pipe = build_tiny_pipeline(seed=0)
    graph = MapGraphSpec.from_harvest(HarvestConfig(  # resize + clamp per layer
        strides=(8, 16, 32, 64), blocks=("down", "up"), accumulate="common",
        accumulate_mode="bicubic", clamp_each_step=True, combine_stride=8))
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(4, 4, 8, 6, generator=g), torch.tensor([300.0]),
            torch.randn(4, 77, 32, generator=g), torch.rand(2, 77, 3, generator=g))
    outs = {}
    for impl in ("ref", "plugin"):
        module = UNetWithMaps(pipe.unet, graph, SIZE, map_impl=impl)
        with torch.no_grad():
            outs[impl] = module(*args)
        module.remove()
    assert len(outs["ref"]) == len(outs["plugin"]) >= 2
    for a, b in zip(outs["ref"], outs["plugin"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# --- needs TensorRT and a GPU ---------------------------------------------------------------


@pytest.fixture(scope="module")
def trt_setup(tmp_path_factory):
    _tensorrt_or_skip()
    from attnseg.engines.build import EngineOptions, build_engines

    pipe = build_tiny_pipeline(seed=0).to("cuda")
    preset = get_preset("attnseg")
    folder = tmp_path_factory.mktemp("trt") / "fp32"
    opts = EngineOptions(backend="tensorrt", height=SIZE[0], width=SIZE[1], max_batch=2,
                         harvest=preset.harvest, trt_refit=True)
    build_engines(pipe, opts, folder, source={"model": "tiny"}, log=lambda m: None)
    return folder, pipe, preset


def test_tensorrt_generation_matches_torch_path(trt_setup):
    from attnseg.engines.verify import verify_engines

    folder, _, _ = trt_setup
    report = verify_engines(folder, steps=4, device="cuda", log=lambda m: None)
    assert report["ok"], report


def test_tensorrt_cuda_graph_replay_equals_plain_execution(trt_setup):
    from attnseg.engines.harvest import load_engines

    folder, pipe, _ = trt_setup
    engines = load_engines(folder, pipe)
    unet = engines.engines["unet"]
    g = torch.Generator().manual_seed(0)
    feeds = {"sample": torch.randn(4, 4, 8, 6, generator=g).cuda(),
             "timestep": torch.tensor([10.0]).cuda(),
             "encoder_hidden_states": torch.randn(4, 77, 32, generator=g).cuda(),
             "token_weights": torch.rand(2, 77, 2, generator=g).cuda()}
    unet.use_cuda_graphs = False
    plain = unet.infer(feeds)
    unet.use_cuda_graphs = True
    first, second = unet.infer(feeds), unet.infer(feeds)
    assert unet._graph is not None
    for name in plain:
        torch.testing.assert_close(first[name], plain[name])
        torch.testing.assert_close(second[name], plain[name])
    engines.close()


def test_tensorrt_refit_swaps_weights(trt_setup, tmp_path):
    from attnseg.engines.export import export_onnx, unet_spec
    from attnseg.engines.harvest import load_engines

    folder, pipe, preset = trt_setup
    other = build_tiny_pipeline(seed=1).to("cuda")
    spec = unet_spec(other.unet, MapGraphSpec.from_harvest(preset.harvest), SIZE, 2, 8)
    export_onnx(spec, tmp_path / "unet.onnx")
    engines = load_engines(folder, pipe)
    unet = engines.engines["unet"]
    feeds = {"sample": torch.randn(4, 4, 8, 6).cuda(), "timestep": torch.tensor([10.0]).cuda(),
             "encoder_hidden_states": torch.randn(4, 77, 32).cuda(),
             "token_weights": torch.rand(2, 77, 2).cuda()}
    unet.refit_from_onnx(tmp_path / "unet.onnx")
    got = unet.infer(feeds)
    with torch.no_grad():
        want = spec.module(*[feeds[n] for n in spec.input_names])
    spec.module.remove()
    torch.testing.assert_close(got["noise_pred"], want[0], atol=1e-3, rtol=1e-3)
    engines.close()


def test_corrupt_tensorrt_plan_gives_a_clear_error(trt_setup, tmp_path):
    from attnseg.engines import cache
    from attnseg.engines.harvest import load_engines
    from attnseg.pipeline.errors import UserError

    folder, pipe, _ = trt_setup
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    (bad / "unet.plan").write_bytes(b"not a plan")
    manifest = json.loads((bad / "engine.json").read_text())
    manifest["files"]["unet.plan"] = {"size": 10, "sha256": cache.file_sha256(bad / "unet.plan")}
    (bad / "engine.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="cannot be loaded by TensorRT"):
        load_engines(bad, pipe)
