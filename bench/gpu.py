"""`attnseg bench gpu`: the GPU path proven in one prepared run (under 8 minutes, cold, on one
H100/H200-class GPU), results in `bench/results/gpu/` (JSON + markdown).

Phases (`--phases`), each under its own time cap, each recorded even when it fails (a failure
does not stop the others):

1. **kernels**: the kernel test suite on the GPU (`pytest tests/kernels`: Triton on CUDA
   against the torch reference, AOT builds, register/spill checks);
2. **parity**: `sd15-random` at 512x512 fp16, stock images against images generated while
   harvesting (Triton kernel), and the Triton maps against the torch reference's;
3. **kernel timings** at SD 1.5's shapes (batch 8, fp16): the fused kernel per layer size, with
   the head split that fills the GPU and without, CUDA-graph timed;
4. **compile**: `attnseg engine build --backend compile` and `attnseg engine verify`;
5. **throughput**: `bench throughput` on `sd15-random`, 512x512 fp16 with CFG: stock, eager
   harvest and compile + CUDA graphs with harvest, batch 1 and 8, with peak memory;
6. **families**: the newer architectures at 1024x1024, stock against harvest (eager): SDXL
   (`sdxl-random`, fp16, with the store-every-map pattern) and FLUX.1-dev's transformer
   (`flux-random`, bf16, 512 T5 keys: the long-text kernel), 4 steps, batch 1; then
   `bench writing` at few-step rates (`sd15-random` 512x512, 2 steps, batch 8): generation
   alone, inline writing and the write pool. Past the default budget after phases 1-5: run it
   as a second call (`--phases families`).
7. **toy**: `attnseg toy train-model` on the GPU for the minutes the cap leaves (batch 128,
   lr 1e-3, stopped by its time limit, so the folder resumes on a later call), its model
   exported and packed with the loss curves into one file beside the report
   (OUT-toy-model.tar.gz) to bring back and measure with `bench toy` on any machine: the toy
   model trained for CPU hours here is the limit of every toy-world figure. Its own call
   (`--phases toy`).

`--smoke` runs the same code on a CPU (the tiny model, 64x64, fp32, the Triton interpreter,
GPU-only steps skipped) so the orchestration is tested where there is no GPU. On a machine
without the project installed (the lent GPU has no diffusers and no registry),
`bench/gpu_proof.sh` puts the carried wheels and the checkout on the path first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

from attnseg.pipeline.settings import PositiveInt

from .common import machine_info, output_base, with_suffix, write_json_and_markdown

# The proof's phases (`--phases`; not denoising steps), in running order.
PHASES = ("kernels", "parity", "kbench", "compile", "throughput", "families", "toy")
REPO = Path(__file__).resolve().parent.parent


@dataclass
class GpuProofConfig:
    """One `attnseg bench gpu` run."""

    phases: tuple[str, ...] = PHASES
    smoke: bool = False  # CPU dry run: tiny model, small sizes, GPU-only steps skipped
    budget_s: PositiveInt = 450  # the whole run; a step that no longer fits is skipped
    out: str = "bench/results/gpu/gpu"

    def __post_init__(self):
        self.phases = tuple(self.phases)

    def validate(self) -> None:
        from attnseg.pipeline.errors import UserError

        bad = [s for s in self.phases if s not in PHASES]
        if bad:
            raise UserError(f"unknown phase(s) {bad}; choose from {list(PHASES)}")


# Per-step caps (seconds, on the GPU); smoke runs take what the CPU needs.
_CAPS = {"kernels": 150, "parity": 90, "kbench": 60, "compile": 150, "throughput": 200,
         "families": 300, "toy": 300}
# The toy model's GPU training: larger batches than the CPU run's 32 (the GPU is idle at 32),
# the learning rate raised with them; scene rendering and start-up come out of the cap first.
TOY_GPU_SETTINGS = ("batch_size=128", "lr=0.001", "unet_steps=100000")
TOY_STARTUP_S = 90


def _subprocess(cmd: list[str], cap: float, env: dict | None = None) -> dict:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=cap, cwd=REPO,
                              env=env)
        out = proc.stdout + proc.stderr
        rc = proc.returncode
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) \
            else (e.stdout or "")
        rc = "timeout"
    return {"rc": rc, "seconds": round(time.perf_counter() - t0, 1), "tail": out[-3000:]}


def step_kernels(cfg: GpuProofConfig, cap: float) -> dict:
    """The kernel tests (Triton on the device where there is one)."""
    cmd = [sys.executable, "-m", "pytest", "tests/kernels", "-q", "-p", "no:cacheprovider",
           "-rfEs"]
    if cfg.smoke:
        cmd += ["-k", "noncontiguous or head_groups"]
    r = _subprocess(cmd, cap)
    summary = [line for line in r["tail"].splitlines() if " passed" in line or " failed" in line]
    r["summary"] = summary[-1] if summary else None
    r["ok"] = r["rc"] == 0
    return r


def _pipe(cfg: GpuProofConfig):
    import torch

    from attnseg.pipeline.models.tiny import build_sd15_random_pipeline, build_tiny_pipeline

    if cfg.smoke:
        return build_tiny_pipeline(seed=0), torch.device("cpu"), torch.float32, 64, 2
    dev = torch.device("cuda")
    return (build_sd15_random_pipeline(seed=0).to(dev, torch.float16), dev, torch.float16,
            512, 4)


def step_parity(cfg: GpuProofConfig, cap: float) -> dict:
    """Stock vs harvesting images (same latents), and the kernel's maps vs the reference's."""
    import torch

    from attnseg.kernels._dispatch import resolve_impl
    from attnseg.pipeline.config import get_preset
    from attnseg.pipeline.harvest.harvester import AttentionHarvester
    from attnseg.pipeline.harvest.masks import masks_from_harvest
    from attnseg.pipeline.prompts import PromptSpec, class_token_weights, load_classes

    pipe, dev, dtype, size, steps = _pipe(cfg)
    by = {c.name: c for c in load_classes("voc")}
    specs = [PromptSpec("a photo of a dog and a cat on the grass",
                        ((by["dog"], "dog"), (by["cat"], "cat"))),
             PromptSpec("a photo of a horse next to a person",
                        ((by["horse"], "horse"), (by["person"], "person")))]
    weights, ids = class_token_weights(pipe.tokenizer, specs)
    latents = torch.randn(len(specs), 4, size // 8, size // 8,
                          generator=torch.Generator().manual_seed(0)).to(dev, dtype)
    preset = get_preset("attnseg")

    def generate():
        return pipe([s.text for s in specs], height=size, width=size, num_inference_steps=steps,
                    guidance_scale=7.5, latents=latents.clone(), output_type="pt").images.float()

    runs = {}
    with torch.no_grad():
        stock = generate()
        for impl in (None, "ref"):
            before = os.environ.pop("ATTNSEG_KERNEL_IMPL", None)
            if impl:
                os.environ["ATTNSEG_KERNEL_IMPL"] = impl
            harvester = AttentionHarvester(pipe.unet, preset.harvest)
            try:
                with harvester.capture(weights, (size, size), steps) as cap_:
                    images = generate()
            finally:
                harvester.remove()
                os.environ.pop("ATTNSEG_KERNEL_IMPL", None)
                if before is not None:
                    os.environ["ATTNSEG_KERNEL_IMPL"] = before
            # The default preset refines with the dense CRF: on a GPU, the GPU lattice.
            rgb = (images.clamp(0, 1) * 255).permute(0, 2, 3, 1)
            labels, _ = masks_from_harvest(cap_.result, ids, preset.harvest, preset.mask,
                                           images=rgb)
            runs[impl or "default"] = (images, cap_.result, labels)
    a, b = runs["default"], runs["ref"]
    rel = {str(s): float((a[1].maps[s] - b[1].maps[s]).abs().max()
                         / b[1].maps[s].abs().max().clamp_min(1e-30)) for s in b[1].maps}
    out = {
        "model": "tiny" if cfg.smoke else "sd15-random", "size": size, "steps": steps,
        "dtype": str(dtype).replace("torch.", ""), "batch": len(specs),
        "kernel_impl": resolve_impl(None, dev),
        "images_bit_identical": bool(torch.equal(a[0], stock)),
        "images_max_abs_diff": float((a[0] - stock).abs().max()),
        "maps_max_rel_diff_vs_reference": rel,
        "label_agreement_vs_reference": float((a[2] == b[2]).float().mean()),
    }
    # Harvesting reads the attention inputs and never writes them, but its processor may run
    # the attention kernel on other strides than stock's, which can change the last bits.
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    out["images_tolerance"] = tol
    out["ok"] = out["images_max_abs_diff"] <= tol and max(rel.values()) < 1e-2
    return out


def step_kbench(cfg: GpuProofConfig, cap: float) -> dict:
    """The fused kernel at SD 1.5's layer sizes, batch 8, fp16: one group vs the head split."""
    import torch
    from triton.testing import do_bench_cudagraph

    from attnseg.kernels.class_attention import accumulate_class_attention_triton, head_groups

    dev = torch.device("cuda")
    b, heads, tokens = 8, 8, 77
    rows = []
    for n, d in ((4096, 40), (1024, 80), (256, 160), (64, 160)):
        side = int(n ** 0.5)
        for c in (5, 20):
            # The layout attention processors hand over: [B, N, H*D] viewed as [B, H, N, D].
            q = torch.randn(b, n, heads * d, device=dev, dtype=torch.float16).view(
                b, n, heads, d).transpose(1, 2)
            k = torch.randn(b, tokens, heads * d, device=dev, dtype=torch.float16).view(
                b, tokens, heads, d).transpose(1, 2)
            tw = torch.rand(b, tokens, c, device=dev)
            out = torch.zeros(b, c, side, side, device=dev)

            def call(groups, q=q, k=k, tw=tw, out=out, side=side, d=d):
                return lambda: accumulate_class_attention_triton(
                    q, k, tw, out, hw=(side, side), scale=d ** -0.5, groups=groups)

            auto = head_groups(b * -(-n // 64), heads, dev)
            row = {"N": n, "D": d, "C": c, "head_groups_auto": auto,
                   "one_group_us": round(do_bench_cudagraph(call(1)) * 1e3, 1),
                   "auto_us": round(do_bench_cudagraph(call(None)) * 1e3, 1),
                   "q_copy_us": round(do_bench_cudagraph(q.contiguous) * 1e3, 1)}
            rows.append(row)
    return {"rows": rows, "ok": True}


def step_compile(cfg: GpuProofConfig, cap: float, work: Path) -> dict:
    """`attnseg engine build --backend compile` + `attnseg engine verify` (subprocesses)."""
    dev, dt = ("cpu", "fp32") if cfg.smoke else ("cuda", "fp16")
    engine = work / "engine-compile"
    cli = [sys.executable, "-m", "attnseg.pipeline.cli"]
    build = _subprocess(cli + ["engine", "build", "--backend", "compile", "--model", "tiny",
                               "--out", str(engine), "--device", dev, "--dtype", dt,
                               "--batch-size", "2"], cap / 3)
    result = {"build": build}
    if build["rc"] != 0:
        result["ok"] = False
        return result
    verify = _subprocess(cli + ["engine", "verify", str(engine), "--device", dev, "--json"],
                         cap * 2 / 3)
    result["verify"] = verify
    report = None
    text = verify["tail"]
    if "{" in text:
        try:
            report = json.loads(text[text.index("{"):text.rindex("}") + 1])
        except ValueError:
            report = None
    result["report"] = report
    result["ok"] = verify["rc"] == 0 and bool(report and report.get("ok"))
    return result


def step_throughput(cfg: GpuProofConfig, cap: float, work: Path) -> dict:
    """Stock, eager harvest and compile + CUDA graphs with harvest; batch 8, then 1 (each a
    subprocess, so that a compile that overruns its share is stopped, not waited for)."""
    if cfg.smoke:
        runs = [("1", ["--model", "tiny", "--backend", "torch", "--height", "64", "--width",
                       "64", "--steps", "2", "--device", "cpu", "--dtype", "fp32"])]
    else:
        common = ["--model", "sd15-random", "--backend", "torch,compile", "--height", "512",
                  "--width", "512", "--steps", "20", "--device", "cuda", "--dtype", "fp16"]
        runs = [("8", common), ("1", common)]
    cli = [sys.executable, "-m", "attnseg.pipeline.cli", "bench", "throughput"]
    repeats = "1" if cfg.smoke else "3"
    return _bench_runs({batch: cli + [*args, "--batch-size", batch, "--repeats", repeats,
                                      "--no-plots"] for batch, args in runs},
                       cap, work, "throughput-b")


def _bench_runs(commands: dict[str, list[str]], cap: float, work: Path, prefix: str) -> dict:
    """Run bench commands one after another (each a subprocess under what is left of `cap`,
    with --out work/PREFIX+NAME); each run's summary rows come from its JSON (`bench
    writing` calls them rows)."""
    result: dict = {"runs": {}}
    t0 = time.perf_counter()
    for name, cmd in commands.items():
        left = cap - (time.perf_counter() - t0)
        if left < 20:
            result["runs"][name] = {"skipped": f"{left:.0f} s left"}
            continue
        out = work / f"{prefix}{name}"
        r = _subprocess(cmd + ["--out", str(out)], left)
        if r["rc"] == 0:
            done = json.loads(with_suffix(out, ".json").read_text())
            r["summary"] = done.get("summary", done.get("rows"))
        result["runs"][name] = r
    result["ok"] = all(r.get("rc") == 0 for r in result["runs"].values())
    return result


def step_families(cfg: GpuProofConfig, cap: float, work: Path) -> dict:
    """SDXL and Flux architectures at 1024x1024, stock against harvest, then the write pool
    at few-step rates (each a subprocess under what is left of the cap)."""
    cli = [sys.executable, "-m", "attnseg.pipeline.cli", "bench"]
    one = ["--steps", "2" if cfg.smoke else "4", "--batch-size", "1", "--repeats",
           "1" if cfg.smoke else "3", "--no-plots"]
    if cfg.smoke:
        where = ["--device", "cpu", "--dtype", "fp32", "--height", "64", "--width", "64"]
        runs = {"sdxl": ["--model", "tiny-sdxl", *where],
                "flux": ["--model", "tiny-flux", *where]}
        writing = ["--model", "tiny", "--device", "cpu", "--dtype", "fp32",
                   "--set", "height=64", "--set", "width=64", "--set", "num_per_class=2",
                   "--set", "batch_size=4", "--set", "repeats=1"]
    else:
        size = ["--height", "1024", "--width", "1024", "--device", "cuda"]
        # Flux without the store-every-map pattern: 57 layers x 24 heads x 4096 x 512 fp32
        # per step is 11 GB a step.
        runs = {"sdxl": ["--model", "sdxl-random", *size, "--dtype", "fp16"],
                "flux": ["--model", "flux-random", *size, "--dtype", "bf16", "--set",
                         'variants=["stock","harvest"]']}
        writing = ["--model", "sd15-random", "--device", "cuda", "--dtype", "fp16",
                   "--set", "height=512", "--set", "width=512", "--set", "steps=2",
                   "--set", "batch_size=8", "--set", "num_per_class=8", "--set", "repeats=2"]
    commands = {name: cli + ["throughput", *args, *one] for name, args in runs.items()}
    commands["writing"] = cli + ["writing", *writing]
    return _bench_runs(commands, cap, work, "families-")


def step_toy(cfg: GpuProofConfig, cap: float, work: Path, base: Path) -> dict:
    """Train the toy model for what the cap leaves (resuming the folder of an earlier call);
    pack the exported model and loss curves into BASE-toy-model.tar.gz."""
    import tarfile

    folder = work / "toy-model"
    cmd = [sys.executable, "-m", "attnseg.pipeline.cli", "toy", "train-model", "--out",
           str(folder), "--no-progress"]
    if cfg.smoke:
        cmd += ["--device", "cpu"]
        sets = ["num_scenes=16", "size=32", "vae_channels=[16,16]", "unet_channels=[16,32]",
                "head_dim=16", "text_dim=16", "vae_steps=2", "vae_batch_size=2",
                "unet_steps=3", "batch_size=4"]
    else:
        cmd += ["--device", "cuda"]
        sets = list(TOY_GPU_SETTINGS)
    sets.append(f"time_limit_s={max(1, cap - TOY_STARTUP_S):.0f}")
    for kv in sets:
        cmd += ["--set", kv]
    before = _toy_state(folder)
    r = _subprocess(cmd, cap)
    after = _toy_state(folder)
    model = folder / "model"
    r["ok"] = r["rc"] == 0 and (model / "attnseg_toy_model.json").exists()
    r["steps_before"], r["steps"] = before.get("step", 0), after.get("step", 0)
    unet = after.get("losses", {}).get("unet", [])
    r["last_unet_loss"] = unet[-1][1] if unet else None
    if r["ok"]:
        packed = with_suffix(base, "-toy-model.tar.gz")
        with tarfile.open(packed, "w:gz") as tar:
            tar.add(model, arcname="toy-model")
            for name in ("loss.json", "loss.png"):
                if (folder / name).exists():
                    tar.add(folder / name, arcname=f"toy-model/{name}")
        r["packed"] = str(packed)
    return r


def _toy_state(folder: Path) -> dict:
    meta = folder / "checkpoint" / "state.json"
    return json.loads(meta.read_text()) if meta.exists() else {}


def run_gpu_proof(cfg: GpuProofConfig) -> dict:
    """Run the steps; write OUT.json and OUT.md; return the report."""
    cfg.validate()
    import torch

    if cfg.smoke:  # before the kernels are imported: the interpreter is chosen at import
        os.environ.setdefault("TRITON_INTERPRET", "1")
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    base = output_base(cfg.out)
    work = with_suffix(base, ".work")
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.smoke else "cpu")
    report = {"benchmark": "gpu", "config": asdict(cfg), "machine": machine_info(device),
              "steps": {}}
    for name in cfg.phases:
        left = cfg.budget_s - (time.perf_counter() - t0)
        cap = min(_CAPS[name] * (10 if cfg.smoke else 1), left)
        if cap < 20:
            report["steps"][name] = {"skipped": f"{left:.0f} s of the budget left"}
            continue
        if device.type != "cuda" and name == "kbench":
            report["steps"][name] = {"skipped": "needs a GPU"}
            continue
        s0 = time.perf_counter()
        try:
            if name == "kernels":
                r = step_kernels(cfg, cap)
            elif name == "parity":
                r = step_parity(cfg, cap)
            elif name == "kbench":
                r = step_kbench(cfg, cap)
            elif name == "compile":
                r = step_compile(cfg, cap, work)
            elif name == "families":
                r = step_families(cfg, cap, work)
            elif name == "toy":
                r = step_toy(cfg, cap, work, base)
            else:
                r = step_throughput(cfg, cap, work)
        except Exception as e:  # a failing step is a result; the others still run
            r = {"ok": False, "error": f"{type(e).__name__}: {e}",
                 "traceback": traceback.format_exc()[-3000:]}
        r["seconds"] = round(time.perf_counter() - s0, 1)
        report["steps"][name] = r
        print(f"  {name}: {'ok' if r.get('ok') else 'FAILED'} ({r['seconds']} s)", flush=True)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["files"] = write_report(report, base)
    return report


def markdown(report: dict) -> str:
    """The report as markdown."""
    m = report["machine"]
    lines = [f"# GPU proof: {m.get('device_name') or m.get('device')}", "",
             f"{report['seconds']} s in all; smoke run: {report['config']['smoke']}.", "",
             "| step | result | seconds |", "|---|---|---|"]
    for name, r in report["steps"].items():
        if "skipped" in r:
            lines.append(f"| {name} | skipped: {r['skipped']} | - |")
            continue
        what = "ok" if r.get("ok") else f"FAILED {r.get('error', '')}"[:120]
        if name == "kernels" and r.get("summary"):
            what += f" ({r['summary'].strip()})"
        if name == "toy" and r.get("ok"):
            what += (f" (toy model steps {r['steps_before']} -> {r['steps']}, last UNet loss "
                     f"{r['last_unet_loss']}; packed: {Path(r['packed']).name})")
        if name == "parity":
            what += (f" (images bit-identical: {r['images_bit_identical']}, max |d| "
                     f"{r['images_max_abs_diff']:.3g} (tolerance {r['images_tolerance']}); "
                     "maps vs reference, max rel "
                     f"{max(r['maps_max_rel_diff_vs_reference'].values()):.2e})")
        lines.append(f"| {name} | {what} | {r.get('seconds', '-')} |")
    kb = report["steps"].get("kbench", {})
    if kb.get("rows"):
        lines += ["", "| N | D | C | one group µs | head split µs (groups) | q copy µs |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['N']} | {r['D']} | {r['C']} | {r['one_group_us']} | {r['auto_us']} "
                  f"({r['head_groups_auto']}) | {r['q_copy_us']} |" for r in kb["rows"]]
    runs = {f"throughput {k}": r for k, r in
            report["steps"].get("throughput", {}).get("runs", {}).items()}
    runs.update({f"families {k}": r for k, r in
                 report["steps"].get("families", {}).get("runs", {}).items() if k != "writing"})
    rows = [(name, row) for name, r in runs.items() for row in r.get("summary", [])]
    if rows:
        lines += ["", "Throughput (`bench throughput`):", "",
                  "| run | backend | variant | batch | images/s | time vs stock | attention "
                  "state B | peak device MiB |", "|---|---|---|---|---|---|---|---|"]
        for name, row in rows:
            peak = row.get("peak_device_bytes")
            lines.append(f"| {name} | {row.get('backend', 'torch')} | {row.get('variant')} | "
                         f"{row.get('batch_size')} | {row.get('images_per_s', 0):.2f} | "
                         f"{row.get('time_vs_stock') or 1:.3f} | "
                         f"{row.get('attention_state_bytes', '-')} | "
                         f"{'-' if peak is None else round(peak / 2**20)} |")
    writing = report["steps"].get("families", {}).get("runs", {}).get("writing", {})
    if writing.get("summary"):
        lines += ["", "Writing (`bench writing`):", "",
                  "| variant | images/s | vs generation alone | spread |", "|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['images_per_s']:.2f} | {r['vs_generate_only']:.3f}x "
                  f"| {100 * r['spread']:.0f} % |" for r in writing["summary"]]
    return "\n".join(lines) + "\n"


def write_report(report: dict, base: Path) -> list[str]:
    return write_json_and_markdown(report, base, markdown(report))
