"""Dataset synthesis: load a Stable Diffusion pipeline, generate with harvesting, write masks.

The seed of sample i depends only on (base seed, i), never on batch size or on which samples
were already written, so a resumed or differently batched run yields the same samples.
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .config import Preset, SynthConfig
from .dataset import (
    DatasetWriter,
    check_output_dir,
    finished_indices,
    prepare_output,
    stored_job_matches,
    write_split,
)
from .device import resolve_device, resolve_dtype
from .errors import UserError
from .harvest import AttentionHarvester
from .lora import check_loras, parse_lora_spec
from .masks import masks_from_harvest
from .prompts import (
    ClassInfo,
    PromptSpec,
    class_token_weights,
    default_prompts,
    load_classes,
    load_prompt_file,
)
from .webdataset import TarChunkWriter, finished_chunks

TINY_NOTICE = (
    "model 'tiny' is attnseg's built-in tiny random Stable Diffusion: its images are noise "
    "and its masks carry no meaning (it exercises the code, not the method)"
)
def _model_path(model: str) -> Path:
    """Check a --model that is not built in; its path (which need not exist for a hub id)."""
    path = Path(model).expanduser()
    looks_like_path = model.startswith((".", "/", "~")) or path.suffix != "" or path.exists()
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        raise UserError(
            f"model {model}: pickle checkpoints are not loaded (they can run code); "
            "convert it to .safetensors"
        )
    if looks_like_path and not path.exists():
        raise UserError(f"model path {model} does not exist")
    if path.is_file() and path.suffix != ".safetensors":
        raise UserError(f"model file {model} is not a .safetensors checkpoint")
    return path


def load_pipeline(model: str, device: torch.device, dtype: torch.dtype, loras=()):
    """A diffusers Stable Diffusion 1.x/2.x pipeline from 'tiny' or 'sd15-random' (built-in
    random weights), a hub id, a folder or one .safetensors file. Hub ids resolve from the local
    cache when HF_HUB_OFFLINE=1.

    `loras` (lora.LoraSpec) are fused into the UNet (and text encoder) with their scales."""
    import diffusers
    from diffusers import StableDiffusionPipeline

    from .tiny import build_sd15_random_pipeline, build_tiny_pipeline

    if model == "tiny":
        pipe = build_tiny_pipeline(dtype=dtype)
    elif model == "sd15-random":
        pipe = build_sd15_random_pipeline(dtype=dtype)
    else:
        path = _model_path(model)
        kwargs = dict(torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
        diffusers.utils.logging.disable_progress_bar()
        try:
            with warnings.catch_warnings():
                # Newer diffusers renamed torch_dtype; the old name works across versions.
                warnings.simplefilter("ignore", FutureWarning)
                if path.is_file():
                    pipe = StableDiffusionPipeline.from_single_file(str(path), **kwargs)
                else:
                    pipe = StableDiffusionPipeline.from_pretrained(
                        str(path) if path.exists() else model, **kwargs
                    )
        except Exception as e:  # diffusers/hub raise many types; report them on one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"could not load model {model!r}: {first}") from None
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if loras:
        from .lora import apply_loras

        apply_loras(pipe, list(loras))
    return pipe


def load_tokenizer(model: str):
    """The text tokenizer of a model, without its weights where the model is a folder or hub
    id (a single .safetensors checkpoint is loaded whole: its tokenizer comes from its config)."""
    if model in RANDOM_MODELS:  # the built-in models share the generated tokenizer
        from .tiny import tiny_tokenizer

        return tiny_tokenizer()
    path = _model_path(model)
    if path.is_file():
        return load_pipeline(model, torch.device("cpu"), torch.float32).tokenizer
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(str(path) if path.exists() else model,
                                             subfolder="tokenizer")
    except Exception as e:  # hub/transformers raise many types; report them on one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load the tokenizer of model {model!r}: {first}") from None


def model_fingerprint(pipe) -> str:
    """A short content hash of the UNet and text encoder weights (names, shapes and a strided
    sample of values). Configs are left out: libraries add bookkeeping keys to them on save."""
    h = hashlib.sha256()
    with torch.no_grad():
        for part in (pipe.unet, pipe.text_encoder):
            for name, p in part.named_parameters():
                sample = p.detach().flatten()[::997].double().cpu()
                h.update(f"{name}:{tuple(p.shape)}".encode())
                h.update(np.float64(sample.sum().item()).tobytes())
    return h.hexdigest()[:16]


def sample_seed(base_seed: int, index: int) -> int:
    """The seed of sample `index`: a function of (base seed, index) only."""
    state = np.random.SeedSequence([base_seed & 0xFFFFFFFF, index]).generate_state(2)
    return int(state[0]) | (int(state[1]) & 0x7FFFFFFF) << 32


@dataclass
class Sample:
    """One planned sample: its global index, prompt and seed."""

    index: int
    spec: PromptSpec
    seed: int

    @property
    def name(self) -> str:
        return f"{self.index:08d}"


def plan_samples(classes: list[ClassInfo], prompts: dict[str, list[PromptSpec]],
                 num_per_class: int, base_seed: int) -> list[Sample]:
    """Sample i: class i // N, that class's prompt (i % N) modulo its prompt count."""
    samples = []
    for ci, cls in enumerate(classes):
        options = prompts[cls.name]
        for k in range(num_per_class):
            i = ci * num_per_class + k
            samples.append(Sample(i, options[k % len(options)], sample_seed(base_seed, i)))
    return samples


class Synthesizer:
    """Generates images, label maps and reliability maps for batches of samples."""

    def __init__(self, pipe, preset: Preset, height: int, width: int, steps: int,
                 guidance: float, harvester=None):
        self.pipe = pipe
        self.preset = preset
        self.size = (height, width)
        self.steps = steps
        self.guidance = guidance
        # An engine backend passes its own harvester (attnseg.engines.runner.EngineHarvester).
        self.harvester = harvester or AttentionHarvester(pipe.unet, preset.harvest)
        self.timings = {"generate": 0.0, "masks": 0.0}

    def initial_latents(self, seeds: list[int]) -> torch.Tensor:
        """Per-sample Gaussian latents from CPU generators, so any device gives the same noise."""
        pipe = self.pipe
        shape = (pipe.unet.config.in_channels, self.size[0] // pipe.vae_scale_factor,
                 self.size[1] // pipe.vae_scale_factor)
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
        return torch.stack(noise).to(device=pipe.device, dtype=pipe.unet.dtype)

    def check_prompts(self, specs: list[PromptSpec]) -> None:
        """Fail early, naming the prompt, if any class word does not survive tokenisation."""
        for spec in specs:
            class_token_weights(self.pipe.tokenizer, [spec], self.preset.harvest.token_merge)

    @torch.no_grad()
    def generate(self, samples: list[Sample]):
        """Images uint8 [B, H, W, 3], labels uint8 [B, H, W], reliability uint8 [B, H, W]."""
        specs = [s.spec for s in samples]
        weights, class_ids = class_token_weights(
            self.pipe.tokenizer, specs, self.preset.harvest.token_merge
        )
        latents = self.initial_latents([s.seed for s in samples])
        generators = [torch.Generator().manual_seed(s.seed + 1) for s in samples]
        t0 = time.perf_counter()
        with self.harvester.capture(weights, self.size, self.steps) as cap:
            images = self.pipe(
                [s.text for s in specs], height=self.size[0], width=self.size[1],
                num_inference_steps=self.steps, guidance_scale=self.guidance, latents=latents,
                generator=generators, output_type="np",
            ).images
        t1 = time.perf_counter()
        labels, reliability = masks_from_harvest(
            cap.result, class_ids, self.preset.harvest, self.preset.mask
        )
        t2 = time.perf_counter()
        self.timings["generate"] += t1 - t0
        self.timings["masks"] += t2 - t1
        images = (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        return images, labels.cpu().numpy(), reliability.cpu().numpy()


RANDOM_MODELS = ("tiny", "sd15-random")


def default_size(model: str) -> int:
    return 128 if model == "tiny" else 512


def parse_shard(spec: str | None) -> tuple[int, int]:
    """`--shard`: "i/n" (0-based), or "auto" for the launcher's rank (torchrun/accelerate set
    RANK and WORLD_SIZE; Slurm arrays SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT)."""
    if spec is None:
        return 0, 1
    if spec == "auto":
        for rank, size in (("RANK", "WORLD_SIZE"),
                           ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")):
            if rank in os.environ and size in os.environ:
                return parse_shard(f"{os.environ[rank]}/{os.environ[size]}")
        return 0, 1
    i, slash, n = spec.partition("/")
    try:
        index, count = int(i), int(n)
    except ValueError:
        index, count = -1, 0
    if not slash or count < 1 or not 0 <= index < count:
        raise UserError(f"--shard {spec!r} is not of the form i/n with 0 <= i < n, or auto")
    return index, count


def plan_batches(samples: list[Sample], batch_size: int, shard: tuple[int, int]):
    """This shard's batches. Batches are fixed runs of `batch_size` consecutive global indices
    and are dealt round-robin to shards, so every batch is generated with the same companions
    under any sharding and on any resume: batched kernels round alike, samples are identical."""
    index, count = shard
    batches = [samples[k : k + batch_size] for k in range(0, len(samples), batch_size)]
    return batches[index::count]


def _write_unit(synth: Synthesizer, unit: list[Sample], sink, done: set[int], batch_size: int,
                bar) -> int:
    """Generate a unit's batches and write its samples that are not done; returns how many."""
    written = 0
    for start in range(0, len(unit), batch_size):
        batch = unit[start : start + batch_size]
        images, labels, reliability = synth.generate(batch)
        for j, s in enumerate(batch):
            if s.index in done:
                continue  # written before an interruption: generated only as a companion
            sink.write(s.index, s.name, images[j], labels[j], reliability[j], {
                "prompt": s.spec.text,
                "classes": [{"id": c.id, "name": c.name, "word": w} for c, w in s.spec.labels],
                "seed": s.seed,
            })
            written += 1
        if bar is not None:
            bar.update(len(batch))
    return written


def run_synth(cfg: SynthConfig, progress: bool = True, pipe=None) -> dict:
    """Run a synthesis job (or one shard of it) end to end; returns a summary dict.

    Resumes an interrupted job; a shard whose samples are all written returns at once (after
    refreshing the split file, which a shard finishing alongside another may have missed).
    `pipe`: an already loaded pipeline for `cfg.model` (launchers reuse one per worker).
    """
    cfg.validate()
    cfg = replace(cfg, height=cfg.height or default_size(cfg.model),
                  width=cfg.width or default_size(cfg.model))
    shard = parse_shard(cfg.shard)
    preset = cfg.resolve_preset()
    steps = cfg.steps or preset.steps or 20
    guidance = cfg.guidance if cfg.guidance is not None else (preset.guidance or 7.5)
    classes = load_classes(cfg.classes)
    prompts = load_prompt_file(cfg.prompts, classes) if cfg.prompts else default_prompts(classes)
    out = Path(cfg.out)
    check_output_dir(out)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if device.type == "cpu" and dtype == torch.float16:
        raise UserError("--dtype fp16 is not supported on CPU; use fp32 or bf16")
    samples = plan_samples(classes, prompts, cfg.num_per_class, cfg.seed)
    webdataset = cfg.format == "webdataset"
    # The unit of work and of resume: one batch (VOC files) or one tar chunk (WebDataset).
    units = plan_batches(samples, cfg.samples_per_tar if webdataset else cfg.batch_size, shard)
    mine = sum(len(u) for u in units)
    loras = [parse_lora_spec(s, cfg.lora_scale) for s in cfg.loras]
    lora_records = check_loras(loras)  # before anything is loaded or written
    job = {
        "model": cfg.model, "classes": cfg.classes,
        "class_names": [c.name for c in classes], "num_per_class": cfg.num_per_class,
        "preset": cfg.preset, "harvest": asdict(preset.harvest), "mask": asdict(preset.mask),
        "prompts": cfg.prompts, "steps": steps, "guidance": guidance,
        "size": [cfg.height, cfg.width], "seed": cfg.seed, "dtype": str(dtype),
        "batch_size": cfg.batch_size, "format": cfg.format,
    }
    if webdataset:
        job["samples_per_tar"] = cfg.samples_per_tar
    if lora_records:  # recorded only when used, so job files of runs without LoRA are unchanged
        job["loras"] = lora_records
    if cfg.backend != "torch" or cfg.engine:  # engines round differently from eager torch
        job["backend"] = cfg.backend if not cfg.engine else f"engine {Path(cfg.engine).name}"
    t0 = time.perf_counter()
    if webdataset:
        chunks = finished_chunks(out) if stored_job_matches(out, job) else set()
        done = {s.index for u in units if u[0].index // cfg.samples_per_tar in chunks for s in u}
    else:
        done = finished_indices(out, job)
    todo = [u for u in units if any(s.index not in done for s in u)]
    synth = None
    written = 0
    if todo:
        pipe = pipe or load_pipeline(cfg.model, device, dtype, loras)
        harvester = None
        if cfg.backend != "torch" or cfg.engine:
            from ..engines.runner import engine_harvester

            harvester = engine_harvester(cfg, pipe, preset, log=print if progress else None)
        synth = Synthesizer(pipe, preset, cfg.height, cfg.width, steps, guidance, harvester)
        synth.check_prompts(list({id(s.spec): s.spec for s in samples}.values()))
        job["model_hash"] = model_fingerprint(pipe)
        if webdataset:
            job = prepare_output(out, job, classes)
        else:
            writer = DatasetWriter(out, job, classes, shard=shard)
            done = writer.done
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=mine, initial=mine - sum(len(u) for u in todo), unit="img",
                       dynamic_ncols=True,
                       desc="synth" if shard[1] == 1 else f"synth {shard[0]}/{shard[1]}")
        try:
            for unit in todo:
                if webdataset:
                    chunk = TarChunkWriter(out, unit[0].index // cfg.samples_per_tar, job)
                    try:
                        written += _write_unit(synth, unit, chunk, done, cfg.batch_size, bar)
                        chunk.close()
                    except BaseException:
                        chunk.abort()
                        raise
                else:
                    written += _write_unit(synth, unit, writer, done, cfg.batch_size, bar)
            if not webdataset:
                writer.finish()
        finally:
            synth.harvester.remove()  # the caller's pipeline is left as it was
            if bar is not None:
                bar.close()
    elif not webdataset and stored_job_matches(out, job):
        write_split(out)
    elapsed = time.perf_counter() - t0
    return {
        "out": str(out), "samples": mine, "new": written, "already_present": mine - written,
        "shard": f"{shard[0]}/{shard[1]}", "seconds": round(elapsed, 3),
        "images_per_s": round(written / elapsed, 3) if written and elapsed > 0 else None,
        "model": cfg.model, "preset": cfg.preset, "steps": steps, "size": [cfg.height, cfg.width],
        "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "loras": lora_records,
        "backend": cfg.backend if not cfg.engine else f"engine {cfg.engine}",
        "timings_s": {k: round(v, 3) for k, v in (synth.timings if synth else {}).items()},
    }
