"""Harvesting against the stock pipeline and against a naive store-everything reference."""

from __future__ import annotations

import gc
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

from attnseg.pipeline.config import get_preset
from attnseg.pipeline.harvest.harvester import AttentionHarvester
from attnseg.pipeline.harvest.masks import combine_maps, refine_maps
from attnseg.pipeline.models.loading import class_weights
from attnseg.pipeline.prompts import PromptSpec, class_token_weights, load_classes

SIZE = (128, 96)  # non-square on purpose
PROMPTS = ["a photo of a dog and a cat", "an aeroplane over a street"]


def _specs(classes):
    by = {c.name: c for c in classes}
    return [
        PromptSpec(PROMPTS[0], ((by["dog"], "dog"), (by["cat"], "cat"))),
        PromptSpec(PROMPTS[1], ((by["aeroplane"], "aeroplane"),)),
    ]


def _latents(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, SIZE[0] // 8, SIZE[1] // 8, generator=g)


def _run(pipe, latents, steps, guidance=7.5):
    return pipe(PROMPTS, height=SIZE[0], width=SIZE[1], num_inference_steps=steps,
                guidance_scale=guidance, latents=latents.clone(), output_type="pt").images


class _StoreEverything:
    """The older tools' pattern: explicit attention, every probability map of every step kept."""

    def __init__(self, store, name):
        self.store, self.name = store, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kwargs):
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        b, n, _ = hidden_states.shape
        heads = attn.heads
        q = attn.to_q(hidden_states).view(b, n, heads, -1).transpose(1, 2)
        k = attn.to_k(ctx).view(b, ctx.shape[1], heads, -1).transpose(1, 2)
        v = attn.to_v(ctx).view(b, ctx.shape[1], heads, -1).transpose(1, 2)
        logits = q @ k.transpose(-1, -2) * attn.scale
        if attention_mask is not None:  # padded text keys (T5), as the stock processor
            logits = logits + attn.prepare_attention_mask(
                attention_mask, ctx.shape[1], b).view(b, heads, -1, ctx.shape[1])
        probs = torch.softmax(logits, dim=-1)
        self.store.append((self.name, self.store.step, probs.detach().clone()))
        out = (probs @ v).transpose(1, 2).reshape(b, n, -1)
        return attn.to_out[1](attn.to_out[0](out))


class _Store(list):
    step = -1


def _naive_maps(store, preset, token_weights, num_steps):
    """Aggregate the stored maps afterwards, straight from each recipe's description."""
    cfg = preset.harvest
    steps = set(cfg.step_range(num_steps))
    H, W = SIZE
    B = token_weights.shape[0]
    per_stride: dict[int, list] = {}
    common = []
    self_maps = []
    head_sums: dict[str, torch.Tensor] = {}
    for name, step, probs in store:
        if step not in steps:
            continue
        # [B, heads, N, L]: the conditional half (Flux has no unconditional one).
        cond = probs[B:] if probs.shape[0] == 2 * B else probs
        n = cond.shape[2]
        h, w, stride = H // 8, W // 8, 8  # walk down the UNet levels (they round up)
        while h * w != n:
            h, w, stride = -(-h // 2), -(-w // 2), stride * 2
        block = name.split(".")[0].split("_")[0]
        block = "transformer" if block == "single" else block  # Flux's single-stream blocks
        if name.endswith("attn1"):
            if stride == cfg.refine_stride:
                self_maps.append(cond.mean(1))
            continue
        if stride not in cfg.strides or (block != "transformer" and block not in cfg.blocks):
            continue  # `blocks` names UNet blocks; a DiT's are always taken
        if cfg.heads:  # only the named layers, only their named heads
            if name not in cfg.heads:
                continue
            cond = cond[:, list(cfg.heads[name])]
        # Text keys past the tokenizer's context (SD3's T5 positions) carry no class.
        tw = F.pad(token_weights, (0, 0, 0, cond.shape[-1] - token_weights.shape[1]))
        if cfg.accumulate == "per_head":  # DAAM: a step-sum per (layer, head), native size
            per = torch.einsum("bhnl,blc->bhcn", cond, tw)
            per = per.reshape(B, cond.shape[1], -1, h, w)
            head_sums[name] = head_sums.get(name, 0) + per
            continue
        cls = torch.einsum("bnl,blc->bcn", cond.mean(1), tw).reshape(B, -1, h, w)
        if cfg.accumulate == "native":
            per_stride.setdefault(stride, []).append(cls)
        else:
            cs = cfg.combine_stride
            size = (-(-H // cs), -(-W // cs))
            up = cls if (h, w) == size else F.interpolate(
                cls, size=size, mode=cfg.accumulate_mode, align_corners=False)
            if cfg.clamp_each_step:
                up = up.clamp_min(0)
            wgt = cfg.stride_weights.get(stride, 1.0)
            common.append((wgt * up, wgt))
    if cfg.accumulate == "per_head":
        # Each (layer, head) sum resized bicubically, clamped at 0 once, then the mean over
        # layers and heads; divided by the step count (a positive scale: the harvester keeps
        # means, DAAM sums; min-max normalisation makes them the same masks).
        size = (-(-H // cfg.combine_stride), -(-W // cfg.combine_stride))
        maps = []
        for sums in head_sums.values():
            for hd in range(sums.shape[1]):
                m = sums[:, hd]
                if tuple(m.shape[-2:]) != size:
                    m = F.interpolate(m, size=size, mode=cfg.accumulate_mode,
                                      align_corners=False)
                maps.append(m.clamp_min(0))
        combined = torch.stack(maps).mean(0) / len(steps)
    elif cfg.accumulate == "common":
        combined = sum(m for m, _ in common) / sum(w for _, w in common)
    else:
        size = (-(-H // cfg.combine_stride), -(-W // cfg.combine_stride))
        total, wsum = 0.0, 0.0
        for stride, maps in sorted(per_stride.items()):
            m = torch.stack(maps).mean(0)
            if cfg.stride_normalize == "max":  # padded all-zero columns stay zero
                m = torch.nan_to_num(m / m.amax(dim=(2, 3), keepdim=True))
            if tuple(m.shape[-2:]) != size:
                m = F.interpolate(m, size=size, mode=cfg.combine_mode, align_corners=False)
            wgt = cfg.stride_weights.get(stride, 1.0)
            total, wsum = total + wgt * m, wsum + wgt
        combined = total / wsum
    if cfg.refine_power:
        size = (-(-H // cfg.refine_stride), -(-W // cfg.refine_stride))
        if tuple(combined.shape[-2:]) != size:
            combined = F.interpolate(combined, size=size, mode=cfg.refine_mode,
                                     align_corners=False)
        a = torch.stack(self_maps).mean(0)
        flat = combined.flatten(2).transpose(1, 2)
        flat = torch.linalg.matrix_power(a, cfg.refine_power) @ flat
        combined = flat.transpose(1, 2).reshape(combined.shape)
    return combined


@pytest.fixture(scope="module")
def classes():
    return load_classes("voc")


@pytest.mark.parametrize("impl", ["ref", "numba"])
def test_images_equal_stock_pipeline(tiny_pipe, impl, monkeypatch, torch_one_thread):
    # Bit for bit: the processors run stock's operations, and the numba kernels leave torch's
    # thread count alone (numba's OpenMP layer used to raise it to numba's, which changed the
    # bits of every later torch reduction).
    monkeypatch.setenv("ATTNSEG_KERNEL_IMPL", impl)
    latents = _latents(tiny_pipe)
    stock = _run(tiny_pipe, latents, steps=3)
    classes = load_classes("voc")
    weights, _ = class_token_weights(tiny_pipe.tokenizer, _specs(classes))
    harvester = AttentionHarvester(tiny_pipe.unet, get_preset("attnseg").harvest)
    try:
        with harvester.capture(weights, SIZE, num_steps=3) as cap:
            ours = _run(tiny_pipe, latents, steps=3)
    finally:
        harvester.remove()
    assert torch.equal(ours, stock)
    assert torch.get_num_threads() == 1
    assert cap.result.maps, "nothing was harvested"
    # remove() restores the stock processors
    assert all(isinstance(p, AttnProcessor2_0) for p in tiny_pipe.unet.attn_processors.values())


def assert_maps_equal_naive_reference(pipe, net, classes, preset_name, run, steps,
                                      store_processor=None, **harvest_changes):
    """Harvest `steps` of `run(pipe, latents, steps)` with the preset (and these harvest
    settings changed), run it again with every attention map stored (by
    `store_processor(store, name)`, default `_StoreEverything`), and compare the harvested
    maps with the naive aggregation."""
    store_processor = store_processor or _StoreEverything
    preset = get_preset(preset_name)
    preset = replace(preset, harvest=replace(preset.harvest, **harvest_changes))
    weights, _ = class_weights(pipe, _specs(classes), preset.harvest.token_merge)
    latents = _latents(pipe, seed=1)
    harvester = AttentionHarvester(net, preset.harvest)
    try:
        with harvester.capture(weights, SIZE, num_steps=steps) as cap:
            run(pipe, latents, steps)
    finally:
        harvester.remove()
    ours = combine_maps(cap.result, preset.harvest)
    if preset.harvest.refine_power:
        ours = refine_maps(ours, cap.result.self_attention, preset.harvest, SIZE)

    store = _Store()
    procs = {name: store_processor(store, name.rsplit(".processor", 1)[0])
             for name in net.attn_processors}
    hook = net.register_forward_pre_hook(lambda *a, **k: setattr(store, "step", store.step + 1),
                                         with_kwargs=True)
    net.set_attn_processor(procs)
    try:
        run(pipe, latents, steps)
    finally:
        hook.remove()
        net.set_attn_processor(AttnProcessor2_0())
    ref = _naive_maps(store, preset, weights, steps)
    assert ours.shape == ref.shape
    scale = ref.abs().max().item()
    assert scale > 0
    assert (ours - ref).abs().max().item() <= 1e-5 * max(1.0, scale)


@pytest.mark.parametrize("preset_name", ["attnseg", "diffumask", "dataset-diffusion", "daam",
                                         "attn2mask"])
def test_maps_equal_naive_reference(tiny_pipe, classes, preset_name):
    assert_maps_equal_naive_reference(tiny_pipe, tiny_pipe.unet, classes, preset_name, _run, 4)


# Two layers at stride 16 and one at stride 8 of the tiny UNet (8 heads each).
SOME_HEADS = {"down_blocks.1.attentions.0.transformer_blocks.0.attn2": (0, 3),
              "up_blocks.2.attentions.1.transformer_blocks.0.attn2": (7,),
              "up_blocks.3.attentions.0.transformer_blocks.0.attn2": (2, 5, 6)}


@pytest.mark.parametrize("preset_name", ["attnseg", "diffumask", "daam"])
def test_chosen_heads_equal_naive_reference(tiny_pipe, classes, preset_name):
    """`heads`: only the named layers' named heads, through every accumulation mode (native,
    common, per head) and the fused kernel, against the naive aggregation of those heads."""
    assert_maps_equal_naive_reference(tiny_pipe, tiny_pipe.unet, classes, preset_name, _run, 3,
                                      heads=SOME_HEADS)


def test_every_head_named_equals_no_choice(tiny_pipe, classes):
    """Naming every head of every layer is the same harvest as naming none; one head less
    changes the maps."""
    from attnseg.pipeline.harvest.attention import cross_attention_heads

    every = {n: tuple(range(h)) for n, h in cross_attention_heads(tiny_pipe.unet).items()}
    one_less = dict(every)
    name = "up_blocks.3.attentions.0.transformer_blocks.0.attn2"
    one_less[name] = every[name][1:]
    weights, _ = class_weights(tiny_pipe, _specs(classes), "sum")
    latents = _latents(tiny_pipe, seed=2)
    maps = {}
    for key, heads in (("none", {}), ("every", every), ("one_less", one_less)):
        # Every level of the tiny UNet (its mid block is at stride 64).
        harvester = AttentionHarvester(tiny_pipe.unet, replace(
            get_preset("attnseg").harvest, heads=heads, strides=(8, 16, 32, 64)))
        try:
            with harvester.capture(weights, SIZE, num_steps=2) as cap:
                _run(tiny_pipe, latents, 2)
        finally:
            harvester.remove()
        maps[key] = cap.result.maps
    assert sorted(maps["every"]) == sorted(maps["none"]) == [8, 16, 32, 64]
    for stride, m in maps["none"].items():
        torch.testing.assert_close(maps["every"][stride], m, rtol=1e-5, atol=1e-7)
    assert (maps["one_less"][8] - maps["none"][8]).abs().max() > 1e-4
    torch.testing.assert_close(maps["one_less"][16], maps["none"][16], rtol=1e-5, atol=1e-7)


def test_heads_that_do_not_exist_or_are_left_out_are_refused(tiny_pipe, classes):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from attnseg.pipeline.errors import UserError

    base = get_preset("attnseg").harvest
    weights, _ = class_weights(tiny_pipe, _specs(classes), "sum")
    latents = _latents(tiny_pipe)
    layer = "up_blocks.3.attentions.0.transformer_blocks.0.attn2"  # stride 8
    at_16 = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    # A name the model does not have: refused before anything runs, processors given back.
    with pytest.raises(UserError, match="not a cross-attention layer of this model"):
        AttentionHarvester(tiny_pipe.unet, replace(base, heads={"up_blocks.9.attn2": (0,)}))
    assert all(isinstance(p, AttnProcessor2_0) for p in tiny_pipe.unet.attn_processors.values())
    with pytest.raises(UserError, match="head 8 does not exist"):
        AttentionHarvester(tiny_pipe.unet, replace(base, heads={layer: (8,)}))
    assert all(isinstance(p, AttnProcessor2_0) for p in tiny_pipe.unet.attn_processors.values())
    # A layer the strides leave out: refused when the first capture ends.
    harvester = AttentionHarvester(tiny_pipe.unet, replace(base, heads={layer: (0,), at_16: (1,)},
                                                           strides=(16, 32)))
    try:
        with pytest.raises(UserError, match="leave out"):
            with harvester.capture(weights, SIZE, num_steps=1):
                _run(tiny_pipe, latents, 1)
    finally:
        harvester.remove()


def test_daam_order_is_exact_on_sharpened_attention(classes):
    """With sharp attention (query projections scaled up), bicubic upsampling undershoots,
    so where the clamp sits matters: the daam preset follows DAAM's order (per-head step-sums,
    one clamp per head after the resize), not the head mean clamped at every step."""
    from attnseg.pipeline.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0)
    with torch.no_grad():
        for name, module in pipe.unet.named_modules():
            if name.endswith("attn2"):
                module.to_q.weight.mul_(12.0)
    preset = get_preset("daam")
    steps = 3
    weights, _ = class_token_weights(pipe.tokenizer, _specs(classes), preset.harvest.token_merge)
    latents = _latents(pipe, seed=2)

    def harvest(cfg):
        harvester = AttentionHarvester(pipe.unet, cfg)
        try:
            with harvester.capture(weights, SIZE, num_steps=steps) as cap:
                _run(pipe, latents, steps)
        finally:
            harvester.remove()
        return combine_maps(cap.result, cfg)

    ours = harvest(preset.harvest)
    store = _Store()
    procs = {name: _StoreEverything(store, name.rsplit(".processor", 1)[0])
             for name in pipe.unet.attn_processors}
    hook = pipe.unet.register_forward_pre_hook(lambda *a: setattr(store, "step", store.step + 1))
    pipe.unet.set_attn_processor(procs)
    try:
        _run(pipe, latents, steps)
    finally:
        hook.remove()
        pipe.unet.set_attn_processor(AttnProcessor2_0())
    ref = _naive_maps(store, preset, weights, steps)
    scale = ref.abs().max().item()
    assert (ours - ref).abs().max().item() <= 1e-5 * scale
    # The former order (head mean resized and clamped at every step) is measurably different.
    old = harvest(replace(preset.harvest, accumulate="common", clamp_each_step=True))
    assert (old - ref).abs().max().item() > 1e-3 * scale


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage alive in this process (weights included), counted by the
    garbage collector, not by the harvester's own accounting."""
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def assert_live_memory_flat(live: dict[int, int], buffers: int) -> None:
    """Live tensor bytes at the end of a short and a long capture differ by less than a tenth
    of the harvester's buffers (the scheduler's per-step tables are a few bytes a step): one
    step's maps kept per step would add the buffers' size again every step."""
    short, long_ = sorted(live)
    assert buffers > 0
    assert abs(live[long_] - live[short]) < buffers / 10, (live, buffers)


@pytest.mark.parametrize("name", ["dataset-diffusion", "daam"])  # + self-attention; per head
def test_memory_does_not_grow_with_steps(tiny_pipe, classes, name):
    weights, _ = class_token_weights(tiny_pipe.tokenizer, _specs(classes))
    preset = get_preset(name)
    harvester = AttentionHarvester(tiny_pipe.unet, preset.harvest)
    sizes, live = {}, {}
    try:
        for steps in (2, 7):
            latents = _latents(tiny_pipe)
            with harvester.capture(weights, SIZE, num_steps=steps) as cap:
                _run(tiny_pipe, latents, steps)
                live[steps] = live_tensor_bytes()
            sizes[steps] = (cap.nbytes(), len(cap.sums) + len(cap.head_sums))
    finally:
        harvester.remove()
    assert sizes[2][0] == sizes[7][0] > 0
    assert sizes[2][1] == sizes[7][1]
    assert_live_memory_flat(live, sizes[2][0])


def test_step_window_selects_steps():
    cfg = get_preset("attn2mask").harvest
    assert list(cfg.step_range(100)) == [50]
    assert list(cfg.step_range(10)) == [5]
    full = get_preset("attnseg").harvest
    assert list(full.step_range(7)) == list(range(7))


def test_no_cfg_batch_is_harvested(tiny_pipe, classes):
    """guidance <= 1 runs the UNet on the conditional batch only; harvesting still works."""
    weights, _ = class_token_weights(tiny_pipe.tokenizer, _specs(classes))
    harvester = AttentionHarvester(tiny_pipe.unet, get_preset("attnseg").harvest)
    try:
        with harvester.capture(weights, SIZE, num_steps=2) as cap:
            _run(tiny_pipe, _latents(tiny_pipe), 2, guidance=1.0)
    finally:
        harvester.remove()
    for m in cap.result.maps.values():
        assert m.shape[:2] == (2, 2)
        assert torch.isfinite(m).all() and m[0, 0].sum() > 0
        assert m[1, 1].abs().sum() == 0  # the second prompt has one class: padded column


def test_crf_step_refines_labels_and_keeps_unsure_pixels(tiny_pipe, classes):
    from attnseg.pipeline.harvest.masks import masks_from_harvest

    preset = get_preset("attnseg")
    weights, ids = class_token_weights(tiny_pipe.tokenizer, _specs(classes))
    latents = _latents(tiny_pipe, seed=3)
    harvester = AttentionHarvester(tiny_pipe.unet, preset.harvest)
    try:
        with harvester.capture(weights, SIZE, num_steps=2) as cap:
            images = _run(tiny_pipe, latents, 2)  # [B, 3, H, W] in [0, 1]
    finally:
        harvester.remove()
    plain, _ = masks_from_harvest(cap.result, ids, preset.harvest,
                                  replace(preset.mask, crf_iterations=0))
    crf_mask = replace(preset.mask, crf_iterations=3, crf_max_side=32)  # refined at 32 px
    rgb = images.permute(0, 2, 3, 1) * 255
    labels, rel = masks_from_harvest(cap.result, ids, preset.harvest, crf_mask, images=rgb)
    assert labels.shape == plain.shape and rel.shape == plain.shape
    assert torch.equal(labels == 255, plain == 255)  # the recipe's unsure pixels stay unsure
    allowed = {0, 255} | set(ids.flatten().tolist())
    assert set(labels.unique().tolist()) <= allowed
    assert not torch.equal(labels, plain)  # the CRF changed something
    with pytest.raises(ValueError, match="pass the images"):
        masks_from_harvest(cap.result, ids, preset.harvest, crf_mask)


def test_daam_masks_follow_daams_order(tiny_pipe, classes):
    """DAAM (heatmap.py, WordHeatMap.expand_as): each word's map is resized bicubically to the
    image, then min-max normalised over it, then thresholded at 0.4. The preset's labels equal
    that order exactly; normalising before the resize (attnseg's default order) does not."""
    from attnseg.pipeline.harvest.masks import masks_from_harvest

    preset = get_preset("daam")
    weights, class_ids = class_weights(tiny_pipe, _specs(classes), preset.harvest.token_merge)
    harvester = AttentionHarvester(tiny_pipe.unet, preset.harvest)
    try:
        with harvester.capture(weights, SIZE, num_steps=3) as cap:
            _run(tiny_pipe, _latents(tiny_pipe), 3)
    finally:
        harvester.remove()
    maps = combine_maps(cap.result, preset.harvest).float()  # [B, C, 16, 12] at stride 8
    up = F.interpolate(maps, size=SIZE, mode="bicubic", align_corners=False)
    lo = up.amin(dim=(2, 3), keepdim=True)
    hi = up.amax(dim=(2, 3), keepdim=True)
    heat = (up - lo) / (hi - lo + 1e-8)
    best, idx = heat.max(dim=1)
    ids = torch.gather(class_ids, 1, idx.flatten(1)).view_as(idx)
    expected = torch.where(best > 0.4, ids, torch.zeros_like(ids)).to(torch.uint8)
    labels, _ = masks_from_harvest(cap.result, class_ids, preset.harvest, preset.mask)
    assert labels.shape == expected.shape
    assert torch.equal(labels, expected), (labels != expected).float().mean().item()
    # The order matters on this model: normalising the small maps first labels other pixels.
    other, _ = masks_from_harvest(cap.result, class_ids, preset.harvest,
                                  replace(preset.mask, normalize_at="maps"))
    assert (other != expected).float().mean().item() > 0.01


@pytest.mark.parametrize("name", ["diffumask", "attn2mask"])
def test_crf_presets_use_the_kernels_of_the_code_they_cite(name):
    """psa's `crf_inference` (pydensecrf's README example): addPairwiseGaussian(sxy=3,
    compat=3), addPairwiseBilateral(sxy=80, srgb=13, compat=10), 10 iterations."""
    mask = get_preset(name).mask
    assert (mask.crf_iterations, mask.crf_w_smooth, mask.crf_sxy_smooth) == (10, 3.0, 3.0)
    assert (mask.crf_w_app, mask.crf_sxy_app, mask.crf_srgb) == (10.0, 80.0, 13.0)
    assert "psa's kernels" in get_preset(name).source
