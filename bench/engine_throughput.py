"""Generation throughput with masks on: torch eager vs `compile` engine vs the older tools'
store-every-map pattern (and the stock pipeline without masks as the baseline).

SD 1.5 architecture (random weights: no download; speed does not depend on the values),
512x512, batch 1 and 8, fp16, on a CUDA GPU. Every variant produces label maps:

- stock: diffusers' pipeline, no attention harvesting, no masks (the ceiling);
- eager: attnseg's AttentionHarvester (Triton kernels) + masks;
- compile: the `compile` engine: torch.compile of the UNet with the harvesting in the graph,
  CUDA graphs ("reduce-overhead"), Triton kernel op + masks;
- store_every_map: DiffuMask/DAAM-style: explicit softmax of every cross-attention call kept
  for every step, aggregated afterwards + masks.

Variants are interleaved over the repeats (machine noise hits them alike); the report gives the
median seconds per generation call, denoising steps/s (UNet calls per second), images/s, the
ratio to eager, and peak GPU memory.

    python -m attnseg.bench.engine_throughput --steps 20 --repeats 5

Results go to bench/results/engine_throughput.{json,md}. Without a CUDA GPU it says so and
writes nothing (`--device cpu --model tiny` runs the harness itself, for testing, into --out).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_pipe(model: str, device, dtype):
    if model == "tiny":
        from attnseg.pipeline.tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline()
    else:
        from attnseg.pipeline.tiny import build_sd15_random_pipeline as build_sd15_random

        pipe = build_sd15_random()
    return pipe.to(device=device, dtype=dtype)


def measure(pipe, batch: int, args, device, dtype, preset, variants) -> dict:
    """Time every variant at one batch size (round 0 warms up / compiles)."""
    from attnseg.engines.build import EngineOptions, engine_key
    from attnseg.engines.harvest import EngineHarvester, compiled_engine_set
    from attnseg.pipeline.attention import StoreEveryMapProcessor, grid_size
    from attnseg.pipeline.harvest import AttentionHarvester, HarvestResult
    from attnseg.pipeline.masks import masks_from_harvest
    from attnseg.pipeline.models import model_fingerprint
    from attnseg.pipeline.prompts import PromptSpec, class_token_weights, load_classes

    size = (args.size, args.size)
    stock_procs = dict(pipe.unet.attn_processors)
    by = {c.name: c for c in load_classes("voc")}
    specs = [PromptSpec("a photo of a dog and a cat on the grass",
                        ((by["dog"], "dog"), (by["cat"], "cat")))] * batch
    weights, ids = class_token_weights(pipe.tokenizer, specs)
    latents = torch.randn(batch, 4, args.size // 8, args.size // 8,
                          generator=torch.Generator().manual_seed(0)).to(device, dtype)
    prompts = [s.text for s in specs]

    def generate():
        return pipe(prompts, height=size[0], width=size[1], num_inference_steps=args.steps,
                    guidance_scale=7.5, latents=latents.clone(), output_type="pt").images

    def with_harvester(h):
        with h.capture(weights, size, args.steps) as cap:
            generate()
        masks_from_harvest(cap.result, ids, preset.harvest, preset.mask)

    def run_stock():
        generate()

    unet = pipe.unet
    compiled = {}

    def run_eager():
        h = AttentionHarvester(unet, preset.harvest)
        try:
            with_harvester(h)
        finally:
            h.remove()

    def run_compile():
        # Compiled once per batch size, on its own copy of the UNet, so that the other
        # variants can use the pipeline's UNet in between.
        if "h" not in compiled:
            opts = EngineOptions(backend="compile", height=size[0], width=size[1],
                                 max_batch=batch, harvest=preset.harvest)
            key = engine_key(pipe, opts, dtype, model_fingerprint(pipe), [])
            view = SimpleNamespace(unet=copy.deepcopy(unet))
            compiled["h"] = EngineHarvester(pipe, compiled_engine_set(view, key),
                                            preset.harvest)
            compiled["adapter"] = pipe.unet
            pipe.unet = unet
        pipe.unet = compiled["adapter"]
        try:
            with_harvester(compiled["h"])
        finally:
            pipe.unet = unet

    def run_store():
        store: list = []
        pipe.unet.set_attn_processor(
            {n: StoreEveryMapProcessor(store) if ".attn2." in n else p
             for n, p in stock_procs.items()})
        generate()
        # Aggregate afterwards as those tools do (cond half, head mean, mean over calls
        # per resolution), then the same mask step.
        sums: dict = {}
        for probs in store:
            n = probs.shape[2]
            side = int(round(n ** 0.5))
            stride = args.size // side
            if stride not in preset.harvest.strides:
                continue
            cls = torch.einsum("bnl,blc->bcn", probs[batch:].float().mean(1),
                               weights.to(device)).reshape(batch, -1, side, side)
            s, c = sums.get(stride, (0, 0))
            sums[stride] = (s + cls, c + 1)
        maps = {s: t / c for s, (t, c) in sums.items()}
        assert all(m.shape[-1] == grid_size(size, s)[1] for s, m in maps.items())
        masks_from_harvest(HarvestResult(maps, None, size), ids, preset.harvest,
                           preset.mask)
        held = sum(p.numel() * p.element_size() for p in store)
        del store
        pipe.unet.set_attn_processor(dict(stock_procs))  # the call empties the dict it gets
        return held

    fns = {"stock": run_stock, "eager": run_eager, "compile": run_compile,
           "store_every_map": run_store}

    times = {v: [] for v in variants}
    peak = {v: 0 for v in variants}
    held = {}
    status = {v: "ok" for v in variants}
    first_call = {}
    for r in range(args.repeats + 1):  # round 0 warms up (and compiles)
        for v in variants:
            if status[v] != "ok":
                continue
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            t = time.perf_counter()
            try:
                out = fns[v]()
            except torch.cuda.OutOfMemoryError:
                status[v] = "out of memory"
                torch.cuda.empty_cache()
                continue
            _sync(device)
            dt = time.perf_counter() - t
            if r == 0:
                first_call[v] = dt
                continue
            times[v].append(dt)
            if isinstance(out, int):
                held[v] = out
            if device.type == "cuda":
                peak[v] = max(peak[v], torch.cuda.max_memory_allocated(device))
    if "h" in compiled:
        compiled["h"].engines.close()
        del compiled["h"]
    med = {v: statistics.median(t) for v, t in times.items() if t}
    return {
        "median_s": {v: round(m, 4) for v, m in med.items()},
        "steps_per_s": {v: round(args.steps / m, 3) for v, m in med.items()},
        "images_per_s": {v: round(batch / m, 3) for v, m in med.items()},
        "ratio_vs_eager": ({v: round(med["eager"] / m, 3) for v, m in med.items()}
                           if "eager" in med else {}),
        "peak_gpu_bytes": peak, "stored_attention_bytes": held,
        "first_call_s": {v: round(x, 2) for v, x in first_call.items()},
        "status": status, "seconds": {v: [round(x, 4) for x in t] for v, t in times.items()},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sd15", choices=("sd15", "tiny"))
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--variants", default="stock,eager,compile,store_every_map")
    ap.add_argument("--out", default=str(RESULTS / "engine_throughput"))
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("engine_throughput: this benchmark needs a CUDA GPU and none is available here; "
              "nothing was measured and no result was written")
        return 2
    # A context, not torch.set_grad_enabled(False): main() is also called in-process
    # (tests, other benches) and must not switch autograd off for its caller.
    with torch.no_grad():
        return _run(args)


def _run(args) -> int:
    from attnseg.pipeline.config import get_preset

    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    size = (args.size, args.size)
    preset = get_preset("attnseg")
    t0 = time.perf_counter()
    pipe = build_pipe(args.model, device, dtype)
    build_s = time.perf_counter() - t0
    variants = [v for v in args.variants.split(",") if v]
    results = {}
    for batch in [int(b) for b in args.batches.split(",")]:
        results[str(batch)] = measure(pipe, batch, args, device, dtype, preset, variants)
    machine = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "platform": platform.platform()}
    report = {"benchmark": "engine_throughput", "model": args.model, "size": list(size),
              "steps": args.steps, "repeats": args.repeats, "dtype": str(dtype),
              "build_s": round(build_s, 1), "machine": machine, "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    what = "SD 1.5 architecture, random weights" if args.model == "sd15" else "tiny model"
    lines = [f"{what}, {size[0]}x{size[1]}, {args.steps} steps, {dtype}, {machine['device']}, "
             f"median of {args.repeats}, masks on (except stock)", "",
             "| batch | variant | s / call | steps/s | images/s | vs eager | peak GPU |",
             "|---|---|---|---|---|---|---|"]
    for batch, r in results.items():
        for v in variants:
            if v not in r["median_s"]:
                lines.append(f"| {batch} | {v} | {r['status'][v]} | | | | |")
                continue
            lines.append(f"| {batch} | {v} | {r['median_s'][v]:.3f} | {r['steps_per_s'][v]:.2f} "
                         f"| {r['images_per_s'][v]:.2f} | {r['ratio_vs_eager'].get(v, 0):.2f}x | "
                         f"{r['peak_gpu_bytes'][v] / 2**30:.1f} GiB |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
