"""UNetWithMaps' kernel op (`attnseg::accumulate_class_attention`) as the GPU path uses it:
equal to the traced reference, and compilable by torch.compile with fullgraph on CPU."""

from __future__ import annotations

import pytest
import torch

from attnseg.engines.graph import MapGraphSpec, UNetWithMaps
from attnseg.kernels.class_attention import accumulate_class_attention_ref
from attnseg.pipeline.config import HarvestConfig, get_preset
from attnseg.pipeline.errors import UserError


def _inputs(unet, size, classes=2, batch=1):
    g = torch.Generator().manual_seed(0)
    lat = (size[0] // 8, size[1] // 8)
    sample = torch.randn(2 * batch, unet.config.in_channels, *lat, generator=g)
    text = torch.randn(2 * batch, 77, unet.config.cross_attention_dim, generator=g)
    weights = torch.zeros(batch, 77, classes)
    weights[:, 2, 0] = weights[:, 4, 1] = 1.0
    return sample, torch.tensor([500.0]), text, weights


RESIZE_CLAMP_EACH_STEP = HarvestConfig(strides=(8, 16, 32, 64), blocks=("down", "up"),
                                       accumulate="common", accumulate_mode="bicubic",
                                       clamp_each_step=True, combine_stride=8)


def test_engines_refuse_per_head_accumulation():
    # The daam preset's exact order keeps every head apart: the torch path only.
    with pytest.raises(UserError, match="runs on --backend torch"):
        MapGraphSpec.from_harvest(get_preset("daam").harvest)


def test_op_impl_equals_the_traced_reference(tiny_pipe):
    """map_impl="op" (what CUDA runs) and "ref" (what exports trace) give the same maps."""
    # Native accumulation, and resize + clamp per step (what engines run for clamping recipes).
    for harvest in (get_preset("attnseg").harvest, RESIZE_CLAMP_EACH_STEP):
        spec = MapGraphSpec.from_harvest(harvest)
        outputs = {}
        for impl in ("ref", "op"):
            module = UNetWithMaps(tiny_pipe.unet, spec, (64, 48), map_impl=impl)
            try:
                with torch.no_grad():
                    outputs[impl] = module(*_inputs(tiny_pipe.unet, (64, 48)))
            finally:
                module.remove()
        assert len(outputs["op"]) == len(outputs["ref"]) > 1
        for a, b in zip(outputs["ref"], outputs["op"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_op_compiles_with_fullgraph_and_no_graph_break():
    """torch.compile wraps a mutating custom op as handler(mode, *args, **kwargs): an argument
    named `mode` made every GPU compile fail. The same registration, compiled on CPU."""
    torch._dynamo.reset()

    def step(q, k, tw):
        # As in UNetWithMaps: the buffer is created inside the graph, then mutated by the op.
        out = q.new_zeros((q.shape[0], tw.shape[2], 8, 8), dtype=torch.float32)
        torch.ops.attnseg.accumulate_class_attention(q, k, tw, out, 4, 4, 0.35, 0.5,
                                                     "bicubic", True)
        return out * 1.0

    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 16, 8, generator=g), torch.randn(1, 2, 77, 8, generator=g)
    tw = torch.zeros(1, 77, 2)
    tw[0, 3, 0] = tw[0, 5, 1] = 1.0
    compiled = torch.compile(step, fullgraph=True)  # a graph break raises here
    got = compiled(q, k, tw)
    want = torch.zeros(1, 2, 8, 8)
    accumulate_class_attention_ref(q, k, tw, want, hw=(4, 4), scale=0.35, weight=0.5,
                                   mode="bicubic", clamp=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_engine_maps_of_chosen_heads_equal_the_harvesters(tiny_pipe):
    """`harvest.heads` in an engine's graph: its per-stride map outputs, divided by their
    counts, equal the torch harvester's maps of the same heads in the same UNet call; the
    spec keeps the heads through its record (and leaves them out when none are chosen)."""
    from attnseg.pipeline.harvest.harvester import AttentionHarvester

    heads = {"down_blocks.1.attentions.0.transformer_blocks.0.attn2": (0, 3),
             "up_blocks.3.attentions.0.transformer_blocks.0.attn2": (2, 5, 6)}
    harvest = HarvestConfig(heads=heads)
    spec = MapGraphSpec.from_harvest(harvest)
    assert MapGraphSpec.from_dict(spec.to_dict()) == spec
    assert spec.to_dict()["heads"] == {k: list(v) for k, v in heads.items()}
    assert "heads" not in MapGraphSpec.from_harvest(HarvestConfig()).to_dict()
    size = (64, 48)
    sample, t, text, weights = _inputs(tiny_pipe.unet, size)
    module = UNetWithMaps(tiny_pipe.unet, spec, size, map_impl="ref")
    try:
        with torch.no_grad():
            outputs = module(sample, t, text, weights)
        layout = module.layout
    finally:
        module.remove()
    # One layer at each of strides 8 and 16 contributes: each output counts one layer.
    assert [(m.kind, m.stride, m.count) for m in layout] == [("stride", 8, 1.0),
                                                            ("stride", 16, 1.0)]
    harvester = AttentionHarvester(tiny_pipe.unet, harvest)
    try:
        with torch.no_grad(), harvester.capture(weights, size, num_steps=1) as cap:
            tiny_pipe.unet(sample, t, encoder_hidden_states=text)
    finally:
        harvester.remove()
    for m, out in zip(layout, outputs[1:], strict=True):
        torch.testing.assert_close(out / m.count, cap.result.maps[m.stride], rtol=1e-5,
                                   atol=1e-7)
    with pytest.raises(UserError, match="leave out"):
        UNetWithMaps(tiny_pipe.unet, MapGraphSpec.from_harvest(HarvestConfig(
            heads=heads, strides=(8,))), size)
    with pytest.raises(UserError, match="head 8 does not exist"):
        UNetWithMaps(tiny_pipe.unet, MapGraphSpec.from_harvest(HarvestConfig(
            heads={"up_blocks.3.attentions.0.transformer_blocks.0.attn2": (8,)})), size)
    assert not any(hasattr(p, "observer") for p in tiny_pipe.unet.attn_processors.values())
