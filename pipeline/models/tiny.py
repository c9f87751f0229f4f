"""Built-in random-weight Stable Diffusion pipelines that need no download.

`tiny`: the built-in tiny Stable Diffusion: random weights, SD 1.x layout.

It has the same component types and the same attention geometry as SD 1.5 (latent stride 8;
cross-attention at strides 8, 16 and 32 in down and up blocks, and 64 in the mid block), so
every code path of harvesting, masks and engines runs on it in seconds on a CPU. Its images are
noise and its masks carry no meaning: it exists for tests, demos and benchmarks of the code.

`sd15-random`: Stable Diffusion 1.5's exact architecture (UNet 860 M parameters, CLIP ViT-L/14
text encoder, SD VAE) with random weights, for timing and memory benchmarks.

`tiny-sdxl`: the SDXL layout in miniature: two CLIP text encoders (the second with a projection,
its pooled output and the size/crop ids feeding the UNet's added conditioning), no
cross-attention at the first level (stride 8), transformer depth 1 then 2, linear projections;
random weights. `sdxl-random`: SDXL 1.0's exact architecture (UNet 2.6 G parameters) with random
weights, for GPU benchmarks at 1024x1024.

`tiny-pixart`: PixArt-Sigma's layout in miniature: a T5 encoder (relative attention, no BOS,
padding masked out of the cross-attention) over a generated sentencepiece (Unigram) vocabulary,
a DiT with patch size 2 (every layer at one resolution: stride 16), cross-attention in every
block; random weights.

`tiny-sd3`: SD3's MMDiT layout in miniature: two CLIP text encoders with projections (no T5:
the pipeline fills its 256 positions with zeros, as SD3 allows), joint image-text attention in
every block (the last block's text stream ends), flow-matching Euler; random weights.

`tiny-flux`: Flux's layout in miniature (CLIP pooled prompt, T5 sequence, double- and
single-stream blocks, guidance embedding, packed 16-channel latents); random weights.
`flux-random`: FLUX.1-dev's exact transformer (11.9 G parameters) and VAE with random weights,
for GPU benchmarks at 1024x1024.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

# Words that become single tokens of the tiny tokenizer; any other word still tokenises,
# into several sub-tokens, which exercises multi-token class words (e.g. "aeroplane").
TINY_WORDS = """a an the of in on at with and photo picture image view close up scene street road
high quality realistic background two one small large
person bird cat cow dog horse sheep bottle chair table plant sofa train monitor boat bus car
bicycle motorbike motorcycle building sky tree grass water""".split()


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins that byte-level BPE (GPT-2/CLIP) uses for raw bytes."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    extra = 0
    chars = []
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def bpe_pieces(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """How byte-level BPE (CLIP's) splits one lower-case word under merge `ranks`: the pair
    of lowest rank is merged everywhere, again and again, until no pair has a rank."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = list(zip(parts[:-1], parts[1:], strict=True))
        rank, pair = min((ranks.get(p, len(ranks)), p) for p in pairs)
        if rank == len(ranks):
            break
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def write_tiny_tokenizer(folder: str | Path, words=None) -> Path:
    """Write a CLIP-style BPE vocabulary and merge list (a few KB) into `folder` in which each
    of `words` (default: the tiny model's) is one token."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = list(dict.fromkeys(TINY_WORDS if words is None else words))
    symbols = _byte_symbols()
    vocab: list[str] = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    seen = set(vocab)

    def chain(parts: list[str]) -> None:
        cur = parts[0]
        for nxt in parts[1:]:
            merged = cur + nxt
            if (cur, nxt) not in known:
                merges.append((cur, nxt))
                known.add((cur, nxt))
            if merged not in seen:
                vocab.append(merged)
                seen.add(merged)
            cur = merged

    known: set[tuple[str, str]] = set()

    for word in words:
        chain(list(word[:-1]) + [word[-1] + "</w>"])
    # BPE applies merges by rank, not word by word: a short merge learnt for one word ("a n"
    # of "and") can split a later word ("triangle") before that word's own chain applies.
    # Chain the pieces such words end in, until every word is whole (a few rounds at most).
    for _ in range(len(words)):
        ranks = {m: i for i, m in enumerate(merges)}
        split = [pieces for w in words if len(pieces := bpe_pieces(w, ranks)) > 1]
        if not split:
            break
        for pieces in split:
            chain(pieces)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n")
    return folder


def tiny_tokenizer(words=None, max_length: int = 77):
    """The CLIP tokenizer over a generated vocabulary in which each of `words` (default: the
    tiny model's) is one token."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_tokenizer(tmp, words)
        return CLIPTokenizer(f"{tmp}/vocab.json", f"{tmp}/merges.txt",
                             model_max_length=max_length, pad_token="<|endoftext|>")


def tiny_vae_config(sample_size: int = 128, **changes) -> dict:
    """The built-in tiny models' AutoencoderKL: 8x down, 4 latent channels, a few KB."""
    return dict(dict(in_channels=3, out_channels=3, latent_channels=4,
                     block_out_channels=(8, 8, 16, 16),
                     down_block_types=("DownEncoderBlock2D",) * 4,
                     up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1,
                     norm_num_groups=4, sample_size=sample_size), **changes)


def _assemble(vae, text_encoder, tokenizer, unet, scheduler, dtype: torch.dtype):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def _random_pipeline(seed: int, dtype: torch.dtype, text_config, unet_config: dict,
                     vae_config: dict, scheduler):
    """A pipeline of randomly initialised components with these configs and the generated
    tokenizer. The text encoder, UNet and VAE are drawn in that order right after seeding, so a
    seed always gives the same weights. `text_config(tokenizer)` gives the text encoder's."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config(tokenizer)))
    unet = UNet2DConditionModel(**unet_config)
    vae = AutoencoderKL(**vae_config)
    return _assemble(vae, text_encoder, tokenizer, unet, scheduler, dtype)


def build_tiny_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A StableDiffusionPipeline with tiny random components, identical for a given seed."""
    from diffusers import DDIMScheduler

    return _random_pipeline(
        seed, dtype,
        lambda tok: dict(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32, 32, 32),
             layers_per_block=1,
             down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
             up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
             cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8),
        tiny_vae_config(sample_size=64),
        DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1),
    )


def build_sd15_random_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """Stable Diffusion 1.5's architecture with random weights (the tiny tokenizer's ids)."""
    from diffusers import PNDMScheduler

    return _random_pipeline(
        seed, dtype,
        lambda tok: dict(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                         num_hidden_layers=12, num_attention_heads=12,
                         max_position_embeddings=77, hidden_act="quick_gelu"),
        # UNet2DConditionModel's defaults are SD 1.x's layout; SD 1.5 cross-attends to 768-d.
        dict(sample_size=64, cross_attention_dim=768),
        dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
             down_block_types=("DownEncoderBlock2D",) * 4,
             up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512),
        PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      skip_prk_steps=True, steps_offset=1),
    )


def _sdxl_pipeline(seed: int, dtype: torch.dtype, text, text_2: dict, unet_config: dict,
                   vae_config: dict):
    """A StableDiffusionXLPipeline of random components (drawn in a fixed order after seeding)
    with the generated tokenizer for both text encoders. `text(tokenizer)` gives the first
    encoder's config; the second's is it with `text_2`'s changes."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = tiny_tokenizer()
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, max_position_embeddings=77)
    text = text(tokenizer)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text, **ids))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**dict(text, **text_2), **ids))
    unet = UNet2DConditionModel(**unet_config)
    vae = AutoencoderKL(**vae_config)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", steps_offset=1,
                                       timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder,
                                     text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def build_tiny_sdxl_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """SDXL's layout in miniature with random weights, identical for a given seed."""
    return _sdxl_pipeline(
        seed, dtype,
        lambda tok: dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4),
        dict(projection_dim=32),
        dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32, 32),
             layers_per_block=1,
             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
             transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4),
             use_linear_projection=True, addition_embed_type="text_time",
             addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 32,
             cross_attention_dim=64, norm_num_groups=8),
        tiny_vae_config(),
    )


def build_sdxl_random_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """SDXL 1.0's architecture with random weights (the tiny tokenizer's ids)."""
    return _sdxl_pipeline(
        seed, dtype,
        lambda tok: dict(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                         num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu"),
        dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
             num_attention_heads=20, hidden_act="gelu", projection_dim=1280),
        dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
             transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
             use_linear_projection=True, addition_embed_type="text_time",
             addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
             cross_attention_dim=2048),
        dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
             down_block_types=("DownEncoderBlock2D",) * 4,
             up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024,
             scaling_factor=0.13025),
    )


def tiny_t5_tokenizer(words=None, max_length: int = 64):
    """A T5-style (sentencepiece Unigram, "\u2581" word marks, EOS appended, no BOS) fast
    tokenizer over a generated vocabulary in which each of `words` (default: the tiny model's)
    is one token; any other word spells out in letters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    words = list(dict.fromkeys(TINY_WORDS if words is None else words))
    letters = "abcdefghijklmnopqrstuvwxyz0123456789.,-'"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -1.0) for w in words] + [("\u2581", -3.0)]
    vocab += [(c, -5.0) for c in letters]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>",
                           pad_token="<pad>", model_max_length=max_length, extra_ids=0)


def build_tiny_pixart_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """PixArt-Sigma's layout in miniature with random weights, identical for a given seed."""
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        PixArtSigmaPipeline,
        PixArtTransformer2DModel,
    )
    from transformers import T5Config, T5EncoderModel

    tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(seed)
    # eval(): modules built in code start in training mode, and T5 has dropout.
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)).eval()
    transformer = PixArtTransformer2DModel(
        sample_size=16, num_layers=2, num_attention_heads=2, attention_head_dim=8,
        in_channels=4, out_channels=8, patch_size=2, cross_attention_dim=16,
        caption_channels=32, norm_type="ada_norm_single", use_additional_conditions=False).eval()
    vae = AutoencoderKL(**tiny_vae_config())
    scheduler = DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02,
                                            beta_schedule="linear")
    pipe = PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                               transformer=transformer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def build_tiny_sd3_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32,
                            with_t5: bool = False):
    """SD3's layout in miniature with random weights, identical for a given seed; `with_t5`:
    with its third text encoder (T5, whose positions follow CLIP's in the text sequence)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer = tiny_tokenizer()
    clip = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, projection_dim=32,
                max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**clip)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip)).eval()
    # joint_attention_dim: the two CLIPs' 32 + 32 features (padded to it when there is no T5).
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16,
        pooled_projection_dim=64, out_channels=4, pos_embed_max_size=32).eval()
    vae = AutoencoderKL(**tiny_vae_config(shift_factor=0.0))  # SD3 shifts latents
    text_encoder_3 = tokenizer_3 = None
    if with_t5:  # drawn last: the other weights stay those of the model without it
        from transformers import T5Config, T5EncoderModel

        tokenizer_3 = tiny_t5_tokenizer()
        text_encoder_3 = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer_3), d_model=64, d_kv=8, d_ff=64, num_layers=2,
            num_heads=4, relative_attention_num_buckets=8, pad_token_id=0,
            eos_token_id=1)).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def _flux_pipeline(seed: int, dtype: torch.dtype, clip: dict, t5: dict, transformer: dict,
                   vae: dict, t5_length: int):
    """A FluxPipeline of random components (drawn in a fixed order after seeding): the
    generated CLIP tokenizer, a T5-style one of `t5_length` positions, and the configs given
    (the vocabularies are the tokenizers')."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = tiny_tokenizer()
    tokenizer_2 = tiny_t5_tokenizer(max_length=t5_length)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **clip)).eval()
    # eval(): modules built in code start in training mode, and T5 has dropout.
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), pad_token_id=0, eos_token_id=1, **t5)).eval()
    # in_channels: 16 latent channels x a 2x2 patch; the rotary axes split the head dim.
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, guidance_embeds=True,
                                         **transformer).eval()
    vae = AutoencoderKL(**vae)
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096, shift=3.0)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                        tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                        tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def build_tiny_flux_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """Flux's layout in miniature with random weights, identical for a given seed: CLIP for the
    pooled prompt, T5 for the text sequence, double- and single-stream blocks with rotary
    positions, guidance embedding (FLUX.1-dev's distillation), a 16-channel VAE whose latents
    are packed 2x2 into the token sequence, flow matching with resolution-dependent shift."""
    return _flux_pipeline(
        seed, dtype,
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
             relative_attention_num_buckets=8),
        dict(num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
             joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)),
        tiny_vae_config(latent_channels=16, norm_num_groups=4, shift_factor=0.1159,
                        scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False),
        t5_length=64,
    )


def build_flux_random_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """FLUX.1-dev's transformer (19 double- and 38 single-stream blocks, 11.9 B parameters) and
    VAE with random weights, 512 T5 positions, for GPU benchmarks. The text encoders have
    CLIP-L's and T5-XXL's widths but T5 only 2 layers (it runs once per prompt; the benchmark
    is the denoiser). Parameters are made in `dtype` on the current default device (load the
    model with --device cuda: the 24 GB of bf16 are drawn on the GPU)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return _flux_pipeline(
            seed, dtype,
            dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, hidden_act="quick_gelu"),
            dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64,
                 relative_attention_num_buckets=32, feed_forward_proj="gated-gelu"),
            dict(num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                 axes_dims_rope=(16, 56, 56)),
            dict(in_channels=3, out_channels=3, latent_channels=16,
                 block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                 down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
                 sample_size=1024, shift_factor=0.1159, scaling_factor=0.3611,
                 use_quant_conv=False, use_post_quant_conv=False),
            t5_length=512,
        )
    finally:
        torch.set_default_dtype(previous)
