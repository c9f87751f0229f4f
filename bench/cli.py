"""`attnseg bench ...` subcommands."""

from __future__ import annotations


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def cmd_throughput(args) -> int:
    from attnseg.pipeline.errors import UserError

    from .throughput import ThroughputConfig, run_throughput

    try:
        batch_sizes = _ints(args.batch_sizes)
    except ValueError:
        raise UserError(f"--batch-sizes {args.batch_sizes!r} is not a comma list of ints") from None
    cfg = ThroughputConfig(
        model=args.model, backends=tuple(args.backends.split(",")), batch_sizes=batch_sizes,
        size=args.size, steps=args.steps, repeats=args.repeats, warmup=args.warmup,
        preset=args.preset, device=args.device, dtype=args.dtype, out=args.out,
        plots=not args.no_plots,
    )
    result = run_throughput(cfg)
    print(open(cfg.out + ".md").read(), end="")
    print(f"results: {cfg.out}.json, {cfg.out}.md" + ("" if args.no_plots else f", {cfg.out}.png"))
    if result["model_note"].startswith("built-in"):
        print(f"note: model '{cfg.model}' has random weights: timings are real, images are noise")
    return 0


def register(sub) -> None:
    """Add `attnseg bench` and its subcommands."""
    bench = sub.add_parser("bench", help="benchmarks: throughput (speed, memory)")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    p = bsub.add_parser("throughput", help="generation speed/memory: stock vs harvesting vs "
                        "store-every-map, per component, batch sizes swept")
    p.add_argument("--model", default="tiny",
                   help="tiny, sd15-random (SD 1.5 architecture, random weights), a hub id, "
                   "a folder or a .safetensors file (default: tiny)")
    p.add_argument("--backends", default="torch", help="comma list (default: torch)")
    p.add_argument("--batch-sizes", default="1,2", help="comma list (default: 1,2)")
    p.add_argument("--size", type=int, help="image side (default: 128 tiny, else 512)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--preset", default="attnseg")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", default="bench/results/throughput",
                   help="output path without suffix (default: bench/results/throughput)")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=cmd_throughput)
