"""`attnseg bench throughput`: generation speed and memory, with and without harvesting.

For each batch size, three variants of the torch backend run interleaved over the repeats, in an
order that rotates every repeat (so machine noise and position effects hit them alike), after
warm-up:

- `stock`: the diffusers pipeline with its stock attention, no masks;
- `harvest`: attnseg harvesting + mask finalisation + writing the samples;
- `store_every_map`: the older tools' pattern (DiffuMask/DAAM-style attention stores): explicit
  softmax of every cross-attention call, both guidance halves, kept for every step and
  aggregated afterwards.

Engine backends (`compile`, `onnxruntime`, `tensorrt`: attnseg.engines, built or reused from
the engine cache) then run the `harvest` variant with the engine in the pipeline, against the
same torch `stock` baseline (always measured). Their harvesting happens inside the UNet engine,
so its time is part of the UNet's.

Per run it records seconds per batch split into text encoder / UNet / harvesting / VAE /
masks / writing, denoising steps/s, images/s, the bytes held in attention state, peak host RSS
growth and peak device memory. Output: JSON, a markdown table and PNG plots; the machine and
library versions are recorded.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import psutil
import torch

from attnseg.pipeline.config import BACKENDS, get_preset
from attnseg.pipeline.device import resolve_device, resolve_dtype
from attnseg.pipeline.errors import UserError
from attnseg.pipeline.files import atomic_write_bytes
from attnseg.pipeline.harvest.attention import attention_scale, install_observers
from attnseg.pipeline.harvest.harvester import AttentionHarvester
from attnseg.pipeline.harvest.masks import masks_from_harvest
from attnseg.pipeline.models.loading import (
    RANDOM_MODELS,
    check_image_size,
    class_weights,
    default_size,
    denoiser,
    generation_kwargs,
    initial_latents,
    load_pipeline,
)
from attnseg.pipeline.prompts import default_prompts, load_classes
from attnseg.pipeline.settings import NonNegativeFloat, NonNegativeInt, PositiveInt
from attnseg.pipeline.synth.writer import DatasetWriter

from .common import (
    machine_info,
    output_base,
    ratio_within_spread,
    spread_note,
    spread_summary,
    with_suffix,
)

VARIANTS = ("stock", "harvest", "store_every_map")
COMPONENTS = ("text_encoder", "unet", "harvest", "vae", "masks", "write")


class MapStore(list):
    """An observer that keeps every cross-attention probability map [batch, heads, N, L] of
    every call (explicit softmax over the text keys, padded keys masked): how attention-map
    tools that store every map work, the benchmark's baseline against running aggregation.
    Installed like the harvester, with `install_observers`, so it sees every family's layers
    as the harvester does."""

    def observe(self, proc, attn, query: torch.Tensor, key: torch.Tensor) -> None:
        if not proc.cross:
            return
        logits = query @ key.transpose(-1, -2) * attention_scale(attn, query)
        valid = proc.key_valid
        if valid is not None:
            logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
        self.append(torch.softmax(logits, dim=-1))

@dataclass
class ThroughputConfig:
    """One `attnseg bench throughput` run."""

    model: str = "tiny"
    backends: tuple[str, ...] = ("torch",)
    batch_sizes: tuple[PositiveInt, ...] = (1, 2)
    height: PositiveInt | None = None  # None: 128 for tiny, else 512
    width: PositiveInt | None = None
    steps: PositiveInt = 10
    guidance: NonNegativeFloat = 7.5
    repeats: PositiveInt = 3
    warmup: NonNegativeInt = 1
    preset: str = "attnseg"
    variants: tuple[str, ...] = VARIANTS
    device: str = "auto"
    dtype: str = "auto"
    out: str = "attnseg-bench/throughput"  # path without suffix: OUT.json, OUT.md, OUT.png
    plots: bool = True
    progress: bool = True  # a line on stderr per measured run (--no-progress: off)
    extra: dict = field(default_factory=dict)


def synced_clock(device: torch.device) -> float:
    """Wall time after the device's queued work is done (a component's boundary)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class HarvestTimer:
    """Time spent in the harvester's per-layer work, measured from outside it: its `observe`
    is wrapped on the instance. On a GPU each call is bracketed by CUDA events, read once
    after the run, so no layer waits for the device (a per-layer synchronise would make the
    harvesting look dearer than it is); on a CPU the calls are timed directly."""

    def __init__(self, harvester, device: torch.device):
        self.device = device
        self._events: list = []
        self._cpu_seconds = 0.0
        observe = harvester.observe  # the bound method: the wrapper below shadows it

        def timed(*args, **kwargs):
            if self.device.type == "cuda":
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                observe(*args, **kwargs)
                end.record()
                self._events.append((start, end))
            else:
                t0 = time.perf_counter()
                observe(*args, **kwargs)
                self._cpu_seconds += time.perf_counter() - t0

        harvester.observe = timed

    def reset(self) -> None:
        self._events.clear()
        self._cpu_seconds = 0.0

    def seconds(self) -> float:
        if self._events:
            torch.cuda.synchronize(self.device)
            return sum(s.elapsed_time(e) for s, e in self._events) / 1000.0
        return self._cpu_seconds


class PeakRSS:
    """Samples the process's resident memory in a thread; `growth` is the peak over the start."""

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


class _ComponentClock:
    """Forward hooks that add each component's wall time (GPU-synchronised) to `seconds`."""

    def __init__(self, pipe, device: torch.device):
        self.device = device
        self.seconds = dict.fromkeys(COMPONENTS, 0.0)
        self._handles = []
        self._starts: dict[str, float] = {}
        for name, module in (("text_encoder", pipe.text_encoder), ("unet", denoiser(pipe))):
            self._handles.append(module.register_forward_pre_hook(self._start(name)))
            self._handles.append(module.register_forward_hook(self._stop(name)))
        self._pipe = pipe
        self._decode = pipe.vae.decode
        clock = self

        def timed_decode(*args, **kwargs):
            t0 = clock.now()
            try:
                return clock._decode(*args, **kwargs)
            finally:
                clock.seconds["vae"] += clock.now() - t0

        pipe.vae.decode = timed_decode

    def now(self) -> float:
        return synced_clock(self.device)

    def _start(self, name):
        def hook(module, args):
            self._starts[name] = self.now()
        return hook

    def _stop(self, name):
        def hook(module, args, output):
            self.seconds[name] += self.now() - self._starts.pop(name)
        return hook

    def reset(self):
        self.seconds = dict.fromkeys(COMPONENTS, 0.0)

    def close(self):
        for h in self._handles:
            h.remove()
        self._pipe.vae.decode = self._decode


@dataclass
class _Case:
    """One (backend, batch size) cell of the sweep and its fixed inputs."""

    backend: str
    batch_size: int
    prompts: list[str]
    weights: torch.Tensor
    class_ids: torch.Tensor
    latents: torch.Tensor
    writer: DatasetWriter


class _Bench:
    """The pipeline instrumented for the three variants."""

    def __init__(self, cfg: ThroughputConfig, pipe, device: torch.device,
                 size: tuple[int, int], engine_harvester=None):
        self.cfg, self.pipe, self.device, self.size = cfg, pipe, device, size
        # The masks without the dense CRF (the default preset's among others): this measures
        # harvesting against the stock pipeline; the CRF runs on synth's write pool, beside
        # generation, measured by `attnseg bench writing --set refine=true`.
        self.preset = get_preset(cfg.preset, pipe.vae_scale_factor).without_crf()
        # An engine harvester has already put its engines in the pipeline: only `harvest`
        # runs, and the clock hooks the engine adapters.
        self.engine = engine_harvester is not None
        self.clock = _ComponentClock(pipe, device)
        if self.engine:
            self.harvester = engine_harvester
            return
        # The model's own processors (AttnProcessor2_0; SD3's joint ones), for `stock`.
        self.stock_processors = dict(denoiser(pipe).attn_processors)
        self.harvester = AttentionHarvester(denoiser(pipe), self.preset.harvest)
        self.harvest_timer = HarvestTimer(self.harvester, device)
        self.harvest_processors = dict(denoiser(pipe).attn_processors)
        self.store = MapStore()
        net = denoiser(pipe)
        install_observers(net, self.store, self_attention=False)
        self.store_processors = dict(net.attn_processors)
        net.set_attn_processor(dict(self.harvest_processors))

    def close(self) -> None:
        self.clock.close()
        self.harvester.remove()

    def _generate(self, case: _Case):
        return self.pipe(case.prompts, height=self.size[0], width=self.size[1],
                         num_inference_steps=self.cfg.steps, guidance_scale=self.cfg.guidance,
                         latents=case.latents.clone(), output_type="np",
                         **generation_kwargs(self.pipe)).images

    def _harvest(self, case: _Case) -> int:
        clock, preset = self.clock, self.preset
        if not self.engine:
            denoiser(self.pipe).set_attn_processor(dict(self.harvest_processors))  # it pops entries
            self.harvest_timer.reset()
        with self.harvester.capture(case.weights, self.size, self.cfg.steps) as cap:
            images = self._generate(case)
        t = clock.now()
        labels, rel = masks_from_harvest(cap.result, case.class_ids, preset.harvest, preset.mask)
        labels, rel = labels.cpu().numpy(), rel.cpu().numpy()
        clock.seconds["masks"] += clock.now() - t
        t = clock.now()
        images = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
        for j in range(case.batch_size):
            case.writer.write(j, f"{j:08d}", images[j], labels[j], rel[j], {})
        clock.seconds["write"] += clock.now() - t
        if not self.engine:
            # The harvesting ran inside the UNet's forward: move its time out of the UNet's.
            harvest = self.harvest_timer.seconds()
            clock.seconds["harvest"] = harvest
            clock.seconds["unet"] -= harvest
        return cap.nbytes()

    def _store_every_map(self, case: _Case) -> int:
        denoiser(self.pipe).set_attn_processor(dict(self.store_processors))
        self.store.clear()
        self._generate(case)
        held = sum(p.numel() * p.element_size() for p in self.store)
        t = self.clock.now()
        # Aggregated afterwards, as those tools do: cond half (the whole batch without
        # guidance), mean over heads/steps/layers.
        maps = [p[-case.batch_size:].mean(1) for p in self.store]
        del maps
        self.store.clear()
        self.clock.seconds["masks"] += self.clock.now() - t
        return held

    def run(self, variant: str, case: _Case) -> dict:
        self.clock.reset()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        with PeakRSS() as mem:
            start = self.clock.now()
            if variant == "stock":
                denoiser(self.pipe).set_attn_processor(dict(self.stock_processors))
                self._generate(case)
                held = 0
            elif variant == "harvest":
                held = self._harvest(case)
            else:
                held = self._store_every_map(case)
            total = self.clock.now() - start
        return {
            "backend": case.backend, "batch_size": case.batch_size, "variant": variant,
            "seconds": total, "components_s": dict(self.clock.seconds),
            "attention_state_bytes": held, "peak_rss_growth_bytes": mem.growth,
            "peak_device_bytes": (torch.cuda.max_memory_allocated(self.device)
                                  if self.device.type == "cuda" else None),
        }


def run_throughput(cfg: ThroughputConfig, pipe=None) -> dict:
    """Run the benchmark; writes `cfg.out`.{json,md} (+ .png plots) and returns the result.

    `pipe`: an already loaded pipeline for `cfg.model` on `cfg.device`/`cfg.dtype` (the quality
    bench shares its own); its attention processors are restored afterwards."""
    unknown = [b for b in cfg.backends if b not in BACKENDS]
    if unknown:
        raise UserError(f"backend(s) {unknown} not available; choose from {list(BACKENDS)}")
    bad = [v for v in cfg.variants if v not in VARIANTS]
    if bad:
        raise UserError(f"unknown variant(s) {bad}; choose from {list(VARIANTS)}")
    if "stock" not in cfg.variants:
        raise UserError("the 'stock' variant is the baseline and must be included")
    if cfg.repeats < 1 or cfg.steps < 1 or not cfg.batch_sizes or min(cfg.batch_sizes) < 1:
        raise UserError("repeats, steps and batch sizes must be >= 1")
    size = (cfg.height or default_size(cfg.model), cfg.width or default_size(cfg.model))
    for flag, v in zip(("--height", "--width"), size, strict=True):
        if v <= 0 or v % 8:
            raise UserError(f"{flag} {v} is not a positive multiple of 8")
    base = output_base(cfg.out)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    t0 = time.perf_counter()
    if pipe is None:
        pipe = load_pipeline(cfg.model, device, dtype)
    load_s = time.perf_counter() - t0
    check_image_size(pipe, *size)
    classes = load_classes("voc")
    prompts = default_prompts(classes)
    engines = [b for b in cfg.backends if b != "torch"]
    # The torch stock baseline is always measured: every ratio is against it.
    torch_variants = cfg.variants if "torch" in cfg.backends else ("stock",)
    bench = _Bench(cfg, pipe, device, size)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:

        def case(backend: str, bs: int) -> _Case:
            specs = [prompts[classes[i % len(classes)].name][0] for i in range(bs)]
            weights, ids = class_weights(pipe, specs)
            latents = initial_latents(pipe, size, range(bs))
            writer = DatasetWriter(Path(tmp) / f"{backend}-{bs}", {
                "model": cfg.model, "model_hash": "", "preset": cfg.preset, "mask": {}}, classes)
            return _Case(backend, bs, [s.text for s in specs], weights, ids, latents, writer)

        try:
            for bs in cfg.batch_sizes:
                runs += _measure(bench, case("torch", bs), torch_variants, cfg)
        finally:
            # Before the engines: the network gets its own processors back and loses the
            # torch bench's clock hooks (a compiled graph would trace them).
            bench.close()
        for backend in engines:
            runs += _measure_engine(cfg, pipe, device, size,
                                    [case(backend, bs) for bs in cfg.batch_sizes])
    result = {
        "benchmark": "throughput", "config": asdict(cfg), "size": list(size),
        "model_note": ("built-in random weights: timings are real, images are noise"
                       if cfg.model in RANDOM_MODELS else "real weights"),
        "load_seconds": round(load_s, 2), "machine": machine_info(device),
        "dtype": str(dtype).replace("torch.", ""), "runs": runs,
        "summary": summarise(runs, cfg.steps),
    }
    result["files"] = write_outputs(result, base, plots=cfg.plots)
    return result


def _measure(bench: _Bench, case: _Case, variants, cfg: ThroughputConfig) -> list[dict]:
    """Warm-up, then the repeats with the variants interleaved; the order rotates every
    repeat, so no variant always runs first or always follows the same one."""
    variants = list(variants)
    what = f"{case.backend} batch {case.batch_size}"
    for w in range(cfg.warmup):
        for v in variants:
            run = bench.run(v, case)
            _log(cfg, f"{what} {v}: warm-up {w + 1}/{cfg.warmup} {run['seconds']:.2f} s")
    runs = []
    for r in range(cfg.repeats):
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:
            runs.append({**bench.run(v, case), "repeat": r})
            _log(cfg, f"{what} {v}: repeat {r + 1}/{cfg.repeats} {runs[-1]['seconds']:.2f} s")
    return runs


def _log(cfg: ThroughputConfig, message: str) -> None:
    """Progress on stderr: a sweep on a CPU takes minutes, and says what it is doing."""
    if cfg.progress:
        print(f"bench: {message}", file=sys.stderr, flush=True)


def _measure_engine(cfg: ThroughputConfig, pipe, device, size: tuple[int, int],
                    cases: list[_Case]) -> list[dict]:
    """The `harvest` variant through one engine backend (built or reused from the engine
    cache, for the largest batch size) at every batch size."""
    from attnseg.engines.harvest import engine_harvester
    from attnseg.pipeline.config import SynthConfig

    synth_cfg = SynthConfig(model=cfg.model, preset=cfg.preset, height=size[0], width=size[1],
                            batch_size=max(c.batch_size for c in cases),
                            backend=cases[0].backend)
    harvester = engine_harvester(synth_cfg, pipe, get_preset(cfg.preset, pipe.vae_scale_factor))
    bench = _Bench(cfg, pipe, device, size, engine_harvester=harvester)
    # Never fewer than one warm-up: an engine's first call compiles or allocates.
    warm = replace(cfg, warmup=max(1, cfg.warmup))
    try:
        return [run for case in cases for run in _measure(bench, case, ("harvest",), warm)]
    finally:
        bench.close()


def summarise(runs: list[dict], steps: int) -> list[dict]:
    """Median and spread per (backend, batch size, variant); ratios against stock."""
    rows = []
    keys = sorted({(r["backend"], r["batch_size"], r["variant"]) for r in runs},
                  key=lambda k: (BACKENDS.index(k[0]), k[1], VARIANTS.index(k[2])))
    medians = {}
    for key in keys:
        sel = [r for r in runs if (r["backend"], r["batch_size"], r["variant"]) == key]
        secs = [r["seconds"] for r in sel]
        med = statistics.median(secs)
        medians[key] = med
        bs = key[1]
        rows.append({
            "backend": key[0], "batch_size": bs, "variant": key[2],
            "seconds_per_batch": spread_summary(secs),
            "images_per_s": bs / med,
            "denoising_steps_per_s": steps / med,
            "seconds_per_image": {c: statistics.median(r["components_s"][c] for r in sel) / bs
                                  for c in COMPONENTS},
            "attention_state_bytes": max(r["attention_state_bytes"] for r in sel),
            "peak_rss_growth_bytes": max(r["peak_rss_growth_bytes"] for r in sel),
            "peak_device_bytes": (max(r["peak_device_bytes"] for r in sel)
                                  if sel[0]["peak_device_bytes"] is not None else None),
        })
    stock_rows = {r["batch_size"]: r for r in rows
                  if (r["backend"], r["variant"]) == ("torch", "stock")}
    for row in rows:
        stock = stock_rows[row["batch_size"]]
        row["time_vs_stock"] = row["seconds_per_batch"]["median"] / \
            stock["seconds_per_batch"]["median"]
        row["within_spread"] = row is not stock and ratio_within_spread(
            row["time_vs_stock"], row["seconds_per_batch"], stock["seconds_per_batch"])
    return rows


def _bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _table(result: dict) -> str:
    m = result["machine"]
    cfg = result["config"]
    head = (f"{cfg['model']} ({result['model_note']}), {result['size'][0]}x{result['size'][1]},"
            f" {cfg['steps']} steps, {result['dtype']} on {m.get('gpu', m['device'])} "
            f"({m['cpu_count']} CPU cores), median of {cfg['repeats']} (min-max)")
    lines = [head, "",
             "| backend | batch | variant | s/batch | images/s | steps/s | vs stock | UNet s/img"
             " | harvest s/img | VAE s/img | masks+write s/img | attn state | peak RSS + |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["summary"]:
        s = r["seconds_per_batch"]
        c = r["seconds_per_image"]
        lines.append(
            f"| {r['backend']} | {r['batch_size']} | {r['variant']} | {s['median']:.3f} "
            f"({s['min']:.3f}-{s['max']:.3f}) | {r['images_per_s']:.3f} | "
            f"{r['denoising_steps_per_s']:.2f} | {r['time_vs_stock']:.3f}x"
            f"{' ~' if r['within_spread'] else ''} | {c['unet']:.3f} | "
            f"{c['harvest']:.4f} | {c['vae']:.3f} | {c['masks'] + c['write']:.4f} | "
            f"{_bytes(r['attention_state_bytes'])} | {_bytes(r['peak_rss_growth_bytes'])} |"
        )
    noisy = [r for r in result["summary"] if r["within_spread"]]
    if noisy:
        lines += ["", f"~ {spread_note(noisy)}"]
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, base: Path, plots: bool = True) -> list[str]:
    """Write BASE.json, BASE.md (and BASE.png); the paths written."""
    base.parent.mkdir(parents=True, exist_ok=True)
    files = [with_suffix(base, ".json"), with_suffix(base, ".md")]
    atomic_write_bytes(files[0], (json.dumps(result, indent=1) + "\n").encode())
    atomic_write_bytes(files[1], _table(result).encode())
    if plots:
        files.append(with_suffix(base, ".png"))
        _plot(result, files[2])
    return [str(f) for f in files]


def _plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plots need matplotlib: pip install 'attnseg[bench]'") from None
    rows = result["summary"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    lines = sorted({(r["backend"], r["variant"]) for r in rows})
    if len({r["batch_size"] for r in rows}) == 1:  # one batch size: a bar per variant
        ax1.bar(range(len(rows)), [r["images_per_s"] for r in rows],
                color=[f"C{lines.index((r['backend'], r['variant']))}" for r in rows])
        ax1.set_xticks(range(len(rows)), [f"{r['backend']}\n{r['variant']}" for r in rows],
                       fontsize=7)
        ax1.set_xlabel(f"batch size {rows[0]['batch_size']}")
    else:
        for (backend, variant) in lines:
            sel = [r for r in rows if r["backend"] == backend and r["variant"] == variant]
            ax1.plot([r["batch_size"] for r in sel], [r["images_per_s"] for r in sel],
                     marker="o", label=f"{backend} {variant}")
        ax1.set_xlabel("batch size")
        ax1.legend(fontsize=8)
    ax1.set_ylim(bottom=0)
    ax1.set_ylabel("images / s")
    ax1.set_title("throughput")
    labels = [f"{r['backend']}\nb{r['batch_size']}\n{r['variant']}" for r in rows]
    bottom = np.zeros(len(rows))
    for comp in COMPONENTS:
        vals = np.array([r["seconds_per_image"][comp] for r in rows])
        ax2.bar(range(len(rows)), vals, bottom=bottom, label=comp)
        bottom += vals
    ax2.set_xticks(range(len(rows)), labels, fontsize=6)
    ax2.set_ylabel("seconds / image")
    ax2.set_title("where the time goes")
    ax2.legend(fontsize=7)
    fig.suptitle(f"attnseg bench throughput: {result['config']['model']}, "
                 f"{result['size'][0]}px, {result['config']['steps']} steps", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
