"""Attention processors for diffusers UNets, and where each attention layer sits.

One module for every place that looks inside a denoiser's attention: the harvester
(`harvester.AttentionHarvester`), the engines' `UNetWithMaps` (the same maps inside an exported
graph) and the throughput benchmark's store-every-map baseline. Each processor
computes the layer's output exactly as the family's stock processor does (diffusers'
`AttnProcessor2_0`, `JointAttnProcessor2_0`, `FluxAttnProcessor`; so images are unchanged) and
hands the query and key to whoever observes it. Installed with diffusers' `set_attn_processor`.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from ..errors import UserError


def stock_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb):
    """The computation of diffusers' AttnProcessor2_0, returning the output and the q/k used.

    Kept operation-for-operation equal to the stock processor so outputs match bitwise.
    """
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch_size, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
    batch_size, sequence_length, _ = (
        hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
    )
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)
    inner_dim = key.shape[-1]
    head_dim = inner_dim // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
    )
    out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
    out = out.to(query.dtype)
    out = attn.to_out[0](out)
    out = attn.to_out[1](out)
    if input_ndim == 4:
        out = out.transpose(-1, -2).reshape(batch_size, channel, height, width)
    if attn.residual_connection:
        out = out + residual
    out = out / attn.rescale_output_factor
    return out, query, key


def key_validity(attention_mask: torch.Tensor) -> torch.Tensor:
    """[batch, keys] bool: the keys an attention mask lets every query see. Masks come as
    bool (True: attend) or as an additive bias (0: attend, a large negative number: not),
    broadcast over heads and queries: [batch, 1, keys] or [batch, heads, queries, keys]."""
    m = attention_mask.reshape(attention_mask.shape[0], -1, attention_mask.shape[-1])[:, 0]
    return m if m.dtype == torch.bool else m > -1.0


def stock_joint_attention(attn, hidden_states, encoder_hidden_states):
    """The computation of diffusers' JointAttnProcessor2_0 (SD3's MMDiT blocks: image and
    text tokens in one attention), returning its outputs and the image queries, image keys and
    text keys [B, heads, *, d] it used. Kept operation for operation equal to the stock
    processor so outputs match bitwise."""
    residual = hidden_states
    batch_size = hidden_states.shape[0]
    query = attn.to_q(hidden_states)
    key = attn.to_k(hidden_states)
    value = attn.to_v(hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    image_query, image_key, text_key = query, key, None
    if encoder_hidden_states is not None:
        text_query = attn.add_q_proj(encoder_hidden_states)
        text_key = attn.add_k_proj(encoder_hidden_states)
        text_value = attn.add_v_proj(encoder_hidden_states)
        text_query = text_query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        text_key = text_key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        text_value = text_value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_added_q is not None:
            text_query = attn.norm_added_q(text_query)
        if attn.norm_added_k is not None:
            text_key = attn.norm_added_k(text_key)
        query = torch.cat([query, text_query], dim=2)
        key = torch.cat([key, text_key], dim=2)
        value = torch.cat([value, text_value], dim=2)
    out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
    out = out.to(query.dtype)
    text_out = None
    if encoder_hidden_states is not None:
        out, text_out = out[:, : residual.shape[1]], out[:, residual.shape[1] :]
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
    out = attn.to_out[0](out)
    out = attn.to_out[1](out)
    outputs = (out, text_out) if encoder_hidden_states is not None else out
    return outputs, image_query, image_key, text_key


def stock_flux_attention(attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                         image_rotary_emb=None):
    """The computation of diffusers' FluxAttnProcessor (Flux's double-stream blocks: text and
    image projected apart, attended jointly; single-stream blocks: one projection of the
    concatenated [text, image] sequence), returning its outputs and the joint queries and keys
    [B, S, heads, d] it attended with (text first, rotary embedding applied). Kept operation for
    operation equal to the stock processor so outputs match bitwise."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.embeddings import apply_rotary_emb

    if attn.fused_projections:
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        query, key, value = (attn.to_q(hidden_states), attn.to_k(hidden_states),
                             attn.to_v(hidden_states))
    query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
    key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
    value = value.unflatten(-1, (-1, attn.head_dim))
    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
        if attn.fused_projections:
            text_query, text_key, text_value = attn.to_added_qkv(
                encoder_hidden_states).chunk(3, dim=-1)
        else:
            text_query = attn.add_q_proj(encoder_hidden_states)
            text_key = attn.add_k_proj(encoder_hidden_states)
            text_value = attn.add_v_proj(encoder_hidden_states)
        text_query = attn.norm_added_q(text_query.unflatten(-1, (-1, attn.head_dim)))
        text_key = attn.norm_added_k(text_key.unflatten(-1, (-1, attn.head_dim)))
        text_value = text_value.unflatten(-1, (-1, attn.head_dim))
        query = torch.cat([text_query, query], dim=1)
        key = torch.cat([text_key, key], dim=1)
        value = torch.cat([text_value, value], dim=1)
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask)
    out = out.flatten(2, 3).to(query.dtype)
    if encoder_hidden_states is None:
        return out, query, key
    text_len = encoder_hidden_states.shape[1]
    text_out, out = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
    out = attn.to_out[1](attn.to_out[0](out.contiguous()))
    return (out, attn.to_add_out(text_out.contiguous())), query, key


def attention_scale(attn, query: torch.Tensor) -> float:
    """The softmax scale a module attends with: its `scale` (diffusers' `Attention`), else
    scaled_dot_product_attention's default 1/sqrt(d) (Flux's modules keep none)."""
    scale = getattr(attn, "scale", None)
    return query.shape[-1] ** -0.5 if scale is None else scale


def block_of(name: str) -> str:
    """The UNet block ("down", "mid", "up"), "transformer" for a DiT's blocks (PixArt, SD3,
    Flux's double- and single-stream blocks), else "other", an attention module belongs to."""
    if name.startswith(("transformer_blocks", "single_transformer_blocks")):
        return "transformer"
    if name.startswith("down_blocks"):
        return "down"
    if name.startswith("mid_block"):
        return "mid"
    if name.startswith("up_blocks"):
        return "up"
    return "other"


def transformer_layers_at_depth(names, depth: tuple[float, float]) -> set[str]:
    """Of attention module names, the DiT layers ("transformer" block) whose position in
    running order (Flux: the double-stream blocks first) falls in the fractions [lo, hi) of
    their count; at least the one at lo."""
    import re

    def order(name: str):
        m = re.match(r"(single_)?transformer_blocks\.(\d+)", name)
        return (bool(m.group(1)), int(m.group(2)), name)

    layers = sorted((n for n in names if block_of(n) == "transformer"), key=order)
    lo, hi = depth
    n = len(layers)
    chosen = {name for i, name in enumerate(layers) if lo <= i / n < hi}
    return chosen or set(layers[min(int(lo * n), n - 1):][:1])


def cross_attention_heads(unet) -> dict[str, int]:
    """The text cross-attention modules (`attn2`: UNets, PixArt) of a model, in its order:
    module name (what `HarvestConfig.heads` names) -> its number of heads."""
    modules = dict(unet.named_modules())
    names = (n.rsplit(".processor", 1)[0] for n in unet.attn_processors)
    return {n: int(modules[n].heads) for n in names if n.rsplit(".", 1)[-1] == "attn2"}


def check_head_layers(heads: dict, network, cross_names) -> None:
    """Refuse a `HarvestConfig.heads` that names a layer the model does not have among its
    cross-attention modules (`cross_names`), or a head that layer lacks, before anything is
    generated."""
    unknown = sorted(set(heads) - set(cross_names))
    if unknown:
        known = sorted(cross_names)
        raise UserError(f"harvest heads name {unknown}, not a cross-attention layer of this "
                        f"model (it has {len(known)}, e.g. {known[:3]})")
    modules = dict(network.named_modules())
    for name, picked in heads.items():
        count = getattr(modules.get(name), "heads", None)
        if count is not None and max(picked) >= count:
            raise UserError(f"harvest heads of {name}: head {max(picked)} does not exist (the "
                            f"layer has {count})")


def layer_selected(proc, stride: int, strides, blocks, transformer_layers) -> bool:
    """Whether a cross-attention layer at `stride` contributes: its stride is chosen and, in a
    UNet, its block (`blocks`); a DiT's layers are chosen by depth (`transformer_layers`)."""
    if stride not in strides:
        return False
    if proc.block == "transformer":
        return proc.name in transformer_layers
    return proc.block in blocks


def pick_heads(query: torch.Tensor, key: torch.Tensor, heads: dict, name: str):
    """The q/k [B, heads, N, d] of the heads `heads` (`HarvestConfig.heads`) keeps for layer
    `name`, None when it keeps none of that layer: every head when `heads` is empty."""
    if not heads:
        return query, key
    picked = heads.get(name)
    if picked is None:
        return None
    if max(picked) >= query.shape[1]:
        raise UserError(f"harvest heads of {name}: head {max(picked)} does not exist (the "
                        f"layer has {query.shape[1]})")
    # Slices, not an index tensor: every layer of every denoising step comes here, and an
    # index made from the list would be a host-to-device copy per call on a GPU.
    return (torch.cat([query[:, h : h + 1] for h in picked], dim=1),
            torch.cat([key[:, h : h + 1] for h in picked], dim=1))


def heads_left_out(missed: list[str], strides, blocks) -> UserError:
    """The error for `HarvestConfig.heads` layers that the strides and blocks leave out."""
    return UserError(f"harvest heads name {missed}, which the harvest strides {list(strides)} "
                     f"and blocks {list(blocks)} leave out")


def layer_grid(n: int, latent_hw: tuple[int, int], image_size: tuple[int, int]):
    """(stride, h, w) of an attention layer with `n` queries.

    UNet levels halve the latent with rounding up, so a level f levels down has
    ceil(latent / 2^f) rows; its stride is image pixels per latent pixel times 2^f.
    """
    lh, lw = latent_hw
    h, w, f = lh, lw, 1
    while h * w > n:
        h, w, f = -(-h // 2), -(-w // 2), f * 2
    if h * w != n:
        raise RuntimeError(f"cannot place {n} queries on a {lh}x{lw} latent grid")
    return image_size[0] // lh * f, h, w


def grid_size(image_size: tuple[int, int], stride: int) -> tuple[int, int]:
    """Map size at `stride`: UNet levels round up, so ceil(H / stride) x ceil(W / stride)."""
    return -(-image_size[0] // stride), -(-image_size[1] // stride)


def self_attention_probs(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """Head-mean softmax self-attention [B, N, N] (fp32) of one layer's q/k [B, heads, N, d]."""
    return torch.softmax(
        torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale, dim=-1
    ).mean(dim=1)


class AttentionObserver(Protocol):
    """Whoever an `ObservingAttnProcessor` reports to."""

    def observe(self, proc: ObservingAttnProcessor, attn, query: torch.Tensor,
                key: torch.Tensor) -> None: ...


class ObservingAttnProcessor:
    """Computes the stock attention output and reports the layer's q/k to an observer.

    `name` is the attention module's name in the UNet, `block` its block, `cross` whether it
    is cross-attention (attn2) rather than self-attention (attn1).
    """

    def __init__(self, observer: AttentionObserver, name: str, cross: bool):
        self.observer = observer
        self.name = name
        self.block = block_of(name)
        self.cross = cross
        # The current call's attention mask (None: every key): T5 text encoders (PixArt) pad
        # the prompt and mask the padding out of cross-attention. Kept as given; observers
        # that need it read `key_valid`.
        self.attention_mask: torch.Tensor | None = None

    @property
    def key_valid(self) -> torch.Tensor | None:
        """[batch, L] bool: the keys the current call may attend to, None for all."""
        return None if self.attention_mask is None else key_validity(self.attention_mask)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        out, query, key = stock_attention(
            attn, hidden_states, encoder_hidden_states, attention_mask, temb
        )
        self.attention_mask = attention_mask
        # Looked up at each call, so a benchmark can wrap the observer's method to time it.
        self.observer.observe(self, attn, query, key)
        return out


class ObservingJointAttnProcessor:
    """The joint-attention counterpart of `ObservingAttnProcessor` (SD3's MMDiT blocks):
    computes the stock outputs and reports the image queries against the text keys, as a
    cross-attention layer would (the class map is the image rows over the class's text
    columns, softmax over the text keys). With `whole_sequence` the keys reported are the
    text keys followed by the image keys (a softmax over them is the joint one; the text
    columns come first, where the class weights are). Blocks whose text stream has ended
    (SD3.5's dual attention `attn2`, image tokens only) report nothing."""

    cross = True
    key_valid = None  # joint attention is not masked

    def __init__(self, observer: AttentionObserver, name: str, whole_sequence: bool = False):
        self.observer = observer
        self.name = name
        self.block = block_of(name)
        self.whole_sequence = whole_sequence

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 *args, **kwargs):
        outputs, query, image_key, text_key = stock_joint_attention(attn, hidden_states,
                                                                    encoder_hidden_states)
        if text_key is not None:
            key = torch.cat([text_key, image_key], dim=2) if self.whole_sequence else text_key
            self.observer.observe(self, attn, query, key)
        return outputs


class FluxTextLength:
    """How many text tokens lead the joint sequence of the current Flux forward: set by the
    double-stream blocks (they see the text apart), read by the single-stream blocks, which
    see one concatenated sequence and run after them."""

    value: int | None = None


class ObservingFluxAttnProcessor:
    """The Flux counterpart of `ObservingJointAttnProcessor`: computes FluxAttnProcessor's
    outputs and reports the image queries against the text keys of both block kinds (the
    class map is the image rows over the class's text columns, softmax over the text keys).
    Flux has no padding mask and no classifier-free guidance batch. With `whole_sequence`
    the keys reported are the whole joint sequence (text first), as for SD3."""

    cross = True
    key_valid = None

    def __init__(self, observer: AttentionObserver, name: str, text_length: FluxTextLength,
                 whole_sequence: bool = False):
        self.observer = observer
        self.name = name
        self.block = block_of(name)
        self.text_length = text_length
        self.whole_sequence = whole_sequence

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, *args, **kwargs):
        outputs, query, key = stock_flux_attention(attn, hidden_states, encoder_hidden_states,
                                                   attention_mask, image_rotary_emb)
        if encoder_hidden_states is not None:
            self.text_length.value = encoder_hidden_states.shape[1]
        n = self.text_length.value
        if n is None:
            raise RuntimeError("a Flux single-stream block ran before any double-stream block; "
                               "its text length is unknown")
        # [B, S, heads, d] -> [B, heads, *, d]: image queries, text (then image) keys.
        keys = key if self.whole_sequence else key[:, :n]
        self.observer.observe(self, attn, query[:, n:].transpose(1, 2), keys.transpose(1, 2))
        return outputs


def _is_flux_attention(module) -> bool:
    return type(module).__name__ == "FluxAttention"


def install_observers(unet, observer: AttentionObserver, self_attention: bool,
                      joint_softmax: str = "text") -> dict:
    """Put an `ObservingAttnProcessor` on every cross-attention module of `unet` (and every
    self-attention module if `self_attention`), an `ObservingJointAttnProcessor` on every
    joint-attention module (SD3: the ones with text projections, `add_k_proj`), an
    `ObservingFluxAttnProcessor` on every attention module of a Flux transformer (those two
    report the whole joint sequence's keys when `joint_softmax` is "joint"); the other
    modules keep theirs. Returns the previous processors, for
    `unet.set_attn_processor(previous)` to restore them."""
    previous = dict(unet.attn_processors)
    modules = dict(unet.named_modules())
    if any(_is_flux_attention(m) for m in modules.values()):
        text_length = FluxTextLength()
        unet.set_attn_processor({
            name: ObservingFluxAttnProcessor(observer, name.rsplit(".processor", 1)[0],
                                             text_length, joint_softmax == "joint")
            if _is_flux_attention(modules.get(name.rsplit(".processor", 1)[0])) else proc
            for name, proc in previous.items()})
        return previous
    joint = {n for n in previous
             if getattr(modules.get(n.rsplit(".processor", 1)[0]), "add_k_proj", None)
             is not None}
    processors = {}
    for name, proc in previous.items():
        module_name = name.rsplit(".processor", 1)[0]
        kind = module_name.rsplit(".", 1)[-1]
        if name in joint:
            processors[name] = ObservingJointAttnProcessor(observer, module_name,
                                                           joint_softmax == "joint")
        elif joint:
            # An MMDiT's other attention modules (SD3.5's image-only `attn2`) are neither
            # cross- nor UNet self-attention: they keep their processors.
            processors[name] = proc
        elif kind == "attn2" or (kind == "attn1" and self_attention):
            processors[name] = ObservingAttnProcessor(observer, module_name, kind == "attn2")
        else:
            processors[name] = proc
    unet.set_attn_processor(processors)
    return previous
