"""`attnseg toy render`: procedural scenes of shapes with exact label maps (the toy world)."""

from __future__ import annotations

from . import cli_args


def cmd_toy_render(args) -> int:
    from .config import apply_set, config_from, config_values
    from .toy_world import ToyRenderConfig, render_dataset

    values = config_values(args, ("out", "num_images", "seed", "domain", "height", "width",
                                  "max_objects"))
    apply_set(values, args.set)
    cfg = config_from(ToyRenderConfig, values, "toy render")
    summary = render_dataset(cfg, progress=not args.no_progress)
    print(f"wrote {summary['images']} {summary['domain']}-domain scenes "
          f"({summary['new']} new) of {summary['size'][0]}x{summary['size'][1]} to "
          f"{summary['out']} (exact labels; class set `toy`)")
    return 0


def register(sub) -> None:
    """Add `attnseg toy render`."""
    p = sub.add_parser("toy", help="the toy world: procedural shape scenes with exact labels")
    tsub = p.add_subparsers(dest="toy_command", required=True)
    r = tsub.add_parser("render", help="render scenes (images, exact label maps, captions) "
                        "into the synthetic dataset layout")
    cli_args.add_config(r, "toy render")
    r.add_argument("--out", help="output folder (default: out/toy)")
    r.add_argument("--num-images", type=int, help="scenes to render (default: 100)")
    r.add_argument("--seed", type=int, help="scene i depends on (seed, i) only (default: 0)")
    r.add_argument("--domain", help="source (meadows, saturated objects) or target (streets, "
                   "darker and smaller objects) (default: source)")
    cli_args.add_size(r)
    r.add_argument("--max-objects", type=int, help="objects per scene, at most (default: 3)")
    cli_args.add_set(r, "max_objects=2")
    cli_args.add_no_progress(r)
    r.set_defaults(func=cmd_toy_render)
