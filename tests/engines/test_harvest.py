"""ONNX export of the tiny model and ONNX Runtime generation against the torch path."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch

from attnseg.engines import cache
from attnseg.engines.build import EngineOptions, build_engines
from attnseg.engines.harvest import EngineHarvester, load_engines
from attnseg.pipeline.errors import UserError
from attnseg.pipeline.harvest.attention import layer_grid
from attnseg.pipeline.harvest.harvester import AttentionHarvester
from attnseg.pipeline.prompts import PromptSpec, default_prompts, load_classes
from attnseg.pipeline.synth.job import Sample, plan_samples

from .conftest import MAX_BATCH, SIZE, torch_vs_engine

pytest.importorskip("onnxruntime")


def _samples(n, classes="dog,cat,aeroplane"):
    cls = load_classes(classes)
    return plan_samples(cls, default_prompts(cls), 2, 0)[:n]


def test_onnx_export_has_the_specs_io_and_dynamic_axes(ort_engine):
    folder, pipe, preset = ort_engine
    manifest = json.loads((folder / "engine.json").read_text())
    assert manifest["key"]["opset"] == 18
    for part in ("text_encoder", "unet", "vae_decoder"):
        model = onnx.load(str(folder / f"{part}.onnx"))
        onnx.checker.check_model(str(folder / f"{part}.onnx"))
        assert [i.name for i in model.graph.input] == manifest["parts"][part]["inputs"]
        assert [o.name for o in model.graph.output] == manifest["parts"][part]["outputs"]
        assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {18}
    unet = onnx.load(str(folder / "unet.onnx"))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in unet.graph.input}
    # The batch (and the CFG pair) and the class count are symbolic; the image size is fixed.
    assert isinstance(dims["sample"][0], str) and dims["sample"][2:] == [SIZE[0] // 8,
                                                                         SIZE[1] // 8]
    assert isinstance(dims["token_weights"][0], str) and isinstance(dims["token_weights"][2],
                                                                     str)
    # One map output per harvested stride, at that stride's grid, counting its layers.
    layout = manifest["parts"]["unet"]["layout"]
    # Count the cross-attention layers per stride with the harvester's own bookkeeping.
    harvester = AttentionHarvester(pipe.unet, preset.harvest)
    weights = torch.zeros(1, 77, 1)
    with harvester.capture(weights, SIZE, 1) as cap:
        pipe.unet(torch.zeros(2, 4, SIZE[0] // 8, SIZE[1] // 8), 1,
                  torch.zeros(2, 77, pipe.unet.config.cross_attention_dim))
    harvester.remove()
    expected = dict(cap.counts)
    assert {m["stride"]: m["count"] for m in layout} == expected
    for m in layout:
        _, h, w = layer_grid(m["shape"][1] * m["shape"][2], (SIZE[0] // 8, SIZE[1] // 8), SIZE)
        assert (h, w) == tuple(m["shape"][1:])


@pytest.mark.parametrize("batch", [MAX_BATCH, 1])
def test_onnxruntime_generation_matches_torch_path(ort_engine, batch):
    folder, pipe, preset = ort_engine
    seen = []  # the engine really replaced the modules (the diffusers loop runs unchanged)
    diff, reference = torch_vs_engine(pipe, preset, SIZE, 4, 7.5, _samples(batch),
                                      load_engines(folder, pipe),
                                      inside=lambda p: seen.append(type(p.unet).__name__))
    assert seen == ["_UNetAdapter"] and type(pipe.unet).__name__ == "UNet2DConditionModel"
    assert diff["image_max_abs_diff"] <= 1e-4, diff
    assert diff["label_agreement"] == 1.0, diff
    assert diff["reliability_max_abs_diff"] <= 1, diff  # uint8 rounding of maps ~1e-7 apart
    assert set(diff["map_max_rel_diff"]) == {f"s{s}" for s in reference[3].maps}
    assert max(diff["map_max_rel_diff"].values()) < 1e-4, diff
    # The comparison is not vacuous: the maps differ between samples and are not flat.
    maps = reference[3].maps[8]
    assert float(maps.std()) > 0


def test_without_guidance_the_engine_still_harvests_the_same(ort_engine):
    folder, pipe, preset = ort_engine
    diff, _ = torch_vs_engine(pipe, preset, SIZE, 3, 1.0, _samples(1),
                              load_engines(folder, pipe))
    assert diff["image_max_abs_diff"] <= 1e-4 and diff["label_agreement"] == 1.0, diff
    assert diff["reliability_max_abs_diff"] <= 1, diff  # uint8 rounding of maps ~1e-7 apart


def _opts(preset):
    return EngineOptions(backend="onnxruntime", height=SIZE[0], width=SIZE[1],
                         max_batch=MAX_BATCH, max_classes=8, harvest=preset.harvest)


def test_valid_engine_is_reused_and_stale_one_rebuilt(ort_engine, tmp_path, monkeypatch):
    folder, pipe, preset = ort_engine
    copy = tmp_path / "engine"
    shutil.copytree(folder, copy)
    exported = []

    def fake_export(spec, path, opset, custom_translation_table=None):
        # Stands in for the (slow) real export: records the call and writes a file.
        exported.append(spec.name)
        path.write_bytes(b"onnx:" + spec.name.encode())
        return [path]

    monkeypatch.setattr("attnseg.engines.build.export_onnx", fake_export)
    assert build_engines(pipe, _opts(preset), copy, log=lambda m: None) == (copy, "reused")
    assert exported == []
    # Stale: built by another attnseg version (the manifest is otherwise intact).
    manifest = json.loads((copy / "engine.json").read_text())
    manifest["key"]["attnseg_version"] = "0.0.0-old"
    (copy / "engine.json").write_text(json.dumps(manifest))
    logs = []
    assert build_engines(pipe, _opts(preset), copy, log=logs.append) == (copy, "built")
    assert sorted(exported) == ["text_encoder", "unet", "vae_decoder"]
    assert "attnseg_version" in logs[0]
    rebuilt = json.loads((copy / "engine.json").read_text())
    assert rebuilt["key"]["attnseg_version"] == cache.attnseg_version()
    assert (copy / "unet.onnx").read_bytes() == b"onnx:unet"
    assert not list(tmp_path.glob(".engine.*")), "temporary build folders were left behind"
    # Other model weights, other image size, or a damaged file: stale as well.
    from attnseg.pipeline.models.tiny import build_tiny_pipeline

    key = cache.EngineKey.from_dict(rebuilt["key"])
    other = build_tiny_pipeline(seed=1)
    from attnseg.engines.build import engine_key

    assert "model_hash" in cache.stale_reason(
        copy, engine_key(other, _opts(preset), torch.float32, "x", []))
    assert cache.stale_reason(copy, key) is None
    (copy / "vae_decoder.onnx").write_bytes(b"tampered")
    assert "corrupt" in cache.stale_reason(copy, key)


def test_corrupt_or_mismatched_engine_gives_a_clear_error(ort_engine, tmp_path):
    folder, pipe, preset = ort_engine
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    data = bytearray((bad / "unet.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "unet.onnx").write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"unet\.onnx is corrupt .*rebuild"):
        load_engines(bad, pipe)
    # A garbage file whose manifest entry was updated too: ONNX Runtime's refusal, one line.
    (bad / "unet.onnx").write_bytes(b"\x08\x07garbage")
    manifest = json.loads((bad / "engine.json").read_text())
    manifest["files"]["unet.onnx"] = {"size": 9, "sha256": cache.file_sha256(bad / "unet.onnx")}
    (bad / "engine.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"cannot be loaded by ONNX Runtime") as err:
        load_engines(bad, pipe)
    assert "\n" not in str(err.value)
    # A manifest that is not JSON.
    (bad / "engine.json").write_text("{not json")
    with pytest.raises(UserError, match="manifest .* is corrupt"):
        load_engines(bad, pipe)
    # Another size than the engine's, and other model weights.
    harvester = EngineHarvester(pipe, load_engines(folder, pipe), preset.harvest)
    try:
        with pytest.raises(UserError, match="built for 64x48"):
            with harvester.capture(torch.zeros(1, 77, 1), (64, 64), 2):
                pass
    finally:
        harvester.remove()
    from attnseg.engines.harvest import check_engine_model
    from attnseg.pipeline.models.tiny import build_tiny_pipeline

    key = cache.EngineKey.from_dict(json.loads((folder / "engine.json").read_text())["key"])
    with pytest.raises(UserError, match=r"built for model tiny \(weights [0-9a-f]{12}\), not "
                       r"for model other-tiny \(weights [0-9a-f]{12}\); pass --model tiny"):
        check_engine_model(key, build_tiny_pipeline(seed=1), folder, "other-tiny")
    # Other harvesting settings than the engine computes.
    from attnseg.pipeline.config import get_preset

    with pytest.raises(UserError, match="other harvesting settings"):
        EngineHarvester(pipe, load_engines(folder, pipe), get_preset("dataset-diffusion").harvest)


def test_ort_engine_runs_batches_it_was_not_traced_with(ort_engine):
    folder, pipe, preset = ort_engine
    engines = load_engines(folder, pipe)
    unet = engines.engines["unet"]
    g = torch.Generator().manual_seed(3)
    for b, c in ((1, 1), (3, 5)):
        feeds = {"sample": torch.randn(2 * b, 4, SIZE[0] // 8, SIZE[1] // 8, generator=g),
                 "timestep": torch.tensor([10.0]),
                 "encoder_hidden_states": torch.randn(2 * b, 77, 32, generator=g),
                 "token_weights": torch.rand(b, 77, c, generator=g)}
        out = unet.infer(feeds)
        assert out["noise_pred"].shape == (2 * b, 4, SIZE[0] // 8, SIZE[1] // 8)
        for m in engines.layout:
            assert out[m.name].shape == (b, c, *m.shape[1:])
            assert np.isfinite(out[m.name].numpy()).all()
    engines.close()
    # Values, not only shapes: a batch of 3 (traced with 2) whose prompts name two and three
    # classes (traced with one), generated through the engine against the torch path.
    dog, cat, plane = load_classes("dog,cat,aeroplane")
    texts = [("a dog and a cat", (dog, cat)), ("a cat, a dog and an aeroplane", (cat, dog, plane)),
             ("an aeroplane and a dog", (plane, dog))]
    samples = [Sample(i, PromptSpec(t, tuple((c, c.word) for c in cs)), 100 + i)
               for i, (t, cs) in enumerate(texts)]
    diff, reference = torch_vs_engine(pipe, preset, SIZE, 2, 7.5, samples,
                                      load_engines(folder, pipe))
    assert diff["image_max_abs_diff"] <= 1e-4 and diff["label_agreement"] == 1.0, diff
    assert diff["reliability_max_abs_diff"] <= 1, diff  # uint8 rounding of maps ~1e-7 apart
    assert max(diff["map_max_rel_diff"].values()) < 1e-4, diff
    assert reference[3].maps[8].shape[:2] == (3, 3)  # batch 3, three class columns


def test_sdxl_unet_engine_matches_torch_path(tmp_path):
    """SDXL: the UNet engine takes the added conditioning (pooled text, size and crop ids) as
    inputs; its text encoders and VAE stay torch modules; generation through ONNX Runtime
    equals the torch path, with and without guidance."""
    pytest.importorskip("onnxscript")
    from attnseg.pipeline.config import get_preset
    from attnseg.pipeline.models.tiny import build_tiny_sdxl_pipeline

    pipe = build_tiny_sdxl_pipeline(seed=0)
    # the masks before the default's dense CRF, which can turn maps 1e-7 apart into a pixel of
    # another label: the engine's maps are what is compared
    preset = get_preset("attnseg", pipe.vae_scale_factor).without_crf()
    size = (64, 64)
    opts = EngineOptions(backend="onnxruntime", height=size[0], width=size[1],
                         max_batch=MAX_BATCH, max_classes=8, harvest=preset.harvest)
    folder = tmp_path / "sdxl-ort"
    build_engines(pipe, opts, folder, log=lambda msg: None)
    manifest = json.loads((folder / "engine.json").read_text())
    assert set(manifest["parts"]) == {"unet"} and not (folder / "deploy").exists()
    assert manifest["parts"]["unet"]["inputs"][-2:] == ["text_embeds", "time_ids"]
    from attnseg.engines.deploy import DeployRuntime

    with pytest.raises(UserError, match="UNet only"):  # the torch-free runtime is SD's loop
        DeployRuntime(folder, runner="onnxruntime")
    seen = []  # the UNet is the engine, the text encoders stay torch

    def modules(p):
        seen.append((type(p.unet).__name__, type(p.text_encoder_2).__name__))

    for guidance in (7.5, 1.0):
        diff, reference = torch_vs_engine(pipe, preset, size, 3, guidance, _samples(2),
                                          load_engines(folder, pipe), inside=modules)
        assert diff["image_max_abs_diff"] <= 1e-4, diff
        # maps ~1e-7 apart: a pixel at a near-tie may flip (one did at one torch thread)
        assert diff["label_agreement"] >= 1 - 2 / 8192, diff
        assert diff["reliability_max_abs_diff"] <= 1, diff  # uint8 rounding
        assert max(diff["map_max_rel_diff"].values()) < 1e-4, diff
        assert float(reference[3].maps[16].std()) > 0
    assert seen == [("_UNetAdapter", "CLIPTextModelWithProjection")] * 2


def test_an_engine_for_other_heads_is_refused_in_one_line(ort_engine):
    """The engine key keeps `harvest.heads` only when set, so a mismatch can be a key that
    only one side has: it is named either way round."""
    folder, pipe, preset = ort_engine
    engines = load_engines(folder, pipe)
    layer = "up_blocks.3.attentions.0.transformer_blocks.0.attn2"
    with_heads = replace(preset.harvest, heads={layer: (1,)})
    with pytest.raises(UserError, match=r"\['heads'\]: \[None\], this job needs \[\{"):
        EngineHarvester(pipe, engines, with_heads)
    # An engine built with heads (its key says so), asked for every head.
    engines.key = replace(engines.key, maps={**engines.key.maps, "heads": {layer: [1]}})
    with pytest.raises(UserError, match=r"\['heads'\]: \[\{.*\}\], this job needs \[None\]"):
        EngineHarvester(pipe, engines, preset.harvest)
    engines.close()


def test_engine_model_mismatch_names_both_models(tmp_path, monkeypatch):
    """The refusal names the model the engine was built for (recorded in its manifest's
    source) and the one given; the hashes alone decide (an engine without the name recorded
    still loads and is still checked)."""
    from attnseg.engines import harvest

    key = cache.EngineKey(backend="onnxruntime", model="", model_hash="a" * 64,
                          base_model_hash="b" * 64, loras=(), height=64, width=64, max_batch=1,
                          max_classes=1, dtype="fp32", opset=18, maps={})
    manifest = {"format": cache.FORMAT_VERSION, "key": key.to_dict(), "parts": {},
                "source": {"model": "runwayml/stable-diffusion-v1-5"}}
    (tmp_path / cache.MANIFEST).write_text(json.dumps(manifest))
    monkeypatch.setattr(harvest, "model_fingerprint", lambda pipe: "c" * 64)
    with pytest.raises(UserError) as err:
        harvest.check_engine_model(key, object(), tmp_path, "my/other-model")
    line = str(err.value)
    assert "\n" not in line
    assert ("built for model runwayml/stable-diffusion-v1-5 (weights bbbbbbbbbbbb), not for "
            "model my/other-model (weights cccccccccccc)") in line
    assert "pass --model runwayml/stable-diffusion-v1-5" in line
    # An engine whose manifest records no name: the hashes, and no made-up name.
    del manifest["source"]
    (tmp_path / cache.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="a model whose name it does not record"):
        harvest.check_engine_model(key, object(), tmp_path, "my/other-model")
