"""The toy world's text-to-image model: a small Stable Diffusion trained from scratch on rendered
source-domain scenes (`attnseg toy train-model`), shipped as `--model toy`.

It is made of the classes a real Stable Diffusion checkpoint is made of (a CLIP text model and
tokenizer, `AutoencoderKL`, `UNet2DConditionModel` with cross-attention at every level, a DDIM
scheduler), saved as a diffusers folder with safetensors weights, and loaded by the same
`StableDiffusionPipeline.from_pretrained` call as any SD 1.x folder. What is small:

- images 64x64; the VAE downsamples 4x (latents 4x16x16), so its cross-attention maps are
  16x16, 8x8 and 4x4 (image strides 4, 8 and 16);
- the text encoder is CLIP's embeddings (token + position) and final layer norm with no
  transformer layers: each word's embedding does not depend on its neighbours, which is what lets
  a model this small tie each class word to its own object (two causal layers gave maps that
  mixed the caption's words);
- the tokenizer's vocabulary is the toy world's words (classes, their synonyms and hyponyms,
  templates, backgrounds) plus the tiny model's, each one token.

Training (seeded and resumable: every batch is a function of (seed, step)) has two phases: the
VAE learns to reconstruct scenes, then the UNet and the text embeddings learn to denoise the
VAE's latents given captions (epsilon prediction, min-SNR-5 weighting, 10 % empty captions for
classifier-free guidance, an exponential moving average of the UNet that is what ships).
Training captions name every object, by its class word or, at `synonym_rate`, by a synonym or
hyponym of the lexicon, so prompt augmentation has words the model knows.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..adapt.prompt_augment import LEXICON_FILE, load_lexicon
from ..device import resolve_device
from ..errors import UserError
from ..files import atomic_write_bytes
from ..jsonfile import read_json
from ..models.tiny import TINY_WORDS
from ..optim_state import load_optimizer_tensors, optimizer_tensors
from ..prompts import data_file, fill_template, load_classes
from ..seeds import sample_seed
from ..settings import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, UnitFloat
from ..signals import StopSignals
from .world import BACKGROUND_WORDS, toy_class_words

# Prefixes of training captions; they match the toy templates' words.
_PREFIXES = ("", "a photo of ", "a picture of ", "a drawing of ", "a scene with ", "an image of ")


@dataclass
class ToyModelConfig:
    """One `attnseg toy train-model` job."""

    out: str = "out/toy-model"
    seed: int = 0
    # Training scenes are (render_seed, i) for i < num_scenes: keep it apart from the seeds
    # that render validation and test sets.
    render_seed: int = 1000
    num_scenes: PositiveInt = 20000
    size: PositiveInt = 64
    vae_channels: tuple[PositiveInt, ...] = (16, 32, 64)
    unet_channels: tuple[PositiveInt, ...] = (48, 96, 96)
    head_dim: PositiveInt = 32
    text_dim: PositiveInt = 64
    max_length: PositiveInt = 32
    vae_steps: NonNegativeInt = 3000
    vae_batch_size: PositiveInt = 16
    vae_lr: PositiveFloat = 1e-3
    unet_steps: NonNegativeInt = 17000
    batch_size: PositiveInt = 32
    lr: PositiveFloat = 5e-4
    caption_dropout: UnitFloat = 0.1
    synonym_rate: UnitFloat = 0.3
    ema_decay: UnitFloat = 0.999
    checkpoint_every: PositiveInt = 200
    # torch CPU threads (0: torch's default).
    threads: NonNegativeInt = 0
    # Where it trains ("auto": the GPU when there is one). Every random draw is made on the
    # CPU from (seed, step) and moved, so a run may resume on another device; weights then
    # agree with a one-device run up to the devices' arithmetic.
    device: str = "auto"
    # Stop after this many seconds of this run (0: no limit): checkpoint, export the model
    # trained so far (its card says how many steps), resume later where it stopped. For a
    # lent GPU's fixed minutes.
    time_limit_s: NonNegativeFloat = 0.0
    # A model exported by `attnseg toy train-model` (a folder, or `toy`: the shipped one) to
    # go on training instead of starting from random weights: its VAE, text encoder and UNet
    # (the EMA it shipped) and its step count, with fresh optimiser states (an export keeps
    # none). Batches stay those of (seed, step), so the run goes on where that model stopped.
    init_from: str = ""

    def __post_init__(self):
        self.vae_channels = tuple(self.vae_channels)  # a config file gives lists
        self.unet_channels = tuple(self.unet_channels)

    def validate(self) -> None:
        if self.size < 32 or self.size % 16:
            raise UserError(f"size {self.size} must be a multiple of 16, at least 32")
        for name in ("num_scenes", "batch_size", "vae_batch_size", "checkpoint_every",
                     "max_length", "text_dim", "head_dim"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1")
        for name in ("vae_steps", "unet_steps", "threads", "time_limit_s"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0")
        if not 0.0 <= self.caption_dropout < 1.0 or not 0.0 <= self.synonym_rate <= 1.0:
            raise UserError("caption_dropout must be in [0, 1) and synonym_rate in [0, 1]")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError("ema_decay must be in [0, 1)")
        if any(c % 16 for c in self.unet_channels + self.vae_channels):
            raise UserError("channels must be multiples of 16 (group norm uses 16 groups)")


# --------------------------------------------------------------------------------------------
# Vocabulary, captions and the model's components


def toy_words() -> list[str]:
    """Every word the toy model's tokenizer keeps whole."""
    lexicon = load_lexicon(data_file(LEXICON_FILE))
    words = list(TINY_WORDS)
    for c in load_classes("toy"):
        words.append(c.name)
        for phrase in lexicon.get(c.name.casefold(), []):
            words += phrase.split()
    for text in _PREFIXES + sum(BACKGROUND_WORDS.values(), ()):
        words += text.split()
    for line in data_file("templates_toy.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            words += [w for w in line.replace("{}", " ").split()]
    return list(dict.fromkeys(w.lower() for w in words))


def class_words() -> dict[str, list[str]]:
    """Per toy class: its name, then its lexicon words (synonyms and hyponyms)."""
    return toy_class_words()


def training_caption(rng: np.random.Generator, objects: list[str], words: dict[str, list[str]],
                     synonym_rate: float, domain: str = "source") -> str:
    """A caption naming every object once, in random order: "a picture of a disc and a star
    on a meadow"; a word is a synonym or hyponym at `synonym_rate`."""
    named = []
    for o in rng.permutation(objects):
        choices = words[str(o)]
        use_other = len(choices) > 1 and rng.random() < synonym_rate
        named.append(choices[1 + rng.integers(len(choices) - 1)] if use_other else choices[0])
    listed = [fill_template("a {}", w) for w in named]
    text = listed[0] if len(listed) == 1 else ", ".join(listed[:-1]) + " and " + listed[-1]
    prefix = _PREFIXES[rng.integers(len(_PREFIXES))]
    if prefix:
        text = prefix + text
    if rng.random() < 0.7:
        text += " on " + BACKGROUND_WORDS[domain][rng.integers(3)]
    return text


def build_components(cfg: ToyModelConfig):
    """(tokenizer, text encoder, VAE, UNet, scheduler), randomly initialised from `cfg.seed`."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..models.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer(toy_words(), max_length=cfg.max_length)
    torch.manual_seed(cfg.seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_dim, intermediate_size=2 * cfg.text_dim,
        num_hidden_layers=0, num_attention_heads=1, max_position_embeddings=cfg.max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    n = len(cfg.vae_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        block_out_channels=cfg.vae_channels,
                        down_block_types=("DownEncoderBlock2D",) * n,
                        up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=1,
                        norm_num_groups=16, sample_size=cfg.size)
    m = len(cfg.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=cfg.size // 2 ** (n - 1), in_channels=4, out_channels=4,
        block_out_channels=cfg.unet_channels, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * m, up_block_types=("CrossAttnUpBlock2D",) * m,
        cross_attention_dim=cfg.text_dim, norm_num_groups=16,
        attention_head_dim=tuple(max(1, c // cfg.head_dim) for c in cfg.unet_channels))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return tokenizer, text_encoder, vae, unet, scheduler


# --------------------------------------------------------------------------------------------
# Training


class ToyModelTrainer:
    """Trains the toy model into `cfg.out`, resuming from `cfg.out/checkpoint` if present.

    The folder holds `checkpoint/` (weights, EMA, optimiser states: safetensors; step and
    losses: JSON), `loss.json` and `loss.png` (the loss curves), and, when training finishes,
    `model/`: the diffusers folder to pass as `--model`."""

    def __init__(self, cfg: ToyModelConfig):
        cfg.validate()
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.device = resolve_device(cfg.device)
        (self.tokenizer, self.text_encoder, self.vae, self.unet,
         self.scheduler) = build_components(cfg)
        for module in (self.text_encoder, self.vae, self.unet):
            module.to(self.device)
        self.ema = {k: v.detach().clone() for k, v in self.unet.state_dict().items()}
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
        self.unet_opt = torch.optim.AdamW(
            list(self.unet.parameters()) + list(self.text_encoder.parameters()), lr=cfg.lr,
            weight_decay=0.0)
        self.step = 0  # steps done, VAE steps first
        self.losses: dict[str, list[list[float]]] = {"vae": [], "unet": []}
        # the losses since the last entry of `losses` (one every 50 steps), kept in a
        # checkpoint so a run stopped between entries resumes to the same curve
        self.loss_window: list[float] = []
        self.images: np.ndarray | None = None
        self.objects: list[list[str]] = []
        self.latents: torch.Tensor | None = None
        self.words = class_words()
        alphas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        self.alpha_bar = torch.cumprod(1 - alphas, 0).float().to(self.device)
        # The card of the model this run went on from (`init_from`), kept in every export.
        self.init_card: dict | None = None
        self._resume()
        if self.step == 0 and cfg.init_from:
            self._init_from(cfg.init_from)

    # -- state ---------------------------------------------------------------------------
    def _checkpoint_paths(self) -> tuple[Path, Path]:
        return self.out / "checkpoint" / "state.safetensors", self.out / "checkpoint" / "state.json"

    def _resume(self) -> None:
        from safetensors.torch import load_file

        weights, meta = self._checkpoint_paths()
        if not meta.exists():
            return
        info = read_json(meta, hint="use another --out, or delete that folder to start over")
        if info.get("config") != self._config_doc():
            raise UserError(f"{self.out} holds a toy-model training with other settings; "
                            "use another --out, or delete that folder to start over")
        tensors = load_file(str(weights))
        for name, module in (("vae", self.vae), ("text", self.text_encoder),
                             ("unet", self.unet)):
            module.load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items()
                                    if k.startswith(name + ".")})
        self.ema = {k[4:]: v.to(self.device) for k, v in tensors.items()
                    if k.startswith("ema.")}
        load_optimizer_tensors(self.vae_opt, tensors, {"param_groups": info["vae_opt"]},
                               "vae_opt.")
        load_optimizer_tensors(self.unet_opt, tensors, {"param_groups": info["unet_opt"]},
                               "unet_opt.")
        if "scaling_factor" in info:
            self.vae.register_to_config(scaling_factor=info["scaling_factor"])
        self.step = info["step"]
        self.losses = info["losses"]
        self.loss_window = info.get("loss_window", [])
        self.init_card = info.get("init_from")

    # What must match for an exported model's weights to load into this run's modules.
    _ARCHITECTURE = ("size", "vae_channels", "unet_channels", "head_dim", "text_dim",
                     "max_length")

    def _init_from(self, model: str) -> None:
        from ..models.loading import load_pipeline, model_source

        folder = Path(model_source(model)).expanduser()
        try:
            card = json.loads((folder / "attnseg_toy_model.json").read_text())
            steps, their_config = int(card["steps"]), dict(card["config"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"init_from {model}: not a model exported by `attnseg toy "
                            f"train-model` ({e})") from None
        wanted = {k: v for k, v in self._config_doc().items() if k in self._ARCHITECTURE}
        theirs = {k: their_config.get(k) for k in self._ARCHITECTURE}
        if wanted != json.loads(json.dumps(theirs)):
            raise UserError(f"init_from {model}: its architecture {theirs} differs from this "
                            f"run's {wanted}")
        if steps < self.cfg.vae_steps:
            raise UserError(f"init_from {model}: it stopped at step {steps}, inside "
                            f"the VAE phase ({self.cfg.vae_steps} steps); resume its own run")
        # Loaded as `--model` loads it (safetensors only), widened to fp32 for training.
        pipe = load_pipeline(str(folder), torch.device("cpu"), torch.float32)
        for name, module in (("vae", self.vae), ("text_encoder", self.text_encoder),
                             ("unet", self.unet)):
            try:
                module.load_state_dict(getattr(pipe, name).state_dict())
            except RuntimeError as e:
                first = str(e).strip().splitlines()[0]
                raise UserError(f"init_from {model}: its {name} weights do not load ({first})"
                                ) from None
        self.vae.register_to_config(scaling_factor=float(pipe.vae.config.scaling_factor))
        self.ema = {k: v.detach().clone() for k, v in self.unet.state_dict().items()}
        self.step = steps
        self.init_card = {"model": str(folder), "steps": steps, "config": their_config}

    def _config_doc(self) -> dict:
        doc = asdict(self.cfg)
        # These change nothing already learnt: a run may be extended by raising unet_steps.
        for k in ("out", "checkpoint_every", "threads", "unet_steps", "device",
                  "time_limit_s"):
            doc.pop(k)
        return json.loads(json.dumps(doc))

    def save_checkpoint(self) -> None:
        from safetensors.torch import save

        tensors = {}
        for name, module in (("vae", self.vae), ("text", self.text_encoder),
                             ("unet", self.unet)):
            tensors.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
        tensors.update({f"ema.{k}": v for k, v in self.ema.items()})
        vae_t, vae_meta = optimizer_tensors(self.vae_opt, "vae_opt.")
        unet_t, unet_meta = optimizer_tensors(self.unet_opt, "unet_opt.")
        if vae_meta["scalars"] or unet_meta["scalars"]:  # AdamW keeps tensors only
            raise RuntimeError("the toy model's optimisers hold non-tensor state")
        vae_groups, unet_groups = vae_meta["param_groups"], unet_meta["param_groups"]
        tensors.update(vae_t)
        tensors.update(unet_t)
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        info = {"step": self.step, "config": self._config_doc(), "losses": self.losses,
                "loss_window": self.loss_window,
                "vae_opt": vae_groups, "unet_opt": unet_groups}
        if self.init_card is not None:
            info["init_from"] = self.init_card
        if self.step > self.cfg.vae_steps or self.cfg.vae_steps == 0:
            info["scaling_factor"] = float(self.vae.config.scaling_factor)
        weights, meta = self._checkpoint_paths()
        weights.parent.mkdir(parents=True, exist_ok=True)
        # Weights first, then the JSON that says which step they belong to.
        atomic_write_bytes(weights, save(tensors))
        atomic_write_bytes(meta, json.dumps(info).encode())
        atomic_write_bytes(self.out / "loss.json", json.dumps(self.losses).encode())
        self._plot_losses()

    def _plot_losses(self) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:  # the plot is optional (the `bench` extra); loss.json has it all
            return
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        for ax, phase in zip(axes, ("vae", "unet"), strict=True):
            pts = np.array(self.losses[phase]) if self.losses[phase] else np.zeros((0, 2))
            if len(pts):
                ax.plot(pts[:, 0], pts[:, 1])
            ax.set_title(f"{phase} loss")
            ax.set_xlabel("step")
            ax.set_yscale("log")
        fig.tight_layout()
        path = self.out / "loss.png"
        tmp = path.with_name(path.stem + ".tmp.png")
        fig.savefig(tmp, dpi=80)
        plt.close(fig)
        tmp.replace(path)

    # -- data ----------------------------------------------------------------------------
    def _render(self, progress: bool) -> None:
        from .world import render_scene

        cfg = self.cfg
        names = tuple(c.name for c in load_classes("toy"))
        images = np.zeros((cfg.num_scenes, cfg.size, cfg.size, 3), np.uint8)
        bar = _bar(progress, cfg.num_scenes, "render", "img")
        for i in range(cfg.num_scenes):
            scene = render_scene(sample_seed(cfg.render_seed, i), cfg.size, cfg.size, "source",
                                 3, names)
            images[i] = scene.image
            self.objects.append(scene.objects)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        self.images = images

    def _pixels(self, idx: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(self.images[idx]).permute(0, 3, 1, 2).float()
        return (x / 127.5 - 1.0).to(self.device)

    @torch.no_grad()
    def _encode_all(self) -> None:
        self.vae.eval()
        out = []
        for i in range(0, len(self.images), 256):
            x = self._pixels(np.arange(i, min(i + 256, len(self.images))))
            out.append(self.vae.encode(x).latent_dist.mean)
        self.latents = torch.cat(out)

    # -- steps ---------------------------------------------------------------------------
    def _vae_step(self, step: int) -> float:
        cfg = self.cfg
        rng = np.random.default_rng((cfg.seed, 1, step))
        gen = torch.Generator().manual_seed(sample_seed(cfg.seed, step))
        x = self._pixels(rng.integers(len(self.images), size=cfg.vae_batch_size))
        dist = self.vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen).to(self.device)
        recon = self.vae.decode(z).sample
        kl = 0.5 * (dist.mean**2 + dist.var - 1.0 - dist.logvar).sum(dim=(1, 2, 3)).mean()
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * kl
        self.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.vae_opt.step()
        return loss.item()

    def _unet_step(self, step: int) -> float:
        cfg = self.cfg
        rng = np.random.default_rng((cfg.seed, 2, step))
        gen = torch.Generator().manual_seed(sample_seed(cfg.seed, step))
        idx = rng.integers(len(self.latents), size=cfg.batch_size)
        captions = ["" if rng.random() < cfg.caption_dropout else
                    training_caption(rng, self.objects[i], self.words, cfg.synonym_rate)
                    for i in idx]
        ids = self.tokenizer(captions, padding="max_length", max_length=cfg.max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        z0 = self.latents[torch.from_numpy(idx).to(self.device)] * self.vae.config.scaling_factor
        t = torch.randint(0, 1000, (cfg.batch_size,), generator=gen).to(self.device)
        noise = torch.randn(z0.shape, generator=gen).to(self.device)
        ab = self.alpha_bar[t].view(-1, 1, 1, 1)
        zt = ab.sqrt() * z0 + (1 - ab).sqrt() * noise
        text = self.text_encoder(ids)[0]
        pred = self.unet(zt, t, encoder_hidden_states=text).sample
        snr = ab.flatten() / (1 - ab.flatten())
        weight = torch.clamp(snr, max=5.0) / snr  # min-SNR-5 for epsilon prediction
        loss = ((pred - noise) ** 2).mean(dim=(1, 2, 3)).mul(weight).mean()
        self.unet_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.unet_opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            # One fused update over every tensor (a GPU launches a few kernels per step, not
            # a few per tensor); the same arithmetic as a loop over them.
            live = self.unet.state_dict()
            floats = [k for k, v in live.items() if v.dtype.is_floating_point]
            ema = [self.ema[k] for k in floats]
            torch._foreach_mul_(ema, decay)
            torch._foreach_add_(ema, [live[k] for k in floats], alpha=1 - decay)
            for k, v in live.items():
                if not v.dtype.is_floating_point:
                    self.ema[k].copy_(v)
        return loss.item()

    def _set_scaling_factor(self) -> None:
        std = float(self.latents.std())
        self.vae.register_to_config(scaling_factor=1.0 / std)

    # -- the whole run -------------------------------------------------------------------
    def train(self, progress: bool = True) -> Path:
        """Train to the end (resuming where a previous run stopped); the exported model."""
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        total = cfg.vae_steps + cfg.unet_steps
        self._render(progress)
        bar = _bar(progress, total, "train", "step", initial=self.step)
        started = time.time()
        deadline = started + cfg.time_limit_s if cfg.time_limit_s else None
        saved = self.step
        stop = StopSignals()
        try:
            stop.install()
            while self.step < total:
                if self.step >= cfg.vae_steps and self.latents is None:
                    self._encode_all()
                    # A run going on from a model keeps the factor its UNet learnt with.
                    if "scaling_factor" not in self._stored_info() and self.init_card is None:
                        self._set_scaling_factor()
                with stop.held():  # a step's update and EMA are whole or not at all
                    if self.step < cfg.vae_steps:
                        self.vae.train()
                        loss = self._vae_step(self.step)
                        phase = "vae"
                    else:
                        self.vae.requires_grad_(False)
                        self.unet.train()
                        self.text_encoder.train()
                        loss = self._unet_step(self.step - cfg.vae_steps)
                        phase = "unet"
                    self.step += 1
                    self.loss_window.append(loss)
                    out_of_time = deadline is not None and time.time() > deadline
                    if self.step % 50 == 0 or self.step in (cfg.vae_steps, total) or out_of_time:
                        mean = float(np.mean(self.loss_window))
                        self.losses[phase].append([self.step, mean])
                        self.loss_window = []
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(phase=phase, loss=f"{loss:.4f}")
                if (self.step % cfg.checkpoint_every == 0 or self.step in (cfg.vae_steps, total)
                        or out_of_time):
                    self.save_checkpoint()
                    saved = self.step
                if out_of_time:
                    break
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (`Terminated`): keep what it trained
            if bar is not None:
                bar.close()
            if self.step > saved:
                with stop.held():  # its two files belong together: a second signal waits
                    self.save_checkpoint()
                print(f"attnseg: stopped after step {self.step} of {total}; saved a "
                      f"checkpoint in {self.out}", file=sys.stderr)
            raise
        finally:
            stop.restore()
        if bar is not None:
            bar.close()
        if self.latents is None:
            self._encode_all()
        model = self.export(self.out / "model")
        self._write_samples(model)
        stopped = "" if self.step == total else " (stopped by time_limit_s; rerun to resume)"
        print(f"trained {self.step} of {total} steps{stopped} ({time.time() - started:.0f} s "
              f"in this run); model in {model}")
        return model

    def _stored_info(self) -> dict:
        meta = self._checkpoint_paths()[1]
        return read_json(meta) if meta.exists() else {}

    def pipeline(self, ema: bool = True):
        """The StableDiffusionPipeline of the current weights (the UNet's EMA if `ema`)."""
        from ..models.tiny import _assemble

        # Copies: exporting (fp16, CPU) must not convert the modules a run goes on training.
        unet = copy.deepcopy(self.unet)
        if ema:
            unet.load_state_dict(self.ema)
        pipe = _assemble(copy.deepcopy(self.vae), copy.deepcopy(self.text_encoder),
                         self.tokenizer, unet, self.scheduler, torch.float32)
        return pipe.to(self.device)

    def export(self, folder: Path, dtype: torch.dtype = torch.float16) -> Path:
        """Write the model as a diffusers folder (safetensors weights in `dtype`)."""
        import shutil

        from ..files import tmp_name
        from ..models.tiny import tiny_tokenizer

        pipe = self.pipeline().to("cpu", dtype=dtype)
        # A fresh tokenizer: one that has tokenized training batches keeps their padding and
        # truncation settings in its saved state, so the folder would depend on the process.
        pipe.tokenizer = tiny_tokenizer(toy_words(), max_length=self.cfg.max_length)
        tmp = tmp_name(folder)
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        card = {"trained_by": "attnseg toy train-model", "config": asdict(self.cfg),
                "steps": self.step}
        if self.init_card is not None:
            card["init_from"] = self.init_card
        (tmp / "attnseg_toy_model.json").write_text(json.dumps(card, indent=1) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        tmp.replace(folder)
        return folder

    def _write_samples(self, model: Path) -> None:
        """`OUT/samples.png`: one row of the exported model's samples of `SAMPLE_PROMPTS`,
        loaded as `--model` loads it."""
        from PIL import Image

        from ..models.loading import load_pipeline

        pipe = load_pipeline(str(model), torch.device("cpu"), torch.float32)
        images = sample_toy(pipe, list(SAMPLE_PROMPTS))
        row = np.concatenate(list(images), axis=1)
        sheet = Image.fromarray(row).resize((row.shape[1] * 3, row.shape[0] * 3),
                                            Image.NEAREST)
        path = self.out / "samples.png"
        tmp = path.with_name(path.stem + ".tmp.png")
        sheet.save(tmp)
        tmp.replace(path)


# What `attnseg toy train-model` draws into OUT/samples.png when a run ends: each class alone,
# then two two-object captions.
SAMPLE_PROMPTS = ("a photo of a circle", "a photo of a square", "a photo of a triangle",
                  "a photo of a star", "a photo of a ring", "a photo of a cross",
                  "a photo of a circle and a square", "a photo of a ring and a star")


def _bar(progress: bool, total: int, desc: str, unit: str, initial: int = 0):
    if not progress:
        return None
    from ..progress import progress_bar

    return progress_bar(total=total, initial=initial, desc=desc, unit=unit)


def sample_toy(pipe, prompts: list[str], seed: int = 0, steps: int = 25, guidance: float = 4.0):
    """Images (uint8 [N, H, W, 3]) of `prompts` from a toy pipeline (for looking at it)."""
    gen = torch.Generator().manual_seed(seed)
    out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gen,
               height=pipe.unet.config.sample_size * pipe.vae_scale_factor,
               width=pipe.unet.config.sample_size * pipe.vae_scale_factor, output_type="np")
    return (np.clip(out.images, 0, 1) * 255).round().astype(np.uint8)

