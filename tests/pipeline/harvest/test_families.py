"""Model families beyond SD 1.x: the tiny SDXL model (two text encoders, added conditioning, no
cross-attention at stride 8, deeper transformer blocks) harvested like SD 1.5 — images equal to
the stock pipeline, maps equal to the store-everything reference, memory independent of the
step count, `attnseg synth` end to end — and loading: folders by their pipeline class, single
files by their keys, unsupported families refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

from attnseg.pipeline.cli import main
from attnseg.pipeline.config import get_preset
from attnseg.pipeline.errors import UserError
from attnseg.pipeline.harvest.harvester import AttentionHarvester
from attnseg.pipeline.models.loading import _single_file_class, load_pipeline, model_family
from attnseg.pipeline.prompts import class_token_weights, load_classes

from .test_harvester import (
    PROMPTS,
    SIZE,
    _latents,
    _run,
    _specs,
    assert_live_memory_flat,
    assert_maps_equal_naive_reference,
    live_tensor_bytes,
)


def _assert_memory_flat(pipe, classes, preset_name, run, latents):
    """The harvester's buffers hold as many bytes after 5 steps as after 2, and the live tensors
    of the process (counted by the garbage collector) do not grow with the steps."""
    from attnseg.pipeline.models.loading import class_weights, denoiser

    weights, _ = class_weights(pipe, _specs(classes))
    harvester = AttentionHarvester(denoiser(pipe), get_preset(preset_name).harvest)
    sizes, live = {}, {}
    try:
        for steps in (2, 5):
            start = latents()
            with harvester.capture(weights, SIZE, num_steps=steps) as cap:
                run(pipe, start, steps)
                live[steps] = live_tensor_bytes()
            sizes[steps] = cap.nbytes()
    finally:
        harvester.remove()
    assert sizes[2] == sizes[5] > 0
    assert_live_memory_flat(live, sizes[2])


def _assert_synth_writes(model, tmp_path):
    out = tmp_path / model
    assert main(["synth", "--model", model, "--classes", "dog,cat", "--steps", "2",
                 "--batch-size", "2", "--out", str(out), "--no-progress"]) == 0
    assert len(list((out / "SegmentationClass").glob("*.png"))) == 2


@pytest.fixture(scope="module")
def sdxl_pipe():
    from attnseg.pipeline.models.tiny import build_tiny_sdxl_pipeline

    return build_tiny_sdxl_pipeline(seed=0)


@pytest.fixture(scope="module")
def classes():
    return load_classes("voc")


def test_tiny_sdxl_is_the_sdxl_layout(sdxl_pipe):
    assert model_family(sdxl_pipe) == "sdxl"
    unet = sdxl_pipe.unet
    assert unet.config.addition_embed_type == "text_time"
    assert sdxl_pipe.text_encoder_2 is not None and sdxl_pipe.tokenizer_2 is not None
    cross = [n for n in unet.attn_processors if ".attn2." in n]
    assert not any(n.startswith("down_blocks.0") for n in cross)  # none at stride 8
    assert any("transformer_blocks.1" in n for n in cross)  # depth 2 at the deepest level


def test_images_equal_stock_pipeline(sdxl_pipe, classes, torch_one_thread):
    latents = _latents(sdxl_pipe)
    stock = _run(sdxl_pipe, latents, steps=3)
    weights, _ = class_token_weights(sdxl_pipe.tokenizer, _specs(classes))
    harvester = AttentionHarvester(sdxl_pipe.unet, get_preset("attnseg").harvest)
    try:
        with harvester.capture(weights, SIZE, num_steps=3) as cap:
            ours = _run(sdxl_pipe, latents, steps=3)
    finally:
        harvester.remove()
    assert torch.equal(ours, stock)
    assert set(cap.result.maps) == {16, 32}  # SDXL has no cross-attention at stride 8


@pytest.mark.parametrize("preset_name", ["attnseg", "dataset-diffusion", "daam"])
def test_maps_equal_naive_reference(sdxl_pipe, classes, preset_name):
    assert_maps_equal_naive_reference(sdxl_pipe, sdxl_pipe.unet, classes, preset_name, _run, 3)


def test_memory_does_not_grow_with_steps(sdxl_pipe, classes):
    _assert_memory_flat(sdxl_pipe, classes, "dataset-diffusion", _run,
                        lambda: _latents(sdxl_pipe))


def test_synth_end_to_end_and_folder_round_trip(tmp_path, sdxl_pipe, torch_one_thread):
    out = tmp_path / "ds"
    assert main(["synth", "--model", "tiny-sdxl", "--classes", "dog,cat", "--num-per-class",
                 "1", "--steps", "2", "--batch-size", "2", "--out", str(out),
                 "--no-progress"]) == 0
    job = json.loads((out / "job.json").read_text())
    assert job["model"] == "tiny-sdxl"
    masks = sorted((out / "SegmentationClass").glob("*.png"))
    assert len(masks) == 2
    # A saved SDXL folder loads as SDXL through the same --model path.
    folder = tmp_path / "sdxl"
    sdxl_pipe.save_pretrained(folder)
    pipe = load_pipeline(str(folder), torch.device("cpu"), torch.float32)
    assert model_family(pipe) == "sdxl"
    assert torch.equal(next(pipe.unet.parameters()), next(sdxl_pipe.unet.parameters()))


def test_single_file_class_from_keys(tmp_path):
    from safetensors.torch import save_file

    sdxl = tmp_path / "xl.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(2)}, str(sdxl))
    sd = tmp_path / "sd.safetensors"
    save_file({"cond_stage_model.transformer.x": torch.zeros(2)}, str(sd))
    assert _single_file_class(sdxl) == "StableDiffusionXLPipeline"
    assert _single_file_class(sd) == "StableDiffusionPipeline"


def test_unsupported_family_is_one_line(tmp_path, capsys):
    folder = tmp_path / "auraflow"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "AuraFlowPipeline"}))
    with pytest.raises(UserError, match="AuraFlowPipeline.*supports"):
        load_pipeline(str(folder), torch.device("cpu"), torch.float32)


def test_few_step_sampling_lcm_and_turbo(tmp_path, sdxl_pipe, classes, torch_one_thread):
    """LCM and Turbo-style sampling: 1-4 steps, each one UNet call; at guidance 0 the batch is
    not doubled and the harvester takes the conditional batch as it is."""
    from copy import copy

    from attnseg.pipeline.models.loading import set_scheduler

    pipe = copy(sdxl_pipe)  # the scheduler is swapped on a shallow copy
    weights, _ = class_token_weights(pipe.tokenizer, _specs(classes))
    for name, steps, guidance in (("lcm", 4, 1.0), ("turbo", 1, 0.0), ("turbo", 2, 0.0)):
        set_scheduler(pipe, name)
        calls = []
        hook = pipe.unet.register_forward_pre_hook(
            lambda m, a, k, calls=calls: calls.append((a[0] if a else k["sample"]).shape[0]),
            with_kwargs=True)
        harvester = AttentionHarvester(pipe.unet, get_preset("attnseg").harvest)
        try:
            with harvester.capture(weights, SIZE, num_steps=steps) as cap:
                _run(pipe, _latents(pipe), steps, guidance=guidance)
        finally:
            harvester.remove()
            hook.remove()
        assert type(pipe.scheduler).__name__ in ("LCMScheduler",
                                                 "EulerAncestralDiscreteScheduler")
        assert calls == [2] * steps  # one call per step, batch 2 (no CFG half)
        assert cap.result.maps and all(torch.isfinite(m).all() for m in cap.result.maps.values())
        # The few-step maps are the naive aggregation of every stored attention map (both runs
        # draw the samplers' step noise, LCM's and Euler-ancestral's, from one seed).
        assert_maps_equal_naive_reference(
            pipe, pipe.unet, classes, "attnseg",
            lambda p, latents, n, g=guidance: (torch.manual_seed(0),
                                               _run(p, latents, n, guidance=g)), steps)
    # Every preset's step window keeps at least one of 1-4 steps.
    from attnseg.pipeline.config import PRESETS

    for name in PRESETS:
        for steps in (1, 2, 3, 4):
            assert len(get_preset(name).harvest.step_range(steps)) >= 1
    # Through the CLI; an unknown sampler is one line before anything loads.
    out = tmp_path / "few"
    assert main(["synth", "--model", "tiny-sdxl", "--classes", "dog,cat", "--steps", "2",
                 "--guidance", "0", "--scheduler", "turbo", "--out", str(out),
                 "--no-progress"]) == 0
    assert json.loads((out / "job.json").read_text())["scheduler"] == "turbo"
    assert main(["synth", "--scheduler", "fast", "--out", str(tmp_path / "bad")]) == 2


# ---- PixArt-Sigma (a DiT with T5: one resolution, padded text keys masked out)


@pytest.fixture(scope="module")
def pixart_pipe():
    from attnseg.pipeline.models.tiny import build_tiny_pixart_pipeline

    return build_tiny_pixart_pipeline(seed=0)


def _run_pixart(pipe, latents, steps, guidance=4.5):
    from attnseg.pipeline.models.loading import generation_kwargs

    return pipe(PROMPTS, height=SIZE[0], width=SIZE[1], num_inference_steps=steps,
                guidance_scale=guidance, latents=latents.clone(), output_type="pt",
                **generation_kwargs(pipe)).images


def test_t5_token_positions(pixart_pipe):
    from attnseg.pipeline.prompts import find_word_tokens, special_token_layout

    tok = pixart_pipe.tokenizer
    assert special_token_layout(tok) == (0, 1)  # no BOS; EOS at the end
    text = "a photo of a dog and an aeroplane"
    ids = tok(text).input_ids
    assert tok.convert_ids_to_tokens([ids[i] for i in find_word_tokens(tok, text, "dog")]) \
        == ["\u2581dog"]
    plane = find_word_tokens(tok, text, "aeroplane")  # not in the vocabulary: spelt out
    assert "".join(tok.convert_ids_to_tokens([ids[i] for i in plane])) == "\u2581aeroplane"


def test_pixart_images_equal_stock_and_padding_is_left_out(pixart_pipe, classes,
                                                           torch_one_thread):
    from attnseg.pipeline.models.loading import denoiser, model_family

    assert model_family(pixart_pipe) == "pixart"
    latents = _latents(pixart_pipe)
    stock = _run_pixart(pixart_pipe, latents, steps=3)
    weights, _ = class_token_weights(pixart_pipe.tokenizer, _specs(classes))
    harvester = AttentionHarvester(denoiser(pixart_pipe), get_preset("attnseg").harvest)
    seen = []
    observe = harvester.observe
    harvester.observe = lambda proc, *a: (seen.append(proc.key_valid), observe(proc, *a))[1]
    try:
        with harvester.capture(weights, SIZE, num_steps=3) as cap:
            ours = _run_pixart(pixart_pipe, latents, steps=3)
    finally:
        harvester.remove()
    assert torch.equal(ours, stock)
    assert set(cap.result.maps) == {16}  # patch 2 on the 8x latent: one resolution
    valid = next(v for v in seen if v is not None)
    assert not bool(valid.all())  # the prompts were padded, and the padding masked


@pytest.mark.parametrize("preset_name", ["attnseg", "diffumask", "daam"])
def test_pixart_maps_equal_naive_reference(pixart_pipe, classes, preset_name):
    from attnseg.pipeline.models.loading import denoiser

    assert_maps_equal_naive_reference(pixart_pipe, denoiser(pixart_pipe), classes, preset_name,
                                      _run_pixart, 3)


def test_pixart_synth_end_to_end(tmp_path, torch_one_thread):
    _assert_synth_writes("tiny-pixart", tmp_path)
    assert json.loads((tmp_path / "tiny-pixart" / "job.json").read_text())["model"] == \
        "tiny-pixart"


def test_pixart_memory_does_not_grow_with_steps(pixart_pipe, classes):
    _assert_memory_flat(pixart_pipe, classes, "daam", _run_pixart,
                        lambda: _latents(pixart_pipe))


def test_real_image_labelling_refuses_other_families(sdxl_pipe):
    from attnseg.pipeline.harvest.real_images import RealImageConfig, RealImageLabeller

    with pytest.raises(UserError, match="supports Stable Diffusion 1.x/2.x models; this one "
                       "is sdxl"):
        RealImageLabeller(sdxl_pipe, get_preset("attnseg"), RealImageConfig())


# ---- SD3 (MMDiT: image and text tokens in one joint attention)


@pytest.fixture(scope="module")
def sd3_pipe():
    from attnseg.pipeline.models.tiny import build_tiny_sd3_pipeline

    return build_tiny_sd3_pipeline(seed=0)


class _StoreJoint:
    """Stores, per joint-attention call, softmax over the text keys of the image queries,
    computed apart from the harvester's code; the output is the stock processor's."""

    def __init__(self, store, name, joint=False):
        from diffusers.models.attention_processor import JointAttnProcessor2_0

        self.store, self.name, self.stock = store, name, JointAttnProcessor2_0()
        self.joint = joint  # softmax over the whole joint sequence, text columns kept

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 *args, **kwargs):
        if encoder_hidden_states is not None:
            b, n, _ = hidden_states.shape
            heads = attn.heads
            q = attn.to_q(hidden_states).view(b, n, heads, -1).transpose(1, 2)
            k = attn.add_k_proj(encoder_hidden_states).view(b, -1, heads, q.shape[-1])
            k = k.transpose(1, 2)
            if attn.norm_q is not None:
                q = attn.norm_q(q)
            if attn.norm_added_k is not None:
                k = attn.norm_added_k(k)
            n_text = k.shape[2]
            if self.joint:
                k_img = attn.to_k(hidden_states).view(b, n, heads, -1).transpose(1, 2)
                k = torch.cat([k, attn.norm_k(k_img) if attn.norm_k is not None else k_img],
                              dim=2)
            probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
            probs = probs[..., :n_text]
            self.store.append((self.name, self.store.step, probs.detach().clone()))
        return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask)


def _run_sd3(pipe, latents, steps, guidance=4.5):
    return pipe(PROMPTS, height=SIZE[0], width=SIZE[1], num_inference_steps=steps,
                guidance_scale=guidance, latents=latents.clone(), output_type="pt").images


def test_sd3_images_equal_stock(sd3_pipe, classes, torch_one_thread):
    from attnseg.pipeline.models.loading import denoiser, model_family

    assert model_family(sd3_pipe) == "sd3"
    latents = _latents(sd3_pipe)
    stock = _run_sd3(sd3_pipe, latents, steps=3)
    weights, _ = class_token_weights(sd3_pipe.tokenizer, _specs(classes))
    harvester = AttentionHarvester(denoiser(sd3_pipe), get_preset("attnseg").harvest)
    try:
        with harvester.capture(weights, SIZE, num_steps=3) as cap:
            ours = _run_sd3(sd3_pipe, latents, steps=3)
    finally:
        harvester.remove()
    assert torch.equal(ours, stock)
    assert set(cap.result.maps) == {16}


@pytest.mark.parametrize("preset_name", ["attnseg", "diffumask", "daam"])
def test_sd3_maps_equal_naive_reference(sd3_pipe, classes, preset_name):
    from attnseg.pipeline.models.loading import denoiser

    assert_maps_equal_naive_reference(sd3_pipe, denoiser(sd3_pipe), classes, preset_name,
                                      _run_sd3, 3, store_processor=_StoreJoint)


@pytest.fixture(scope="module")
def sd3_t5_pipe():
    from attnseg.pipeline.models.tiny import build_tiny_sd3_pipeline

    return build_tiny_sd3_pipeline(seed=0, with_t5=True)


def test_sd3_class_words_in_clip_and_t5_positions(sd3_t5_pipe, sd3_pipe, classes):
    from attnseg.pipeline.models.loading import SD3_MAX_TOKENS, class_weights

    pipe = sd3_t5_pipe
    specs = _specs(classes)
    w, ids = class_weights(pipe, specs, "sum")
    clip, _ = class_token_weights(pipe.tokenizer, specs)
    t5, _ = class_token_weights(pipe.tokenizer_3, specs)
    assert w.shape[1] == 77 + SD3_MAX_TOKENS
    assert torch.equal(w[:, :77], clip) and torch.equal(w[:, 77 : 77 + t5.shape[1]], t5)
    # "dog" in "a photo of a dog ...": CLIP's BOS first, T5 has none; one token each.
    assert torch.nonzero(w[0, :, 0]).flatten().tolist() == [5, 77 + 4]
    mean, _ = class_weights(pipe, specs, "mean")
    used = w.sum(dim=1) > 0
    assert torch.allclose(mean.sum(dim=1)[used], torch.ones(int(used.sum())))
    # Without T5 only CLIP's positions (the pipeline fills T5's with zeros).
    w_clip, _ = class_weights(sd3_pipe, specs, "sum")
    assert torch.equal(w_clip, clip)


def test_sd3_with_t5_images_equal_stock_and_maps_equal_reference(sd3_t5_pipe, classes,
                                                                  torch_one_thread):
    from attnseg.pipeline.models.loading import class_weights, denoiser, generation_kwargs

    pipe = sd3_t5_pipe

    def run(pipe, latents, steps):
        return pipe(PROMPTS, height=SIZE[0], width=SIZE[1], num_inference_steps=steps,
                    guidance_scale=4.5, latents=latents.clone(), output_type="pt",
                    **generation_kwargs(pipe)).images

    latents = _latents(pipe)
    stock = run(pipe, latents, 2)
    weights, _ = class_weights(pipe, _specs(classes))
    harvester = AttentionHarvester(denoiser(pipe), get_preset("attnseg").harvest)
    try:
        with harvester.capture(weights, SIZE, num_steps=2):
            ours = run(pipe, latents, 2)
    finally:
        harvester.remove()
    assert torch.equal(ours, stock)
    assert_maps_equal_naive_reference(pipe, denoiser(pipe), classes, "attnseg", run, 2,
                                      store_processor=_StoreJoint)


def test_sd3_memory_and_synth_end_to_end(sd3_pipe, classes, tmp_path, torch_one_thread):
    _assert_memory_flat(sd3_pipe, classes, "attnseg", _run_sd3, lambda: _latents(sd3_pipe))
    _assert_synth_writes("tiny-sd3", tmp_path)


# ---- Flux (double- and single-stream joint blocks, T5 text, rotary positions, no CFG half)


@pytest.fixture(scope="module")
def flux_pipe():
    from attnseg.pipeline.models.tiny import build_tiny_flux_pipeline

    return build_tiny_flux_pipeline(seed=0)


def _flux_latents(seed=0):
    from attnseg.pipeline.models.loading import pack_latents

    g = torch.Generator().manual_seed(seed)
    return pack_latents(torch.randn(2, 16, SIZE[0] // 8, SIZE[1] // 8, generator=g))


def _run_flux(pipe, latents, steps, guidance=3.5):
    from attnseg.pipeline.models.loading import generation_kwargs

    if latents.ndim == 4:  # the shared reference helper draws SD-shaped latents
        latents = _flux_latents(1)
    return pipe(PROMPTS, height=SIZE[0], width=SIZE[1], num_inference_steps=steps,
                guidance_scale=guidance, latents=latents.clone(), output_type="pt",
                **generation_kwargs(pipe)).images


class _StoreFlux:
    """Stores, per Flux attention call, softmax over the text keys of the image queries,
    computed apart from the harvester's code (text length: the T5 context the pipeline was
    given); the output is the stock processor's."""

    def __init__(self, store, name, text_length=64, joint=False):
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        self.store, self.name, self.n, self.joint = store, name, text_length, joint
        self.stock = FluxAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        def heads(x):
            return x.view(x.shape[0], x.shape[1], -1, attn.head_dim)

        q = attn.norm_q(heads(attn.to_q(hidden_states)))
        k = attn.norm_k(heads(attn.to_k(hidden_states)))
        if encoder_hidden_states is not None:
            q = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states))),
                           q], dim=1)
            k = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states))),
                           k], dim=1)
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1).transpose(1, 2)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1).transpose(1, 2)
        keys = k if self.joint else k[:, :, : self.n]
        logits = q[:, :, self.n:] @ keys.transpose(-1, -2) / q.shape[-1] ** 0.5
        probs = torch.softmax(logits, dim=-1)[..., : self.n]
        self.store.append((self.name, self.store.step, probs))
        return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask,
                          image_rotary_emb)


def test_flux_tokens_and_layout(flux_pipe):
    from attnseg.pipeline.models.loading import (
        generation_kwargs,
        model_family,
        prompt_tokenizer,
    )
    from attnseg.pipeline.prompts import special_token_layout

    assert model_family(flux_pipe) == "flux"
    tok = prompt_tokenizer(flux_pipe)
    assert tok is flux_pipe.tokenizer_2 and special_token_layout(tok) == (0, 1)  # T5
    assert generation_kwargs(flux_pipe) == {"max_sequence_length": 64}
    net = flux_pipe.transformer
    assert net.config.guidance_embeds and net.config.num_single_layers == 2


def test_flux_images_equal_stock(flux_pipe, classes, torch_one_thread):
    from attnseg.pipeline.models.loading import denoiser, prompt_tokenizer

    latents = _flux_latents()
    stock = _run_flux(flux_pipe, latents, steps=3)
    weights, _ = class_token_weights(prompt_tokenizer(flux_pipe), _specs(classes))
    harvester = AttentionHarvester(denoiser(flux_pipe), get_preset("attnseg").harvest)
    layers = []
    observe = harvester.observe
    harvester.observe = lambda proc, *a: (layers.append(proc.name), observe(proc, *a))
    try:
        with harvester.capture(weights, SIZE, num_steps=3) as cap:
            ours = _run_flux(flux_pipe, latents, steps=3)
    finally:
        harvester.remove()
    assert torch.equal(ours, stock)
    assert set(cap.result.maps) == {16}  # Flux's tokens: 2x2 patches of 8x latents
    # Both block kinds report, once per step, with no CFG half to drop.
    assert sorted(set(layers)) == ["single_transformer_blocks.0.attn",
                                   "single_transformer_blocks.1.attn",
                                   "transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    assert len(layers) == 4 * 3


@pytest.mark.parametrize("preset_name", ["attnseg", "diffumask", "daam"])
def test_flux_maps_equal_naive_reference(flux_pipe, classes, preset_name):
    from attnseg.pipeline.models.loading import denoiser

    assert_maps_equal_naive_reference(flux_pipe, denoiser(flux_pipe), classes, preset_name,
                                      _run_flux, 3, store_processor=_StoreFlux)


def test_flux_memory_and_synth_end_to_end(flux_pipe, classes, tmp_path, torch_one_thread):
    _assert_memory_flat(flux_pipe, classes, "attnseg", _run_flux, _flux_latents)
    _assert_synth_writes("tiny-flux", tmp_path)
    assert main(["synth", "--model", "tiny-flux", "--classes", "dog", "--height", "136",
                 "--out", str(tmp_path / "odd"), "--no-progress"]) == 2


def test_flux_folder_loads_with_its_t5_tokenizer(flux_pipe, tmp_path):
    from attnseg.pipeline.models.loading import load_tokenizer, prompt_tokenizer
    from attnseg.pipeline.prompts import special_token_layout

    folder = tmp_path / "flux-folder"
    flux_pipe.save_pretrained(str(folder))
    pipe = load_pipeline(str(folder), torch.device("cpu"), torch.float32)
    assert model_family(pipe) == "flux"
    tok = load_tokenizer(str(folder))  # what `attnseg prompts --model` checks prompts with
    assert special_token_layout(tok) == (0, 1)
    assert tok("a dog").input_ids == prompt_tokenizer(pipe)("a dog").input_ids


@pytest.mark.parametrize("preset_name", ["attnseg", "daam"])
def test_joint_softmax_over_the_whole_sequence(sd3_pipe, flux_pipe, classes, preset_name):
    """harvest.joint_softmax="joint": the image queries' softmax over text and image keys,
    text columns kept, for SD3 and Flux, equal to the reference computing it that way; and
    not the text-only maps."""
    import functools

    from attnseg.pipeline.models.loading import denoiser

    for pipe, run, store in ((sd3_pipe, _run_sd3, _StoreJoint), (flux_pipe, _run_flux,
                                                                   _StoreFlux)):
        assert_maps_equal_naive_reference(pipe, denoiser(pipe), classes, preset_name, run, 2,
                                          store_processor=functools.partial(store, joint=True),
                                          joint_softmax="joint")
        with pytest.raises(AssertionError):  # the text-only reference differs
            assert_maps_equal_naive_reference(pipe, denoiser(pipe), classes, preset_name, run,
                                              2, store_processor=store, joint_softmax="joint")


def test_transformer_depth_chooses_dit_layers(flux_pipe, classes, torch_one_thread):
    """harvest.transformer_depth: the fractions of a DiT's blocks in running order (Flux: two
    double-stream blocks, then two single-stream ones) whose maps are taken."""
    from dataclasses import replace

    from attnseg.pipeline.models.loading import class_weights, denoiser

    weights, _ = class_weights(flux_pipe, _specs(classes))
    taken = {}
    for depth in ((0.0, 1.0), (0.5, 1.0), (0.0, 0.25)):
        cfg = replace(get_preset("attnseg").harvest, transformer_depth=depth)
        harvester = AttentionHarvester(denoiser(flux_pipe), cfg)
        try:
            with harvester.capture(weights, SIZE, num_steps=2) as cap:
                _run_flux(flux_pipe, _flux_latents(), 2)
        finally:
            harvester.remove()
        taken[depth] = (cap.counts[16], sorted(harvester.transformer_layers))
    assert taken[(0.0, 1.0)][0] == 4 * 2
    assert taken[(0.5, 1.0)] == (2 * 2, ["single_transformer_blocks.0.attn",
                                         "single_transformer_blocks.1.attn"])
    assert taken[(0.0, 0.25)] == (1 * 2, ["transformer_blocks.0.attn"])
    with pytest.raises(UserError, match="transformer_depth"):
        replace(get_preset("attnseg").harvest, transformer_depth=(0.5, 0.5)).validate()


def test_flux_random_is_flux1_dev_sized_and_drawn_in_its_dtype():
    """`flux-random` (GPU benchmarks): FLUX.1-dev's transformer and VAE parameter counts, 512
    T5 positions, parameters made in the asked dtype (counted on the meta device: nothing is
    allocated), and the default dtype given back."""
    from attnseg.pipeline.models.tiny import build_flux_random_pipeline

    with torch.device("meta"):
        pipe = build_flux_random_pipeline(dtype=torch.bfloat16)
    assert torch.get_default_dtype() == torch.float32
    assert model_family(pipe) == "flux"
    assert sum(p.numel() for p in pipe.transformer.parameters()) == 11_901_408_320
    assert sum(p.numel() for p in pipe.vae.parameters()) == 83_819_683
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.vae_scale_factor == 8
    assert pipe.tokenizer_2.model_max_length == 512
    assert len(pipe.transformer.transformer_blocks) == 19
    assert len(pipe.transformer.single_transformer_blocks) == 38
