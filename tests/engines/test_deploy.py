"""The torch-free deploy runtime: its host math against the torch pipeline, and a whole
generation with torch made unimportable."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from attnseg.engines.deploy import DDIM, token_weights
from attnseg.pipeline.models.tiny import build_tiny_pipeline
from attnseg.pipeline.prompts import PromptSpec, class_token_weights, load_classes
from attnseg.pipeline.synth.job import Sample, Synthesizer

from .conftest import SIZE

pytest.importorskip("onnxruntime")


def _samples():
    by = {c.name: c for c in load_classes("voc")}
    specs = [PromptSpec("a photo of a dog and a cat on the grass",
                        ((by["dog"], "dog"), (by["cat"], "cat"))),
             PromptSpec("an aeroplane over a street", ((by["aeroplane"], "aeroplane"),))]
    return [Sample(i, s, 1000 + i) for i, s in enumerate(specs)]


def test_token_weights_equal_the_pipelines():
    tok = build_tiny_pipeline().tokenizer
    specs = [s.spec for s in _samples()]
    for merge in ("sum", "mean"):
        want_w, want_ids = class_token_weights(tok, specs, merge)
        got_w, got_ids = token_weights(tok, [s.text for s in specs],
                                       [[(c.id, w) for c, w in s.labels] for s in specs], merge)
        np.testing.assert_array_equal(got_w, want_w.numpy())
        np.testing.assert_array_equal(got_ids, want_ids.numpy())
    # "aeroplane" is several tokens of the tiny vocabulary: the multi-token path ran.
    assert (want_w[1, :, 0] > 0).sum() > 1


def test_ddim_matches_diffusers():
    pipe = build_tiny_pipeline()
    sched = pipe.scheduler
    ours = DDIM(dict(sched.config))
    steps = 7
    sched.set_timesteps(steps)
    np.testing.assert_array_equal(ours.timesteps(steps), sched.timesteps.numpy())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 6, generator=g)
    for t in sched.timesteps:
        eps = torch.randn(2, 4, 8, 6, generator=g)
        want = sched.step(eps, t, x, eta=0.0, return_dict=False)[0]
        got = ours.step(eps.numpy(), int(t), x.numpy(), steps)
        np.testing.assert_allclose(got, want.numpy(), atol=1e-6, rtol=1e-6)
        x = want


def test_deploy_runtime_without_torch_matches_the_torch_path(ort_engine, tmp_path):
    folder, pipe, preset = ort_engine
    samples = _samples()
    assert not preset.mask.crf_iterations  # the runtime does not refine (unrefined=True)
    synth = Synthesizer(pipe, preset, *SIZE, 4, 7.5)
    ref_images, ref_labels, ref_rel, _ = synth.generate_float(samples)
    latents = synth.initial_latents([s.seed for s in samples]).numpy()
    synth.harvester.remove()
    np.save(tmp_path / "latents.npy", latents)
    labels = [[(c.id, w) for c, w in s.spec.labels] for s in samples]
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any import of torch now fails
        import numpy as np
        from attnseg.engines.deploy import DeployRuntime
        try:
            DeployRuntime({str(folder)!r}, runner="onnxruntime")
            raise SystemExit("a refining preset was not refused")
        except Exception as exc:
            assert "unrefined=True" in str(exc), exc
        rt = DeployRuntime({str(folder)!r}, runner="onnxruntime", unrefined=True)
        images, labels, rel = rt.generate({[s.spec.text for s in samples]!r}, {labels!r},
                                          latents=np.load({str(tmp_path / 'latents.npy')!r}),
                                          steps=4, guidance=7.5)
        np.savez({str(tmp_path / 'out.npz')!r}, images=rt.last_images, labels=labels, rel=rel)
        assert sys.modules["torch"] is None
        print("ok")
    """)
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr
    out = np.load(tmp_path / "out.npz")
    assert np.abs(out["images"] - ref_images).max() <= 1e-4
    assert (out["labels"] == ref_labels).all()
    assert np.abs(out["rel"].astype(int) - ref_rel.astype(int)).max() <= 1  # uint8 rounding
    assert len(np.unique(ref_labels)) > 1  # not a trivial all-background comparison


def test_tensorrt_deploy_runner_matches_the_torch_path(tmp_path):
    try:
        import pycuda  # noqa: F401
        import tensorrt  # noqa: F401
    except Exception as exc:
        pytest.skip(f"the TensorRT deploy runner needs tensorrt and pycuda ({type(exc).__name__})")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from pathlib import Path

    from attnseg.engines.build import EngineOptions, build_engines
    from attnseg.engines.deploy import DeployRuntime
    from attnseg.pipeline.config import get_preset

    pipe = build_tiny_pipeline().to("cuda")
    preset = get_preset("attnseg").without_crf()  # the runtime's masks
    opts = EngineOptions(backend="tensorrt", height=SIZE[0], width=SIZE[1], max_batch=2,
                         harvest=preset.harvest, trt_plugin="off")
    folder, _ = build_engines(pipe, opts, tmp_path / "trt", log=lambda m: None)
    samples = _samples()
    synth = Synthesizer(pipe, preset, *SIZE, 4, 7.5)
    ref_images, ref_labels, _, _ = synth.generate_float(samples)
    latents = synth.initial_latents([s.seed for s in samples]).float().cpu().numpy()
    synth.harvester.remove()
    lib = Path(__file__).resolve().parents[2] / "build/native/libattnseg_kernels.so"
    rt = DeployRuntime(folder, runner="tensorrt", kernels=lib if lib.exists() else None,
                       unrefined=True)
    _, labels, _ = rt.generate([s.spec.text for s in samples],
                               [[(c.id, w) for c, w in s.spec.labels] for s in samples],
                               latents=latents, steps=4)
    assert np.abs(rt.last_images - ref_images).max() <= 1e-3
    assert (labels == ref_labels).mean() >= 0.999
