"""LoRA domain adaptation: train a LoRA on the UNet from unlabeled images (`attnseg lora train`).

Peft LoRA adapters on the UNet's attention projections are fitted with the standard
noise-prediction loss on a folder of target-domain images (e.g. street scenes) with a fixed or
per-image caption. The result is a diffusers LoRA file: `pipe.load_lora_weights(OUT)` loads it,
and `attnseg synth --lora OUT` fuses it into the UNet before harvesting (`lora`), so synthesis
reaches the target domain.

    OUT/pytorch_lora_weights.safetensors    the trained LoRA (diffusers format, safetensors)
    OUT/lora_train.json                     the run's settings; a rerun must match them
    OUT/history.json                        per-step loss and the probe loss at checkpoints
    OUT/checkpoints/step-XXXXXXXX/          LoRA + optimizer state (safetensors) + state.json

Resume: every random draw of step s (which images, crops, flips, the VAE sample, noise and
timesteps) comes from a generator seeded by (seed, s), and the LoRA and AdamW state are
checkpointed, so a run killed at any point and started again continues from its last
checkpoint along the same path as an uninterrupted run. Ctrl-C and SIGTERM (`kill`, `timeout`,
a scheduler's preemption) first save a checkpoint of the last whole step (SIGTERM: exit 143).
A rerun with a larger --steps trains on.

The probe loss is the noise-prediction loss on a fixed set (the first images, centre crops,
fixed noise, timesteps spread over the schedule): unlike the per-step loss it is not noisy, so
its fall shows that training fits the images.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..files import (
    atomic_write_bytes,
    check_output_dir,
    hold_output,
    holding_output,
    holds_same_run,
    remove_stale_temporaries,
    tmp_name,
)
from ..jsonfile import read_json
from ..models.lora import LORA_WEIGHTS, require_compatible_peft
from ..optim_state import load_optimizer_tensors, optimizer_tensors
from ..seeds import sample_seed
from ..settings import NonNegativeFloat, PositiveFloat, PositiveInt
from ..signals import StopSignals

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_ADAPTER = "default"  # peft's adapter name during training


LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the UNet attention projections


@dataclass
class LoraTrainConfig:
    """LoRA fine-tuning of the UNet on unlabeled images (`attnseg lora train`)."""

    images: str = ""  # folder of images (searched recursively)
    model: str = "tiny"
    out: str = "out/lora"
    caption: str | None = None  # for images without a caption file <image>.txt
    rank: PositiveInt = 4
    alpha: PositiveFloat | None = None  # None: equal to rank (LoRA scale alpha / rank = 1)
    target_modules: tuple[str, ...] = LORA_TARGETS  # UNet attention projections
    steps: PositiveInt = 1000  # total optimiser steps; a rerun with more steps continues training
    lr: PositiveFloat = 1e-4
    batch_size: PositiveInt = 1
    # square training crop side; None: 128 for the tiny model, else 512
    crop: PositiveInt | None = None
    seed: int = 0
    flip: bool = True  # random horizontal flips
    center_crop: bool = False  # else random square crops
    weight_decay: NonNegativeFloat = 1e-2
    max_grad_norm: PositiveFloat = 1.0
    # Offset noise: a per-image, per-channel constant of this std added to the training noise.
    # A model trained on plain noise reads each image's mean colour off the noisy latent
    # (the schedule never hides it fully) and so cannot move it: a LoRA fitted without it
    # learns a domain's textures but keeps the old domain's colours. 0: plain noise.
    noise_offset: NonNegativeFloat = 0.0
    gradient_checkpointing: bool = False
    checkpoint_every: PositiveInt = 250
    keep_checkpoints: PositiveInt = 2
    device: str = "auto"
    dtype: str = "auto"  # weights of the frozen model: fp32 on CPU, bf16 on GPU; LoRA is fp32
    allow_pickle: bool = False  # load pickle (.bin) weights: they can run code

    def validate(self) -> None:
        if not self.images:
            raise UserError("--images is required: a folder of target-domain images")
        for name in ("rank", "steps", "batch_size", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1")
        if self.lr <= 0:
            raise UserError("--lr must be > 0")
        if not 0 <= self.noise_offset <= 1:
            raise UserError("--noise-offset must be between 0 and 1")
        if self.alpha is not None and self.alpha <= 0:
            raise UserError("--alpha must be > 0")
        if self.crop is not None and (self.crop <= 0 or self.crop % 8):
            raise UserError(f"--crop {self.crop} is not a positive multiple of 8")
        if not self.target_modules:
            raise UserError("--target-modules is empty")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise UserError(f"--dtype for LoRA training must be auto, fp32 or bf16, not "
                            f"{self.dtype!r} (fp16 training would need loss scaling)")


# ---------------------------------------------------------------------------------------------
# Training data.


def find_training_images(folder: str, caption: str | None) -> list[tuple[Path, str]]:
    """(image, caption) pairs, sorted by path. An image's caption is the text of `<image>.txt`
    next to it, else `caption`; an image with neither is an error naming it."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"image folder {folder} does not exist")
    files = sorted(f for f in root.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES
                   and f.is_file())
    if not files:
        raise UserError(f"image folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    from PIL import Image

    pairs = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.size  # noqa: B018  (reads the header: fails fast on a broken file)
        except Exception:
            raise UserError(f"image {f} cannot be read as an image") from None
        txt = f.with_suffix(".txt")
        if txt.is_file():
            text = " ".join(txt.read_text(encoding="utf-8").split())
        elif caption is not None:
            text = caption
        else:
            raise UserError(f"image {f} has no caption file {txt.name} and no --caption was given")
        pairs.append((f, text))
    return pairs


def load_training_image(path: Path, resolution: int, generator: torch.Generator | None,
                        flip: bool, center_crop: bool) -> torch.Tensor:
    """[3, R, R] in [-1, 1]: shorter side resized to R (bicubic), a square crop (random with
    `generator`, else central), optionally flipped left-right (random with `generator`)."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
    scale = resolution / min(im.size)
    size = (max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale)))
    im = im.resize(size, Image.BICUBIC)
    dx, dy = im.width - resolution, im.height - resolution
    if center_crop or generator is None:
        left, top = dx // 2, dy // 2
    else:
        left = int(torch.randint(0, dx + 1, (1,), generator=generator))
        top = int(torch.randint(0, dy + 1, (1,), generator=generator))
    im = im.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    if flip and generator is not None and bool(torch.rand((), generator=generator) < 0.5):
        x = x.flip(-1)
    return x.contiguous()


def batch_indices(step: int, batch_size: int, count: int, seed: int) -> list[int]:
    """The images of optimiser step `step`: epochs walk seeded permutations of the images."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, k = divmod(pos, count)
        out.append(int(np.random.default_rng([seed & 0xFFFFFFFF, epoch]).permutation(count)[k]))
    return out


# ---------------------------------------------------------------------------------------------
# Training.


def _resolve_train_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]


def check_target_modules(unet, targets: tuple[str, ...]) -> None:
    """Every target must name Linear or Conv2d layers of the UNet (by the end of their module
    name): attention projections, or the ResNet blocks' convolutions, which carry more of an
    image's style (backgrounds, palette) than attention does."""
    names = [n for n, m in unet.named_modules()
             if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise UserError(f"--target-modules {missing} match no Linear or Conv2d layer of the "
                        "UNet (attention projections are to_q, to_k, to_v, to_out.0; ResNet "
                        "convolutions conv1, conv2)")


def add_lora_adapter(unet, cfg: LoraTrainConfig) -> list[torch.nn.Parameter]:
    """Freeze the UNet, add the LoRA adapter (seeded initialisation), return its parameters
    (kept in fp32 whatever the UNet's dtype)."""
    from peft import LoraConfig

    check_target_modules(unet, tuple(cfg.target_modules))
    unet.requires_grad_(False)
    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha or cfg.rank,
                        target_modules=list(cfg.target_modules), init_lora_weights=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        unet.add_adapter(config, adapter_name=_ADAPTER)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The adapter's weights in diffusers' LoRA layout (keys without the "unet." prefix)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(unet, adapter_name=_ADAPTER)
    return {k: v.detach().float().cpu().contiguous()
            for k, v in convert_state_dict_to_diffusers(sd).items()}


def save_lora(unet, folder: Path) -> Path:
    """Write the adapter as `folder/pytorch_lora_weights.safetensors` (atomically), with its
    rank and alpha in the file's metadata so diffusers restores the same scale."""
    from diffusers import StableDiffusionPipeline

    folder.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(folder / ".lora")
    shutil.rmtree(tmp, ignore_errors=True)
    metadata = unet.peft_config[_ADAPTER].to_dict()
    # peft keeps target_modules as a set, whose order changes with each process's string
    # hashing: sorted, the same weights make the same file (synth jobs record its hash).
    if isinstance(metadata.get("target_modules"), (set, list, tuple)):
        metadata["target_modules"] = sorted(metadata["target_modules"])
    StableDiffusionPipeline.save_lora_weights(
        str(tmp), unet_lora_layers=lora_state_dict(unet), safe_serialization=True,
        unet_lora_adapter_metadata=metadata,
    )
    os.replace(tmp / LORA_WEIGHTS, folder / LORA_WEIGHTS)
    shutil.rmtree(tmp, ignore_errors=True)
    return folder / LORA_WEIGHTS


def load_lora_into_adapter(unet, file: Path) -> None:
    """Load a LoRA file written by `save_lora` into the training adapter (resume)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    sd = {k.removeprefix("unet."): v for k, v in load_file(str(file)).items()
          if k.startswith("unet.")}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(sd),
                                       adapter_name=_ADAPTER)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise UserError(f"checkpoint {file} does not fit this LoRA: {unexpected[0]} ...")


def _checkpoints(out: Path) -> list[Path]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir()
            if p.is_dir() and p.name.startswith("step-") and (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def _save_checkpoint(out: Path, step: int, unet, optimizer, state: dict, keep: int) -> None:
    root = out / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = tmp_name(final)
    shutil.rmtree(tmp, ignore_errors=True)
    from safetensors.torch import save_file

    save_lora(unet, tmp)
    tensors, meta = optimizer_tensors(optimizer)
    if meta["scalars"]:  # AdamW keeps tensors only
        raise RuntimeError("the LoRA optimiser holds non-tensor state")
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state))  # last: marks the checkpoint complete
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in _checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _remove_half_written(out: Path) -> None:
    """Remove what a killed run left half-written: temporaries and incomplete checkpoints."""
    remove_stale_temporaries(out)
    for p in (out / "checkpoints").glob("step-*"):
        if p.is_dir() and not (p / "state.json").is_file():
            shutil.rmtree(p, ignore_errors=True)


class LoraTrainer:
    """One LoRA training run's model parts and the loss they compute."""

    def __init__(self, pipe, images: list[tuple[Path, str]], cfg: LoraTrainConfig,
                 resolution: int):
        from diffusers import DDPMScheduler

        self.pipe, self.images, self.cfg, self.resolution = pipe, images, cfg, resolution
        self.unet, self.vae, self.text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
        self.vae.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.device = pipe.vae.device
        self.dtype = pipe.vae.dtype  # of the frozen weights (the LoRA's own are fp32)
        self._embeddings: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def embed(self, captions: list[str]) -> torch.Tensor:
        """Text-encoder states of the captions (cached per caption)."""
        tok = self.pipe.tokenizer
        for c in set(captions) - set(self._embeddings):
            ids = tok([c], padding="max_length", max_length=tok.model_max_length,
                      truncation=True, return_tensors="pt").input_ids.to(self.device)
            self._embeddings[c] = self.text_encoder(ids)[0][0]
        return torch.stack([self._embeddings[c] for c in captions])

    @torch.no_grad()
    def latents(self, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """VAE latents: a sample of the posterior (its mean without a generator), scaled."""
        dist = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        z = dist.mean
        if generator is not None:
            eps = torch.randn(z.shape, generator=generator).to(self.device, self.dtype)
            z = z + dist.std * eps
        return z * self.vae.config.scaling_factor

    def loss(self, latents: torch.Tensor, cond: torch.Tensor, noise: torch.Tensor,
             timesteps: torch.Tensor) -> torch.Tensor:
        """Noise-prediction loss: MSE between the UNet output and the noise (or velocity)."""
        noise = noise.to(self.device, latents.dtype)
        timesteps = timesteps.to(self.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        pred = self.unet(noisy, timesteps, cond).sample
        return F.mse_loss(pred.float(), target.float())

    def step_loss(self, step: int) -> torch.Tensor:
        """The training loss of optimiser step `step`; every draw is seeded by (seed, step)."""
        g = torch.Generator().manual_seed(sample_seed(self.cfg.seed, step))
        idx = batch_indices(step, self.cfg.batch_size, len(self.images), self.cfg.seed)
        pixels = torch.stack([
            load_training_image(self.images[i][0], self.resolution, g, self.cfg.flip,
                                self.cfg.center_crop) for i in idx])
        latents = self.latents(pixels, g)
        noise = torch.randn(latents.shape, generator=g)
        steps = self.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (len(idx),), generator=g)
        if self.cfg.noise_offset:  # drawn last: runs without it keep their draws
            noise = noise + self.cfg.noise_offset * torch.randn(
                (*latents.shape[:2], 1, 1), generator=g)
        return self.loss(latents, self.embed([self.images[i][1] for i in idx]), noise, timesteps)

    @torch.no_grad()
    def probe_loss(self, images: int = 4, timesteps: int = 4) -> float:
        """Loss on a fixed set: the first images (centre crops, posterior means), each at
        `timesteps` levels spread over the schedule, fixed noise."""
        chosen = self.images[:images]
        pixels = torch.stack([load_training_image(p, self.resolution, None, False, True)
                              for p, _ in chosen])
        latents = self.latents(pixels, None)
        cond = self.embed([c for _, c in chosen])
        g = torch.Generator().manual_seed(sample_seed(self.cfg.seed, 1 << 40))
        total = self.scheduler.config.num_train_timesteps
        levels = [int((k + 0.5) / timesteps * total) for k in range(timesteps)]
        losses = []
        for t in levels:
            noise = torch.randn(latents.shape, generator=g)
            ts = torch.full((len(chosen),), t, dtype=torch.long)
            losses.append(self.loss(latents, cond, noise, ts).item())
        return float(np.mean(losses))


@holding_output
def train_lora(cfg: LoraTrainConfig, progress: bool = True) -> dict:
    """Train (or resume training) a LoRA; returns a summary dict."""
    from ..device import resolve_device
    from ..models.loading import default_size, load_pipeline, model_fingerprint

    cfg.validate()
    cfg.target_modules = tuple(cfg.target_modules)
    images = find_training_images(cfg.images, cfg.caption)
    out = Path(cfg.out)
    check_output_dir(out)
    require_compatible_peft()
    device = resolve_device(cfg.device)
    dtype = _resolve_train_dtype(cfg.dtype, device)
    crop = cfg.crop or default_size(cfg.model)
    pipe = load_pipeline(cfg.model, device, dtype, allow_pickle=cfg.allow_pickle)
    job = {
        "model": cfg.model, "model_hash": model_fingerprint(pipe),
        "data_hash": hashlib.sha256(json.dumps(
            [[str(p.relative_to(Path(cfg.images).expanduser())), c] for p, c in images]
        ).encode()).hexdigest()[:16],
        "num_images": len(images), "crop": crop, "dtype": str(dtype),
        **{k: v for k, v in asdict(cfg).items()
           if k not in ("images", "model", "out", "steps", "checkpoint_every",
                        "keep_checkpoints", "device", "dtype", "crop",
                        "gradient_checkpointing")
           and not (k == "noise_offset" and not v)},  # runs from before it keep their job
    }
    job = json.loads(json.dumps(job))  # as it reads back (tuples -> lists)
    params = add_lora_adapter(pipe.unet, cfg)
    if cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    trainer = LoraTrainer(pipe, images, cfg, crop)

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"output folder {out} cannot be written: {e.strerror}") from None
    hold_output(out)  # a second process training into the folder is refused
    _remove_half_written(out)
    if not holds_same_run(out, "lora_train.json", job, "output folder", "LoRA training run"):
        atomic_write_bytes(out / "lora_train.json",
                           json.dumps(job, indent=1, sort_keys=True).encode())

    history: dict = {"loss": [], "probe_loss": {}}
    start = 0
    checkpoints = _checkpoints(out)
    if checkpoints:
        from safetensors.torch import load_file

        last = checkpoints[-1]
        hint = f"delete {last} to resume from the checkpoint before it"
        state = read_json(last / "state.json", hint=hint)
        if not (isinstance(state.get("step"), int) and isinstance(state.get("history"), dict)):
            raise UserError(f"{last / 'state.json'} is damaged: it lacks the step or the "
                            f"history; {hint}")
        load_lora_into_adapter(pipe.unet, last / LORA_WEIGHTS)
        load_optimizer_tensors(optimizer, load_file(str(last / "optimizer.safetensors")))
        start, history = state["step"], state["history"]
    if start % cfg.checkpoint_every == 0 and str(start) not in history["probe_loss"]:
        # step 0's, or an interval's probe that a stop cut short (its checkpoint was saved)
        history["probe_loss"][str(start)] = trainer.probe_loss()

    bar = None
    if progress and start < cfg.steps:
        from ..progress import progress_bar

        bar = progress_bar(total=cfg.steps, initial=start, unit="step", desc="lora")
    t0 = time.perf_counter()
    # Training seconds over every process of the run (saved with each checkpoint), so a
    # finished run asked again still tells what it cost; None for runs from before.
    seconds_before = history.get("seconds", 0.0 if start == 0 else None)

    def save(done: int) -> None:
        if seconds_before is not None:
            history["seconds"] = round(seconds_before + time.perf_counter() - t0, 3)
        _save_checkpoint(out, done, pipe.unet, optimizer, {"step": done, "history": history},
                         cfg.keep_checkpoints)

    pipe.unet.train()
    done = saved = start
    stop = StopSignals()
    try:
        stop.install()
        for step in range(start, cfg.steps):
            loss = trainer.step_loss(step)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            with stop.held():  # the update and its loss row are one step
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                history["loss"].append(loss.item())
                done = step + 1
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                pipe.unet.eval()
                history["probe_loss"][str(done)] = trainer.probe_loss()
                pipe.unet.train()
                save(done)
                saved = done
            if bar is not None:
                bar.set_postfix_str(f"loss {np.mean(history['loss'][-20:]):.4f}")
                bar.update(1)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (`Terminated`)
        # Keep what this call trained; the same command resumes from it along the same path
        # (each step draws from its own seed). No probe loss here: a stop at an interval's
        # step leaves it to the resumed run, which measures it first.
        if bar is not None:
            bar.close()
            bar = None
        if done > saved:
            save(done)
            print(f"attnseg: stopped after step {done} of {cfg.steps}; saved checkpoint "
                  f"{_checkpoints(out)[-1]}", file=sys.stderr)
        raise
    finally:
        stop.restore()
    if bar is not None:
        bar.close()
    pipe.unet.eval()
    trained = max(start, cfg.steps)
    weights = out / LORA_WEIGHTS
    if start != cfg.steps or not weights.is_file():
        # A finished run asked again for its own steps writes nothing: its LoRA file stays
        # the one that datasets synthesised with it recorded.
        if str(trained) not in history["probe_loss"]:  # fewer steps than already done
            history["probe_loss"][str(trained)] = trainer.probe_loss()
        weights = save_lora(pipe.unet, out)
        atomic_write_bytes(out / "history.json", json.dumps(history).encode())
    elapsed = time.perf_counter() - t0
    new_steps = max(0, cfg.steps - start)
    probes = history["probe_loss"]
    return {
        "out": str(out), "weights": str(weights), "steps": trained, "resumed_from": start,
        "new_steps": new_steps, "seconds": round(elapsed, 3),
        "train_seconds": history.get("seconds"),
        "steps_per_s": round(new_steps / elapsed, 3) if new_steps and elapsed > 0 else None,
        "probe_loss_start": probes["0"], "probe_loss_end": probes[str(trained)],
        "images": len(images), "model": cfg.model, "device": str(device),
        "dtype": str(dtype).replace("torch.", ""), "trainable_params": sum(p.numel()
                                                                           for p in params),
    }
