"""Engine runtimes' settings that hold without a GPU: ONNX Runtime's CUDA options and run
options, bf16 outside torch (refused by ONNX Runtime in one line, mapped by the deploy
runtime)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnseg.engines.backends import OrtEngine, ort_cuda_options, ort_run_options
from attnseg.pipeline.errors import UserError

ort = pytest.importorskip("onnxruntime")


def test_cuda_provider_options_name_torchs_stream_and_graphs():
    """The options attnseg hands ONNX Runtime's CUDA provider (that the provider then runs on
    torch's stream with graphs needs a GPU: the GPU proof's compile/onnxruntime steps)."""
    opts = ort_cuda_options(1, 123456, cuda_graphs=True)
    assert opts == {"device_id": "1", "user_compute_stream": "123456",
                    "enable_cuda_graph": "1"}
    assert "enable_cuda_graph" not in ort_cuda_options(0, 7, cuda_graphs=False)


def test_run_options_skip_the_host_synchronisation():
    ro = ort_run_options(ort)
    assert ro.get_run_config_entry("disable_synchronize_execution_providers") == "1"
    assert ort_run_options(ort, 3).get_run_config_entry("gpu_graph_id") == "3"


def test_onnxruntime_refuses_bf16_engines_in_one_line(tmp_path):
    onnx_file = tmp_path / "unet.onnx"
    onnx_file.write_bytes(b"not read: the dtype check comes first")
    io = {"sample": {"dtype": "bfloat16", "shape": ["batch", 4, 8, 8]}}
    with pytest.raises(UserError, match="bfloat16 tensors, which ONNX Runtime does not run"):
        OrtEngine(onnx_file, "unet", ["sample"], [], io, torch.device("cpu"))


def test_deploy_runtime_maps_bfloat16():
    from attnseg.engines.deploy import host_dtype

    bf16 = host_dtype("bfloat16")
    assert bf16.itemsize == 2 and host_dtype("float16") == np.float16
    x = np.array([1.5, -2.25], np.float32)
    # The same bits as torch's bfloat16 (what TensorRT reads and writes).
    assert x.astype(bf16).view(np.uint16).tolist() == \
        torch.from_numpy(x).bfloat16().view(torch.int16).numpy().view(np.uint16).tolist()
