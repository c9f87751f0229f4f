"""Running engine sets inside the Stable Diffusion pipeline.

`load_engines` opens an engine folder. `EngineHarvester` is a drop-in for the pipeline's
`AttentionHarvester`: it puts the engines in place of the pipeline's modules (the UNet, or a
DiT's transformer under the compile backend), so diffusers' own denoising loop runs unchanged,
and sums the denoiser engine's per-step map outputs over the step window into the same
`HarvestResult`. `engine_harvester` is what `attnseg synth --backend/
--engine` hands to `run_synth`.
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from ..pipeline.config import HarvestConfig, Preset, SynthConfig
from ..pipeline.errors import UserError
from ..pipeline.harvest.harvester import HarvestResult, fit_token_weights
from ..pipeline.models.loading import denoiser, model_family, model_fingerprint, token_stride
from . import cache
from .backends import DTYPE_NAMES, CompiledEngine, Engine, OrtEngine
from .build import (
    EngineOptions,
    build_engines,
    check_backend,
    check_engine_family,
    engine_key,
    vae_fingerprint,
)
from .export import unet_spec
from .graph import DIT_INPUTS, MapGraphSpec, MapOutput, TransformerWithMaps, UNetWithMaps


@dataclass
class EngineSet:
    """The loaded engines of one folder (or the in-process torch/compile ones)."""

    key: cache.EngineKey
    engines: dict[str, Engine]
    layout: list[MapOutput]
    folder: Path | None = None
    # The in-process module (compile): UNetWithMaps or TransformerWithMaps.
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
    layout = [MapOutput.from_dict(m) for m in (parts.get("unet") or parts["transformer"])["layout"]]
    if device is None:
        device = denoiser(pipe).device if pipe is not None else torch.device("cpu")
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
    """torch.compile of the pipeline's UNet (or DiT transformer) with harvesting in the graph
    (Triton kernel op on CUDA, the torch reference traced into the graph on CPU)."""
    graph = MapGraphSpec.from_dict({k: v for k, v in key.maps.items() if k != "vae_hash"})
    device = denoiser(pipe).device
    impl = "op" if device.type == "cuda" else "ref"
    size = (key.height, key.width)
    if model_family(pipe) in DIT_INPUTS:
        module = TransformerWithMaps(pipe.transformer, graph, size, model_family(pipe),
                                     token_stride(pipe), map_impl=impl).eval()
        name, io = "transformer", {}
    else:
        spec = unet_spec(pipe.unet, graph, size, key.max_batch, key.max_classes, map_impl=impl)
        module, name, io = spec.module, "unet", spec.io_dict()
    if layout is not None and [m.to_dict() for m in module.layout] != [m.to_dict()
                                                                      for m in layout]:
        module.remove()
        raise UserError("the compile engine's map layout differs from this model's; rebuild it")
    engine = CompiledEngine(module, name, module.input_names, module.output_names, io, device,
                            mode=mode)
    return EngineSet(key, {name: engine}, module.layout, None, module)


class _ModuleAdapter(torch.nn.Module):
    """Stands in for a pipeline module: same config, dtype and device; runs an engine."""

    def __init__(self, original, engine: Engine, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.config = original.config
        self._engine = engine
        self._dtype = dtype
        self._device = device
        # Not registered as a submodule: the adapter holds no weights of its own.
        object.__setattr__(self, "_original", original)

    def __getattr__(self, name):
        # What the pipeline reads off the module beyond its config (SDXL checks the width of
        # `unet.add_embedding`) comes from the original.
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = self.__dict__.get("_original")
            if original is None:  # before __init__ set it (copy, unpickling)
                raise
            return getattr(original, name)

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
        return (self._harvester._unet_step(sample, timestep, encoder_hidden_states,
                                           added_cond_kwargs),)


class _TransformerAdapter(_ModuleAdapter):
    """A DiT's transformer: every tensor of the call (PixArt's added conditioning included)
    goes to the engine by name; the rest (attention kwargs, return_dict) does not apply."""

    def __init__(self, original, engine, dtype, device, harvester: EngineHarvester):
        super().__init__(original, engine, dtype, device)
        self._harvester = harvester

    def forward(self, hidden_states, **kwargs):
        feeds = {"hidden_states": hidden_states}
        for name, value in {**kwargs, **(kwargs.get("added_cond_kwargs") or {})}.items():
            if isinstance(value, torch.Tensor):
                feeds[name] = value
        return (self._harvester._transformer_step(feeds),)


class EngineHarvester:
    """Drop-in for `AttentionHarvester` that generates through an `EngineSet`.

    Installing it swaps the pipeline's UNet (and, for exported engines, text encoder and VAE)
    for adapters that run the engines; `remove()` swaps the originals back. `capture(...)`
    has the same contract as `AttentionHarvester.capture`.
    """

    def __init__(self, pipe, engines: EngineSet, config: HarvestConfig):
        check_engine_family(pipe, engines.key.backend)
        config.validate(pipe.vae_scale_factor)
        want = MapGraphSpec.from_harvest(config).to_dict()
        have = {k: v for k, v in engines.key.maps.items() if k != "vae_hash"}
        if have != want:
            # Over both sides' keys: settings left out at their defaults (heads, the DiT
            # ones) are in only one of them.
            diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
            raise UserError(f"the engine was built for other harvesting settings ({diff}: "
                            f"{[have.get(k) for k in diff]}, this job needs "
                            f"{[want.get(k) for k in diff]}); build it with the same "
                            "--preset/--set")
        self.pipe = pipe
        self.engines = engines
        self.config = config
        self.backend = engines.key.backend  # what generation runs on, for summaries
        self._capture = None
        self._originals = {}
        device = denoiser(pipe).device
        for name, attr, cls in (("unet", "unet", _UNetAdapter),
                                ("transformer", "transformer", _TransformerAdapter),
                                ("text_encoder", "text_encoder", _TextEncoderAdapter),
                                ("vae_decoder", "vae", _VaeAdapter)):
            engine = engines.engines.get(name)
            if engine is None:
                continue
            original = getattr(pipe, attr)
            args = (original, engine, original.dtype, device)
            denoising = cls in (_UNetAdapter, _TransformerAdapter)
            adapter = cls(*args, self) if denoising else cls(*args)
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
        device = denoiser(self.pipe).device
        cap = _EngineCapture(token_weights.to(device=device, dtype=torch.float32),
                             tuple(image_size), self.config.step_range(num_steps))
        self._capture = cap
        try:
            yield cap
        finally:
            self._capture = None
        cap.result = self._finish(cap)

    def _unet_step(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None):
        cap = self._capture
        if cap is None:
            raise RuntimeError("the engine UNet runs only inside EngineHarvester.capture")
        cap.step += 1
        b = cap.token_weights.shape[0]
        n = sample.shape[0]
        unet = self.engines.engines["unet"]
        # SDXL's added conditioning (pooled text, size and crop ids), by input name.
        feeds = {name: added_cond_kwargs[name] for name in unet.input_names
                 if added_cond_kwargs and name in added_cond_kwargs}
        feeds.update(sample=sample, encoder_hidden_states=encoder_hidden_states)
        if n == b:  # no classifier-free guidance: the engine takes [uncond, cond] pairs
            feeds = {k: torch.cat([v, v]) for k, v in feeds.items()}
        elif n != 2 * b:
            raise RuntimeError(f"UNet batch {n} is neither the harvested batch {b} nor twice it")
        feeds["timestep"] = torch.as_tensor(timestep, device=sample.device).float().reshape(-1)[:1]
        feeds["token_weights"] = cap.token_weights
        out = unet.infer(feeds)
        self._add_maps(cap, out)
        noise = out["noise_pred"]
        return noise[n:] if n == b else noise

    def _transformer_step(self, feeds: dict) -> torch.Tensor:
        """One call of a DiT's transformer engine (the pipeline's own batch: with or without
        the guidance half); returns the noise prediction."""
        cap = self._capture
        if cap is None:
            raise RuntimeError("the engine transformer runs only inside EngineHarvester.capture")
        cap.step += 1
        engine = self.engines.engines["transformer"]
        missing = [n for n in engine.input_names if n != "token_weights" and n not in feeds]
        if missing:
            raise RuntimeError(f"the transformer call lacks the engine inputs {missing}")
        feeds = {n: feeds[n] for n in engine.input_names if n != "token_weights"}
        # The weights fitted to the encoder's text length once per capture (checked there:
        # a class word past it is refused, as by the torch harvester).
        text_len = feeds["encoder_hidden_states"].shape[1]
        if cap.fitted is None or cap.fitted.shape[1] != text_len:
            cap.fitted = fit_token_weights(cap.token_weights, text_len)
        feeds["token_weights"] = cap.fitted
        out = engine.infer(feeds)
        self._add_maps(cap, out)
        return out["noise_pred"]

    def _add_maps(self, cap: _EngineCapture, out: dict) -> None:
        """Add one step's map outputs to the capture's sums when the step is in the window."""
        if cap.step not in cap.steps:
            return
        for m in self.engines.layout:
            value = out[m.name].float()
            prev = cap.sums.get(m.name)
            cap.sums[m.name] = value.clone() if prev is None else prev.add_(value)
            cap.counts[m.name] = cap.counts.get(m.name, 0.0) + m.count

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
        self.fitted: torch.Tensor | None = None  # token weights at the DiT's text length

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.sums.values())


def engine_model_name(folder) -> str | None:
    """The model an engine folder was built from, as its build named it (the manifest's
    `source`, written by every build), or None where it is not recorded. Only the weights'
    hashes decide whether a model fits an engine; the name is for messages."""
    try:
        source = cache.read_manifest(Path(folder)).get("source") or {}
    except UserError:
        return None
    name = source.get("model") if isinstance(source, dict) else None
    return name if isinstance(name, str) and name else None


def check_engine_model(key: cache.EngineKey, pipe, folder, model: str | None = None) -> None:
    """The loaded pipeline (`model`, as the job names it) must hold the weights the engine was
    built from (with or without the engine's LoRA merged) and the same VAE. The weights'
    hashes decide; the message names both models."""
    have = model_fingerprint(pipe)
    if have not in (key.model_hash, key.base_model_hash):
        built = engine_model_name(folder) or key.model
        built_for = f"model {built}" if built else "a model whose name it does not record"
        given = f"model {model}" if model else "the loaded model"
        fix = f"pass --model {built}" if built else "use the model it was built from"
        raise UserError(f"engine {folder} was built for {built_for} (weights "
                        f"{key.base_model_hash[:12]}), not for {given} (weights {have[:12]}); "
                        f"{fix} or rebuild the engine")
    if key.maps.get("vae_hash") not in (None, vae_fingerprint(pipe.vae)):
        raise UserError(f"engine {folder} was built with another VAE than the loaded model's")
    dtype = DTYPE_NAMES[denoiser(pipe).dtype]
    if dtype != key.dtype:
        raise UserError(f"engine {folder} is {key.dtype}, the job runs in {dtype}; pass "
                        f"--dtype {key.dtype}")


def engine_harvester(cfg: SynthConfig, pipe, preset: Preset, log=None) -> EngineHarvester:
    """The harvester `run_synth` uses for `--backend compile|onnxruntime|tensorrt` or
    `--engine DIR`: loads the folder, or builds/reuses one in the engine cache."""
    log = log or (lambda msg: None)
    if cfg.engine:
        folder = Path(cfg.engine).expanduser()
        key = cache.check_engine_job(folder, cfg.backend, cfg.height, cfg.width, cfg.batch_size)
        check_engine_family(pipe, key.backend)
        check_engine_model(key, pipe, folder, cfg.model)
        harvester = EngineHarvester(pipe, load_engines(folder, pipe), preset.harvest)
        harvester.backend = f"{key.backend} engine in {folder}"
        return harvester
    check_engine_family(pipe, cfg.backend)
    opts = EngineOptions(backend=cfg.backend, height=cfg.height, width=cfg.width,
                         max_batch=cfg.batch_size, max_classes=8, harvest=preset.harvest)
    check_backend(cfg.backend)
    if cfg.backend == "compile":
        key = engine_key(pipe, opts, denoiser(pipe).dtype, model_fingerprint(pipe), [])
        harvester = EngineHarvester(pipe, compiled_engine_set(pipe, key), preset.harvest)
        harvester.backend = (f"compile (torch.compile of the {type(denoiser(pipe)).__name__} "
                             "with maps)")
        return harvester
    base = model_fingerprint(pipe)
    key = engine_key(pipe, opts, denoiser(pipe).dtype, base, [])
    folder = cache.default_cache_root() / f"{cfg.backend}-{key.digest()}"
    build_engines(pipe, opts, folder, source={"model": cfg.model}, base_hash=base, log=log)
    harvester = EngineHarvester(pipe, load_engines(folder, pipe), preset.harvest)
    harvester.backend = f"{cfg.backend} engine in {folder}"
    return harvester
