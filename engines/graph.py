"""The networks that engines are built from: the UNet (or a DiT's transformer) with its attention
maps as outputs, the text encoder and the VAE decoder, each wrapped so that its inputs and outputs
are plain tensors.

`UNetWithMaps` is the core: it runs the stock UNet (the attention *outputs* are computed exactly
as `AttentionHarvester` computes them, so the noise prediction is the stock one) and, inside the
same graph, sums the step's class-token cross-attention maps over the selected layers with the
harvesting kernel op. The host adds these per-step sums over the steps of the step window and
divides by the layer counts in `MapLayout`, which gives exactly the `HarvestResult` that
`AttentionHarvester` gives. Token weights are an input ([B, 77, C]), so one engine serves every
prompt and class set.

The map math is `accumulate_class_attention_ref` (plain torch ops: exportable to ONNX and traced
by `torch.compile`); with ``map_impl="op"``, the `attnseg::accumulate_class_attention`
custom op, which dispatches to the Triton kernel on CUDA and stays one opaque node in a
`torch.compile` graph; with ``map_impl="plugin"``, the `attnseg::class_attention_maps` op per
layer (exported as a TensorRT plugin node) followed by the same resize/clamp/accumulate in
torch ops.

`TransformerWithMaps` does the same for the DiTs (PixArt, SD3, Flux) under the compile backend:
the inputs are the family's own transformer call, and the layers are chosen by depth.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..kernels.class_attention import accumulate_class_attention, accumulate_class_attention_ref
from ..kernels.interp import resize
from ..pipeline.config import LATER_SETTINGS, HarvestConfig
from ..pipeline.errors import UserError
from ..pipeline.harvest.attention import (
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
from ..pipeline.harvest.harvester import token_grid

MAP_IMPLS = ("ref", "op", "plugin")


@torch.library.custom_op("attnseg::accumulate_class_attention", mutates_args=("out",))
def _accumulate_op(q: torch.Tensor, k: torch.Tensor, token_weights: torch.Tensor,
                   out: torch.Tensor, h: int, w: int, scale: float, weight: float,
                   resize_mode: str, clamp: bool) -> None:
    # The kernel op with its own device dispatch (Triton on CUDA, numba on CPU); registered as
    # a custom op so that torch.compile keeps it as one node instead of tracing its launcher.
    # No argument may be called `mode`: torch.compile's wrapper of a mutating custom op calls
    # handler(mode, *args, **kwargs), and a keyword `mode` collides with it.
    accumulate_class_attention(q, k, token_weights, out, hw=(h, w), scale=scale, weight=weight,
                               mode=resize_mode, clamp=clamp)


@_accumulate_op.register_fake
def _accumulate_op_fake(q, k, token_weights, out, h, w, scale, weight, resize_mode,
                        clamp) -> None:
    return None


@torch.library.custom_op("attnseg::class_attention_maps", mutates_args=())
def _class_maps_op(q: torch.Tensor, k: torch.Tensor, token_weights: torch.Tensor, h: int, w: int,
                   scale: float, heads: int, head_dim: int, tokens: int,
                   block_c: int) -> torch.Tensor:
    # One layer's class maps [B, C, h, w] as a single op: the node that becomes the TensorRT
    # plugin (the sizes are attributes there, as the plugin compiles its kernel ahead of time).
    out = q.new_zeros((q.shape[0], token_weights.shape[2], h, w), dtype=torch.float32)
    accumulate_class_attention(q, k, token_weights, out, hw=(h, w), scale=scale)
    return out


@_class_maps_op.register_fake
def _class_maps_op_fake(q, k, token_weights, h, w, scale, heads, head_dim, tokens, block_c):
    return q.new_empty((q.shape[0], token_weights.shape[2], h, w), dtype=torch.float32)


@dataclass(frozen=True)
class MapGraphSpec:
    """The part of a `HarvestConfig` that decides what an engine's map outputs are.

    Settings the host applies after the engine (step window, token merging, per-stride
    normalisation, combine/refine resizing, refine power) are not part of it, so presets that
    differ only there share one engine.
    """

    strides: tuple[int, ...]
    blocks: tuple[str, ...]
    accumulate: str
    # Only for accumulate == "common" (canonical defaults otherwise):
    combine_stride: int = 8
    accumulate_mode: str = "bicubic"
    clamp_each_step: bool = False
    stride_weights: tuple[tuple[int, float], ...] = ()
    # Stride of the self-attention output, 0 when the recipe does not refine.
    refine_stride: int = 0
    # DiTs only (the harvester's settings of the same names); left out of `to_dict` at their
    # defaults, so that the keys of engines built before them stay valid.
    transformer_depth: tuple[float, float] = LATER_SETTINGS["transformer_depth"]
    joint_softmax: str = LATER_SETTINGS["joint_softmax"]
    # The kept heads (`HarvestConfig.heads`) as sorted (layer, heads) pairs; () keeps every
    # head and is left out of `to_dict`, as the DiT settings above.
    heads: tuple[tuple[str, tuple[int, ...]], ...] = ()

    @classmethod
    def from_harvest(cls, cfg: HarvestConfig) -> MapGraphSpec:
        cfg.validate()
        if cfg.accumulate == "per_head":
            raise UserError("engines harvest head-averaged maps; accumulate='per_head' (the "
                            "daam preset's exact order) runs on --backend torch")
        common = cfg.accumulate == "common"
        return cls(
            strides=tuple(sorted(set(cfg.strides))),
            blocks=tuple(b for b in ("down", "mid", "up") if b in cfg.blocks),
            accumulate=cfg.accumulate,
            combine_stride=cfg.combine_stride if common else 8,
            accumulate_mode=cfg.accumulate_mode if common else "bicubic",
            clamp_each_step=cfg.clamp_each_step if common else False,
            stride_weights=tuple(sorted((int(k), float(v)) for k, v in cfg.stride_weights.items()
                                        if int(k) in cfg.strides)) if common else (),
            refine_stride=cfg.refine_stride if cfg.refine_power > 0 else 0,
            transformer_depth=tuple(cfg.transformer_depth),
            joint_softmax=cfg.joint_softmax,
            heads=tuple(sorted((n, tuple(h)) for n, h in cfg.heads.items())),
        )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for name, default in LATER_SETTINGS.items():
            if d[name] == default or (name == "heads" and not d[name]):
                del d[name]
        if "heads" in d:
            d["heads"] = {n: list(h) for n, h in d["heads"]}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> MapGraphSpec:
        d = dict(d)
        d["strides"] = tuple(d["strides"])
        d["blocks"] = tuple(d["blocks"])
        d["stride_weights"] = tuple((int(s), float(w)) for s, w in d.get("stride_weights", ()))
        if "transformer_depth" in d:
            d["transformer_depth"] = tuple(d["transformer_depth"])
        if "heads" in d:
            d["heads"] = tuple(sorted((n, tuple(h)) for n, h in d["heads"].items()))
        return cls(**d)


@dataclass(frozen=True)
class MapOutput:
    """One map output of the UNet engine.

    kind: "stride" (sum over the layers at `stride` of that step's class maps; the harvester's
    native buffers), "common" (weighted sum at `stride` = the combine stride) or "self" (sum of
    head-mean self-attention at `stride`). `count` is what one step adds to the harvester's
    divisor (layers, or summed stride weights).
    """

    name: str
    kind: str
    stride: int
    shape: tuple[int, ...]  # without the batch dimension; C stands for the class count
    count: float

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "stride": self.stride,
                "shape": list(self.shape), "count": self.count}

    @classmethod
    def from_dict(cls, d: dict) -> MapOutput:
        return cls(d["name"], d["kind"], int(d["stride"]), tuple(d["shape"]), float(d["count"]))


def added_condition_dims(unet) -> dict[str, int] | None:
    """SDXL's added conditioning of a UNet: {"text_embeds": pooled text width, "time_ids": 6}
    (original size, crop, target size); None for a UNet without it (SD 1.x/2.x)."""
    cfg = unet.config
    if getattr(cfg, "addition_embed_type", None) != "text_time":
        return None
    ids = 6
    return {"text_embeds": cfg.projection_class_embeddings_input_dim
            - ids * cfg.addition_time_embed_dim, "time_ids": ids}


class UNetWithMaps(torch.nn.Module):
    """UNet -> (noise prediction, this step's map sums...), harvesting inside the graph.

    forward(sample [2B, 4, h, w], timestep [1] float32, encoder_hidden_states [2B, 77, D],
    token_weights [B, 77, C], and for SDXL text_embeds [2B, P], time_ids [2B, 6]) with the
    batch laid out as classifier-free guidance lays it out ([uncond, cond]); the maps come
    from the cond half. Outputs follow `self.layout`.

    Installing it replaces the UNet's attention processors; `remove()` restores them.
    """

    def __init__(self, unet, spec: MapGraphSpec, image_size: tuple[int, int],
                 map_impl: str = "ref"):
        super().__init__()
        if map_impl not in MAP_IMPLS:
            raise ValueError(f"map_impl must be one of {MAP_IMPLS}, not {map_impl!r}")
        self.unet = unet
        self.spec = spec
        self.image_size = tuple(image_size)
        self.map_impl = map_impl
        # Class-count tile of the plugin kernel (>= the engine's largest class count).
        self.plugin_block_c = 16
        self.added_dims = added_condition_dims(unet)
        self._install()
        self.layout = self._discover_layout()

    def _install(self) -> None:
        """Put the observing processors on the network; pick the DiT layers by depth."""
        network = self.network
        self._state: dict | None = None
        self._previous = install_observers(network, self,
                                           self_attention=bool(self.spec.refine_stride),
                                           joint_softmax=self.spec.joint_softmax)
        cross = [p.name for p in network.attn_processors.values() if getattr(p, "cross", False)]
        self.transformer_layers = transformer_layers_at_depth(cross, self.spec.transformer_depth)
        self.heads = dict(self.spec.heads)
        try:
            check_head_layers(self.heads, network, cross)
        except UserError:
            self.remove()
            raise

    @property
    def network(self):
        """The wrapped denoiser."""
        return self.unet

    def remove(self) -> None:
        """Give the network back its previous attention processors."""
        self.network.set_attn_processor(dict(self._previous))  # diffusers empties the dict

    @property
    def input_names(self) -> list[str]:
        return ["sample", "timestep", "encoder_hidden_states", "token_weights"] + list(
            self.added_dims or ())

    @property
    def output_names(self) -> list[str]:
        return ["noise_pred"] + [m.name for m in self.layout]

    def _discover_layout(self) -> list[MapOutput]:
        """Run once on a tiny batch to see which layers contribute where."""
        cfg = self.unet.config
        lat = (self.image_size[0] // 8, self.image_size[1] // 8)
        p = next(self.unet.parameters())
        sample = torch.zeros(2, cfg.in_channels, *lat, device=p.device, dtype=p.dtype)
        ehs = torch.zeros(2, 77, cfg.cross_attention_dim, device=p.device, dtype=p.dtype)
        tw = torch.zeros(1, 77, 1, device=p.device)
        added = {k: torch.zeros(2, n, device=p.device, dtype=p.dtype)
                 for k, n in (self.added_dims or {}).items()} or None
        self._layout_counts: dict = {}
        self._layout_headed: set[str] = set()
        with torch.no_grad():
            self._run(sample, torch.zeros(1, device=p.device), ehs, tw, added, count=True)
        counts = self._layout_counts
        missed = sorted(set(self.heads) - self._layout_headed)
        del self._layout_counts, self._layout_headed
        if missed:
            self.remove()
            raise heads_left_out(missed, self.spec.strides, self.spec.blocks)
        layout = []
        for (kind, stride), (shape, count) in sorted(counts.items(),
                                                    key=lambda kv: ("scs".index(kv[0][0][0]),
                                                                    kv[0][1])):
            name = {"stride": f"maps_s{stride}", "common": f"maps_common_s{stride}",
                    "self": f"self_attention_s{stride}"}[kind]
            layout.append(MapOutput(name, kind, stride, shape, count))
        if not any(m.kind != "self" for m in layout):
            raise UserError(
                f"the UNet has no cross-attention layer at strides {list(self.spec.strides)} in "
                f"blocks {list(self.spec.blocks)}"
            )
        return layout

    def _run(self, sample, timestep, encoder_hidden_states, token_weights, added=None,
             count=False):
        self._state = {"tw": token_weights, "latent_hw": tuple(sample.shape[-2:]), "sums": {},
                       "count": count}
        try:
            noise = self.unet(sample, timestep, encoder_hidden_states,
                              added_cond_kwargs=added, return_dict=False)[0]
            return noise, self._state["sums"]
        finally:
            self._state = None

    def forward(self, sample, timestep, encoder_hidden_states, token_weights, text_embeds=None,
                time_ids=None):
        added = None
        if self.added_dims is not None:
            added = {"text_embeds": text_embeds, "time_ids": time_ids}
        noise, sums = self._run(sample, timestep, encoder_hidden_states, token_weights, added)
        return (noise, *[sums[(m.kind, m.stride)] for m in self.layout])

    def observe(self, proc: ObservingAttnProcessor, attn, query, key) -> None:
        """One attention layer's q/k during a forward (`ObservingAttnProcessor` calls this):
        the cond half's class maps are added into this step's map outputs."""
        state = self._state
        if state is None:
            return
        spec = self.spec
        tw = state["tw"]
        b = tw.shape[0]
        # Classifier-free guidance stacks [uncond, cond]: keep the cond half (as the harvester);
        # a batch without guidance (DiTs take one) is all cond.
        query, key = query[-b:], key[-b:]
        stride, h, w = layer_grid(query.shape[2], state["latent_hw"], self.image_size)
        sums = state["sums"]
        if not proc.cross:
            if stride == spec.refine_stride:
                # The harvester's math: head-mean softmax of the cond half's self-attention.
                probs = self_attention_probs(query, key, attn.scale)
                slot = ("self", stride)
                sums[slot] = probs if slot not in sums else sums[slot] + probs
                self._count(slot, probs, 1.0)
            return
        if not layer_selected(proc, stride, spec.strides, spec.blocks, self.transformer_layers):
            return
        picked = pick_heads(query, key, self.heads, proc.name)
        if picked is None:
            return
        query, key = picked
        if self.heads and state.get("count"):
            self._layout_headed.add(proc.name)
        # Padded text keys (PixArt's T5) are left out of the softmax: the kernels take no
        # mask (the torch harvester runs them on each sample's valid prefix, a loop over
        # data-dependent lengths that one graph cannot hold), so those layers take the masked
        # reference, which the compiler fuses.
        valid = proc.key_valid
        valid = None if valid is None else valid[-b:]
        if key.shape[2] > tw.shape[1]:  # joint softmax: the image keys follow, no class
            tw = torch.nn.functional.pad(tw, (0, 0, 0, key.shape[2] - tw.shape[1]))
        c = tw.shape[2]
        if spec.accumulate == "native":
            slot, size, wgt, mode, clamp = ("stride", stride), (h, w), 1.0, "none", False
        else:
            size = grid_size(self.image_size, spec.combine_stride)
            slot = ("common", spec.combine_stride)
            wgt = dict(spec.stride_weights).get(stride, 1.0)
            mode = "none" if (h, w) == size else spec.accumulate_mode
            clamp = spec.clamp_each_step
        out = sums.get(slot)
        if out is None:
            out = sums[slot] = query.new_zeros((b, c, *size), dtype=torch.float32)
        scale = attention_scale(attn, query)
        if self.map_impl == "ref" or valid is not None:
            # In place on a buffer created in this call: traced graphs functionalise it.
            accumulate_class_attention_ref(query, key, tw, out, hw=(h, w), scale=scale,
                                           weight=wgt, mode=mode, clamp=clamp, key_valid=valid)
        elif self.map_impl == "plugin":
            maps = torch.ops.attnseg.class_attention_maps(
                query.contiguous(), key.contiguous(), tw, h, w, float(scale),
                query.shape[1], query.shape[3], key.shape[2], self.plugin_block_c)
            maps = resize(maps, size, mode)
            if clamp:
                maps = maps.clamp_min(0.0)
            out = sums[slot] = out + wgt * maps
        else:
            torch.ops.attnseg.accumulate_class_attention(
                query, key, tw, out, h, w, float(scale),
                float(wgt), mode, bool(clamp))
        self._count(slot, out, wgt)

    def _count(self, slot, tensor, amount: float) -> None:
        counts = getattr(self, "_layout_counts", None)
        if counts is not None:
            shape = tuple(tensor.shape[1:])
            if slot[0] != "self":
                shape = ("C", *shape[1:])
            prev = counts.get(slot, (shape, 0.0))[1]
            counts[slot] = (shape, prev + amount)


# The transformer call of each DiT family, in engine input order (token_weights follows);
# optional inputs below are added when the model has them.
DIT_INPUTS = {
    "pixart": ("hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask"),
    "sd3": ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections"),
    "flux": ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections",
             "txt_ids", "img_ids"),
}


class TransformerWithMaps(UNetWithMaps):
    """A DiT's transformer -> (noise prediction, this step's map sums...), harvesting inside
    the graph, for the compile backend.

    forward(*inputs) takes `input_names`: the family's transformer call (`DIT_INPUTS`; PixArt
    adds its resolution and aspect-ratio conditioning, Flux its guidance, when the model
    takes them) followed by token_weights [B, L, C]. The batch is the pipeline's: [uncond,
    cond] under classifier-free guidance, or the B conditional rows (Flux, guidance <= 1);
    the maps come from the last B rows either way. Every layer of a DiT is at one stride
    (`token_stride`), so the layout needs no trial run.
    """

    def __init__(self, transformer, spec: MapGraphSpec, image_size: tuple[int, int],
                 family: str, token_stride: int, map_impl: str = "ref"):
        torch.nn.Module.__init__(self)
        if map_impl not in ("ref", "op"):
            raise ValueError(f"map_impl must be 'ref' or 'op' for a DiT, not {map_impl!r}")
        if spec.refine_stride:
            raise UserError("refinement needs self-attention maps, which DiT harvesting does "
                            "not take; use a preset without refinement")
        self.transformer = transformer
        self.spec = spec
        self.image_size = tuple(image_size)
        self.map_impl = map_impl
        self.family = family
        self.added_dims = None
        names = list(DIT_INPUTS[family])
        if family == "pixart" and getattr(transformer, "use_additional_conditions", False):
            names += ["resolution", "aspect_ratio"]
        if family == "flux" and transformer.config.guidance_embeds:
            names.append("guidance")
        self._call_names = names
        self._install()
        if token_stride not in spec.strides:
            self.remove()
            raise UserError(f"the {family} transformer's layers are all at stride "
                            f"{token_stride}, which the harvest strides {list(spec.strides)} "
                            "leave out")
        layers = self.transformer_layers
        if self.heads:
            missed = sorted(set(self.heads) - layers)
            if missed:
                self.remove()
                raise UserError(f"harvest heads name {missed}, which the harvest "
                                f"transformer_depth {list(spec.transformer_depth)} leaves out")
            layers = set(self.heads)
        layers = float(len(layers))
        if spec.accumulate == "native":
            h, w = grid_size(self.image_size, token_stride)
            self.layout = [MapOutput(f"maps_s{token_stride}", "stride", token_stride,
                                     ("C", h, w), layers)]
        else:
            cs = spec.combine_stride
            wgt = dict(spec.stride_weights).get(token_stride, 1.0)
            self.layout = [MapOutput(f"maps_common_s{cs}", "common", cs,
                                     ("C", *grid_size(self.image_size, cs)), layers * wgt)]

    @property
    def network(self):
        return self.transformer

    @property
    def input_names(self) -> list[str]:
        return self._call_names + ["token_weights"]

    def forward(self, *inputs):
        feeds = dict(zip(self.input_names, inputs, strict=True))
        token_weights = feeds.pop("token_weights")
        if self.family == "pixart":
            feeds["added_cond_kwargs"] = {"resolution": feeds.pop("resolution", None),
                                          "aspect_ratio": feeds.pop("aspect_ratio", None)}
        latents = feeds["hidden_states"]
        latent_hw = (token_grid(latents.shape[1], self.image_size) if latents.ndim == 3
                     else tuple(latents.shape[-2:]))  # Flux packs its latents into tokens
        self._state = {"tw": token_weights, "latent_hw": latent_hw, "sums": {}}
        try:
            noise = self.transformer(**feeds, return_dict=False)[0]
            sums = self._state["sums"]
        finally:
            self._state = None
        return (noise, *[sums[(m.kind, m.stride)] for m in self.layout])


class TextEncoderOutput(torch.nn.Module):
    """input_ids [B, 77] int64 -> last_hidden_state [B, 77, D] (what the SD pipeline uses)."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids, return_dict=False)[0]


class VaeDecoderOutput(torch.nn.Module):
    """latents [B, 4, h, w] (already divided by the scaling factor) -> image [B, 3, H, W]."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]
