"""TensorRT backend: plans built from the exported ONNX, loaded and run with CUDA graphs.

Written against TensorRT 10's documented Python API (`tensorrt`, `tensorrt.plugin`); this
project's machines cannot install TensorRT's libraries, so only what needs no TensorRT is tested
here (the build configuration, the plugin's ONNX nodes and Triton kernel, the error paths).

- Build (`build_plan`): ONNX parser -> network; reduced-precision ONNX (fp16/bf16 exports) is
  parsed as a *strongly typed* network, so TensorRT keeps the exported types (the attention
  maps are computed in fp32 in the graph); one optimisation profile over the dynamic batch and
  class count; a timing cache shared by the sub-networks of a folder (`timing.cache`), read
  before and written after each build; `REFIT` when asked (LoRA swaps without a rebuild).
- Plugin: with TensorRT's Python plugin API (10.8+: `tensorrt.plugin.aot_impl`), the UNet's
  map computation is exported as `attnseg::class_attention_maps` nodes implemented by the
  Triton kernel of `attnseg.kernels` compiled to PTX ahead of time, so aggregation runs inside
  the engine without Python at run time.
- Run (`TensorRTEngine`): `execute_async_v3` on a torch CUDA stream; when the input shapes
  repeat, the launch is captured once into a CUDA graph and replayed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from ..pipeline.errors import UserError
from .backends import _TORCH_DTYPES, Engine, require_module, resolve_shapes

PLUGIN_NAMESPACE = "attnseg"
PLUGIN_NAME = "class_attention_maps"
# ONNX domain of plugin nodes; TensorRT's parser finds the plugin by op type and the
# `plugin_namespace` attribute.
PLUGIN_DOMAIN = "trt.plugins"
TIMING_CACHE = "timing.cache"
WORKSPACE_BYTES = 8 << 30


def require_tensorrt():
    """The `tensorrt` module, or a one-line UserError saying what to install."""
    trt = require_module("tensorrt", "tensorrt")
    if not torch.cuda.is_available():
        raise UserError("backend 'tensorrt' needs a CUDA GPU, and none is visible")
    return trt


def toolchain_info() -> dict:
    """What a plan depends on besides its ONNX: TensorRT version and the GPU."""
    trt = require_tensorrt()
    major, minor = torch.cuda.get_device_capability()
    return {"tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(),
            "sm": f"{major}{minor}"}


# ---------------------------------------------------------------------------------------------
# Build configuration (pure data: testable without TensorRT)


@dataclass(frozen=True)
class PlanConfig:
    """How one plan is built."""

    strongly_typed: bool  # reduced-precision ONNX: keep the exported types
    tf32: bool  # fp32 ONNX: allow TF32 tensor cores
    refit: bool
    workspace_bytes: int
    profile: dict  # input name -> (min, opt, max)


def plan_config(io: dict, profiles: dict, refit: bool) -> PlanConfig:
    """The build settings `build_plan` uses for a sub-network with this I/O description."""
    dtypes = {v["dtype"] for v in io.values()}
    reduced = bool(dtypes & {"float16", "bfloat16"})
    # Profiles cover the inputs with dynamic dims only (the timestep is a static [1]).
    dynamic = {k for k, v in io.items() if any(isinstance(d, str) for d in v["shape"])}
    return PlanConfig(strongly_typed=reduced, tf32=not reduced, refit=refit,
                      workspace_bytes=WORKSPACE_BYTES,
                      profile={k: tuple(tuple(s) for s in v) for k, v in profiles.items()
                               if k in dynamic})


# ---------------------------------------------------------------------------------------------
# The plugin


# TensorRT data type -> the Triton kernel's q/k type (filled in when the plugin registers).
PLUGIN_DTYPES: dict = {}


def plugin_available() -> bool:
    """TensorRT with the Python plugin API's ahead-of-time implementations (10.8+)."""
    try:
        import tensorrt.plugin as trtp
    except Exception:
        return False
    return hasattr(trtp, "aot_impl")


def plugin_translation_table(mode: str) -> dict | None:
    """ONNX translation of `attnseg::class_attention_maps` into plugin nodes, or None when the
    plugin is not used (mode "off", or "auto" without a plugin-capable TensorRT)."""
    if mode == "off" or (mode == "auto" and not plugin_available()):
        return None
    if mode == "on" and not plugin_available():
        raise UserError("--trt-plugin on needs TensorRT 10.8+ with tensorrt.plugin.aot_impl")
    return plugin_onnx_translation()


def plugin_onnx_translation() -> dict:
    """`custom_translation_table` for torch.onnx.export: each `attnseg::class_attention_maps`
    call becomes one `class_attention_maps` node (domain trt.plugins) whose attributes are
    what the plugin's ahead-of-time kernel needs."""
    import onnxscript

    _register_plugin_schema()
    plugin_op = onnxscript.values.Opset(PLUGIN_DOMAIN, 1)[PLUGIN_NAME]

    def class_attention_maps(q, k, token_weights, h: int, w: int, scale: float, heads: int,
                             head_dim: int, tokens: int, block_c: int):
        # "aot" is not a plugin field: TensorRT's ONNX parser reads it to pick the
        # registered aot_impl over a JIT impl (TensorRT's quickly-deployable-plugin sample
        # documents it as a bool attribute; ONNX stores bools as INT 1).
        return plugin_op(
            q, k, token_weights, h=h, w=w, scale=scale, heads=heads, head_dim=head_dim,
            tokens=tokens, block_c=block_c, plugin_namespace=PLUGIN_NAMESPACE, plugin_version="1",
            aot=1)

    return {torch.ops.attnseg.class_attention_maps.default: class_attention_maps}


@functools.cache
def _register_plugin_schema() -> None:
    """An ONNX schema for the plugin node (the exporter builds nodes from schemas)."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has(PLUGIN_NAME, PLUGIN_DOMAIN):
        return
    attr = OpSchema.Attribute
    ints = ("h", "w", "heads", "head_dim", "tokens", "block_c", "aot")
    schema = OpSchema(
        PLUGIN_NAME, PLUGIN_DOMAIN, 1,
        doc="attnseg class-token attention maps of one layer (TensorRT plugin).",
        inputs=[OpSchema.FormalParameter("q", "T"), OpSchema.FormalParameter("k", "T"),
                OpSchema.FormalParameter("token_weights", "tensor(float)")],
        outputs=[OpSchema.FormalParameter("maps", "tensor(float)")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"],
                           "query/key precision")],
        attributes=[attr(n, OpSchema.AttrType.INT, "") for n in ints]
        + [attr("scale", OpSchema.AttrType.FLOAT, ""),
           attr("plugin_namespace", OpSchema.AttrType.STRING, ""),
           attr("plugin_version", OpSchema.AttrType.STRING, "")],
    )
    onnx.defs.register_schema(schema)


@functools.cache
def register_plugin() -> None:
    """Register `attnseg::class_attention_maps` with TensorRT (shape function + AOT kernel)."""
    trt = require_tensorrt()
    import tensorrt.plugin as trtp

    from .aot import plugin_ptx

    PLUGIN_DTYPES.update({trt.float16: "fp16", trt.bfloat16: "bf16", trt.float32: "fp32"})

    @trtp.register(f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}")
    def _desc(q: trtp.TensorDesc, k: trtp.TensorDesc, token_weights: trtp.TensorDesc, h: int,
              w: int, scale: float, heads: int, head_dim: int, tokens: int,
              block_c: int) -> trtp.TensorDesc:
        return trtp.from_shape_expr((q.shape_expr[0], token_weights.shape_expr[2], h, w),
                                    dtype=trt.float32)

    @trtp.autotune(f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}")
    def _formats(q, k, token_weights, outputs):
        # q and k in the model's precision (one type for both); maps always fp32.
        return [trtp.AutoTuneCombination("FP16|BF16|FP32, FP16|BF16|FP32, FP32, FP32")]

    @trtp.aot_impl(f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}")
    def _aot(q: trtp.TensorDesc, k: trtp.TensorDesc, token_weights: trtp.TensorDesc, h: int,
             w: int, scale: float, heads: int, head_dim: int, tokens: int, block_c: int,
             outputs, tactic):
        dtype = PLUGIN_DTYPES.get(q.dtype)
        if dtype is None:
            raise ValueError(f"the attnseg plugin has no kernel for q of type {q.dtype}")
        major, minor = torch.cuda.get_device_capability()
        name, ptx, threads, shared, block_n = plugin_ptx(dtype, scale, tokens, head_dim,
                                                         block_c, major * 10 + minor)
        launch = trtp.KernelLaunchParams()
        launch.grid_x = q.shape_expr[0]
        launch.grid_y = -(-(h * w) // block_n)
        launch.block_x = threads
        launch.shared_mem = shared
        # Kernel scalars after the input pointers: B, N, L, D, C, H.
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in (
            q.shape_expr[0], h * w, tokens, head_dim, token_weights.shape_expr[2], heads)])
        return name.encode(), ptx.encode(), launch, extra


# ---------------------------------------------------------------------------------------------
# Build / load / run / refit


def _logger(trt):
    return trt.Logger(trt.Logger.WARNING)


def build_plan(onnx_path: Path, spec, folder: Path, refit: bool = False,
               plugin: bool = False) -> str:
    """Build `<name>.plan` next to the ONNX file; returns its file name."""
    trt = require_tensorrt()
    if plugin:
        register_plugin()
    cfg = plan_config(spec.io_dict(), spec.profiles, refit)
    logger = _logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    if cfg.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT cannot parse {onnx_path.name}: {errors[:500]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_bytes)
    if cfg.tf32:
        config.set_flag(trt.BuilderFlag.TF32)
    if cfg.refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in cfg.profile.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache_path = Path(folder) / TIMING_CACHE
    blob = cache_path.read_bytes() if cache_path.exists() else b""
    timing = config.create_timing_cache(blob)
    if not config.set_timing_cache(timing, ignore_mismatch=False):
        # A cache from another GPU or TensorRT version: start a fresh one rather than
        # time nothing or reuse timings that do not hold here.
        print(f"  timing cache {cache_path.name} is from another GPU or TensorRT; starting anew")
        timing = config.create_timing_cache(b"")
        if not config.set_timing_cache(timing, ignore_mismatch=False):
            raise UserError("TensorRT refused a new timing cache")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError(f"TensorRT could not build an engine from {onnx_path.name} (see the "
                        "TensorRT messages above)")
    out = Path(folder) / f"{spec.name}.plan"
    out.write_bytes(bytes(plan))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return out.name


class TensorRTEngine(Engine):
    """A deserialised plan with one execution context; CUDA graphs for repeated shapes."""

    backend = "tensorrt"

    def __init__(self, engine, name, input_names, output_names, io, device, use_cuda_graphs=True):
        super().__init__(name, input_names, output_names, io, device)
        self.engine = engine
        self.context = engine.create_execution_context()
        self.stream = torch.cuda.Stream(device=self.device)
        self.use_cuda_graphs = use_cuda_graphs
        self._graph = None
        self._graph_shapes = None
        self._static_in: dict[str, torch.Tensor] = {}
        self._static_out: dict[str, torch.Tensor] = {}

    @classmethod
    def load(cls, plan_path: Path, name: str, part: dict, device) -> TensorRTEngine:
        trt = require_tensorrt()
        if part.get("plugin"):
            register_plugin()
        plan_path = Path(plan_path)
        runtime = trt.Runtime(_logger(trt))
        engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if engine is None:
            raise UserError(f"engine file {plan_path} cannot be loaded by TensorRT "
                            f"{trt.__version__} (corrupt, or built by another TensorRT version "
                            "or GPU); rebuild with `attnseg engine build`")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        if sorted(names) != sorted(part["inputs"] + part["outputs"]):
            raise UserError(f"engine file {plan_path} does not match its manifest (tensors "
                            f"{names}); rebuild with `attnseg engine build`")
        return cls(engine, name, part["inputs"], part["outputs"], part["io"], device)

    def _bind(self, inputs: dict[str, torch.Tensor], shapes: dict) -> dict[str, torch.Tensor]:
        outputs = {}
        for n in self.input_names:
            if not self.context.set_input_shape(n, tuple(inputs[n].shape)):
                raise UserError(f"{self.name} input {n} of shape {tuple(inputs[n].shape)} is "
                                "outside the engine's profile; rebuild it for this size and "
                                "batch")
            self.context.set_tensor_address(n, inputs[n].data_ptr())
        for n in self.output_names:
            t = torch.empty(shapes[n], dtype=_TORCH_DTYPES[self.io[n]["dtype"]],
                            device=self.device)
            outputs[n] = t
            self.context.set_tensor_address(n, t.data_ptr())
        return outputs

    def infer(self, feeds):
        self._check_feeds(feeds)
        feeds = {n: feeds[n].to(self.device, _TORCH_DTYPES[self.io[n]["dtype"]]).contiguous()
                 for n in self.input_names}
        shapes = resolve_shapes(self.io, feeds)
        key = tuple(tuple(feeds[n].shape) for n in self.input_names)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            if not self.use_cuda_graphs:
                outs = self._bind(feeds, shapes)
                self._execute()
            else:
                if key != self._graph_shapes:
                    self._capture(feeds, shapes, key)
                for n in self.input_names:
                    self._static_in[n].copy_(feeds[n])
                self._graph.replay()
                outs = {n: t.clone() for n, t in self._static_out.items()}
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return outs

    def _execute(self):
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution of {self.name} failed")

    def _capture(self, feeds, shapes, key):
        """Static buffers for these shapes, one plain run (TensorRT allocates lazily on the
        first run), then the capture of one launch into a CUDA graph."""
        self._static_in = {n: t.clone() for n, t in feeds.items()}
        self._static_out = self._bind(self._static_in, shapes)
        self._execute()
        self.stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            self._execute()
        self._graph, self._graph_shapes = graph, key

    def refit_from_onnx(self, onnx_path: Path) -> None:
        """Swap in the weights of an ONNX export of the same graph (e.g. another LoRA merged):
        TensorRT's ONNX refitter matches initializers to the plan's refittable weights."""
        trt = require_tensorrt()
        logger = _logger(trt)
        refitter = trt.Refitter(self.engine, logger)
        parser_refitter = trt.OnnxParserRefitter(refitter, logger)
        if not parser_refitter.refit_from_file(str(onnx_path)):
            raise UserError(f"TensorRT cannot refit {self.name} from {onnx_path}: the graph "
                            "differs or the plan was built without --refit")
        if not refitter.refit_cuda_engine():
            raise UserError(f"TensorRT refit of {self.name} failed")
        self._graph = self._graph_shapes = None  # weights moved: recapture

    def close(self):
        self._graph = None
        self.context = None
        self.engine = None


def refit_folder(folder: Path, pipe, loras: list, key_update: dict, log=print) -> None:
    """Swap the weights of a refittable TensorRT engine folder for those of `pipe` (e.g. the
    same base model with other LoRAs merged): re-export the ONNX of the text encoder and UNet
    (same graphs), refit their plans from it, and write the folder anew (atomically)."""
    import json
    import shutil

    from . import cache
    from .export import export_onnx, text_encoder_spec, unet_spec
    from .graph import MapGraphSpec

    folder = Path(folder)
    manifest = cache.read_manifest(folder)
    key = manifest["key"]
    if key["backend"] != "tensorrt" or not manifest.get("trt_refit"):
        raise UserError(f"engine {folder} is not a refittable TensorRT engine (build it with "
                        "--backend tensorrt --refit)")
    graph = MapGraphSpec.from_dict({k: v for k, v in key["maps"].items() if k != "vae_hash"})
    tmp = cache.prepare_output(folder)
    try:
        for f in folder.iterdir():
            if f.name != cache.MANIFEST:
                (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
        specs = [text_encoder_spec(pipe.text_encoder, key["max_batch"]),
                 unet_spec(pipe.unet, graph, (key["height"], key["width"]), key["max_batch"],
                           key["max_classes"])]
        try:
            for spec in specs:
                part = manifest["parts"][spec.name]
                if part.get("plugin"):
                    spec.module.map_impl = "plugin"
                translation = plugin_onnx_translation() if part.get("plugin") else None
                export_onnx(spec, tmp / part["onnx"], key["opset"],
                            custom_translation_table=translation)
                engine = TensorRTEngine.load(tmp / part["plan"], spec.name, part, pipe.device)
                engine.refit_from_onnx(tmp / part["onnx"])
                (tmp / part["plan"]).write_bytes(bytes(engine.engine.serialize()))
                engine.close()
                log(f"  refitted {spec.name}")
        finally:
            specs[1].module.remove()
        new = dict(manifest, key=dict(key, **key_update))
        new["source"] = dict(manifest.get("source", {}),
                             loras=[[p, s] for p, s, _ in loras])
        new.pop("files", None)
        cache.commit_output(tmp, folder, json.loads(json.dumps(new)))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
