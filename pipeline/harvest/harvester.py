"""Harvest per-class cross-attention maps from a diffusers UNet while it denoises.

`AttentionHarvester` installs `pipeline.harvest.attention`'s observing processors (diffusers'
`set_attn_processor` mechanism) on the UNet's cross-attention modules. Each processor computes
the module's output exactly as the stock fused processor does (one
`scaled_dot_product_attention`), so images are unchanged, and hands the queries and keys to the
harvester, which passes the conditional half's queries and the text keys to the
`accumulate_class_attention` kernel, which recomputes softmax(Q.K_text^T/sqrt(d)) over the text
keys only, keeps the class-token columns, averages heads and adds the result into one running
buffer per stride. Nothing is stored per step or per layer: memory is independent of the number
of denoising steps.

Usage on any diffusers Stable Diffusion pipeline::

    harvester = AttentionHarvester(pipe.unet, HarvestConfig())
    weights = class_token_weights(pipe.tokenizer, prompts, class_words)
    with harvester.capture(weights, image_size=(512, 512), num_steps=50) as maps:
        images = pipe(prompts, num_inference_steps=50).images
    result = maps.result  # HarvestResult: per-stride means (+ self-attention if refining)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ...kernels.class_attention import accumulate_class_attention
from ...kernels.interp import resize
from ..config import HarvestConfig
from ..errors import UserError
from .attention import (
    ObservingAttnProcessor,
    attention_scale,
    check_head_layers,
    grid_size,
    heads_left_out,
    install_observers,
    layer_grid,
    layer_selected,
    pick_heads,
    self_attention_probs,
    transformer_layers_at_depth,
)


@dataclass
class HarvestResult:
    """What one generation call harvested, already averaged over steps and layers.

    maps: stride -> [B, C, h, w] mean class-token attention (for accumulate="common" a single
        entry at `combine_stride`).
    self_attention: [B, N, N] mean self-attention at `refine_stride` (None unless refining).
    image_size: (H, W) of the generated images.
    """

    maps: dict[int, torch.Tensor]
    self_attention: torch.Tensor | None
    image_size: tuple[int, int]


class _Capture:
    """Per-generation state: the running buffers, reset by `AttentionHarvester.capture`."""

    def __init__(self, token_weights, image_size, num_steps, steps):
        self.token_weights = token_weights
        self.image_size = image_size
        self.num_steps = num_steps
        self.steps = steps
        self.step = -1
        self.latent_hw = (0, 0)
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, float] = {}
        # accumulate="per_head": layer name -> [B, heads, C, h, w] step-sum.
        self.head_sums: dict[str, torch.Tensor] = {}
        # Layers of `HarvestConfig.heads` that contributed (each must).
        self.headed: set[str] = set()
        self.self_sum: torch.Tensor | None = None
        self.self_count = 0
        self.result: HarvestResult | None = None
        self._weights_by_keys: dict[int, torch.Tensor] = {}
        self._lengths_read = False
        self._key_lengths: list[int] | None = None

    @property
    def batch(self) -> int:
        return self.token_weights.shape[0]

    def weights_for(self, keys: int) -> torch.Tensor:
        """The token weights for a layer with `keys` text keys (`fit_token_weights`), made
        once per capture and key count (every layer of every step asks)."""
        w = self._weights_by_keys.get(keys)
        if w is None:
            w = self._weights_by_keys[keys] = fit_token_weights(self.token_weights, keys)
        return w

    def key_lengths(self, valid: torch.Tensor) -> list[int] | None:
        """Each sample's count of valid (unpadded) text keys, None when none is padded; read
        from the first masked layer and kept for the capture: the prompts, so their padding,
        do not change while it lasts, and reading a mask waits for the device."""
        if not self._lengths_read:
            self._key_lengths = None if bool(valid.all()) else valid_prefix_lengths(valid)
            self._lengths_read = True
        return self._key_lengths

    def active(self) -> bool:
        return self.step in self.steps

    def nbytes(self) -> int:
        """Bytes held by the running buffers (the harvester's extra memory)."""
        total = sum(t.numel() * t.element_size() for t in self.sums.values())
        total += sum(t.numel() * t.element_size() for t in self.head_sums.values())
        if self.self_sum is not None:
            total += self.self_sum.numel() * self.self_sum.element_size()
        return total


def fit_token_weights(weights: torch.Tensor, keys: int) -> torch.Tensor:
    """Token weights [B, L, C] cut or zero-padded to `keys` text positions: a tokenizer's
    context may be longer than the encoder's (PixArt: 300 of T5's 512) or shorter; positions
    past the weights' length carry no class. A class word past `keys` is refused."""
    if weights.shape[1] > keys:
        if bool(weights[:, keys:].any()):
            raise UserError(f"a class word lies past the {keys} text tokens the model "
                            "attends to; shorten the prompt")
        return weights[:, :keys]
    if weights.shape[1] < keys:
        return torch.nn.functional.pad(weights, (0, 0, 0, keys - weights.shape[1]))
    return weights


def token_grid(n: int, image_size: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of `n` image tokens laid out with the image's aspect ratio (Flux packs
    its latents into a sequence; the grid is not in the tensor's shape)."""
    rows = round((n * image_size[0] / image_size[1]) ** 0.5)
    if rows < 1 or n % rows:
        raise RuntimeError(f"cannot lay {n} tokens out as a {image_size[0]}x{image_size[1]} "
                           "image")
    return rows, n // rows


def valid_prefix_lengths(valid: torch.Tensor) -> list[int]:
    """Per sample, how many keys are valid, from a [B, L] mask whose valid keys come first
    (a padded prompt: what T5 pipelines pass). Other masks are refused."""
    lengths = valid.sum(dim=1).tolist()
    for row, n in zip(valid, lengths, strict=True):
        if not bool(row[:n].all()):
            raise RuntimeError("cross-attention masks that are not a padded prefix are not "
                               "supported by the harvester")
    return [int(n) for n in lengths]


def _accumulate(query, key, weights, out, lengths, **kwargs) -> None:
    """`accumulate_class_attention`, with padded keys left out: each sample's softmax runs over
    its own valid keys (the fused kernel on each sample's key prefix)."""
    if lengths is None:
        accumulate_class_attention(query, key, weights, out, **kwargs)
        return
    for i, n in enumerate(lengths):
        accumulate_class_attention(query[i : i + 1], key[i : i + 1, :, :n],
                                   weights[i : i + 1, :n], out[i : i + 1], **kwargs)


class AttentionHarvester:
    """Accumulates class-token cross-attention maps of a UNet into per-stride running means.

    Install once per UNet (`AttentionHarvester(unet, config)`); wrap every generation call in
    `capture(...)`. `remove()` restores the UNet's previous attention processors.
    """

    def __init__(self, unet, config: HarvestConfig):
        # The UNet does not know its VAE's stride: strides are checked against the model
        # where the preset is resolved for it (SynthConfig.resolve_preset).
        config.validate(latent_stride=1)
        self.unet = unet
        self.config = config
        self._capture: _Capture | None = None
        self._previous = install_observers(unet, self, self_attention=config.refine_power > 0,
                                           joint_softmax=config.joint_softmax)
        cross = [p.name for p in unet.attn_processors.values() if getattr(p, "cross", False)]
        self.transformer_layers = transformer_layers_at_depth(cross, config.transformer_depth)
        try:
            check_head_layers(config.heads, unet, cross)
        except UserError:
            unet.set_attn_processor(dict(self._previous))
            raise
        self._hook = unet.register_forward_pre_hook(self._on_unet_call, with_kwargs=True)

    def remove(self) -> None:
        """Uninstall: the UNet gets back the processors it had before."""
        self._hook.remove()
        self.unet.set_attn_processor(dict(self._previous))  # diffusers empties the dict it gets

    def _on_unet_call(self, module, args, kwargs):
        if self._capture is not None:
            self._capture.step += 1
            # UNets take `sample`; DiTs take `hidden_states` (SD3 passes it by keyword).
            sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
            if sample.ndim == 3:  # Flux: latents packed into a [B, tokens, C] sequence
                self._capture.latent_hw = token_grid(sample.shape[1], self._capture.image_size)
            else:
                self._capture.latent_hw = tuple(sample.shape[-2:])

    @contextlib.contextmanager
    def capture(self, token_weights: torch.Tensor, image_size: tuple[int, int], num_steps: int):
        """Harvest during the UNet calls made inside this block.

        token_weights: [B, L, C] from `class_token_weights` (B = images in the call).
        image_size: (H, W) of the images being generated.
        num_steps: denoising steps of the call; each UNet forward counts as one step.
        Yields the capture; after the block `capture.result` holds the HarvestResult.
        """
        if self._capture is not None:
            raise RuntimeError("AttentionHarvester.capture is not re-entrant")
        device = self.unet.device
        capture = _Capture(
            token_weights.to(device=device, dtype=torch.float32),
            tuple(image_size), num_steps, self.config.step_range(num_steps),
        )
        self._capture = capture
        try:
            yield capture
        finally:
            self._capture = None
        capture.result = self._finish(capture)

    def observe(self, proc: ObservingAttnProcessor, attn, query, key) -> None:
        """One attention layer's q/k [2B or B, heads, N, d] during a UNet call: added into the
        running buffers when a capture is on, the step is in the window and the layer is
        selected (`ObservingAttnProcessor` calls this)."""
        capture = self._capture
        if capture is None or not capture.active():
            return
        cfg = self.config
        b = capture.batch
        total = query.shape[0]
        if total == 2 * b:  # classifier-free guidance: [uncond, cond]; keep the cond half
            query, key = query[b:], key[b:]
        elif total != b:
            raise RuntimeError(
                f"attention batch {total} is neither the harvested batch {b} nor twice it"
            )
        stride, h, w = layer_grid(query.shape[2], capture.latent_hw, capture.image_size)
        if not proc.cross:
            if stride == cfg.refine_stride:
                self._observe_self(query, key, attention_scale(attn, query), capture)
            return
        if not layer_selected(proc, stride, cfg.strides, cfg.blocks, self.transformer_layers):
            return
        picked = pick_heads(query, key, cfg.heads, proc.name)
        if picked is None:
            return
        query, key = picked
        if cfg.heads:
            capture.headed.add(proc.name)
        weights = capture.weights_for(key.shape[2])
        scale = attention_scale(attn, query)
        valid = proc.key_valid  # padded text keys (T5), None for none
        if valid is not None:
            valid = valid[-b:]  # the conditional half (or the whole batch without guidance)
        lengths = None if valid is None else capture.key_lengths(valid)
        if cfg.accumulate == "per_head":
            # Per-head maps (DAAM's order needs them apart until the end): plain torch ops.
            logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
            if lengths is not None:
                logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
            probs = torch.softmax(logits, dim=-1)  # [B, H, N, L]
            maps = torch.matmul(probs, weights[:, None])  # [B, H, N, C]
            maps = maps.transpose(2, 3).reshape(b, query.shape[1], weights.shape[2], h, w)
            held = capture.head_sums.get(proc.name)
            capture.head_sums[proc.name] = maps if held is None else held + maps
            capture.counts[proc.name] = capture.counts.get(proc.name, 0.0) + 1.0
        elif cfg.accumulate == "native":
            out = capture.sums.get(stride)
            if out is None:
                out = capture.sums[stride] = query.new_zeros(
                    (b, weights.shape[2], h, w), dtype=torch.float32
                )
            _accumulate(query, key, weights, out, lengths, hw=(h, w), scale=scale)
            capture.counts[stride] = capture.counts.get(stride, 0.0) + 1.0
        else:
            cs = cfg.combine_stride
            size = grid_size(capture.image_size, cs)
            out = capture.sums.get(cs)
            if out is None:
                out = capture.sums[cs] = query.new_zeros(
                    (b, weights.shape[2], *size), dtype=torch.float32
                )
            wgt = cfg.stride_weights.get(stride, 1.0)
            mode = "none" if (h, w) == size else cfg.accumulate_mode
            _accumulate(query, key, weights, out, lengths, hw=(h, w), scale=scale,
                        weight=wgt, mode=mode, clamp=cfg.clamp_each_step)
            capture.counts[cs] = capture.counts.get(cs, 0.0) + wgt

    def _observe_self(self, query, key, scale, capture: _Capture) -> None:
        # Self-attention probabilities of the cond half, mean over heads; one [B, N, N] buffer.
        probs = self_attention_probs(query, key, scale)
        if capture.self_sum is None:
            capture.self_sum = probs
        else:
            capture.self_sum += probs
        capture.self_count += 1

    def _finish(self, capture: _Capture) -> HarvestResult:
        missed = sorted(set(self.config.heads) - capture.headed)
        if missed and capture.step >= 0:  # the UNet ran, and these layers gave nothing
            raise heads_left_out(missed, self.config.strides, self.config.blocks)
        if capture.head_sums:
            capture.sums = {self.config.combine_stride: self._combine_heads(capture)}
            capture.counts = {self.config.combine_stride: 1.0}
        if not capture.sums:
            raise UserError(
                "no cross-attention was harvested: the UNet has no cross-attention layer at "
                f"strides {list(self.config.strides)} in blocks {list(self.config.blocks)} "
                "during the selected steps"
            )
        maps = {s: t / capture.counts[s] for s, t in capture.sums.items()}
        self_attn = None
        if self.config.refine_power > 0:
            if capture.self_sum is None:
                raise UserError(
                    f"refinement asked for self-attention at stride {self.config.refine_stride},"
                    " but the UNet has no self-attention layer there"
                )
            self_attn = capture.self_sum / capture.self_count
        return HarvestResult(maps=maps, self_attention=self_attn, image_size=capture.image_size)

    def _combine_heads(self, capture: _Capture) -> torch.Tensor:
        """DAAM's order: each (layer, head) step-mean resized to the combine stride and
        clamped at zero, then the mean over layers and heads: [B, C, h, w]."""
        cfg = self.config
        size = grid_size(capture.image_size, cfg.combine_stride)
        total, n = None, 0
        for name, sums in capture.head_sums.items():
            b, heads, c, h, w = sums.shape
            per_head = (sums / capture.counts[name]).reshape(b * heads, c, h, w)
            mode = "none" if (h, w) == size else cfg.accumulate_mode
            resized = resize(per_head, size, mode).clamp_min(0.0).reshape(b, heads, c, *size)
            part = resized.sum(dim=1)
            total = part if total is None else total + part
            n += heads
        return total / n
