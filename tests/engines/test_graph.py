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
