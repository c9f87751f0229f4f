"""`attnseg engine build | verify | info`: compiled engines with attention-map outputs.

This module is imported by the `attnseg` command at start-up, so it imports nothing heavy at
module level.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..pipeline import cli_args


def cmd_build(args) -> int:
    from ..pipeline.config import SynthConfig
    from ..pipeline.device import resolve_device, resolve_dtype
    from ..pipeline.errors import UserError
    from ..pipeline.files import check_output_dir
    from ..pipeline.models.loading import (
        RANDOM_MODELS,
        check_model_path,
        default_size,
        latent_stride,
        load_pipeline,
        model_fingerprint,
        random_model_notice,
    )
    from ..pipeline.settings import apply_set
    from .build import EngineOptions, build_engines, check_backend, fuse_loras

    size = default_size(args.model)
    overrides: dict = {}
    apply_set(overrides, args.set, sections_only=True)
    preset = SynthConfig(preset=args.preset, overrides=overrides).resolve_preset(
        latent_stride(args.model))
    opts = EngineOptions(backend=args.backend, height=args.height or size,
                         width=args.width or size, max_batch=args.batch_size,
                         max_classes=args.max_classes, opset=args.opset, harvest=preset.harvest,
                         trt_plugin=args.trt_plugin, trt_refit=args.refit)
    opts.validate()
    check_backend(args.backend)
    if args.model not in RANDOM_MODELS:
        check_model_path(args.model, args.allow_pickle)
    check_output_dir(Path(args.out))
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if device.type == "cpu" and dtype == torch_dtype("fp16"):
        raise UserError("--dtype fp16 is not supported on CPU; use fp32 or bf16")
    pipe = load_pipeline(args.model, device, dtype, allow_pickle=args.allow_pickle)
    base = model_fingerprint(pipe)
    loras = fuse_loras(pipe, args.lora)
    source = {"model": args.model, "loras": [[p, s] for p, s, _ in loras],
              "preset": args.preset, "overrides": overrides}
    folder, status = build_engines(pipe, opts, args.out, source=source, base_hash=base,
                                   loras=loras)
    print(f"{status} {args.backend} engine in {folder}")
    notice = random_model_notice(args.model)
    if notice:
        print(f"note: {notice}")
    return 0


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def cmd_verify(args) -> int:
    from .verify import verify_engines

    report = verify_engines(args.dir, steps=args.steps, device=args.device)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        maps = ", ".join(f"{k} {v:.2e}" for k, v in report["map_max_rel_diff"].items())
        print(f"{report['backend']} engine {report['engine']} ({report['dtype']}, "
              f"{report['samples']} samples, {report['steps']} steps, "
              f"{report['size'][0]}x{report['size'][1]})")
        print(f"  images: max abs diff {report['image_max_abs_diff']:.2e} "
              f"(tolerance {report['image_tolerance']:.0e})")
        print(f"  labels: {100 * report['label_agreement']:.3f} % equal "
              f"(tolerance {100 * report['label_tolerance']:.1f} %)")
        print(f"  maps: max relative diff {maps}")
        print(f"  time: torch {report['torch_seconds']} s, engine {report['engine_seconds']} s")
        print("  parity OK" if report["ok"] else "  parity FAILED")
    return 0 if report["ok"] else 1


def cmd_refit(args) -> int:
    from ..pipeline.device import resolve_device
    from ..pipeline.errors import UserError
    from ..pipeline.models.loading import load_pipeline, model_fingerprint
    from .backends import DTYPE_NAMES
    from .build import fuse_loras
    from .cache import EngineKey, read_manifest
    from .trt import refit_folder, require_tensorrt

    require_tensorrt()
    manifest = read_manifest(args.dir)
    key = EngineKey.from_dict(manifest["key"])
    model = (manifest.get("source") or {}).get("model")
    if not model:
        raise UserError(f"engine {args.dir} does not record its model; rebuild it instead")
    dtype = {v: k for k, v in DTYPE_NAMES.items()}[key.dtype]
    pipe = load_pipeline(model, resolve_device("cuda"), dtype)
    base = model_fingerprint(pipe)
    if base != key.base_model_hash:
        raise UserError(f"model {model} has changed since the engine was built; rebuild it")
    loras = fuse_loras(pipe, args.lora)
    update = {"model_hash": model_fingerprint(pipe),
              "loras": [[f"{s:g}", fp] for _, s, fp in loras]}
    refit_folder(args.dir, pipe, loras, update)
    print(f"refitted {args.dir} with {len(loras)} LoRA(s)")
    return 0


def cmd_info(args) -> int:
    from .cache import check_files, read_manifest

    manifest = read_manifest(args.dir)
    check_files(args.dir, manifest, full=False)
    key = manifest["key"]
    if args.json:
        print(json.dumps({"key": key, "source": manifest.get("source"),
                          "parts": {k: {"inputs": v["inputs"], "outputs": v["outputs"]}
                                    for k, v in manifest["parts"].items()},
                          "files": {k: v["size"] for k, v in manifest["files"].items()}},
                         indent=1))
        return 0
    source = manifest.get("source") or {}
    total = sum(v["size"] for v in manifest["files"].values())
    loras = ", ".join(f"{p}:{s}" for p, s in source.get("loras", [])) or "none"
    print(f"{key['backend']} engine {args.dir}")
    print(f"  model {source.get('model', key['model'])} (weights {key['model_hash']}), "
          f"LoRAs: {loras}")
    print(f"  {key['height']}x{key['width']} images, up to {key['max_batch']} per call and "
          f"{key['max_classes']} classes per prompt, {key['dtype']}, opset {key['opset']}")
    print(f"  parts: {', '.join(manifest['parts'])}; {len(manifest['files'])} files, "
          f"{total / 2**20:.1f} MiB")
    print("  (--json prints the whole manifest)")
    return 0


def register(sub) -> None:
    """Add `attnseg engine {build,verify,info}`."""
    p = sub.add_parser("engine", help="compiled engines (torch.compile, ONNX Runtime, TensorRT) "
                       "whose UNet also outputs the attention maps",
                       description="Compiled engines (torch.compile, ONNX Runtime, TensorRT) "
                       "whose denoiser also outputs the harvested attention maps: build them, "
                       "check them against torch, swap LoRAs into TensorRT ones, inspect them.")
    esub = p.add_subparsers(dest="engine_command", required=True)
    b = esub.add_parser("build", help="export/compile a model into an engine folder (reused "
                        "when up to date)",
                        description="Export or compile --model (LoRAs merged) into an engine "
                        "folder for --backend, with the map outputs of --preset; a folder that "
                        "is up to date is reused. `attnseg synth --engine DIR` generates with it.")
    cli_args.add_model(b, default="tiny")
    b.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="LoRA (folder or .safetensors file) to merge before export; repeat for "
                   "several (default: none)")
    cli_args.add_allow_pickle(b)
    cli_args.add_backend(b, engines_only=True)
    b.add_argument("--out", required=True, help="engine folder; required")
    cli_args.add_size(b)
    b.add_argument("--batch-size", type=int, default=4,
                   help="largest images per call (TensorRT profile max; default 4)")
    b.add_argument("--max-classes", type=int, default=8,
                   help="largest labelled words per prompt (TensorRT profile max; default 8)")
    cli_args.add_dtype(b, default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    cli_args.add_device(b, default="auto")
    b.add_argument("--preset", default="attnseg",
                   help="harvesting recipe whose map outputs the engine computes "
                   "(default: attnseg)")
    cli_args.add_set(b, "harvest.strides=[16,32]", sections="harvest, mask (the preset's "
                     "settings, as for synth)", sections_only=True)
    b.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    b.add_argument("--trt-plugin", default="auto", choices=("auto", "on", "off"),
                   help="TensorRT: aggregate maps with the Triton kernel as a plugin "
                   "(default: auto)")
    b.add_argument("--refit", action="store_true",
                   help="TensorRT: keep weights refittable (LoRA swaps without a rebuild)")
    b.set_defaults(func=cmd_build)
    v = esub.add_parser("verify", help="generate through the engine and through torch; compare",
                        description="Generate the same samples through the engine and through "
                        "torch and compare images, labels and maps against tolerances; exit 1 "
                        "when parity fails.")
    v.add_argument("dir", help="engine folder")
    v.add_argument("--steps", type=int, default=4, help="denoising steps (default: 4)")
    cli_args.add_device(v, default="auto")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.set_defaults(func=cmd_verify)
    r = esub.add_parser("refit", help="TensorRT: swap in other LoRAs without a rebuild "
                        "(engine built with --refit)",
                        description="Refit a TensorRT engine built with --refit: the recorded "
                        "model is reloaded, the given LoRAs merged and the engine's weights "
                        "replaced, without a rebuild.")
    r.add_argument("dir", help="engine folder built with --refit")
    r.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="LoRA (folder or .safetensors file) to merge; repeat for several "
                   "(default: none, the base model)")
    r.set_defaults(func=cmd_refit)
    i = esub.add_parser("info", help="print what an engine folder holds",
                        description="Print an engine folder's model, LoRAs, shapes, dtype, "
                        "parts and files (--json: the manifest).")
    i.add_argument("dir", help="engine folder")
    i.add_argument("--json", action="store_true",
                   help="print the manifest (key, inputs and outputs, files) as JSON")
    i.set_defaults(func=cmd_info)


__all__ = ["register"]
