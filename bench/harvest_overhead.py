"""Cost of harvesting: stock generation vs attnseg harvesting vs the store-every-map pattern.

Runs the SD 1.5 architecture (random weights: UNet 860 M params, CLIP ViT-L text encoder, SD
VAE) at 256x256, in one process, interleaving the three variants over several repeats so that
machine noise hits them alike. Reports the median seconds per image, the overhead ratio against
stock, the bytes each variant's attention state holds, and the peak resident memory growth.

    python -m attnseg.bench.harvest_overhead --steps 10 --repeats 5

Results go to bench/results/harvest_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path

import psutil
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from attnseg.kernels._dispatch import ENV_VAR
from attnseg.pipeline.config import get_preset
from attnseg.pipeline.harvest import AttentionHarvester, _stock_attention
from attnseg.pipeline.masks import masks_from_harvest
from attnseg.pipeline.prompts import PromptSpec, class_token_weights, load_classes

RESULTS = Path(__file__).resolve().parent / "results"


def build_sd15_random():
    """Stable Diffusion 1.5's architecture with random weights (no download)."""
    import tempfile

    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from attnseg.pipeline.tiny import write_tiny_tokenizer

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_tokenizer(tmp)
        tokenizer = CLIPTokenizer(f"{tmp}/vocab.json", f"{tmp}/merges.txt",
                                  model_max_length=77, pad_token="<|endoftext|>")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
    ))
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=512,
    )
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class StoreEveryMapProcessor:
    """The older tools' pattern (DiffuMask/DAAM-style attention stores): explicit softmax of
    every cross-attention call, both CFG halves, kept for every step; aggregated afterwards."""

    def __init__(self, store: list):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        out, query, key = _stock_attention(attn, hidden_states, encoder_hidden_states,
                                           attention_mask, temb)
        if encoder_hidden_states is not None:
            probs = torch.softmax(query @ key.transpose(-1, -2) * attn.scale, dim=-1)
            self.store.append(probs)
        return out


class PeakRSS:
    """Samples the process's resident memory in a thread; reports the peak above the start."""

    def __enter__(self):
        self.proc = psutil.Process()
        self.start = self.peak = self.proc.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.growth = self.peak - self.start


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "harvest_overhead"))
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)

    t0 = time.perf_counter()
    pipe = build_sd15_random()
    build_s = time.perf_counter() - t0
    size = (args.size, args.size)
    classes = load_classes("voc")
    dog = next(c for c in classes if c.name == "dog")
    specs = [PromptSpec("a photo of a dog on the grass", ((dog, "dog"),))] * args.batch
    preset = get_preset("attnseg")
    weights, ids = class_token_weights(pipe.tokenizer, specs)
    latents = torch.randn(args.batch, 4, args.size // 8, args.size // 8,
                          generator=torch.Generator().manual_seed(0))

    def generate():
        return pipe([s.text for s in specs], height=size[0], width=size[1],
                    num_inference_steps=args.steps, guidance_scale=7.5,
                    latents=latents.clone(), output_type="np").images

    def run_stock():
        pipe.unet.set_attn_processor(AttnProcessor2_0())
        generate()
        return 0

    def run_harvest(impl):
        os.environ[ENV_VAR] = impl
        harvester = AttentionHarvester(pipe.unet, preset.harvest)
        with harvester.capture(weights, size, args.steps) as cap:
            generate()
        masks_from_harvest(cap.result, ids, preset.harvest, preset.mask)
        held = cap.nbytes()
        harvester.remove()
        del os.environ[ENV_VAR]
        return held

    def run_store_all():
        store: list = []
        pipe.unet.set_attn_processor(
            {n: StoreEveryMapProcessor(store) if ".attn2." in n else AttnProcessor2_0()
             for n in pipe.unet.attn_processors}
        )
        generate()
        held = sum(t.numel() * t.element_size() for t in store)
        # Aggregate afterwards as those tools do: cond half, mean over heads, steps, layers.
        b = args.batch
        maps = [p[b:].mean(1) for p in store]
        del maps, store
        pipe.unet.set_attn_processor(AttnProcessor2_0())
        return held

    variants = {
        "stock": run_stock,
        "harvest (numba kernels)": lambda: run_harvest("numba"),
        "harvest (torch kernels)": lambda: run_harvest("ref"),
        "store_every_map": run_store_all,
    }
    for fn in variants.values():  # warm-up: kernels compiled, allocator primed
        fn()
    times = {k: [] for k in variants}
    held = {k: 0 for k in variants}
    rss = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            with PeakRSS() as mem:
                t = time.perf_counter()
                held[name] = fn()
                times[name].append(time.perf_counter() - t)
            rss[name].append(mem.growth)

    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "benchmark": "harvest_overhead",
        "model": "SD 1.5 architecture, random weights (UNet 860M, CLIP ViT-L text, SD VAE)",
        "size": list(size), "steps": args.steps, "batch": args.batch, "guidance": 7.5,
        "repeats": args.repeats, "build_s": round(build_s, 1),
        "machine": {"cpu_count": psutil.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "device": "cpu"},
        "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "median_s": {k: round(v, 3) for k, v in med.items()},
        "ratio_vs_stock": {k: round(v / med["stock"], 4) for k, v in med.items()},
        "attention_state_bytes": held,
        "peak_rss_growth_bytes": {k: max(v) for k, v in rss.items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"SD 1.5 architecture (random weights), {size[0]}x{size[1]}, {args.steps} steps, "
        f"batch {args.batch}, CPU ({psutil.cpu_count()} cores), median of {args.repeats}",
        "",
        "| variant | s / batch | vs stock | attention state | peak RSS growth |",
        "|---|---|---|---|---|",
    ]
    for k in variants:
        lines.append(
            f"| {k} | {med[k]:.2f} | {med[k] / med['stock']:.3f}x | "
            f"{held[k] / 2**20:.2f} MiB | {max(rss[k]) / 2**20:.0f} MiB |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
