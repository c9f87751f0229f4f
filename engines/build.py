"""Building engine folders: `build_engines` exports (and for TensorRT compiles) the text
encoder, the UNet with map outputs and the VAE decoder of a loaded pipeline into an engine
folder, or reuses the folder when its key matches (`engines.cache`). A compile folder (any
family, the DiTs included) records the key, the I/O names and the map layout: compiling
happens in the process that runs it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..pipeline.config import BACKENDS, HarvestConfig
from ..pipeline.errors import UserError
from ..pipeline.models.loading import (
    denoiser,
    model_family,
    model_fingerprint,
    token_stride,
    weights_fingerprint,
)
from ..pipeline.models.lora import apply_loras, parse_lora_spec
from . import cache
from .backends import DTYPE_NAMES, require_module
from .export import OPSET, PARTS, export_onnx, text_encoder_spec, unet_spec, vae_decoder_spec
from .graph import DIT_INPUTS, MapGraphSpec, TransformerWithMaps


def vae_fingerprint(vae) -> str:
    """Content hash of the VAE decoder weights (model_fingerprint covers UNet + text encoder)."""
    return weights_fingerprint((vae,), keep=lambda name: name.startswith(
        ("decoder.", "post_quant_conv.")))


def check_backend(backend: str) -> None:
    """A one-line UserError when `backend` is unknown or its libraries are missing."""
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; choose from {list(BACKENDS)}")
    if backend == "onnxruntime":
        require_module(backend, "onnxruntime")
        require_module(backend, "onnxscript")
    elif backend == "tensorrt":
        from .trt import require_tensorrt

        require_tensorrt()


# The sub-networks the engines export, per family: SD 1.x/2.x all three (the torch-free deploy
# runtime runs them); SDXL its UNet, with the added conditioning (pooled text, size and crop
# ids) as inputs: its prompt encoding reads two encoders' inner layers and pooled outputs,
# which the one-output text engine does not give, so its text encoders and VAE stay torch.
ENGINE_PARTS = {"sd": PARTS, "sdxl": ("unet",)}


def check_engine_family(pipe, backend: str) -> None:
    """Refuse, in one line, a model whose denoiser `backend` does not run: the DiTs (PixArt,
    SD3, Flux) run under `compile` only (no export spec: their calls differ per family)."""
    family = model_family(pipe)
    if family in ENGINE_PARTS or (backend == "compile" and family in DIT_INPUTS):
        return
    if family in DIT_INPUTS:
        raise UserError(f"backend {backend!r} exports Stable Diffusion 1.x/2.x and SDXL UNets; "
                        f"this model is {family}: use --backend compile or torch")
    raise UserError(f"engines support Stable Diffusion 1.x/2.x, SDXL, PixArt, SD3 and Flux; "
                    f"this model is {family}: use --backend torch")


def fuse_loras(pipe, loras: list[str]) -> list[tuple[str, float, str]]:
    """Fuse LoRAs (`PATH` or `PATH:scale`) into the pipeline; returns (path, scale, content
    fingerprint) per LoRA, for the engine key."""
    if not loras:
        return []
    specs = [parse_lora_spec(text) for text in loras]
    records = []
    for spec in specs:
        path = Path(spec.path).expanduser()
        if not path.exists():
            raise UserError(f"LoRA {spec.path} does not exist")
        records.append((str(spec.path), float(spec.scale), cache.lora_fingerprint(path)))
    apply_loras(pipe, specs)
    return records


@dataclass
class EngineOptions:
    """What to build besides the model: backend, shapes, precision, harvesting graph."""

    backend: str = "onnxruntime"
    height: int = 512
    width: int = 512
    max_batch: int = 4  # images per call (the UNet's batch is twice that under CFG)
    max_classes: int = 8  # labelled words per prompt (TensorRT profile bound)
    opset: int = OPSET
    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    # TensorRT only: replace the map math by the Triton plugin, keep refit weights.
    trt_plugin: str = "auto"
    trt_refit: bool = False

    def validate(self) -> None:
        if self.backend not in BACKENDS or self.backend == "torch":
            raise UserError(f"engine backend must be one of {list(BACKENDS[1:])}, not "
                            f"{self.backend!r}")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v <= 0 or v % 8:
                raise UserError(f"--{name} {v} is not a positive multiple of 8")
        if self.max_batch < 1 or self.max_classes < 1:
            raise UserError("--batch-size and --max-classes must be >= 1")
        if self.trt_plugin not in ("auto", "on", "off"):
            raise UserError("trt_plugin must be auto, on or off")


def engine_key(pipe, opts: EngineOptions, dtype: torch.dtype, base_hash: str,
               loras: list[tuple[str, float, str]]) -> cache.EngineKey:
    toolchain = {"torch": torch.__version__.split("+")[0]}
    if opts.backend == "onnxruntime":
        import onnxruntime

        toolchain["onnxruntime"] = onnxruntime.__version__
    if opts.backend == "tensorrt":
        from .trt import toolchain_info

        toolchain.update(toolchain_info())
    maps = MapGraphSpec.from_harvest(opts.harvest).to_dict()
    maps["vae_hash"] = vae_fingerprint(pipe.vae)
    return cache.EngineKey(
        backend=opts.backend, model="", model_hash=model_fingerprint(pipe),
        base_model_hash=base_hash,
        loras=tuple((f"{scale:g}", fp) for _, scale, fp in loras), height=opts.height,
        width=opts.width, max_batch=opts.max_batch, max_classes=opts.max_classes,
        dtype=DTYPE_NAMES[dtype], opset=opts.opset, maps=maps,
        attnseg_version=cache.attnseg_version(), toolchain=toolchain,
    )


def build_engines(pipe, opts: EngineOptions, out: Path, *, source: dict | None = None,
                  base_hash: str | None = None, loras=(), log=print) -> tuple[Path, str]:
    """Build the engine set of `pipe` into `out`, or reuse it. Returns (folder, "reused" |
    "built"). `source` (model name, LoRA paths and scales) is recorded for `engine verify`."""
    opts.validate()
    check_backend(opts.backend)
    check_engine_family(pipe, opts.backend)
    device = denoiser(pipe).device
    dtype = denoiser(pipe).dtype
    if opts.backend == "onnxruntime" and dtype == torch.bfloat16:
        raise UserError("backend onnxruntime has no bf16 kernels; use --dtype fp16 or fp32")
    if opts.backend == "tensorrt" and device.type != "cuda":
        raise UserError("backend tensorrt needs a CUDA device")
    base_hash = base_hash or model_fingerprint(pipe)
    key = engine_key(pipe, opts, dtype, base_hash, list(loras))
    out = Path(out)
    reason = cache.stale_reason(out, key)
    if reason is None:
        log(f"engine {out}: up to date, reused")
        return out, "reused"
    log(f"engine {out}: building ({reason})")
    tmp = cache.prepare_output(out)
    t0 = time.perf_counter()
    try:
        parts = _build_parts(pipe, opts, tmp, log)
        manifest = {"key": key.to_dict(), "source": source or {}, "parts": parts,
                    "trt_refit": opts.backend == "tensorrt" and opts.trt_refit,
                    "build_seconds": round(time.perf_counter() - t0, 1),
                    "harvest": _harvest_dict(opts.harvest)}
        cache.commit_output(tmp, out, manifest)
    except BaseException:  # a failed build (a full disk, say) leaves no GB-sized debris
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"engine {out}: built in {time.perf_counter() - t0:.1f} s")
    return out, "built"


def _harvest_dict(cfg: HarvestConfig) -> dict:
    from dataclasses import asdict

    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}


def _build_parts(pipe, opts: EngineOptions, folder: Path, log) -> dict:
    """Export every sub-network (ONNX; TensorRT plans from them); returns the manifest parts."""
    size = (opts.height, opts.width)
    graph = MapGraphSpec.from_harvest(opts.harvest)
    parts = {}
    specs = []
    if model_family(pipe) in DIT_INPUTS:  # compile only (check_engine_family)
        module = TransformerWithMaps(pipe.transformer, graph, size, model_family(pipe),
                                     token_stride(pipe))
        module.remove()
        parts["transformer"] = {"inputs": module.input_names, "outputs": module.output_names,
                                "io": {}, "profiles": {},
                                "layout": [m.to_dict() for m in module.layout]}
        return parts
    u = unet_spec(pipe.unet, graph, size, opts.max_batch, opts.max_classes)
    try:
        layout = [m.to_dict() for m in u.module.layout]
        if opts.backend == "compile":
            # torch.compile compiles in the process that runs it; the folder records the key
            # and I/O so that `synth --engine` and `engine verify` check what they load.
            parts["unet"] = _part_dict(u, None, layout)
            return parts
        wanted = ENGINE_PARTS[model_family(pipe)]
        make = {"text_encoder": lambda: text_encoder_spec(pipe.text_encoder, opts.max_batch),
                "unet": lambda: u,
                "vae_decoder": lambda: vae_decoder_spec(pipe.vae, size, opts.max_batch)}
        specs = [make[name]() for name in wanted]
        for spec in specs:
            t = time.perf_counter()
            onnx_path = folder / f"{spec.name}.onnx"
            translation = None
            if spec.name == "unet" and opts.backend == "tensorrt":
                from .aot import PLUGIN_MAX_CLASSES
                from .trt import plugin_translation_table

                translation = plugin_translation_table(opts.trt_plugin)
                if translation:
                    if opts.max_classes > PLUGIN_MAX_CLASSES:
                        raise UserError(f"the TensorRT plugin takes at most "
                                        f"{PLUGIN_MAX_CLASSES} labelled words per prompt, not "
                                        f"--max-classes {opts.max_classes}")
                    u.module.map_impl = "plugin"
                    u.module.plugin_block_c = max(16, 1 << (opts.max_classes - 1).bit_length())
            export_onnx(spec, onnx_path, opts.opset, custom_translation_table=translation)
            u.module.map_impl = "ref"
            log(f"  exported {spec.name} to ONNX in {time.perf_counter() - t:.1f} s")
            part = _part_dict(spec, onnx_path.name, layout if spec.name == "unet" else None)
            if translation and spec.name == "unet":
                part["plugin"] = True
            if opts.backend == "tensorrt":
                from .trt import build_plan

                t = time.perf_counter()
                part["plan"] = build_plan(onnx_path, spec, folder, refit=opts.trt_refit,
                                          plugin=bool(translation) and spec.name == "unet")
                log(f"  built TensorRT plan for {spec.name} in {time.perf_counter() - t:.1f} s")
            parts[spec.name] = part
        if wanted == PARTS:  # the deploy runtime runs a whole set
            write_deploy_files(pipe, size, folder)
    finally:
        u.module.remove()
    return parts


def write_deploy_files(pipe, size: tuple[int, int], folder: Path) -> None:
    """What the torch-free deploy runtime (`engines.deploy`) needs besides the engines: the
    tokenizer, the scheduler config, a few pipeline constants, and the interpolation taps
    (kernels.interp's, the single definition) between every pair of map sizes this image size
    has, so that any harvesting/mask settings can be finalised without torch."""
    import json

    from ..kernels.interp import MODES, interp_taps_np

    out = folder / "deploy"
    out.mkdir()
    pipe.tokenizer.save_pretrained(str(out / "tokenizer"))
    (out / "scheduler_config.json").write_text(json.dumps(dict(pipe.scheduler.config)))
    sizes = sorted({-(-n // s) for n in size for s in (1, 2, 4, 8, 16, 32, 64)})
    taps = {}
    for mode in MODES:
        for a in sizes:
            for b in sizes:
                if mode == "none" and a != b:
                    continue
                idx, wts = interp_taps_np(a, b, mode)
                taps[f"{mode}:{a}:{b}:idx"], taps[f"{mode}:{a}:{b}:w"] = idx, wts
    np.savez(out / "taps.npz", **taps)
    (out / "pipeline.json").write_text(json.dumps({
        "scheduler_class": type(pipe.scheduler).__name__,
        "vae_scaling_factor": float(pipe.vae.config.scaling_factor),
        "latent_channels": int(pipe.unet.config.in_channels),
        "vae_scale_factor": int(pipe.vae_scale_factor),
        "image_size": list(size),
    }))


def _part_dict(spec, onnx_name, layout) -> dict:
    d = {"inputs": spec.input_names, "outputs": spec.output_names, "io": spec.io_dict(),
         "profiles": {k: [list(s) for s in v] for k, v in spec.profiles.items()}}
    if onnx_name:
        d["onnx"] = onnx_name
    if layout is not None:
        d["layout"] = layout
    return d
