"""One `Engine` interface over the backends: torch (eager), compile, onnxruntime (tensorrt lives
in `engines.trt`, because it needs its own libraries).

An engine runs one sub-network: `infer(feeds)` takes and returns dicts of torch tensors keyed by
the names in the sub-network's export spec, on the engine's device. The backends differ only in
how they are built and loaded; what they compute is the same graph.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import torch

from ..pipeline.errors import UserError, first_line

_INSTALL_HINT = {
    "onnxruntime": "pip install onnxruntime-gpu onnx onnxscript (the GPU wheel also runs on "
                   "CPU-only machines)",
    "tensorrt": "install TensorRT 10 for Python (pip install tensorrt --extra-index-url "
                "https://pypi.nvidia.com) on a machine with an NVIDIA GPU, plus pycuda for the "
                "torch-free deploy runtime",
}

# The short dtype names engine keys and --dtype use.
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16,
                 "bfloat16": torch.bfloat16, "int64": torch.int64}
_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64}
# ONNX Runtime has no bf16 kernels for most of a UNet's ops (`engine build` refuses it).
ORT_DTYPES = ("float32", "float16", "int64")


def require_module(backend: str, module: str):
    """Import `module` for `backend`, or a one-line UserError saying what to install."""
    try:
        return importlib.import_module(module)
    except Exception as e:  # ImportError, or a bindings wheel whose libraries are missing
        reason = first_line(e)
        raise UserError(f"backend {backend!r} is not available ({module}: {reason}); "
                        f"{_INSTALL_HINT.get(backend, 'install ' + module)}") from None


def resolve_shapes(io: dict, feeds: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Concrete shapes of every I/O tensor, solving the symbolic dims (B, 2B, C) from feeds."""
    values: dict[str, int] = {}
    for name, t in feeds.items():
        for sym, n in zip(io[name]["shape"], t.shape, strict=True):
            if sym == "2B":
                values["B"] = n // 2
            elif isinstance(sym, str):
                values[sym] = n
    out = {}
    for name, info in io.items():
        out[name] = tuple(
            (2 * values["B"] if d == "2B" else values[d]) if isinstance(d, str) else int(d)
            for d in info["shape"])
    return out


class Engine:
    """A built sub-network. `infer(feeds) -> outputs`, both name -> tensor on `device`."""

    backend = "abstract"

    def __init__(self, name: str, input_names: list[str], output_names: list[str],
                 io: dict, device: torch.device):
        self.name = name
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.io = io
        self.device = torch.device(device)

    def infer(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the engine holds (sessions, device memory)."""

    def _check_feeds(self, feeds):
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ValueError(f"engine {self.name}: missing inputs {missing}")


class TorchEngine(Engine):
    """Eager PyTorch: the export-spec module called directly (the reference for the others)."""

    backend = "torch"

    def __init__(self, module, name, input_names, output_names, io, device):
        super().__init__(name, input_names, output_names, io, device)
        self.module = module

    def _call(self, *args):
        return self.module(*args)

    @torch.no_grad()
    def infer(self, feeds):
        self._check_feeds(feeds)
        out = self._call(*[feeds[n] for n in self.input_names])
        out = out if isinstance(out, tuple) else (out,)
        return dict(zip(self.output_names, out, strict=True))


class CompiledEngine(TorchEngine):
    """`torch.compile` of the export-spec module, one graph (fullgraph: a break would leave the
    harvesting outside the graph); on CUDA with CUDA graphs ("reduce-overhead")."""

    backend = "compile"

    def __init__(self, module, name, input_names, output_names, io, device, mode=None):
        super().__init__(module, name, input_names, output_names, io, device)
        self.cuda_graphs = self.device.type == "cuda"
        if mode is None:
            mode = "reduce-overhead" if self.cuda_graphs else "default"
        self.mode = mode
        self.compiled = torch.compile(module, fullgraph=True, dynamic=False, mode=mode)

    def _call(self, *args):
        if self.cuda_graphs:
            # Each call is a new step of the CUDA-graph tree; outputs are copied out below
            # because the next replay overwrites the graph's output buffers.
            torch.compiler.cudagraph_mark_step_begin()
            return tuple(t.clone() for t in self.compiled(*args))
        return self.compiled(*args)


def ort_cuda_options(device_id: int, stream: int | None, cuda_graphs: bool) -> dict:
    """Options of ONNX Runtime's CUDA execution provider: run on `stream` (torch's, so that
    neither side waits on the host for the other) and, with `cuda_graphs`, replay each input
    shape's captured CUDA graph."""
    opts = {"device_id": str(device_id)}
    if stream is not None:
        opts["user_compute_stream"] = str(stream)
    if cuda_graphs:
        opts["enable_cuda_graph"] = "1"
    return opts


def ort_run_options(ort, graph_id: int | None = None):
    """Run options: no host synchronisation at the end of a run (the outputs are ordered on
    the shared stream), and the CUDA graph of `graph_id` when graphs are on."""
    opts = ort.RunOptions()
    opts.add_run_config_entry("disable_synchronize_execution_providers", "1")
    if graph_id is not None:
        opts.add_run_config_entry("gpu_graph_id", str(graph_id))
    return opts


class OrtEngine(Engine):
    """An ONNX Runtime session over one exported ONNX file.

    CPU: numpy in and out. CUDA: the CUDA execution provider (TensorRT's first when
    `use_trt_provider` and available) with IO binding on torch's current stream, so tensors
    stay on the GPU and no call waits on the host; with `cuda_graphs` (the default on CUDA),
    one CUDA graph per input shape, captured on its first call and replayed after (if ONNX
    Runtime cannot capture this graph, the session is made again without them, once).
    """

    backend = "onnxruntime"

    def __init__(self, path: Path, name, input_names, output_names, io, device,
                 use_trt_provider: bool = False, trt_cache: Path | None = None,
                 cuda_graphs: bool = True):
        super().__init__(name, input_names, output_names, io, device)
        self.ort = require_module("onnxruntime", "onnxruntime")
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"engine file {self.path} is missing; rebuild with "
                            "`attnseg engine build`")
        odd = sorted({v["dtype"] for v in io.values()} - set(ORT_DTYPES))
        if odd:
            raise UserError(f"engine file {self.path} has {', '.join(odd)} tensors, which ONNX "
                            "Runtime does not run; rebuild with --dtype fp16 or fp32")
        self.use_trt_provider, self.trt_cache = use_trt_provider, trt_cache
        # A stream of its own: CUDA graphs cannot be captured on the legacy default stream.
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.cuda_graphs = cuda_graphs and self.stream is not None
        self._graphs: dict = {}
        self._open()

    def _providers(self) -> list:
        if self.device.type != "cuda":
            return ["CPUExecutionProvider"]
        dev_id = self.device.index or 0
        providers: list = []
        if self.use_trt_provider and "TensorrtExecutionProvider" in \
                self.ort.get_available_providers():
            trt_opts = {"device_id": dev_id, "trt_fp16_enable": "float16" in str(self.io),
                        "user_compute_stream": str(self.stream.cuda_stream)}
            if self.trt_cache is not None:
                Path(self.trt_cache).mkdir(parents=True, exist_ok=True)
                trt_opts.update(trt_engine_cache_enable=True,
                                trt_engine_cache_path=str(self.trt_cache),
                                trt_timing_cache_enable=True)
            providers.append(("TensorrtExecutionProvider", trt_opts))
        providers += [("CUDAExecutionProvider", ort_cuda_options(
            dev_id, self.stream.cuda_stream, self.cuda_graphs)), "CPUExecutionProvider"]
        return providers

    def _open(self) -> None:
        ort = self.ort
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # errors only; provider fallbacks are reported below
        try:
            self.session = ort.InferenceSession(str(self.path), opts,
                                                providers=self._providers())
        except Exception as e:
            first = first_line(e)[:300]
            raise UserError(f"engine file {self.path} cannot be loaded by ONNX Runtime "
                            f"({first}); rebuild with `attnseg engine build`") from None
        got_in = [i.name for i in self.session.get_inputs()]
        got_out = [o.name for o in self.session.get_outputs()]
        if got_in != self.input_names or got_out != self.output_names:
            raise UserError(f"engine file {self.path} does not match its manifest (inputs "
                            f"{got_in}, outputs {got_out}); rebuild with `attnseg engine build`")
        self.providers = self.session.get_providers()
        self.on_gpu = self.device.type == "cuda" and "CUDAExecutionProvider" in self.providers
        if self.device.type == "cuda" and not self.on_gpu:
            raise UserError("ONNX Runtime cannot use CUDA here (CUDA/cuDNN libraries of the "
                            "onnxruntime-gpu wheel missing); run with --device cpu or install "
                            "them")
        self.run_options = ort_run_options(ort)

    def _bind(self, inputs: dict, shapes: dict):
        binding = self.session.io_binding()
        dev_id = self.device.index or 0
        for n in self.input_names:
            t = inputs[n]
            binding.bind_input(n, "cuda", dev_id, _NP_DTYPES[self.io[n]["dtype"]],
                               list(t.shape), t.data_ptr())
        outs = {}
        for n in self.output_names:
            t = torch.empty(shapes[n], dtype=_TORCH_DTYPES[self.io[n]["dtype"]],
                            device=self.device)
            outs[n] = t
            binding.bind_output(n, "cuda", dev_id, _NP_DTYPES[self.io[n]["dtype"]],
                                list(t.shape), t.data_ptr())
        return binding, outs

    def infer(self, feeds):
        self._check_feeds(feeds)
        if not self.on_gpu:
            arrays = {n: feeds[n].detach().cpu().contiguous().numpy() for n in self.input_names}
            outs = self.session.run(self.output_names, arrays)
            return {n: torch.from_numpy(np.ascontiguousarray(a)).to(self.device)
                    for n, a in zip(self.output_names, outs, strict=True)}
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)  # GPU-side ordering: no host synchronisation
        with torch.cuda.stream(self.stream):
            inputs = {n: feeds[n].contiguous() for n in self.input_names}
            for t in inputs.values():
                t.record_stream(self.stream)
            shapes = resolve_shapes(self.io, inputs)
            if self.cuda_graphs:
                try:
                    outs = self._replay(inputs, shapes)
                except Exception as e:  # ORT raises its own types; capture is best effort
                    print(f"  {self.name}: ONNX Runtime cannot capture a CUDA graph here "
                          f"({first_line(e)[:200]}); running without")
                    self.cuda_graphs, self._graphs = False, {}
                    self._open()
                    return self.infer(feeds)
            else:
                binding, outs = self._bind(inputs, shapes)
                self.session.run_with_iobinding(binding, self.run_options)
        current.wait_stream(self.stream)
        return outs

    def _replay(self, inputs: dict, shapes: dict) -> dict:
        """One call through the CUDA graph of these input shapes: static buffers bound once,
        the inputs copied in, the outputs copied out (the next replay overwrites them)."""
        key = tuple(tuple(t.shape) for t in inputs.values())
        entry = self._graphs.get(key)
        if entry is None:
            static = {n: t.clone() for n, t in inputs.items()}
            binding, outs = self._bind(static, shapes)
            entry = (binding, static, outs, ort_run_options(self.ort, len(self._graphs)))
            self._graphs[key] = entry
        else:
            for n, t in inputs.items():
                entry[1][n].copy_(t)
        binding, _, outs, options = entry
        self.session.run_with_iobinding(binding, options)
        return {n: t.clone() for n, t in outs.items()}

    def close(self):
        self.session = None
