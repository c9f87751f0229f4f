"""Export specs, one per sub-network, and their ONNX export.

A `SubnetSpec` says everything a backend needs about one sub-network: the module, its input and
output names, sample inputs, the dynamic axes, and the TensorRT shape profile (min/opt/max per
input). The UNet spec is `UNetWithMaps` (noise prediction plus that step's attention-map sums).

Dynamic axes: the batch everywhere (the UNet's is 2 x batch: the classifier-free-guidance pair)
and the class count of the token weights. Height and width are fixed per engine (the map
layout depends on them). ONNX opset: `OPSET` (18: the opset of torch's dynamo exporter's
function library; ONNX Runtime >= 1.14 and TensorRT >= 8.6 read it).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..pipeline.errors import UserError
from .graph import MapGraphSpec, TextEncoderOutput, UNetWithMaps, VaeDecoderOutput

OPSET = 18
TEXT_LEN = 77
# Sample batch and class count used to trace (2, not 1: torch.export specialises size-1 dims).
_TRACE_BATCH = 2
_TRACE_CLASSES = 2
# Export-time bounds of the dynamic dims. They only steer tracing (the ONNX graph has no
# guards and runs any batch; a TensorRT profile sets the engine's real range): diffusers'
# upsampler branches on a UNet batch >= 64 (the branch is a memory-layout no-op, so B <= 31
# loses nothing), and torch.export specialises size-1 dims. Bounds that hold on the first try
# spare the exporter a second, fallback trace (which doubles the export time).
_MIN_DIM = 2
_MAX_BATCH_DIM = 31
_MAX_CLASSES_DIM = 256

PARTS = ("text_encoder", "unet", "vae_decoder")


@dataclass
class SubnetSpec:
    """One sub-network to export: module, I/O names, sample inputs, dynamic axes, profiles.

    io: name -> (dtype name, shape) with symbolic dims "B" (batch), "2B" (CFG batch) and "C"
    (classes); profiles: input name -> (min, opt, max) concrete shapes for TensorRT.
    """

    name: str
    module: torch.nn.Module
    input_names: list[str]
    output_names: list[str]
    sample_inputs: tuple
    dynamic_shapes: dict
    io: dict[str, tuple[str, tuple]] = field(default_factory=dict)
    profiles: dict[str, tuple[tuple, tuple, tuple]] = field(default_factory=dict)

    def io_dict(self) -> dict:
        return {k: {"dtype": d, "shape": list(s)} for k, (d, s) in self.io.items()}


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
            torch.int64: "int64"}[dtype]


def _profile(sym_shape: tuple, batch: int, classes: int, opt_batch: int, opt_classes: int):
    def concrete(b, c):
        out = []
        for d in sym_shape:
            out.append({"B": b, "2B": 2 * b, "C": c}.get(d, d) if isinstance(d, str) else d)
        return tuple(out)

    return concrete(1, 1), concrete(opt_batch, opt_classes), concrete(batch, classes)


def unet_spec(unet, graph: MapGraphSpec, image_size: tuple[int, int], max_batch: int,
              max_classes: int, map_impl: str = "ref") -> SubnetSpec:
    """The UNet-with-maps spec (installs `UNetWithMaps` on `unet`; call `.module.remove()`)."""
    from torch.export import Dim

    module = UNetWithMaps(unet, graph, image_size, map_impl=map_impl).eval()
    cfg = unet.config
    p = next(unet.parameters())
    lat = (image_size[0] // 8, image_size[1] // 8)
    g = torch.Generator().manual_seed(0)
    b, c = _TRACE_BATCH, _TRACE_CLASSES
    sample = torch.randn(2 * b, cfg.in_channels, *lat, generator=g).to(p.device, p.dtype)
    ehs = torch.randn(2 * b, TEXT_LEN, cfg.cross_attention_dim, generator=g).to(p.device,
                                                                                 p.dtype)
    tw = torch.rand(b, TEXT_LEN, c, generator=g).to(p.device)
    timestep = torch.tensor([500.0], device=p.device)
    batch = Dim("batch", min=_MIN_DIM, max=_MAX_BATCH_DIM)
    classes = Dim("classes", min=_MIN_DIM, max=_MAX_CLASSES_DIM)
    dt = _dtype_name(p.dtype)
    io = {
        "sample": (dt, ("2B", cfg.in_channels, *lat)),
        "timestep": ("float32", (1,)),
        "encoder_hidden_states": (dt, ("2B", TEXT_LEN, cfg.cross_attention_dim)),
        "token_weights": ("float32", ("B", TEXT_LEN, "C")),
        "noise_pred": (dt, ("2B", cfg.out_channels, *lat)),
    }
    for m in module.layout:
        io[m.name] = ("float32", ("B", *m.shape))
    inputs = [sample, timestep, ehs, tw]
    dynamic = {"sample": {0: 2 * batch}, "timestep": None,
               "encoder_hidden_states": {0: 2 * batch},
               "token_weights": {0: batch, 2: classes}}
    for name, width in (module.added_dims or {}).items():  # SDXL's added conditioning
        inputs.append(torch.randn(2 * b, width, generator=g).to(p.device, p.dtype))
        dynamic[name] = {0: 2 * batch}
        io[name] = (dt, ("2B", width))
    spec = SubnetSpec(
        name="unet", module=module, input_names=module.input_names,
        output_names=module.output_names, sample_inputs=tuple(inputs),
        dynamic_shapes=dynamic, io=io,
    )
    for name in spec.input_names:
        spec.profiles[name] = _profile(io[name][1], max_batch, max_classes,
                                       max_batch, min(2, max_classes))
    return spec


def text_encoder_spec(text_encoder, max_batch: int) -> SubnetSpec:
    from torch.export import Dim

    module = TextEncoderOutput(text_encoder).eval()
    p = next(text_encoder.parameters())
    ids = torch.zeros(_TRACE_BATCH, TEXT_LEN, dtype=torch.int64, device=p.device)
    ids[:, 0] = 1
    batch = Dim("batch", min=_MIN_DIM, max=_MAX_BATCH_DIM)
    hidden = text_encoder.config.hidden_size
    io = {"input_ids": ("int64", ("B", TEXT_LEN)),
          "last_hidden_state": (_dtype_name(p.dtype), ("B", TEXT_LEN, hidden))}
    spec = SubnetSpec("text_encoder", module, ["input_ids"], ["last_hidden_state"], (ids,),
                      {"input_ids": {0: batch}}, io)
    spec.profiles["input_ids"] = _profile(io["input_ids"][1], max_batch, 1, max_batch, 1)
    return spec


def vae_decoder_spec(vae, image_size: tuple[int, int], max_batch: int) -> SubnetSpec:
    from torch.export import Dim

    module = VaeDecoderOutput(vae).eval()
    p = next(vae.parameters())
    lat = (image_size[0] // 8, image_size[1] // 8)
    latents = torch.randn(_TRACE_BATCH, vae.config.latent_channels, *lat,
                          generator=torch.Generator().manual_seed(0)).to(p.device, p.dtype)
    batch = Dim("batch", min=_MIN_DIM, max=_MAX_BATCH_DIM)
    dt = _dtype_name(p.dtype)
    io = {"latents": (dt, ("B", vae.config.latent_channels, *lat)),
          "image": (dt, ("B", vae.config.out_channels, *image_size))}
    spec = SubnetSpec("vae_decoder", module, ["latents"], ["image"], (latents,),
                      {"latents": {0: batch}}, io)
    spec.profiles["latents"] = _profile(io["latents"][1], max_batch, 1, max_batch, 1)
    return spec


def export_onnx(spec: SubnetSpec, path: Path, opset: int = OPSET,
                custom_translation_table: dict | None = None) -> list[Path]:
    """Export `spec` to ONNX at `path` (weights in `path`.data); returns the files written.

    Uses torch's dynamo-based exporter (the TorchScript one mistranslates the in-place map
    accumulation). Its progress chatter is kept off the console.
    """
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError:
        raise UserError("ONNX export needs onnx and onnxscript: pip install onnx onnxscript"
                        ) from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sink = io.StringIO()
    # The exporter logs a warning per missing torchvision op and prints its progress.
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            spec.module, spec.sample_inputs, dynamo=True, opset_version=opset,
            input_names=spec.input_names, output_names=spec.output_names,
            dynamic_shapes=spec.dynamic_shapes, custom_translation_table=custom_translation_table,
            verbose=False, report=False,
        )
        program.save(str(path), external_data=True)
    onnx_log.setLevel(level)
    files = [path]
    data = path.with_name(path.name + ".data")
    if data.exists():
        files.append(data)
    return files
