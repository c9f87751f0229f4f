"""`attnseg bench ...` subcommands."""

from __future__ import annotations

import sys

from attnseg.pipeline import cli_args

# `bench gpu`'s phases, for its help (bench/gpu.py's PHASES; it imports torch, this module must
# not: tests/bench/test_gpu.py checks that the two agree).
GPU_PHASES = ("kernels", "parity", "kbench", "compile", "throughput", "families", "toy")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def bench_config(cls, args, flags: tuple[str, ...], what: str, values: dict | None = None):
    """A benchmark's config: its --config file, then the flags given, then --set."""
    from attnseg.pipeline.settings import apply_set, config_from, config_values

    merged = config_values(args, flags)
    merged.update(values or {})
    apply_set(merged, args.set)
    return config_from(cls, merged, what)


def cmd_throughput(args) -> int:
    from attnseg.pipeline.errors import UserError

    from .common import spread_note
    from .throughput import ThroughputConfig, _table, run_throughput

    values: dict = {}
    if args.backend is not None:
        values["backends"] = tuple(b.strip() for b in args.backend.split(",") if b.strip())
    if args.batch_size is not None:
        try:
            values["batch_sizes"] = _ints(args.batch_size)
        except ValueError:
            raise UserError(f"--batch-size {args.batch_size!r} is not a comma list of ints") \
                from None
    if args.no_plots:
        values["plots"] = False
    if args.no_progress:
        values["progress"] = False
    cfg = bench_config(ThroughputConfig, args, (
        "model", "height", "width", "steps", "repeats", "warmup", "preset", "device", "dtype",
        "out"), "bench throughput", values)
    result = run_throughput(cfg)
    print(_table(result), end="")
    print(f"results: {', '.join(result['files'])}")
    noisy = [r for r in result["summary"] if r["within_spread"]]
    if noisy:
        print(f"note: {spread_note(noisy)}")
    if result["model_note"].startswith("built-in"):
        print(f"note: model '{cfg.model}' has random weights: timings are real, images are noise")
    return 0


def cmd_robust_training(args) -> int:
    from .robust_training import RobustTrainingConfig, render_markdown, run_robust_training

    values = {"quick": True} if args.quick else {}
    cfg = bench_config(RobustTrainingConfig, args, ("out",), "bench robust-training", values)
    doc = run_robust_training(cfg, "attnseg " + " ".join(sys.argv[1:]))
    print(render_markdown(doc), end="")
    if doc["files"]:
        print(f"results: {', '.join(doc['files'])}")
    return 0


def cmd_prompts_lora(args) -> int:
    from .prompts_lora import PromptsLoraConfig, run_prompts_lora, to_markdown

    cfg = bench_config(PromptsLoraConfig, args, ("out",), "bench prompts-lora")
    result = run_prompts_lora(cfg)
    print(to_markdown(result), end="")
    print(f"results: {', '.join(result['files'])}")
    return 0


def _floats(text: str) -> tuple[float, ...]:
    from attnseg.pipeline.errors import UserError

    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(f"{text!r} is not a comma list of numbers") from None


# Flags copied into QualityConfig when given (dest name == field name).
_QUALITY_FLAGS = ("model", "classes", "preset", "num_per_class", "steps", "height", "width",
                  "seed",
                  "device", "dtype", "labelled", "labelled_kind", "labelled_split", "limit",
                  "pseudo_gt", "train_steps", "train_model", "throughput", "work", "out")


def quality_config_from_args(args):
    """QualityConfig from `--config` (JSON/TOML; sections `real` and `train`), then flags."""
    from attnseg.pipeline.errors import UserError
    from attnseg.pipeline.harvest.real_images import RealImageConfig
    from attnseg.pipeline.settings import (
        apply_set,
        check_value,
        config_from,
        config_values,
        unknown_keys_line,
    )

    from .quality import QualityConfig

    values = config_values(args, _QUALITY_FLAGS)
    if args.no_throughput:
        values["throughput"] = ""
    if args.no_progress:
        values["progress"] = False
    real = dict(check_value(dict, values.get("real") or {}, "quality", "real"))
    if args.noise_levels is not None:
        real["noise_levels"] = _floats(args.noise_levels)
    sets: dict = {}
    apply_set(sets, args.set, sections_only=True)
    unknown = sorted(set(sets) - {"real", "train"})
    if unknown:
        raise UserError(unknown_keys_line(unknown, ("real", "train"), "bench quality",
                                          "section"))
    real.update(sets.get("real", {}))
    train = dict(check_value(dict, values.get("train") or {}, "quality", "train"))
    for key, value in sets.get("train", {}).items():  # train.loss.name=ce -> {"loss": {...}}
        section, dot, name = key.partition(".")
        if dot:
            train.setdefault(section, {})[name] = value
        else:
            train[key] = value
    values["train"] = train
    if "noise_levels" in real:
        real["noise_levels"] = tuple(real["noise_levels"])
    values["real"] = config_from(RealImageConfig, real, "quality.real")
    return config_from(QualityConfig, values, "quality")


def cmd_quality(args) -> int:
    from .quality import markdown, run_quality, work_folder

    cfg = quality_config_from_args(args)
    report = run_quality(cfg)
    print(markdown(report), end="")
    print(f"results: {', '.join(report['files'])} (work folder: {work_folder(cfg)})")
    if report["model_note"].startswith("built-in"):
        print(f"note: model '{cfg.model}' has random weights: its images are noise and its "
              "mIoU figures only show that the path works")
    return 0


def cmd_toy(args) -> int:
    from .toy.config import ToyBenchConfig
    from .toy.run import run_toy_bench

    values = {"progress": False} if args.no_progress else {}
    cfg = bench_config(ToyBenchConfig, args, ("model", "device", "dtype", "out"), "bench toy",
                       values)
    report = run_toy_bench(cfg)
    print(open(report["files"][1]).read(), end="")
    print(f"results: {', '.join(report['files'])}")
    return 0


def cmd_toy_downstream(args) -> int:
    from .toy.instrument import ToyDownstreamConfig, run_toy_downstream

    cfg = bench_config(ToyDownstreamConfig, args, ("model", "device", "dtype", "out"),
                       "bench toy-downstream")
    report = run_toy_downstream(cfg)
    print(open(report["files"][1]).read(), end="")
    print(f"results: {', '.join(report['files'])}")
    return 0


def cmd_writing(args) -> int:
    from .writing import WritingBenchConfig, run_writing_bench

    values = {"progress": False} if args.no_progress else {}
    cfg = bench_config(WritingBenchConfig, args, ("model", "device", "dtype", "out"),
                       "bench writing", values)
    report = run_writing_bench(cfg)
    print(open(report["files"][1]).read(), end="")
    print(f"results: {', '.join(report['files'])}")
    return 0


def cmd_crf(args) -> int:
    from .crf import CrfBenchConfig, run_crf_bench

    values = {"progress": False} if args.no_progress else {}
    cfg = bench_config(CrfBenchConfig, args, ("out",), "bench crf", values)
    report = run_crf_bench(cfg)
    print(open(report["files"][1]).read(), end="")
    print(f"results: {', '.join(report['files'])}")
    return 0


def cmd_gpu(args) -> int:
    from .gpu import GpuProofConfig, run_gpu_proof

    values: dict = {}
    if args.phases:
        values["phases"] = tuple(x.strip() for x in args.phases.split(",") if x.strip())
    if args.smoke:
        values["smoke"] = True
    cfg = bench_config(GpuProofConfig, args, ("out",), "bench gpu", values)
    report = run_gpu_proof(cfg)
    print(open(report["files"][1]).read(), end="")
    print(f"results: {', '.join(report['files'])}")
    failed = [n for n, r in report["steps"].items() if "skipped" not in r and not r.get("ok")]
    return 1 if failed else 0


def _add_toy_model(p) -> None:
    p.add_argument("--model", help="a toy-world model: 'toy' (shipped) or the model/ folder of "
                   "`attnseg toy train-model` (default: toy)")


def register(sub) -> None:
    """Add `attnseg bench` and its subcommands."""
    bench = sub.add_parser("bench", help="benchmarks (named below, once they are added)")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    p = bsub.add_parser("throughput", help="generation speed/memory: stock vs harvesting vs "
                        "store-every-map, per component, batch sizes swept",
                        description="Time generation three ways (stock, harvesting the maps, "
                        "storing every map) on each --backend and --batch-size, runs "
                        "interleaved, per component, with peak memory; writes OUT.json, OUT.md "
                        "and a plot.")
    cli_args.add_config(p, "throughput")
    cli_args.add_set(p, "repeats=5")
    cli_args.add_model(p)
    cli_args.add_backend(p, several=True, extra="engine backends run the harvest variant "
                         "against the torch stock baseline; compile uses CUDA graphs on a GPU")
    p.add_argument("--batch-size",
                   help="images per generation call, or a comma list to sweep (default: 1,2)")
    cli_args.add_size(p)
    p.add_argument("--steps", type=int, help="denoising steps (default: 10)")
    p.add_argument("--repeats", type=int,
                   help="measured runs per variant, interleaved (default: 3)")
    p.add_argument("--warmup", type=int, help="unmeasured runs per variant first (default: 1)")
    p.add_argument("--preset", help="harvesting recipe, see `attnseg presets` (default: attnseg)")
    cli_args.add_device(p)
    cli_args.add_dtype(p)
    p.add_argument("--out", help="where results go: OUT.json, OUT.md, OUT.png (a .json/.md "
                   "suffix is dropped; default: attnseg-bench/throughput in the current folder)")
    p.add_argument("--no-plots", action="store_true", help="no PNG plot")
    cli_args.add_no_progress(p, "no line per measured run on stderr")
    p.set_defaults(func=cmd_throughput)

    q = bsub.add_parser(
        "quality", help="pseudo-mask mIoU against a labelled set, downstream mIoU after "
        "training on the generated data, and throughput, in one report",
        description="Generate a small dataset, score its pseudo-masks (against --pseudo-gt, and "
        "the real-image labeller's against --labelled), train a segmenter on it and score that "
        "on --labelled, and measure throughput: one report, OUT.json and OUT.md.")
    cli_args.add_config(q, "quality", sections="real, train")
    cli_args.add_model(q)
    cli_args.add_classes(q)
    q.add_argument("--preset", help="harvesting recipe (default: attnseg)")
    q.add_argument("--num-per-class", type=int, help="images generated per class (default: 2)")
    q.add_argument("--steps", type=int, help="denoising steps (default: the preset's, else 20)")
    cli_args.add_size(q)
    q.add_argument("--seed", type=int, help="base seed of generation and training (default: 0)")
    cli_args.add_device(q)
    cli_args.add_dtype(q)
    q.add_argument("--labelled", help="labelled set (VOC, Cityscapes, ImageNet-S or attnseg "
                   "layout): pseudo-masks of its images and the trained model are scored on it "
                   "(default: none)")
    q.add_argument("--labelled-kind", help="its layout (default: auto)")
    q.add_argument("--labelled-split", help="its split (default: val)")
    q.add_argument("--limit", type=int, help="score the first N labelled images only "
                   "(default: all)")
    q.add_argument("--noise-levels", help="comma list in [0, 1): timesteps (as fractions of "
                   "the training schedule) real images are noised to (default: 0.2,0.4)")
    q.add_argument("--pseudo-gt", help="labels drawn for the generated images (same names): "
                   "their pseudo-masks are scored against them (default: none)")
    q.add_argument("--train-steps", type=int, help="downstream training steps, 0 for none "
                   "(default: 200)")
    q.add_argument("--train-model", help="segmenter to train (default: segformer-b0)")
    cli_args.add_set(q, "real.noise_levels=[0.3] --set train.loss.name=ce --set "
                     "train.batch_size=4", sections="real (the real-image labeller's), train "
                     "(the downstream training's)", sections_only=True)
    q.add_argument("--throughput", help="embed this `bench throughput` JSON instead of "
                   "measuring a short one (default: measure)")
    q.add_argument("--no-throughput", action="store_true", help="leave throughput out")
    q.add_argument("--work", help="folder for the dataset and training run (default: OUT.work)")
    q.add_argument("--out", help="where results go: OUT.json, OUT.md (default: "
                   "attnseg-bench/quality in the current folder)")
    cli_args.add_no_progress(q, "no progress bars")
    q.set_defaults(func=cmd_quality)

    t = bsub.add_parser("toy", help="the toy world: trivial baselines, pseudo-mask mIoU per "
                        "preset and localisation against exact labels of rendered scenes "
                        "(seeds, spread; tuned on a validation seed, reported on a test seed)",
                        description="The toy world's study, scored against exact labels of "
                        "rendered scenes: trivial baselines, pseudo-mask mIoU per preset and "
                        "localisation, over seeds with their spread; choices tuned on a "
                        "validation seed, figures reported on a test seed.")
    cli_args.add_config(t, "toy benchmark")
    cli_args.add_set(t, "num_images=50 --set seeds=[0]")
    _add_toy_model(t)
    cli_args.add_device(t)
    cli_args.add_dtype(t)
    t.add_argument("--out", help="where results go: OUT.json, OUT.md (default: "
                   "attnseg-bench/toy in the current folder)")
    cli_args.add_no_progress(t, "no progress bars")
    t.set_defaults(func=cmd_toy)

    d = bsub.add_parser("toy-downstream", help="the toy world's downstream instrument: the "
                        "training protocol chosen on validation, then each arm (exact labels, "
                        "synthetic data, losses, prompts, CRF, image counts, recipes, the "
                        "target-domain LoRA) over "
                        "training seeds and test renders, gains paired by seed with 95 % "
                        "intervals",
                        description="Segmenters trained on rendered or synthetic toy scenes, "
                        "scored against exact labels on several test renders: the training "
                        "protocol chosen on the validation render by a rule fixed beforehand "
                        "(highest mean among seed spreads <= max_spread), then every arm over "
                        "the training seeds, each gain paired by seed with the synthetic arm "
                        "(a target-domain LoRA's with the synthetic arm on target renders).")
    cli_args.add_config(d, "toy downstream instrument")
    cli_args.add_set(d, "arms=[\"exact\",\"synthetic\"] --set seeds=[0,1]")
    _add_toy_model(d)
    cli_args.add_device(d)
    cli_args.add_dtype(d)
    d.add_argument("--out", help="where results go: OUT.json, OUT.md (default: "
                   "attnseg-bench/toy-downstream in the current folder)")
    d.set_defaults(func=cmd_toy_downstream)

    w = bsub.add_parser("writing", help="`attnseg synth` images/s: generation alone, writing "
                        "inline, writing on the pool's threads (few-step rates)",
                        description="Time one `attnseg synth` job three ways, interleaved: "
                        "generation alone, writing inline and writing on the pool's threads, "
                        "as images/s and as ratios to generation alone with their spread.")
    cli_args.add_config(w, "writing benchmark")
    cli_args.add_set(w, "steps=2 --set write_workers=4")
    cli_args.add_model(w)
    cli_args.add_device(w)
    cli_args.add_dtype(w)
    w.add_argument("--out", help="where results go: OUT.json, OUT.md (default: "
                   "attnseg-bench/writing in the current folder)")
    cli_args.add_no_progress(w, "no line per timed run on stderr")
    w.set_defaults(func=cmd_writing)

    c = bsub.add_parser("crf", help="the CPU dense CRF: attnseg's lattice against pydensecrf "
                        "(single-threaded) and at each thread count, side by side",
                        description="Time the dense CRF on a photo at each size, interleaved: "
                        "pydensecrf2 (where it imports) and attnseg's lattice at each torch "
                        "thread count, as medians with their spread and as ratios.")
    cli_args.add_config(c, "crf benchmark")
    cli_args.add_set(c, "sizes=[64,512] --set repeats=3")
    c.add_argument("--out", help="where results go: OUT.json, OUT.md (default: "
                   "attnseg-bench/crf in the current folder)")
    cli_args.add_no_progress(c, "no line per size and repeat on stderr")
    c.set_defaults(func=cmd_crf)

    g = bsub.add_parser("gpu", help="the GPU proof in one run: kernel tests on the GPU, stock vs "
                        "harvest parity, kernel timings, compile build + verify, throughput, "
                        "newer families, toy model training (bench/gpu_proof.sh runs it on a "
                        "machine without the project installed)",
                        description="The GPU proof in one run, each phase capped and recorded "
                        "even when it fails: kernel tests on the GPU, stock vs harvest parity, "
                        "kernel timings, compile build + verify, throughput, the newer families "
                        "and the toy model's GPU training (--phases picks them).")
    cli_args.add_config(g, "gpu proof")
    cli_args.add_set(g, "budget_s=400")
    g.add_argument("--phases", metavar="PHASE[,PHASE...]",
                   help=f"which phases of the proof to run (not denoising steps): a comma list "
                   f"of {', '.join(GPU_PHASES)} (default: all, in that order)")
    g.add_argument("--smoke", action="store_true", help="CPU dry run: tiny model, small sizes, "
                   "Triton interpreter, GPU-only steps skipped")
    g.add_argument("--out", help="where results go: OUT.json, OUT.md (default: "
                   "bench/results/gpu/gpu)")
    g.set_defaults(func=cmd_gpu)

    r = bsub.add_parser("robust-training", help="plain CE against the reliability-aware losses "
                        "on procedural shapes with attention-like noisy masks (seeds, spread)",
                        description="Train on procedural shapes whose masks carry "
                        "attention-like noise, with plain cross-entropy and with the "
                        "reliability-aware losses, over seeds; report mIoU against the clean "
                        "labels with its spread.")
    cli_args.add_config(r, "robust-training")
    cli_args.add_set(r, "seeds=5 --set steps=400")
    r.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, 30 steps")
    r.add_argument("--out", help="where results go: OUT.json, OUT.md (default: "
                   "attnseg-bench/robust_training in the current folder)")
    r.set_defaults(func=cmd_robust_training)

    r = bsub.add_parser("prompts-lora", help="prompt augmentation counts and cost, fused vs "
                        "unfused LoRA generation, LoRA training step cost",
                        description="Prompt augmentation (prompts per class and their cost), "
                        "generation with a LoRA fused against unfused, and the cost of a LoRA "
                        "training step.")
    cli_args.add_config(r, "prompts-lora")
    cli_args.add_set(r, "parts=prompts")
    r.add_argument("--out", help="where results go: OUT.json, OUT.md (default: "
                   "attnseg-bench/prompts_lora in the current folder)")
    r.set_defaults(func=cmd_prompts_lora)

    # `attnseg --help` and `attnseg bench --help` name every bench, from the subparsers.
    names = list(bsub.choices)
    bench.description = (f"Benchmarks, each writing OUT.json and OUT.md: {', '.join(names)} "
                         "(each described below; `attnseg bench NAME --help` for its flags).")
    for action in sub._choices_actions:
        if action.dest == "bench":
            action.help = f"benchmarks: {', '.join(names)}"
