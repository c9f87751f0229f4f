"""Loading text-to-image models: the built-in random ones, hub ids, diffusers folders and single
checkpoint files; their tokenizers; and a fingerprint of their weights.

Light at import time (torch and diffusers are imported inside the functions), so the command
line can check a `--model` before anything heavy loads.

Untrusted weights: only safetensors are read unless the caller passes `allow_pickle=True`
(`--allow-pickle`): a pickle (.bin, .ckpt, .pt) can run code when it is loaded.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

from ..errors import UserError, first_line

# Built-in models with random weights: name -> its builder in pipeline/models/tiny.py (imported only
# when one is loaded: this module stays light).
RANDOM_BUILDERS = {"tiny": "build_tiny_pipeline", "sd15-random": "build_sd15_random_pipeline",
                   "tiny-sdxl": "build_tiny_sdxl_pipeline",
                   "sdxl-random": "build_sdxl_random_pipeline",
                   "tiny-pixart": "build_tiny_pixart_pipeline",
                   "tiny-sd3": "build_tiny_sd3_pipeline",
                   "tiny-flux": "build_tiny_flux_pipeline",
                   "flux-random": "build_flux_random_pipeline"}
RANDOM_MODELS = tuple(RANDOM_BUILDERS)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# Diffusers folders keep each sub-network's weights in a subfolder of its own.
_WEIGHT_FOLDERS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3",
                   "vae")
# Model families by diffusers pipeline class; harvesting supports these.
FAMILIES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl",
            "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux",
            "PixArtSigmaPipeline": "pixart", "PixArtAlphaPipeline": "pixart"}
SUPPORTED_FAMILIES = ("sd", "sdxl", "pixart", "sd3", "flux")


def model_family(pipe_or_class) -> str:
    """"sd" (1.x/2.x), "sdxl", "sd3", "flux", "pixart", or the pipeline's class name for any
    other, from a pipeline or its class name."""
    name = pipe_or_class if isinstance(pipe_or_class, str) else type(pipe_or_class).__name__
    return FAMILIES.get(name, name)


def _check_family(model: str, class_name: str) -> None:
    family = model_family(class_name)
    if family not in SUPPORTED_FAMILIES:
        raise UserError(f"model {model!r} is a {class_name} ({family}); harvesting supports "
                        "Stable Diffusion 1.x/2.x, SDXL, PixArt, SD3 and Flux")


def denoiser(pipe):
    """The network that denoises: the UNet of SD/SDXL, the transformer of PixArt, SD3 and
    Flux."""
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else pipe.transformer


# PixArt-Sigma's T5 context (its pipeline's default; the tokenizer allows more).
PIXART_MAX_TOKENS = 300
# Flux's T5 context (FluxPipeline's default; FLUX.1-schnell's tokenizer allows 256).
FLUX_MAX_TOKENS = 512
# SD3's T5 context (its pipeline's default).
SD3_MAX_TOKENS = 256


def class_weights(pipe, specs, merge: str = "sum"):
    """[B, L, C] token-to-class weights over the text sequence the denoiser attends to, and
    [B, C] class ids (`prompts.class_token_weights`): SD3 with its T5 encoder attends to CLIP's
    77 positions then T5's, and a class word weighs on its tokens in both; every other model
    reads one tokenizer's positions (`prompt_tokenizer`)."""
    from ..prompts import class_token_weights, sequence_token_weights

    if model_family(pipe) == "sd3" and getattr(pipe, "text_encoder_3", None) is not None:
        return sequence_token_weights([(pipe.tokenizer, pipe.tokenizer_max_length),
                                       (pipe.tokenizer_3, SD3_MAX_TOKENS)], specs, merge)
    return class_token_weights(prompt_tokenizer(pipe), specs, merge)


def prompt_tokenizer(pipe):
    """The tokenizer of the text sequence the denoiser attends to, where class words are
    located: T5's for Flux (its CLIP gives only the pooled prompt), else `pipe.tokenizer`
    (SDXL's and SD3's CLIP tokenizers agree on positions; PixArt's is T5)."""
    return pipe.tokenizer_2 if model_family(pipe) == "flux" else pipe.tokenizer


def pack_latents(latents):
    """Flux's token layout of latents: [B, C, H, W] -> [B, (H/2)(W/2), 4C], each token a 2x2
    patch (channels outer, patch rows, patch columns), as FluxPipeline packs them."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def initial_latents(pipe, size: tuple[int, int], seeds):
    """Gaussian starting latents for images of `size` (H, W), one CPU generator per seed, so
    any device gives the same noise; in the denoiser's layout and dtype (Flux: packed)."""
    import torch

    net = denoiser(pipe)
    packed = model_family(pipe) == "flux"
    channels = net.config.in_channels // 4 if packed else net.config.in_channels
    shape = (channels, size[0] // pipe.vae_scale_factor, size[1] // pipe.vae_scale_factor)
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s))
                         for s in seeds])
    if packed:
        noise = pack_latents(noise)
    return noise.to(device=pipe.device, dtype=net.dtype)


def token_stride(pipe) -> int:
    """Image pixels per image token of a DiT pipeline: the VAE's stride times the patch
    (Flux packs 2x2 latent pixels into a token)."""
    patch = 2 if model_family(pipe) == "flux" else pipe.transformer.config.patch_size
    return pipe.vae_scale_factor * patch


def check_image_size(pipe, height: int, width: int) -> None:
    """Refuse, in one line, a size the pipeline would silently change: Flux packs 2x2 latent
    patches, so its sides must be multiples of its token stride."""
    if model_family(pipe) != "flux":
        return
    unit = token_stride(pipe)
    if height % unit or width % unit:
        raise UserError(f"Flux packs 2x2 latent patches: --height and --width must be "
                        f"multiples of {unit}, not {height}x{width}")


def generation_kwargs(pipe) -> dict:
    """Keyword arguments a family's pipeline call needs beyond the common ones: PixArt
    generates at the asked size (no aspect-ratio binning, which would resize the image after
    the attention was harvested at another size), without caption cleaning (it needs extra
    packages and rewrites the words the class tokens were located in), with a T5 context that
    the class-token weights match; Flux with its T5 context no longer than its tokenizer's;
    SD3 with the T5 context `class_weights` lays out."""
    family = model_family(pipe)
    if family == "flux":
        return {"max_sequence_length": min(FLUX_MAX_TOKENS, pipe.tokenizer_2.model_max_length)}
    if family == "sd3":
        return {"max_sequence_length": SD3_MAX_TOKENS}
    if family != "pixart":
        return {}
    return {"use_resolution_binning": False, "clean_caption": False,
            "max_sequence_length": min(PIXART_MAX_TOKENS, pipe.tokenizer.model_max_length)}


# The image size a model generates by default (`--height/--width` not given; the help texts
# are written from this table): the toy model's is the size it was trained at; any other model
# gets DEFAULT_SIZE (a real SDXL checkpoint's native 1024 is asked for with --height/--width).
DEFAULT_SIZES = {"tiny": 128, "tiny-sdxl": 128, "tiny-pixart": 128, "tiny-sd3": 128,
                 "tiny-flux": 128, "toy": 64, "sdxl-random": 1024, "flux-random": 1024}
DEFAULT_SIZE = 512


def default_size(model: str) -> int:
    """The image size a model generates by default (`DEFAULT_SIZES`, else `DEFAULT_SIZE`)."""
    return DEFAULT_SIZES.get(model, DEFAULT_SIZE)


def random_model_notice(model: str) -> str | None:
    """The note for a built-in random model (any of `RANDOM_MODELS`): its outputs mean
    nothing. None for any other model."""
    if model not in RANDOM_MODELS:
        return None
    return (f"model {model!r} is one of attnseg's built-in random models: its images are "
            "noise and its masks carry no meaning (it exercises the code, not the method)")


def shipped_model_path() -> Path:
    """The folder of the shipped toy model (`attnseg toy train-model`'s model/, copied into
    the package's data folder)."""
    from ..prompts import data_file

    return data_file("toy-model")


def model_source(model: str) -> str:
    """What `model` loads from: the shipped folder for `toy`, else `model` itself."""
    if model != "toy":
        return model
    path = shipped_model_path()
    if not (path / "model_index.json").is_file():
        raise UserError(f"the toy model is missing from this install ({path}); "
                        "train one with `attnseg toy train-model` and pass its folder")
    return str(path)


def latent_stride(model: str) -> int:
    """Image pixels per latent pixel of `model`, read from its VAE config where it is a
    folder (without loading weights); 8, every Stable Diffusion's, otherwise."""
    import json

    if model in RANDOM_MODELS:
        return 8
    config = Path(model_source(model)).expanduser() / "vae" / "config.json"
    try:
        blocks = json.loads(config.read_text())["block_out_channels"]
    except (OSError, ValueError, KeyError, TypeError):
        return 8
    return 2 ** (len(blocks) - 1)


def _pickle_only_parts(folder: Path) -> list[str]:
    """Sub-networks of a diffusers folder whose weights exist only as pickles."""
    parts = []
    for name in _WEIGHT_FOLDERS:
        sub = folder / name
        if not sub.is_dir():
            continue
        files = [f for f in sub.iterdir() if f.is_file()]
        if any(f.suffix in PICKLE_SUFFIXES for f in files) and \
                not any(f.suffix == ".safetensors" for f in files):
            parts.append(name)
    return parts


def check_model_path(model: str, allow_pickle: bool = False) -> Path:
    """Check a --model that is not built at random, without loading it; its path (which need
    not exist for a hub id). Pickle weights are refused unless `allow_pickle`."""
    model = model_source(model)
    path = Path(model).expanduser()
    looks_like_path = model.startswith((".", "/", "~")) or path.suffix != "" or path.exists()
    if path.suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise UserError(f"model {model}: pickle checkpoints are not loaded (they can run code); "
                        "convert it to .safetensors, or pass --allow-pickle if you trust it")
    if looks_like_path and not path.exists():
        raise UserError(f"model path {model} does not exist")
    if path.is_file() and path.suffix != ".safetensors" and path.suffix not in PICKLE_SUFFIXES:
        raise UserError(f"model file {model} is not a .safetensors checkpoint")
    if path.is_dir() and not allow_pickle:
        pickled = _pickle_only_parts(path)
        if pickled:
            raise UserError(f"model folder {model} holds only pickle weights (.bin) for "
                            f"{', '.join(pickled)}; they can run code when loaded: convert them "
                            "to safetensors, or pass --allow-pickle if you trust them")
    return path


def load_pipeline(model: str, device, dtype, loras=(), allow_pickle: bool = False):
    """A diffusers pipeline of a supported family (SD 1.x/2.x, SDXL, PixArt, SD3, Flux) from a
    built-in random model (`RANDOM_BUILDERS`), 'toy' (the shipped toy-world model), a hub id, a
    folder or one .safetensors file (the pipeline class comes from the folder's
    model_index.json; other families are refused in one line). Hub ids resolve from the local
    cache when HF_HUB_OFFLINE=1. Only safetensors weights are read unless `allow_pickle`.

    `loras` (lora.LoraSpec) are fused into the UNet (and text encoder) with their scales."""
    import diffusers
    import torch
    import transformers

    from . import tiny

    if model in RANDOM_BUILDERS:
        # Drawn where they will run: a GPU draws flux-random's 12 B parameters in seconds.
        with torch.device(device):
            pipe = getattr(tiny, RANDOM_BUILDERS[model])(dtype=dtype)
    else:
        path = check_model_path(model, allow_pickle)
        model = model_source(model)
        source = str(path) if path.exists() else model
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()  # its text encoders' loading bar

        def load(local_files_only: bool = False):
            try:
                with warnings.catch_warnings():
                    # Newer diffusers renamed torch_dtype; the old name works across versions.
                    warnings.simplefilter("ignore", FutureWarning)
                    # The hub client warns about arguments diffusers still passes it.
                    warnings.filterwarnings("ignore", category=UserWarning,
                                            module="huggingface_hub")
                    class_name = (_single_file_class(path) if path.is_file() else
                                  diffusers.DiffusionPipeline.load_config(
                                      source, local_files_only=local_files_only)["_class_name"])
                    _check_family(model, class_name)
                    cls = getattr(diffusers, class_name)
                    kwargs = dict(torch_dtype=dtype)
                    if model_family(class_name) == "sd":
                        kwargs.update(safety_checker=None, requires_safety_checker=False)
                    if path.is_file():
                        return cls.from_single_file(str(path), **kwargs)
                    return cls.from_pretrained(
                        source, use_safetensors=None if allow_pickle else True,
                        local_files_only=local_files_only, **kwargs)
            except UserError:
                raise
            except Exception as e:  # diffusers/hub raise many types; report them on one line
                raise UserError(f"could not load model {model!r}: {_load_failure(e)}") \
                    from None

        pipe = load() if path.exists() else from_hub(model, load)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if loras:
        from .lora import apply_loras

        apply_loras(pipe, list(loras))
    return pipe


def _cached_hub_file(repo_id: str, filename: str) -> str | None:
    """The path of `filename` of hub repo `repo_id` in the local hub cache, else None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename)
    except Exception:  # not a repo id at all: nothing cached under it
        return None
    return found if isinstance(found, str) else None


def _hub_offline() -> bool:
    from huggingface_hub import constants

    check = getattr(constants, "is_offline_mode", None)
    return bool(check() if check is not None else constants.HF_HUB_OFFLINE)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host (or the proxy the environment names for it) takes a TCP
    connection within about `timeout` seconds, name lookup included (the probe runs in a
    thread that is not waited for longer)."""
    import socket
    import threading
    import urllib.parse
    import urllib.request

    from huggingface_hub import constants

    url = urllib.parse.urlsplit(constants.ENDPOINT)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        url = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    try:
        address = (url.hostname, url.port or (443 if url.scheme == "https" else 80))
    except ValueError:  # a malformed port
        return False
    answered: list[bool] = []

    def probe():
        try:
            with socket.create_connection(address, timeout=timeout):
                answered.append(True)
        except (OSError, UnicodeError):
            answered.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(answered and answered[0])


def from_hub(model: str, load):
    """`load(local_files_only)` for the hub id `model`: from the local hub cache first (the
    hub is not asked, as with HF_HUB_OFFLINE=1), from the hub only where the cache cannot
    serve it, and then only after a quick check that the hub answers; else one line at once
    (the hub client would retry an unreachable host for half a minute and then say that the
    repo has no model_index.json)."""
    offline = _hub_offline()
    why_not = ("HF_HUB_OFFLINE is set" if offline else
               "the hub cannot be reached (no network?)")
    if _cached_hub_file(model, "model_index.json") is not None:
        try:
            return load(True)
        except UserError as e:
            if offline or not hub_reachable():
                raise UserError(f"{model}: the local cache holds only part of it ({e}) and "
                                f"{why_not}") from None
    elif offline or not hub_reachable():
        raise UserError(f"{model}: not in the local cache and {why_not}")
    return load(False)


# --scheduler names: diffusers class and config changes.
SCHEDULERS = {
    "lcm": ("LCMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpm": ("DPMSolverMultistepScheduler", {}),
    # SDXL-Turbo / SD-Turbo's sampler: ancestral Euler from the last timestep down.
    "turbo": ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}),
}


# The samplers above step a noise-prediction (DDPM) schedule. SD3 and Flux are flow-matching
# models: a discrete sampler built from their FlowMatchEulerDiscreteScheduler's config gets
# the default beta schedule (wrong noise levels: SD3 runs on and makes noise), and Flux's
# pipeline passes `mu` (its resolution-dependent timestep shift) that only flow-matching
# samplers take. They keep their own sampler.
FLOW_MATCHING_FAMILIES = ("sd3", "flux")
# The family of each built-in random model (and of toy, an SD 1.x folder), known by name.
RANDOM_FAMILIES = {"tiny": "sd", "sd15-random": "sd", "tiny-sdxl": "sdxl", "sdxl-random": "sdxl",
                   "tiny-pixart": "pixart", "tiny-sd3": "sd3", "tiny-flux": "flux",
                   "flux-random": "flux", "toy": "sd"}


def known_family(model: str) -> str | None:
    """A model's family without loading it: by name for the built-in models, from the
    model_index.json of a folder or of a hub id in the local cache, from the header of a
    .safetensors file; None when it cannot be told before loading."""
    if model in RANDOM_FAMILIES:
        return RANDOM_FAMILIES[model]
    try:
        path = Path(model).expanduser()
        if path.is_file():
            return model_family(_single_file_class(path)) if path.suffix == ".safetensors" \
                else None
        index = path / "model_index.json"
        if not index.is_file():
            index = _cached_hub_file(model, "model_index.json")
        if index is None:
            return None
        import json

        return model_family(json.loads(Path(index).read_text())["_class_name"])
    except Exception:  # anything unreadable is reported when the model loads
        return None


def check_scheduler(name: str | None, model: str | None = None, family: str | None = None,
                    flow: bool | None = None) -> None:
    """Refuse in one line an unknown --scheduler, or any for a flow-matching model (`flow`;
    by default told by `family`, else by `known_family(model)` before anything loads)."""
    if not name:
        return
    if name not in SCHEDULERS:
        raise UserError(f"unknown scheduler {name!r}; choose from {sorted(SCHEDULERS)} "
                        "(or leave it out for the model's own)")
    if family is None and model is not None:
        family = known_family(model)
    if not (flow if flow is not None else family in FLOW_MATCHING_FAMILIES):
        return
    which = f"model {model!r}" if model else "this model"
    raise UserError(f"--scheduler {name} does not fit {which} ({family}, a flow-matching "
                    "model): it takes no --scheduler (leave it out: its own flow-matching "
                    f"Euler sampler runs); {', '.join(sorted(SCHEDULERS))} are for SD 1.x/2.x, "
                    "SDXL and PixArt")


def scheduler_note(name: str | None, guidance: float, model: str, loras=()) -> str | None:
    """What a few-step --scheduler does where the run may not be what it was made for (a line
    for the user, not an error: the maps are harvested either way): turbo with
    classifier-free guidance, lcm without an LCM-LoRA (told by 'lcm' in a --lora or model
    name)."""
    if name == "turbo" and guidance > 1:
        return (f"--scheduler turbo is the sampler SD-Turbo and SDXL-Turbo were distilled for "
                f"(1-4 steps without guidance); at --guidance {guidance:g} every step runs "
                "the model twice and a Turbo model's images come out over-saturated: give "
                "--guidance 0 for a Turbo model")
    if name == "lcm" and not any("lcm" in str(s).lower() for s in (model, *loras)):
        return ("--scheduler lcm samples as a latent-consistency model expects; without an "
                "LCM-LoRA (--lora lcm-lora...safetensors, no 'lcm' in any --lora or --model "
                f"name here) model {model!r} is not one, and its few-step images come out "
                "blurred")
    return None


def set_scheduler(pipe, name: str | None) -> None:
    """Give `pipe` the named sampler, built from its own scheduler's config (the noise
    schedule stays the model's); None or "": keep the model's. A flow-matching model (SD3,
    Flux, or any whose own sampler is a flow-matching one) is refused in one line."""
    if not name:
        return
    family = model_family(pipe)
    flow = family in FLOW_MATCHING_FAMILIES or \
        type(pipe.scheduler).__name__.startswith("FlowMatch")
    check_scheduler(name, getattr(pipe, "name_or_path", None) or None, family, flow)
    import diffusers

    cls_name, changes = SCHEDULERS[name]
    cls = getattr(diffusers, cls_name)
    pipe.scheduler = cls.from_config(dict(pipe.scheduler.config, **changes))


def _single_file_class(path: Path) -> str:
    """The pipeline class of a single-file checkpoint: SDXL's have a second text encoder under
    conditioner.embedders.1 (read from the safetensors header only); anything else loads as
    Stable Diffusion 1.x/2.x."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            if any(k.startswith("conditioner.embedders.1.") for k in f.keys()):
                return "StableDiffusionXLPipeline"
    return "StableDiffusionPipeline"


def _load_failure(e: Exception) -> str:
    """The cause of a failed load, on one line. Diffusers wraps some causes in a message that
    points at a stack trace the user never sees; the cause is then the chained exception."""
    line = first_line(e)
    cause = e.__cause__ or e.__context__
    at = max(line.lower().find("stacktrace above"), line.lower().find("stack trace above"))
    if at >= 0:
        # Drop the sentence that points at the trace (not at the first ".": paths have dots).
        line = line[: line.rfind(". ", 0, at) + 1 or at].rstrip(" .")
        if cause is not None:
            line += f": {first_line(cause)}"
    return line


def load_tokenizer(model: str, allow_pickle: bool = False):
    """The tokenizer of the text a model attends to (`prompt_tokenizer`), without its
    weights where the model is a folder or hub id (a single .safetensors checkpoint is loaded
    whole: its tokenizer comes from its config)."""
    if model in RANDOM_MODELS:  # the built-in models share a generated vocabulary
        from .tiny import tiny_t5_tokenizer, tiny_tokenizer

        return (tiny_t5_tokenizer() if model in ("tiny-pixart", "tiny-flux")
                else tiny_tokenizer())
    path = check_model_path(model, allow_pickle)
    if path.is_file():
        import torch

        return prompt_tokenizer(load_pipeline(model, torch.device("cpu"), torch.float32,
                                              allow_pickle=allow_pickle))
    import diffusers
    from transformers import AutoTokenizer

    model = model_source(model)
    source = str(path) if path.exists() else model

    def load(local_files_only: bool = False):
        try:
            family = model_family(diffusers.DiffusionPipeline.load_config(
                source, local_files_only=local_files_only)["_class_name"])
            # Flux's class words are in its T5 sequence (see `prompt_tokenizer`).
            return AutoTokenizer.from_pretrained(
                source, subfolder="tokenizer_2" if family == "flux" else "tokenizer",
                local_files_only=local_files_only)
        except Exception as e:  # hub/transformers raise many types; report them on one line
            raise UserError(f"could not load the tokenizer of model {model!r}: "
                            f"{first_line(e)}") from None

    return load() if path.exists() else from_hub(model, load)


def weights_fingerprint(modules, keep=lambda name: True) -> str:
    """A short content hash of modules' weights (names, shapes and a strided sample of values),
    over the parameters whose names `keep` accepts. Configs are left out: libraries add
    bookkeeping keys to them on save."""
    import numpy as np
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for part in modules:
            for name, p in part.named_parameters():
                if not keep(name):
                    continue
                sample = p.detach().flatten()[::997].double().cpu()
                h.update(f"{name}:{tuple(p.shape)}".encode())
                h.update(np.float64(sample.sum().item()).tobytes())
    return h.hexdigest()[:16]


def model_fingerprint(pipe) -> str:
    """The content hash of a pipeline's denoiser and text encoder(s) weights."""
    return weights_fingerprint([denoiser(pipe), pipe.text_encoder] + (
        [pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) is not None else []))
