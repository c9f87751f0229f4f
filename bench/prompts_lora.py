"""Prompt augmentation and LoRA: how many distinct prompts augmentation makes available, what
checking them costs, what fusing a LoRA saves at generation, and what a LoRA training step costs.

1. Prompts: per built-in class set, the distinct prompts per class without augmentation (the
   synth default: 4 templates x the class word) and with it (the set's templates x class word,
   synonyms and hyponyms), and the time to build 50 checked prompts per class.
2. Fused vs unfused LoRA: generation with the SD 1.5 architecture (random weights) and a random
   rank-r LoRA on every attention projection, interleaved over repeats: no LoRA, the LoRA
   loaded as peft layers (unfused), the LoRA fused into the weights (attnseg's path). Median
   seconds per image, ratios, and the largest pixel difference fused vs unfused.
3. LoRA training: seconds per optimiser step on the same architecture, trainable parameters.

    attnseg bench prompts-lora --out bench/results/prompts_lora
    attnseg bench prompts-lora --set parts=prompts      # only the (fast) prompt table

Results go to OUT.json and OUT.md (default OUT: attnseg-bench/prompts_lora).
"""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import torch

from attnseg.pipeline.adapt.lora_train import (
    LoraTrainConfig,
    LoraTrainer,
    add_lora_adapter,
    find_training_images,
    save_lora,
)
from attnseg.pipeline.adapt.prompt_augment import (
    PromptsConfig,
    build_prompt_set,
    default_templates_file,
    load_templates,
)
from attnseg.pipeline.files import atomic_write_bytes
from attnseg.pipeline.models.lora import LoraSpec, apply_loras
from attnseg.pipeline.models.tiny import build_sd15_random_pipeline as build_sd15_random
from attnseg.pipeline.models.tiny import tiny_tokenizer
from attnseg.pipeline.prompts import CLASS_SETS, DEFAULT_TEMPLATES
from attnseg.pipeline.settings import PositiveInt

from .common import output_base, with_suffix


def bench_prompts(num_per_class: int = 20) -> list[dict]:
    tok = tiny_tokenizer()
    rows = []
    for name in CLASS_SETS:
        templates = load_templates(default_templates_file(name))
        t = time.perf_counter()
        # one class per prompt: the published rows measured those sets (the default has
        # named several since 2026-12-07)
        result = build_prompt_set(PromptsConfig(classes=name, num_per_class=num_per_class,
                                                classes_per_prompt=(1.0,)), tokenizer=tok)
        seconds = time.perf_counter() - t
        words = list(result.words_per_class.values())
        rows.append({
            "class_set": name, "classes": len(result.classes),
            "prompts_per_class_plain": len(DEFAULT_TEMPLATES),
            "templates": len(templates),
            "words_per_class": {"min": min(words), "median": statistics.median(words),
                                "max": max(words)},
            "prompts_per_class_augmented": {"min": min(words) * len(templates),
                                            "median": statistics.median(words) * len(templates)},
            "build_checked_s": round(seconds, 2),
            "prompts_written": len(result.records()), "issues": len(result.issues),
        })
    return rows


def _random_lora(pipe, rank: int, folder: Path) -> int:
    """Save a rank-`rank` LoRA with random A and B for `pipe`'s UNet; remove it again."""
    cfg = LoraTrainConfig(images="-", rank=rank, seed=0)
    params = add_lora_adapter(pipe.unet, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    save_lora(pipe.unet, folder)
    pipe.unet.unload_lora()  # plain Linear layers again
    return sum(p.numel() for p in params)


def bench_fused(pipe, size: int, steps: int, repeats: int, rank: int) -> dict:
    lora_dir = Path(tempfile.mkdtemp(prefix="attnseg-bench-lora-"))
    params = _random_lora(pipe, rank, lora_dir)
    linears = {n: m for n, m in pipe.unet.named_modules()
               if n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))}
    original = {n: m.weight.detach().clone() for n, m in linears.items()}
    latents = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))

    def generate():
        t = time.perf_counter()
        img = pipe("a photo of a street", height=size, width=size, num_inference_steps=steps,
                   guidance_scale=7.5, latents=latents.clone(), output_type="np").images
        return time.perf_counter() - t, img

    def restore():
        with torch.no_grad():
            for n, m in pipe.unet.named_modules():
                if n in original:
                    m.weight.copy_(original[n])

    def run_unfused():
        pipe.load_lora_weights(str(lora_dir), adapter_name="bench")
        result = generate()
        pipe.unload_lora_weights()
        return result

    def run_fused():
        apply_loras(pipe, [LoraSpec(str(lora_dir), 1.0)])
        result = generate()
        restore()
        return result

    variants = {"no LoRA": generate, "LoRA unfused (peft layers)": run_unfused,
                "LoRA fused (attnseg)": run_fused}
    times = {k: [] for k in variants}
    diff = 0.0
    names = list(variants)
    for r in range(repeats + 1):  # the first round warms up and is not counted
        order = names[r % 3:] + names[:r % 3]  # rotated, so no variant always runs first
        images = {}
        for name in order:
            seconds, images[name] = variants[name]()
            if r:
                times[name].append(round(seconds, 3))
        diff = max(diff, float(np.abs(images[names[2]] - images[names[1]]).max() * 255))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"size": size, "steps": steps, "repeats": repeats, "rank": rank,
            "lora_params": params, "seconds": times,
            "median_s_per_image": {k: round(v, 3) for k, v in med.items()},
            "ratio_to_no_lora": {k: round(v / med["no LoRA"], 3) for k, v in med.items()},
            "max_pixel_diff_fused_vs_unfused_0_255": round(diff, 3)}


def bench_training(pipe, size: int, steps: int, rank: int) -> dict:
    import PIL.Image

    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        for i in range(2):
            arr = (rng.random((size, size + 32, 3)) * 255).astype(np.uint8)
            PIL.Image.fromarray(arr).save(f"{tmp}/{i}.png")
        cfg = LoraTrainConfig(images=tmp, caption="a street", rank=rank, crop=size)
        params = add_lora_adapter(pipe.unet, cfg)
        optimizer = torch.optim.AdamW(params, lr=cfg.lr)
        trainer = LoraTrainer(pipe, find_training_images(tmp, cfg.caption), cfg, size)
        pipe.unet.train()
        times = []
        for step in range(steps + 1):
            t = time.perf_counter()
            loss = trainer.step_loss(step)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step:
                times.append(round(time.perf_counter() - t, 3))
        pipe.unet.eval()
        pipe.unet.unload_lora()
    return {"resolution": size, "batch_size": 1, "rank": rank, "steps_timed": steps,
            "trainable_params": sum(p.numel() for p in params), "seconds_per_step": times,
            "median_s_per_step": statistics.median(times)}


@dataclass
class PromptsLoraConfig:
    """One `attnseg bench prompts-lora` run."""

    height: PositiveInt = 256  # generation size of the fused-vs-unfused comparison (square)
    steps: PositiveInt = 10
    repeats: PositiveInt = 3
    rank: PositiveInt = 16
    train_steps: PositiveInt = 3
    # What to run: "prompts", "lora" (generation + training) or both; parts not run are kept
    # from the existing result file.
    parts: str = "prompts,lora"
    out: str = "attnseg-bench/prompts_lora"  # OUT.json, OUT.md


def run_prompts_lora(cfg: PromptsLoraConfig) -> dict:
    """Measure the parts asked for; the result (also written to OUT)."""
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # "no LoRA keys for the text encoder" notes
    parts = set(cfg.parts.split(","))
    base = output_base(cfg.out)
    previous = with_suffix(base, ".json")
    result = json.loads(previous.read_text()) if previous.is_file() else {}
    result.update({
        "benchmark": "prompts_lora",
        "model": "SD 1.5 architecture, random weights (UNet 860M, CLIP ViT-L text, SD VAE); "
                 "prompt checks use the tiny tokenizer",
        "machine": {"cpu_count": psutil.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "device": "cpu"},
    })
    if "prompts" in parts:
        result["prompts"] = bench_prompts()
    if "lora" in parts:
        pipe = build_sd15_random()
        with torch.no_grad():
            result["fused_vs_unfused"] = bench_fused(pipe, cfg.height, cfg.steps, cfg.repeats,
                                                     cfg.rank)
        result["training"] = bench_training(pipe, cfg.height, cfg.train_steps, 4)
    base.parent.mkdir(parents=True, exist_ok=True)
    files = [with_suffix(base, ".json"), with_suffix(base, ".md")]
    atomic_write_bytes(files[0], (json.dumps(result, indent=1) + "\n").encode())
    atomic_write_bytes(files[1], to_markdown(result).encode())
    result["files"] = [str(f) for f in files]
    return result


def to_markdown(r: dict) -> str:
    lines = ["# Prompt augmentation and LoRA", "", f"Machine: {r['machine']['cpu_count']} CPU "
             f"cores, torch {r['machine']['torch']}, {r['machine']['threads']} threads. "
             f"Model: {r['model']}.", "",
             "| class set | classes | prompts/class plain | templates | words/class (min/med/max) "
             "| prompts/class augmented (min/med) | 20/class checked, s |",
             "|---|---|---|---|---|---|---|"]
    for p in r.get("prompts", []):
        w, a = p["words_per_class"], p["prompts_per_class_augmented"]
        lines.append(f"| {p['class_set']} | {p['classes']} | {p['prompts_per_class_plain']} | "
                     f"{p['templates']} | {w['min']}/{w['median']}/{w['max']} | "
                     f"{a['min']}/{a['median']} | {p['build_checked_s']} |")
    if "fused_vs_unfused" not in r:
        return "\n".join(lines) + "\n"
    f = r["fused_vs_unfused"]
    lines += ["", f"Generation, {f['size']}x{f['size']}, {f['steps']} steps, rank-{f['rank']} "
              f"LoRA on every attention projection ({f['lora_params']} parameters), median of "
              f"{f['repeats']} interleaved repeats (order rotated):", "",
              "| variant | s/image | ratio to no LoRA |", "|---|---|---|"]
    for k, v in f["median_s_per_image"].items():
        lines.append(f"| {k} | {v} | {f['ratio_to_no_lora'][k]} |")
    lines += ["", f"Largest pixel difference fused vs unfused: "
              f"{f['max_pixel_diff_fused_vs_unfused_0_255']} (0-255 scale).", ""]
    t = r["training"]
    lines += [f"LoRA training, {t['resolution']}x{t['resolution']}, batch 1, rank {t['rank']} "
              f"({t['trainable_params']} trainable parameters): median {t['median_s_per_step']} "
              f"s per step over {t['steps_timed']} steps.", ""]
    return "\n".join(lines)
