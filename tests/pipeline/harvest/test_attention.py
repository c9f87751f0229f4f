"""Attention processors and layer placement (pipeline/harvest/attention.py)."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from attnseg.pipeline.harvest.attention import (
    ObservingAttnProcessor,
    block_of,
    grid_size,
    install_observers,
    layer_grid,
)


def test_block_and_grid_of_a_layer():
    assert [block_of(n) for n in ("down_blocks.0.attentions.0", "mid_block.attentions.0",
                                  "up_blocks.3.x", "conv_in")] == ["down", "mid", "up", "other"]
    # 512x512 image, 64x64 latent: the 4096-query layer is stride 8, 256 queries stride 32.
    assert layer_grid(64 * 64, (64, 64), (512, 512)) == (8, 64, 64)
    assert layer_grid(16 * 16, (64, 64), (512, 512)) == (32, 16, 16)
    # Odd latents round up level by level (64x48 image -> 8x6 latent -> 4x3 -> 2x2).
    assert layer_grid(4, (8, 6), (64, 48)) == (32, 2, 2)
    assert grid_size((64, 48), 32) == (2, 2)
    with pytest.raises(RuntimeError, match="cannot place 5 queries"):
        layer_grid(5, (8, 6), (64, 48))


class _Recorder:
    def __init__(self):
        self.calls = []

    def observe(self, proc, attn, query, key):
        self.calls.append((proc.name, proc.block, proc.cross, tuple(query.shape)))


def test_observers_keep_the_output_and_give_the_processors_back(tiny_pipe):
    unet = tiny_pipe.unet
    unet.set_attn_processor(AttnProcessor2_0())
    sample = torch.randn(2, unet.config.in_channels, 8, 8, generator=torch.Generator()
                         .manual_seed(0))
    text = torch.randn(2, 77, unet.config.cross_attention_dim,
                       generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        stock = unet(sample, 10, text).sample
        recorder = _Recorder()
        previous = install_observers(unet, recorder, self_attention=False)
        observed = unet(sample, 10, text).sample
    assert torch.equal(stock, observed)  # the stock computation, bit for bit
    procs = [p for p in unet.attn_processors.values() if isinstance(p, ObservingAttnProcessor)]
    assert procs and all(p.cross for p in procs)  # attn2 only without self-attention
    assert len(recorder.calls) == len(procs) and {c[1] for c in recorder.calls} <= {
        "down", "mid", "up"}
    unet.set_attn_processor(dict(previous))  # diffusers empties the dict it is given
    assert not any(isinstance(p, ObservingAttnProcessor) for p in unet.attn_processors.values())
    install_observers(unet, recorder, self_attention=True)
    kinds = {p.cross for p in unet.attn_processors.values()}
    assert kinds == {True, False}
    unet.set_attn_processor(previous)
