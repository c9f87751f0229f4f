"""Torch-free deploy runtime: prompts -> images, label maps and reliability maps from an engine
folder, with numpy on the host.

    runtime = DeployRuntime("engines/sd15-trt", runner="tensorrt",
                            kernels="build/native/libattnseg_kernels.so", unrefined=True)
    images, labels, reliability = runtime.generate(
        ["a photo of a dog on the grass"], [[(12, "dog")]], seeds=[0], steps=30)

Runners: "tensorrt" (TensorRT plans + pycuda; label maps from the AOT-compiled finalize kernel
of libattnseg_kernels when `kernels` is given, else on the host) and "onnxruntime" (the ONNX
files, CPU; the same loop, used to test it). Never imports torch: the tokenizer comes from
`transformers` (torch-free), the interpolation taps were written by `engine build` with
`attnseg.kernels.interp` (`deploy/taps.npz`), and the sampler is DDIM (eta 0) computed as
diffusers' `DDIMScheduler` computes it, so a DDIM model's images equal the torch path's for the
same initial latents. Models built with another scheduler are sampled with DDIM here.

The host-side math (per-step map sums over the step window, stride combination, refinement,
normalisation, background/ignore rules) follows `AttentionHarvester`, `pipeline.harvest.masks` and
`kernels.finalize` step for step.
"""

from __future__ import annotations

import ctypes
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..kernels.labels import IGNORE_LABEL
from ..pipeline.config import HarvestConfig, MaskConfig, get_preset
from ..pipeline.errors import UserError
from ..pipeline.prompts import find_word_tokens
from .cache import check_files, read_manifest

TEXT_LEN = 77


def host_dtype(name: str) -> np.dtype:
    """numpy dtype of an engine tensor type name; numpy has no bfloat16, so it comes from
    ml_dtypes (a dependency of onnx), whose bfloat16 has TensorRT's bit layout."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)
_FLAT_EPS = np.float32(1e-12)  # as kernels.finalize


# --- text -----------------------------------------------------------------------------------


def token_weights(tokenizer, prompts: list[str], labels: list[list[tuple[int, str]]],
                  merge: str = "sum") -> tuple[np.ndarray, np.ndarray]:
    """[B, 77, C] float32 weights and [B, C] int64 class ids (pipeline.prompts'
    class_token_weights, in numpy). labels[b] = [(class id, word in the prompt), ...]."""
    width = max(len(x) for x in labels)
    weights = np.zeros((len(prompts), TEXT_LEN, width), np.float32)
    ids = np.zeros((len(prompts), width), np.int64)
    for b, (prompt, pairs) in enumerate(zip(prompts, labels, strict=True)):
        for c, (cid, word) in enumerate(pairs):
            pos = find_word_tokens(tokenizer, prompt, word)
            weights[b, pos, c] = 1.0 if merge == "sum" else 1.0 / len(pos)
            ids[b, c] = cid
    return weights, ids


# --- sampler --------------------------------------------------------------------------------


class DDIM:
    """diffusers' DDIMScheduler (eta 0, epsilon or v prediction) in float32 numpy."""

    def __init__(self, config: dict):
        self.cfg = config
        n = config["num_train_timesteps"]
        if config.get("trained_betas") is not None:
            betas = np.asarray(config["trained_betas"], np.float32)
        elif config["beta_schedule"] == "scaled_linear":
            betas = np.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, n,
                                dtype=np.float32) ** 2
        elif config["beta_schedule"] == "linear":
            betas = np.linspace(config["beta_start"], config["beta_end"], n, dtype=np.float32)
        else:
            raise UserError(f"deploy runtime: beta schedule {config['beta_schedule']!r} is not "
                            "supported (scaled_linear, linear)")
        self.alphas_cumprod = np.cumprod((1.0 - betas).astype(np.float32), dtype=np.float32)
        self.final = np.float32(1.0) if config.get("set_alpha_to_one", True) \
            else self.alphas_cumprod[0]
        self.prediction = config.get("prediction_type", "epsilon")

    def timesteps(self, steps: int) -> np.ndarray:
        n = self.cfg["num_train_timesteps"]
        spacing = self.cfg.get("timestep_spacing", "leading")
        if spacing == "leading":
            t = (np.arange(0, steps) * (n // steps)).round()[::-1].astype(np.int64)
            return t + self.cfg.get("steps_offset", 0)
        if spacing == "trailing":
            return np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1
        return np.linspace(0, n - 1, steps).round()[::-1].astype(np.int64)

    def step(self, eps: np.ndarray, t: int, x: np.ndarray, steps: int) -> np.ndarray:
        prev = t - self.cfg["num_train_timesteps"] // steps
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final
        b_t = np.float32(1) - a_t
        if self.prediction == "v_prediction":
            x0 = a_t ** np.float32(0.5) * x - b_t ** np.float32(0.5) * eps
            eps = a_t ** np.float32(0.5) * eps + b_t ** np.float32(0.5) * x
        else:
            x0 = (x - b_t ** np.float32(0.5) * eps) / a_t ** np.float32(0.5)
        if self.cfg.get("clip_sample"):
            r = self.cfg.get("clip_sample_range", 1.0)
            x0 = np.clip(x0, -r, r)
        direction = (np.float32(1) - a_prev) ** np.float32(0.5) * eps
        return (a_prev ** np.float32(0.5) * x0 + direction).astype(np.float32)


# --- runners --------------------------------------------------------------------------------


class _OrtRunner:
    def __init__(self, path: Path):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("runner 'onnxruntime' needs onnxruntime-gpu (or onnxruntime)"
                            ) from None
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), opts,
                                            providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self.session.run(self.outputs, feeds), strict=True))


_CONTEXT = []


def _cuda():
    """pycuda's driver module with device 0's primary context current (the context the CUDA
    runtime, and so TensorRT or torch in the same process, uses as well)."""
    try:
        import pycuda.driver as cuda
    except Exception as e:
        raise UserError(f"runner 'tensorrt' needs pycuda ({e}); pip install pycuda") from None
    if not _CONTEXT:
        cuda.init()
        ctx = cuda.Device(0).retain_primary_context()
        ctx.push()
        _CONTEXT.append(ctx)
    return cuda


class _TrtRunner:
    """One TensorRT plan on pycuda: host arrays in, host arrays out."""

    def __init__(self, path: Path, part: dict):
        try:
            import tensorrt as trt
        except Exception as e:
            raise UserError(f"runner 'tensorrt' needs TensorRT and pycuda ({e}); pip install "
                            "tensorrt pycuda") from None
        cuda = _cuda()
        if part.get("plugin"):
            raise UserError("this engine aggregates maps with the attnseg TensorRT plugin, "
                            "whose registration needs the attnseg Python package at build time "
                            "only; rebuild with --trt-plugin off for the torch-free runtime")
        self.cuda, self.trt = cuda, trt
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise UserError(f"engine file {path} cannot be loaded by TensorRT {trt.__version__}")
        self.context = self.engine.create_execution_context()
        self.stream = cuda.Stream()
        self.inputs, self.outputs, self.io = part["inputs"], part["outputs"], part["io"]
        self._buffers: dict = {}
        self._host: dict = {}  # page-locked output buffers, kept while the shape holds

    def _buffer(self, name, nbytes):
        buf = self._buffers.get(name)
        if buf is None or buf[1] < nbytes:
            buf = self._buffers[name] = (self.cuda.mem_alloc(max(nbytes, 1)), nbytes)
        return buf[0]

    def __call__(self, feeds):
        cuda = self.cuda
        for n in self.inputs:
            a = np.ascontiguousarray(feeds[n])
            d = self._buffer(n, a.nbytes)
            cuda.memcpy_htod_async(d, a, self.stream)
            if not self.context.set_input_shape(n, a.shape):
                raise UserError(f"input {n} of shape {a.shape} is outside the engine's "
                                "profile; rebuild it for this size and batch")
            self.context.set_tensor_address(n, int(d))
        host = {}
        for n in self.outputs:
            shape = tuple(self.context.get_tensor_shape(n))
            buf = self._host.get(n)
            if buf is None or buf.shape != shape:
                # Page-locked memory is slow to allocate: once per shape, not per call.
                buf = self._host[n] = cuda.pagelocked_empty(shape, host_dtype(
                    self.io[n]["dtype"]))
            host[n] = buf
            d = self._buffer(n, host[n].nbytes)
            self.context.set_tensor_address(n, int(d))
        if not self.context.execute_async_v3(self.stream.handle):
            raise RuntimeError("TensorRT execution failed")
        for n in self.outputs:
            cuda.memcpy_dtoh_async(host[n], self._buffers[n][0], self.stream)
        self.stream.synchronize()
        return {n: np.array(a) for n, a in host.items()}


class KernelLibrary:
    """ctypes binding of libattnseg_kernels (CMakeLists.txt): the finalize kernel on the GPU."""

    def __init__(self, path: str | Path):
        self.lib = ctypes.CDLL(str(path))
        self.lib.attnseg_kernels_last_error.restype = ctypes.c_char_p
        fz = self.lib.attnseg_finalize_masks
        fz.argtypes = [ctypes.c_void_p] + [ctypes.c_uint64] * 8 + [ctypes.c_int] * 7 + \
            [ctypes.c_float] * 4
        if self.lib.attnseg_kernels_init() != 0:
            raise UserError(f"libattnseg_kernels: {self.lib.attnseg_kernels_last_error().decode()}")

    def finalize(self, norm, ids, taps_y, taps_x, size, rules) -> tuple[np.ndarray, np.ndarray]:
        cuda = _cuda()

        arrays = [np.ascontiguousarray(a) for a in (norm, ids, *taps_y, *taps_x)]
        dev = [cuda.to_device(a) for a in arrays]
        b, c, mh, mw = norm.shape
        labels = np.empty((b, *size), np.uint8)
        rel = np.empty_like(labels)
        d_lab, d_rel = cuda.mem_alloc(labels.nbytes), cuda.mem_alloc(rel.nbytes)
        status = self.lib.attnseg_finalize_masks(
            None, *(int(d) for d in dev[:2]), int(dev[2]), int(dev[3]), int(dev[4]),
            int(dev[5]), int(d_lab), int(d_rel), b, c, mh, mw, size[0], size[1],
            taps_y[0].shape[1], *rules)
        if status != 0:
            raise RuntimeError(self.lib.attnseg_kernels_last_error().decode())
        cuda.memcpy_dtoh(labels, d_lab)
        cuda.memcpy_dtoh(rel, d_rel)
        return labels, rel


# --- masks on the host (numpy forms of pipeline.harvest.masks / kernels.finalize) -----------------


def _normalize(x: np.ndarray, how: str) -> np.ndarray:
    x = x.astype(np.float32)
    if how == "none":
        return x
    flat = x.reshape(*x.shape[:2], -1)
    hi = flat.max(-1, keepdims=True)
    if how == "minmax":
        lo = flat.min(-1, keepdims=True)
        span = hi - lo
        with np.errstate(divide="ignore", invalid="ignore"):
            y = np.where(span < _FLAT_EPS, 0.0, (flat - lo) / span)
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            y = np.where(hi <= _FLAT_EPS, 0.0, flat / hi)
    return y.astype(np.float32).reshape(x.shape)


def _decide(scores: np.ndarray, ids: np.ndarray, mask: MaskConfig):
    """kernels.finalize's rule on resized scores [B, C, H, W]."""
    valid = (ids != 0)[:, :, None, None]
    scores = np.where(valid, scores, -np.inf).astype(np.float32)
    best = scores.max(1)
    m = np.where(valid.any(1), best, np.float32(0)).astype(np.float32)
    bg = np.float32(mask.bg_const) + np.float32(mask.bg_slope) * m
    cand = np.concatenate([bg[:, None], scores], 1)
    idx = cand.argmax(1)
    top = -np.sort(-cand, axis=1)
    second = np.where(np.isneginf(top[:, 1]), 0.0, top[:, 1])
    rel = np.floor(255.0 * np.clip(top[:, 0] - second, 0.0, 1.0) + 0.5)
    ids_px = np.take_along_axis(ids, np.clip(idx - 1, 0, None).reshape(len(ids), -1),
                                1).reshape(idx.shape)
    labels = np.where(idx == 0, 0, ids_px)
    ignore = (m >= np.float32(mask.ignore_low)) & (m < np.float32(mask.ignore_high))
    labels = np.where(ignore, IGNORE_LABEL, labels)
    rel = np.where(ignore, 0, rel)
    return labels.astype(np.uint8), rel.astype(np.uint8)


class DeployRuntime:
    """Generation with attention-map masks from an engine folder, without torch. A preset
    that refines its masks (the default's dense CRF) is refused: the refinement runs in torch;
    `unrefined=True` gives its masks before refinement."""

    def __init__(self, folder: str | Path, runner: str = "tensorrt",
                 kernels: str | Path | None = None, preset: str = "attnseg",
                 unrefined: bool = False):
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        check_files(self.folder, manifest)
        key = manifest["key"]
        if key["backend"] not in ("onnxruntime", "tensorrt"):
            raise UserError(f"engine {folder} is a {key['backend']} engine; the deploy runtime "
                            "runs onnxruntime or tensorrt folders")
        if runner == "tensorrt" and key["backend"] != "tensorrt":
            raise UserError(f"engine {folder} has no TensorRT plans (it is an onnxruntime "
                            "engine); use runner='onnxruntime'")
        deploy = self.folder / "deploy"
        if not deploy.is_dir():
            if set(manifest["parts"]) == {"unet"}:  # SDXL: the UNet alone is an engine
                raise UserError(f"engine {folder} holds a UNet only (SDXL); the deploy runtime "
                                "runs Stable Diffusion 1.x/2.x engine sets")
            raise UserError(f"engine {folder} has no deploy/ files; rebuild it")
        p = get_preset(preset)
        if unrefined:  # the preset's masks before its refinement steps, asked for by name
            p.mask = replace(p.mask, crf_iterations=0, min_region_box=0.0)
        if p.mask.crf_iterations or p.mask.min_region_box:
            raise UserError(f"deploy runtime: preset {preset!r} refines its masks (dense CRF or "
                            "small regions), which the torch-free runtime does not do; run "
                            "`attnseg synth --engine` for them, or pass unrefined=True for the "
                            "preset's masks before refinement")
        if p.mask.normalize_at != "maps":
            raise UserError(f"deploy runtime: preset {preset!r} normalises its maps at image "
                            "size, which the torch-free runtime does not do; run `attnseg synth "
                            "--engine` for it")
        from transformers import CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(str(deploy / "tokenizer"))
        self.scheduler = DDIM(json.loads((deploy / "scheduler_config.json").read_text()))
        self.info = json.loads((deploy / "pipeline.json").read_text())
        self.taps = np.load(deploy / "taps.npz")
        self.parts = manifest["parts"]
        self.layout = self.parts["unet"]["layout"]
        self.size = (key["height"], key["width"])
        self.dtype = host_dtype(self.parts["unet"]["io"]["sample"]["dtype"])
        self.runners = {}
        for name, part in self.parts.items():
            if runner == "onnxruntime":
                self.runners[name] = _OrtRunner(self.folder / part["onnx"])
            else:
                self.runners[name] = _TrtRunner(self.folder / part["plan"], part)
        self.kernels = KernelLibrary(kernels) if kernels and runner == "tensorrt" else None
        saved = manifest.get("harvest")
        self.harvest = HarvestConfig.from_record(saved) if saved else p.harvest
        self.mask = p.mask

    def _encode(self, prompts):
        ids = self.tokenizer(prompts, padding="max_length", max_length=TEXT_LEN,
                             truncation=True, return_tensors="np").input_ids.astype(np.int64)
        return self.runners["text_encoder"]({"input_ids": ids})["last_hidden_state"]

    def _taps(self, a: int, b: int, mode: str):
        if a == b:
            mode = "none"
        return self.taps[f"{mode}:{a}:{b}:idx"], self.taps[f"{mode}:{a}:{b}:w"]

    def _resize(self, x: np.ndarray, size, mode) -> np.ndarray:
        """kernels.interp.resize: Wy @ x @ Wx^T with the stored taps."""
        def matrix(a, b):
            idx, w = self._taps(a, b, mode)
            m = np.zeros((b, a), np.float64)
            np.add.at(m, (np.repeat(np.arange(b), idx.shape[1]), idx.reshape(-1)),
                      w.reshape(-1))
            return m.astype(np.float32)

        wy, wx = matrix(x.shape[-2], size[0]), matrix(x.shape[-1], size[1])
        return (wy @ x @ wx.T).astype(np.float32)

    def generate(self, prompts: list[str], labels: list[list[tuple[int, str]]],
                 seeds: list[int] | None = None, steps: int = 30, guidance: float = 7.5,
                 latents: np.ndarray | None = None):
        """images uint8 [B, H, W, 3], labels uint8 [B, H, W], reliability uint8 [B, H, W];
        `latents` [B, 4, h, w] float32 overrides the seeded initial noise.
        `self.last_images`/`self.last_maps` keep the float images and harvested means."""
        h, w = self.size[0] // self.info["vae_scale_factor"], \
            self.size[1] // self.info["vae_scale_factor"]
        b = len(prompts)
        if latents is None:
            seeds = seeds if seeds is not None else list(range(b))
            latents = np.stack([np.random.default_rng(s).standard_normal(
                (self.info["latent_channels"], h, w), dtype=np.float32) for s in seeds])
        x = latents.astype(np.float32)
        tw, class_ids = token_weights(self.tokenizer, prompts, labels, self.harvest.token_merge)
        embeds = np.concatenate([self._encode([""] * b), self._encode(prompts)]).astype(self.dtype)
        window = self.harvest.step_range(steps)
        sums: dict[str, np.ndarray] = {}
        counts: dict[str, float] = {}
        for i, t in enumerate(self.scheduler.timesteps(steps)):
            out = self.runners["unet"]({
                "sample": np.concatenate([x, x]).astype(self.dtype),
                "timestep": np.array([t], np.float32), "encoder_hidden_states": embeds,
                "token_weights": tw})
            if i in window:
                for m in self.layout:
                    sums[m["name"]] = sums.get(m["name"], 0.0) + out[m["name"]]
                    counts[m["name"]] = counts.get(m["name"], 0.0) + m["count"]
            uncond, cond = np.split(out["noise_pred"].astype(np.float32), 2)
            eps = uncond + np.float32(guidance) * (cond - uncond)
            x = self.scheduler.step(eps, int(t), x, steps)
        image = self.runners["vae_decoder"]({
            "latents": (x / np.float32(self.info["vae_scaling_factor"])).astype(self.dtype)
        })["image"].astype(np.float32)
        image = np.clip(image / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
        means = {m["name"]: sums[m["name"]] / counts[m["name"]] for m in self.layout}
        self.last_images, self.last_maps = image, means
        lab, rel = self._masks(means, class_ids)
        return (image * 255.0).round().astype(np.uint8), lab, rel

    def _masks(self, means: dict, class_ids: np.ndarray):
        cfg, mask = self.harvest, self.mask
        grid = (-(-self.size[0] // cfg.combine_stride), -(-self.size[1] // cfg.combine_stride))
        maps = {m["stride"]: means[m["name"]] for m in self.layout if m["kind"] != "self"}
        if cfg.accumulate == "common":
            (combined,) = maps.values()
        else:  # pipeline.harvest.masks.combine_maps
            total, wsum = 0.0, 0.0
            for stride in sorted(maps):
                wgt = cfg.stride_weights.get(stride, 1.0)
                m = _normalize(maps[stride], cfg.stride_normalize)
                total = total + wgt * self._resize(m, grid, cfg.combine_mode)
                wsum += wgt
            combined = (total / wsum).astype(np.float32)
        if cfg.refine_power > 0:  # pipeline.harvest.masks.refine_maps
            size = (-(-self.size[0] // cfg.refine_stride), -(-self.size[1] // cfg.refine_stride))
            x = self._resize(combined, size, cfg.refine_mode)
            a = next(means[m["name"]] for m in self.layout if m["kind"] == "self")
            flat = x.reshape(*x.shape[:2], -1).transpose(0, 2, 1)
            for _ in range(cfg.refine_power):
                flat = a @ flat
            combined = flat.transpose(0, 2, 1).reshape(x.shape).astype(np.float32)
        norm = _normalize(combined, mask.normalize)
        mode = mask.upsample_mode
        ty = self._taps(norm.shape[2], self.size[0], mode)
        tx = self._taps(norm.shape[3], self.size[1], mode)
        if self.kernels is not None:
            return self.kernels.finalize(norm, class_ids, ty, tx, self.size,
                                         (mask.bg_const, mask.bg_slope, mask.ignore_low,
                                          mask.ignore_high))
        scores = self._resize(norm, self.size, mode if norm.shape[2:] != self.size else "none")
        return _decide(scores, class_ids, mask)
