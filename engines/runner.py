"""Building, loading and running engine sets inside the Stable Diffusion pipeline.

`build_engines` exports (and for TensorRT compiles) the text encoder, the UNet with map outputs
and the VAE decoder of a loaded pipeline into an engine folder, or reuses the folder when its
key matches. `EngineHarvester` is a drop-in for `AttentionHarvester`: it puts the engines in
place of the pipeline's modules, so diffusers' own denoising loop runs unchanged, and sums the
UNet engine's per-step map outputs over the step window into the same `HarvestResult`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..pipeline.config import HarvestConfig, Preset, SynthConfig
from ..pipeline.errors import UserError
from ..pipeline.harvest import HarvestResult
from ..pipeline.models import model_fingerprint
from . import cache
from .backends import BACKENDS, CompiledEngine, Engine, OrtEngine, TorchEngine, require_module
from .export import OPSET, export_onnx, text_encoder_spec, unet_spec, vae_decoder_spec
from .graph import MapGraphSpec, MapOutput, UNetWithMaps

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def vae_fingerprint(vae) -> str:
    """Content hash of the VAE decoder weights (model_fingerprint covers UNet + text encoder)."""
    import hashlib

    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.startswith(("decoder.", "post_quant_conv.")):
                h.update(f"{name}:{tuple(p.shape)}".encode())
                h.update(np.float64(p.detach().flatten()[::997].double().sum().item()).tobytes())
    return h.hexdigest()[:16]


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


# ---------------------------------------------------------------------------------------------
# LoRA


def fuse_loras(pipe, loras: list[str]) -> list[tuple[str, float, str]]:
    """Fuse LoRAs (`PATH` or `PATH:scale`) into the pipeline; returns (path, scale, content
    fingerprint) per LoRA. Uses attnseg.pipeline.lora when that module is present."""
    if not loras:
        return []
    try:
        from ..pipeline.lora import apply_loras, parse_lora_spec
    except ImportError:
        apply_loras = None

        def parse_lora_spec(text):
            head, sep, tail = text.rpartition(":")
            with contextlib.suppress(ValueError):
                if sep and head:
                    return head, float(tail)
            return text, 1.0
    records = []
    specs = []
    for text in loras:
        spec = parse_lora_spec(text)
        path, scale = (spec.path, spec.scale) if hasattr(spec, "path") else spec
        if not Path(path).expanduser().exists():
            raise UserError(f"LoRA {path} does not exist")
        records.append((str(path), float(scale), cache.lora_fingerprint(Path(path).expanduser())))
        specs.append(spec)
    if apply_loras is not None:
        apply_loras(pipe, specs)
        return records
    for i, (path, scale, _) in enumerate(records):
        try:
            pipe.load_lora_weights(str(Path(path).expanduser()), adapter_name=f"attnseg_{i}")
            pipe.fuse_lora(lora_scale=scale, adapter_names=[f"attnseg_{i}"])
        except Exception as e:  # diffusers/peft raise many types for incompatible files
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"could not load LoRA {path}: {first}") from None
    pipe.unload_lora_weights()
    return records


# ---------------------------------------------------------------------------------------------
# Building


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
        dtype=_DTYPE_NAMES[pipe.unet.dtype], opset=opts.opset, maps=maps,
        attnseg_version=cache.attnseg_version(), toolchain=toolchain,
    )


def build_engines(pipe, opts: EngineOptions, out: Path, *, source: dict | None = None,
                  base_hash: str | None = None, loras=(), log=print) -> tuple[Path, str]:
    """Build the engine set of `pipe` into `out`, or reuse it. Returns (folder, "reused" |
    "built"). `source` (model name, LoRA paths and scales) is recorded for `engine verify`."""
    opts.validate()
    check_backend(opts.backend)
    device = pipe.unet.device
    dtype = pipe.unet.dtype
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
    u = unet_spec(pipe.unet, graph, size, opts.max_batch, opts.max_classes)
    try:
        layout = [m.to_dict() for m in u.module.layout]
        if opts.backend == "compile":
            # torch.compile compiles in the process that runs it; the folder records the key
            # and I/O so that `synth --engine` and `engine verify` check what they load.
            parts["unet"] = _part_dict(u, None, layout)
            return parts
        specs = [text_encoder_spec(pipe.text_encoder, opts.max_batch), u,
                 vae_decoder_spec(pipe.vae, size, opts.max_batch)]
        for spec in specs:
            t = time.perf_counter()
            onnx_path = folder / f"{spec.name}.onnx"
            translation = None
            if spec.name == "unet" and opts.backend == "tensorrt":
                from .trt import plugin_translation_table

                translation = plugin_translation_table(opts.trt_plugin)
                if translation:
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


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass
class EngineSet:
    """The loaded engines of one folder (or the in-process torch/compile ones)."""

    key: cache.EngineKey
    engines: dict[str, Engine]
    layout: list[MapOutput]
    folder: Path | None = None
    unet_module: UNetWithMaps | None = None

    def close(self) -> None:
        for e in self.engines.values():
            e.close()
        if self.unet_module is not None:
            self.unet_module.remove()
            self.unet_module = None


def load_engines(folder: Path, pipe=None, device: torch.device | None = None) -> EngineSet:
    """Load an engine folder. `compile` folders need the `pipe` whose UNet they compile."""
    folder = Path(folder)
    manifest = cache.read_manifest(folder)
    cache.check_files(folder, manifest)
    key = cache.EngineKey.from_dict(manifest["key"])
    check_backend(key.backend)
    parts = manifest["parts"]
    layout = [MapOutput.from_dict(m) for m in parts["unet"]["layout"]]
    if device is None:
        device = pipe.unet.device if pipe is not None else torch.device("cpu")
    if key.backend == "compile":
        if pipe is None:
            raise UserError("a compile engine needs the model it was built for")
        return compiled_engine_set(pipe, key, layout)
    engines: dict[str, Engine] = {}
    for name, part in parts.items():
        if key.backend == "onnxruntime":
            # On a GPU, ONNX Runtime's TensorRT provider goes first when TensorRT is installed
            # (its engines are cached per engine key), then CUDA.
            use_trt = device.type == "cuda" and importlib.util.find_spec("tensorrt") is not None
            engines[name] = OrtEngine(folder / part["onnx"], name, part["inputs"],
                                      part["outputs"], part["io"], device,
                                      use_trt_provider=use_trt,
                                      trt_cache=cache.default_cache_root() / "ort-tensorrt"
                                      / key.digest())
        else:
            from .trt import TensorRTEngine

            engines[name] = TensorRTEngine.load(folder / part["plan"], name, part, device)
    return EngineSet(key, engines, layout, folder)


def compiled_engine_set(pipe, key: cache.EngineKey, layout=None, mode=None) -> EngineSet:
    """torch.compile of the pipeline's UNet with harvesting in the graph (Triton kernel op on
    CUDA, the torch reference traced into the graph on CPU)."""
    graph = MapGraphSpec.from_dict({k: v for k, v in key.maps.items() if k != "vae_hash"})
    device = pipe.unet.device
    spec = unet_spec(pipe.unet, graph, (key.height, key.width), key.max_batch, key.max_classes,
                     map_impl="op" if device.type == "cuda" else "ref")
    module = spec.module
    if layout is not None and [m.to_dict() for m in module.layout] != [m.to_dict()
                                                                      for m in layout]:
        module.remove()
        raise UserError("the compile engine's map layout differs from this model's; rebuild it")
    engine = CompiledEngine(module, "unet", spec.input_names, spec.output_names,
                            spec.io_dict(), device, mode=mode)
    return EngineSet(key, {"unet": engine}, module.layout, None, module)


def torch_engine_set(pipe, harvest: HarvestConfig, size: tuple[int, int]) -> EngineSet:
    """The eager graph behind the engines (no export): for parity checks and benchmarks."""
    graph = MapGraphSpec.from_harvest(harvest)
    spec = unet_spec(pipe.unet, graph, size, 1, 1)
    engine = TorchEngine(spec.module, "unet", spec.input_names, spec.output_names,
                         spec.io_dict(), pipe.unet.device)
    key = cache.EngineKey("torch", "", "", "", (), size[0], size[1], 0, 0,
                          _DTYPE_NAMES[pipe.unet.dtype], 0, graph.to_dict())
    return EngineSet(key, {"unet": engine}, spec.module.layout, None, spec.module)


# ---------------------------------------------------------------------------------------------
# Running inside the diffusers pipeline


class _ModuleAdapter(torch.nn.Module):
    """Stands in for a pipeline module: same config, dtype and device; runs an engine."""

    def __init__(self, original, engine: Engine, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.config = original.config
        self._engine = engine
        self._dtype = dtype
        self._device = device

    @property
    def dtype(self):
        return self._dtype

    @property
    def device(self):
        return self._device


class _TextEncoderAdapter(_ModuleAdapter):
    def forward(self, input_ids, attention_mask=None, output_hidden_states=None, **kwargs):
        if output_hidden_states:
            raise UserError("engines do not support clip_skip (hidden states of inner layers)")
        out = self._engine.infer({"input_ids": input_ids.to(self._device, torch.int64)})
        return (out["last_hidden_state"],)


class _VaeAdapter(_ModuleAdapter):
    def forward(self, *args, **kwargs):
        raise UserError("the VAE engine only decodes")

    def decode(self, latents, return_dict=False, generator=None):
        return (self._engine.infer({"latents": latents.to(self._dtype)})["image"],)


class _UNetAdapter(_ModuleAdapter):
    def __init__(self, original, engine, dtype, device, harvester: EngineHarvester):
        super().__init__(original, engine, dtype, device)
        self._harvester = harvester

    def forward(self, sample, timestep, encoder_hidden_states=None, timestep_cond=None,
                cross_attention_kwargs=None, added_cond_kwargs=None, return_dict=False,
                **kwargs):
        return (self._harvester._unet_step(sample, timestep, encoder_hidden_states),)


class EngineHarvester:
    """Drop-in for `AttentionHarvester` that generates through an `EngineSet`.

    Installing it swaps the pipeline's UNet (and, for exported engines, text encoder and VAE)
    for adapters that run the engines; `remove()` swaps the originals back. `capture(...)`
    has the same contract as `AttentionHarvester.capture`.
    """

    def __init__(self, pipe, engines: EngineSet, config: HarvestConfig):
        config.validate()
        want = MapGraphSpec.from_harvest(config).to_dict()
        have = {k: v for k, v in engines.key.maps.items() if k != "vae_hash"}
        if have != want:
            diff = sorted(k for k in want if want[k] != have.get(k))
            raise UserError(f"the engine was built for other harvesting settings ({diff}: "
                            f"{[have.get(k) for k in diff]}, this job needs "
                            f"{[want[k] for k in diff]}); build it with the same --preset/--set")
        self.pipe = pipe
        self.engines = engines
        self.config = config
        self.backend = engines.key.backend  # what generation runs on, for summaries
        self._capture = None
        self._originals = {}
        device = pipe.unet.device
        for name, attr, cls in (("unet", "unet", _UNetAdapter),
                                ("text_encoder", "text_encoder", _TextEncoderAdapter),
                                ("vae_decoder", "vae", _VaeAdapter)):
            engine = engines.engines.get(name)
            if engine is None:
                continue
            original = getattr(pipe, attr)
            args = (original, engine, original.dtype, device)
            adapter = cls(*args, self) if cls is _UNetAdapter else cls(*args)
            self._originals[attr] = original
            setattr(pipe, attr, adapter)

    def remove(self) -> None:
        """Give the pipeline its modules back and release the engines."""
        for attr, original in self._originals.items():
            setattr(self.pipe, attr, original)
        self._originals = {}
        self.engines.close()

    @contextlib.contextmanager
    def capture(self, token_weights: torch.Tensor, image_size: tuple[int, int], num_steps: int):
        """Harvest during the generation call(s) inside this block (see AttentionHarvester)."""
        key = self.engines.key
        if tuple(image_size) != (key.height, key.width):
            raise UserError(f"the engine is built for {key.height}x{key.width} images, not "
                            f"{image_size[0]}x{image_size[1]}; rebuild it with --height/--width")
        b, _, c = token_weights.shape
        if key.max_batch and b > key.max_batch and key.backend == "tensorrt":
            raise UserError(f"the engine takes at most {key.max_batch} images per call; use "
                            f"--batch-size {key.max_batch} or rebuild with a larger one")
        if key.max_classes and c > key.max_classes and key.backend == "tensorrt":
            raise UserError(f"the engine takes at most {key.max_classes} labelled words per "
                            f"prompt, this batch has {c}; rebuild with --max-classes {c}")
        if self._capture is not None:
            raise RuntimeError("EngineHarvester.capture is not re-entrant")
        device = self.pipe.unet.device
        cap = _EngineCapture(token_weights.to(device=device, dtype=torch.float32),
                             tuple(image_size), self.config.step_range(num_steps))
        self._capture = cap
        try:
            yield cap
        finally:
            self._capture = None
        cap.result = self._finish(cap)

    def _unet_step(self, sample, timestep, encoder_hidden_states):
        cap = self._capture
        if cap is None:
            raise RuntimeError("the engine UNet runs only inside EngineHarvester.capture")
        cap.step += 1
        b = cap.token_weights.shape[0]
        n = sample.shape[0]
        if n == b:  # no classifier-free guidance: the engine takes [uncond, cond] pairs
            sample = torch.cat([sample, sample])
            encoder_hidden_states = torch.cat([encoder_hidden_states, encoder_hidden_states])
        elif n != 2 * b:
            raise RuntimeError(f"UNet batch {n} is neither the harvested batch {b} nor twice it")
        t = torch.as_tensor(timestep, device=sample.device).float().reshape(-1)[:1]
        out = self.engines.engines["unet"].infer({
            "sample": sample, "timestep": t, "encoder_hidden_states": encoder_hidden_states,
            "token_weights": cap.token_weights,
        })
        if cap.step in cap.steps:
            for m in self.engines.layout:
                value = out[m.name].float()
                prev = cap.sums.get(m.name)
                cap.sums[m.name] = value.clone() if prev is None else prev.add_(value)
                cap.counts[m.name] = cap.counts.get(m.name, 0.0) + m.count
        noise = out["noise_pred"]
        return noise[n:] if n == b else noise

    def _finish(self, cap: _EngineCapture) -> HarvestResult:
        maps, self_attn = {}, None
        for m in self.engines.layout:
            if m.name not in cap.sums:
                continue
            mean = cap.sums[m.name] / cap.counts[m.name]
            if m.kind == "self":
                self_attn = mean
            else:
                maps[m.stride] = mean
        if not maps:
            raise UserError("no cross-attention was harvested (no UNet step ran in the window)")
        if self.config.refine_power > 0 and self_attn is None:
            raise UserError("refinement needs the engine's self-attention output; rebuild the "
                            "engine with the refining preset")
        return HarvestResult(maps=maps, self_attention=self_attn, image_size=cap.image_size)


class _EngineCapture:
    def __init__(self, token_weights, image_size, steps):
        self.token_weights = token_weights
        self.image_size = image_size
        self.steps = steps
        self.step = -1
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, float] = {}
        self.result: HarvestResult | None = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.sums.values())


# ---------------------------------------------------------------------------------------------
# Synthesis entry point


def check_engine_model(key: cache.EngineKey, pipe, folder) -> None:
    """The loaded pipeline must hold the weights the engine was built from (with or without
    the engine's LoRA merged) and the same VAE."""
    have = model_fingerprint(pipe)
    if have not in (key.model_hash, key.base_model_hash):
        raise UserError(f"engine {folder} was built for model weights {key.model_hash} (base "
                        f"{key.base_model_hash}), the loaded model has {have}; use the model it "
                        "was built from or rebuild the engine")
    if key.maps.get("vae_hash") not in (None, vae_fingerprint(pipe.vae)):
        raise UserError(f"engine {folder} was built with another VAE than the loaded model's")
    if _DTYPE_NAMES[pipe.unet.dtype] != key.dtype:
        raise UserError(f"engine {folder} is {key.dtype}, the job runs in "
                        f"{_DTYPE_NAMES[pipe.unet.dtype]}; pass --dtype {key.dtype}")


def engine_harvester(cfg: SynthConfig, pipe, preset: Preset, log=None) -> EngineHarvester:
    """The harvester `run_synth` uses for `--backend compile|onnxruntime|tensorrt` or
    `--engine DIR`: loads the folder, or builds/reuses one in the engine cache."""
    log = log or (lambda msg: None)
    if cfg.engine:
        folder = Path(cfg.engine).expanduser()
        key = cache.check_engine_job(folder, cfg.backend, cfg.height, cfg.width, cfg.batch_size)
        check_engine_model(key, pipe, folder)
        harvester = EngineHarvester(pipe, load_engines(folder, pipe), preset.harvest)
        harvester.backend = f"{key.backend} engine in {folder}"
        return harvester
    opts = EngineOptions(backend=cfg.backend, height=cfg.height, width=cfg.width,
                         max_batch=cfg.batch_size, max_classes=8, harvest=preset.harvest)
    check_backend(cfg.backend)
    if cfg.backend == "compile":
        key = engine_key(pipe, opts, pipe.unet.dtype, model_fingerprint(pipe), [])
        harvester = EngineHarvester(pipe, compiled_engine_set(pipe, key), preset.harvest)
        harvester.backend = "compile (torch.compile of the UNet with maps)"
        return harvester
    base = model_fingerprint(pipe)
    key = engine_key(pipe, opts, pipe.unet.dtype, base, [])
    folder = cache.default_cache_root() / f"{cfg.backend}-{key.digest()}"
    build_engines(pipe, opts, folder, source={"model": cfg.model}, base_hash=base, log=log)
    harvester = EngineHarvester(pipe, load_engines(folder, pipe), preset.harvest)
    harvester.backend = f"{cfg.backend} engine in {folder}"
    return harvester


# ---------------------------------------------------------------------------------------------
# Parity against the torch path


# Parity bounds per engine precision: images (max abs difference, pixel values in [0, 1]) and
# label maps (fraction of equal labels).
TOLERANCES = {"fp32": (1e-4, 0.999), "fp16": (2e-2, 0.99), "bf16": (5e-2, 0.98)}


def generate_float(synth, samples):
    """What `Synthesizer.generate` does (same latents, generators and pipeline call), keeping
    the float images and the HarvestResult: (images [B, H, W, 3] float, labels, reliability,
    harvest result)."""
    from ..pipeline.masks import masks_from_harvest
    from ..pipeline.prompts import class_token_weights

    specs = [s.spec for s in samples]
    weights, class_ids = class_token_weights(synth.pipe.tokenizer, specs,
                                             synth.preset.harvest.token_merge)
    latents = synth.initial_latents([s.seed for s in samples])
    generators = [torch.Generator().manual_seed(s.seed + 1) for s in samples]
    with torch.no_grad(), synth.harvester.capture(weights, synth.size, synth.steps) as cap:
        images = synth.pipe(
            [s.text for s in specs], height=synth.size[0], width=synth.size[1],
            num_inference_steps=synth.steps, guidance_scale=synth.guidance, latents=latents,
            generator=generators, output_type="np",
        ).images
    labels, rel = masks_from_harvest(cap.result, class_ids, synth.preset.harvest,
                                     synth.preset.mask)
    return images, labels.cpu().numpy(), rel.cpu().numpy(), cap.result


def compare_paths(reference, candidate) -> dict:
    """Differences between two `generate_float` results."""
    img_a, lab_a, _, res_a = reference
    img_b, lab_b, _, res_b = candidate
    maps = {}
    for stride, a in res_a.maps.items():
        b = res_b.maps[stride].to(a.device)
        maps[f"s{stride}"] = float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))
    if res_a.self_attention is not None:
        a, b = res_a.self_attention, res_b.self_attention.to(res_a.self_attention.device)
        maps["self"] = float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))
    return {
        "image_max_abs_diff": float(np.abs(np.asarray(img_a) - np.asarray(img_b)).max()),
        "label_agreement": float((lab_a == lab_b).mean()),
        "map_max_rel_diff": maps,
    }


def verify_engines(folder: Path, steps: int = 4, device: str = "auto", log=print) -> dict:
    """Generate the same samples on the torch path and through the engine folder; report the
    differences and whether they are within `TOLERANCES` for the engine's precision."""
    from ..pipeline.device import resolve_device
    from ..pipeline.models import load_pipeline
    from ..pipeline.prompts import default_prompts, load_classes
    from ..pipeline.synth import Synthesizer, plan_samples

    folder = Path(folder)
    manifest = cache.read_manifest(folder)
    key = cache.EngineKey.from_dict(manifest["key"])
    source = manifest.get("source") or {}
    if not source.get("model"):
        raise UserError(f"engine {folder} does not record the model it was built from; verify "
                        "needs it (build it with `attnseg engine build`)")
    dev = resolve_device(device)
    dtype = {v: k for k, v in _DTYPE_NAMES.items()}[key.dtype]
    pipe = load_pipeline(source["model"], dev, dtype)
    fuse_loras(pipe, [f"{p}:{s}" for p, s in source.get("loras", [])])
    check_engine_model(key, pipe, folder)
    preset = SynthConfig(preset=source.get("preset", "attnseg"),
                         overrides=source.get("overrides", {})).resolve_preset()
    preset.harvest = HarvestConfig(**{
        k: (tuple(v) if isinstance(v, list) else
            {int(a): b for a, b in v.items()} if isinstance(v, dict) else v)
        for k, v in manifest["harvest"].items()})
    classes = load_classes("dog,cat,aeroplane")
    batch = max(1, min(key.max_batch, 2))
    samples = plan_samples(classes, default_prompts(classes), 1, 0)[:batch]
    size = (key.height, key.width)
    t0 = time.perf_counter()
    ref_synth = Synthesizer(pipe, preset, *size, steps, 7.5)
    reference = generate_float(ref_synth, samples)
    ref_synth.harvester.remove()
    t1 = time.perf_counter()
    engines = load_engines(folder, pipe)
    harvester = EngineHarvester(pipe, engines, preset.harvest)
    try:
        candidate = generate_float(Synthesizer(pipe, preset, *size, steps, 7.5, harvester),
                                   samples)
    finally:
        harvester.remove()
    t2 = time.perf_counter()
    report = compare_paths(reference, candidate)
    img_tol, label_tol = TOLERANCES[key.dtype]
    report.update(
        engine=str(folder), backend=key.backend, dtype=key.dtype, samples=len(samples),
        steps=steps, size=list(size), torch_seconds=round(t1 - t0, 2),
        engine_seconds=round(t2 - t1, 2), image_tolerance=img_tol, label_tolerance=label_tol,
        ok=report["image_max_abs_diff"] <= img_tol and report["label_agreement"] >= label_tol,
    )
    return report
