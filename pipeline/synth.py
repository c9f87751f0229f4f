"""Dataset synthesis: load a Stable Diffusion pipeline, generate with harvesting, write masks.

The seed of sample i depends only on (base seed, i), never on batch size or on which samples
were already written, so a resumed or differently batched run yields the same samples.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .config import Preset, SynthConfig
from .dataset import DatasetWriter, check_output_dir
from .errors import UserError
from .harvest import AttentionHarvester
from .masks import masks_from_harvest
from .prompts import (
    ClassInfo,
    PromptSpec,
    class_token_weights,
    default_prompts,
    load_classes,
    load_prompt_file,
)

TINY_NOTICE = (
    "model 'tiny' is attnseg's built-in tiny random Stable Diffusion: its images are noise "
    "and its masks carry no meaning (it exercises the code, not the method)"
)
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for, but no CUDA device is available")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """fp16 on GPU and fp32 on CPU unless asked otherwise."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


def load_pipeline(model: str, device: torch.device, dtype: torch.dtype):
    """A diffusers Stable Diffusion 1.x/2.x pipeline from 'tiny', a hub id, a folder or one
    .safetensors file. Hub ids resolve from the local cache when HF_HUB_OFFLINE=1."""
    import diffusers
    from diffusers import StableDiffusionPipeline

    from .tiny import build_tiny_pipeline

    if model == "tiny":
        pipe = build_tiny_pipeline(dtype=dtype)
    else:
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
    return pipe.to(device)


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


def default_size(model: str) -> int:
    return 128 if model == "tiny" else 512


def run_synth(cfg: SynthConfig, progress: bool = True) -> dict:
    """Run a synthesis job end to end; returns a summary dict. Resumes an interrupted job."""
    cfg.validate()
    cfg.height = cfg.height or default_size(cfg.model)
    cfg.width = cfg.width or default_size(cfg.model)
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
    pipe = load_pipeline(cfg.model, device, dtype)
    harvester = None
    if cfg.backend != "torch" or cfg.engine:
        from ..engines.runner import engine_harvester

        harvester = engine_harvester(cfg, pipe, preset, log=print if progress else None)
    synth = Synthesizer(pipe, preset, cfg.height, cfg.width, steps, guidance, harvester)
    synth.check_prompts(list({id(s.spec): s.spec for s in samples}.values()))
    job = {
        "model": cfg.model, "model_hash": model_fingerprint(pipe), "classes": cfg.classes,
        "class_names": [c.name for c in classes], "num_per_class": cfg.num_per_class,
        "preset": cfg.preset, "harvest": asdict(preset.harvest), "mask": asdict(preset.mask),
        "prompts": cfg.prompts, "steps": steps, "guidance": guidance,
        "size": [cfg.height, cfg.width], "seed": cfg.seed, "dtype": str(dtype),
    }
    writer = DatasetWriter(out, job, classes)
    todo = [s for s in samples if s.index not in writer.done]
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(samples), initial=len(samples) - len(todo), unit="img",
                   desc="synth", dynamic_ncols=True)
    written = 0
    for start in range(0, len(todo), cfg.batch_size):
        batch = todo[start : start + cfg.batch_size]
        images, labels, reliability = synth.generate(batch)
        for j, s in enumerate(batch):
            writer.write(s.index, s.name, images[j], labels[j], reliability[j], {
                "prompt": s.spec.text,
                "classes": [{"id": c.id, "name": c.name, "word": w} for c, w in s.spec.labels],
                "seed": s.seed,
            })
        written += len(batch)
        if bar is not None:
            rate = written / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix_str(f"{rate:.2f} img/s")
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    writer.finish()
    elapsed = time.perf_counter() - t0
    summary = {
        "out": str(out), "samples": len(samples), "new": written,
        "already_present": len(samples) - written, "seconds": round(elapsed, 3),
        "images_per_s": round(written / elapsed, 3) if written and elapsed > 0 else None,
        "model": cfg.model, "preset": cfg.preset, "steps": steps, "size": [cfg.height, cfg.width],
        "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "backend": cfg.backend if not cfg.engine else f"engine {cfg.engine}",
        "timings_s": {k: round(v, 3) for k, v in synth.timings.items()},
    }
    synth.harvester.remove()
    return summary
