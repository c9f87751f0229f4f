"""`attnseg toy render` (procedural scenes of shapes with exact label maps) and `attnseg toy
train-model` (the small text-to-image model trained on them): the toy world."""

from __future__ import annotations

from .. import cli_args


def cmd_toy_render(args) -> int:
    from ..settings import apply_set, config_from, config_values
    from ..toy.world import ToyRenderConfig, render_dataset

    values = config_values(args, ("out", "num_images", "seed", "domain", "height", "width",
                                  "max_objects"))
    apply_set(values, args.set)
    cfg = config_from(ToyRenderConfig, values, "toy render")
    summary = render_dataset(cfg, progress=not args.no_progress)
    print(f"wrote {summary['images']} {summary['domain']}-domain scenes "
          f"({summary['new']} new) of {summary['size'][0]}x{summary['size'][1]} to "
          f"{summary['out']} (exact labels; class set `toy`)")
    return 0


def cmd_toy_train_model(args) -> int:
    from pathlib import Path

    from ..device import resolve_device
    from ..files import OutputLock
    from ..settings import apply_set, config_from, config_values
    from ..toy.model import ToyModelConfig, ToyModelTrainer

    values = config_values(args, ("out", "seed", "device"))
    apply_set(values, args.set)
    cfg = config_from(ToyModelConfig, values, "toy train-model")
    cfg.validate()
    resolve_device(cfg.device)  # bad arguments are refused before the folder is made
    with OutputLock(Path(cfg.out)):  # a second process training into the folder is refused
        trainer = ToyModelTrainer(cfg)
        start = trainer.step
        model = trainer.train(progress=not args.no_progress)
    print(f"trained steps {start}-{trainer.step} of the toy model (VAE {cfg.vae_steps}, UNet "
          f"{cfg.unet_steps}); loss curves in {cfg.out}/loss.json and loss.png; model in "
          f"{model} (pass it as --model)")
    return 0


def register(sub) -> None:
    """Add `attnseg toy render` and `attnseg toy train-model`."""
    p = sub.add_parser("toy", help="the toy world: procedural shape scenes with exact labels",
                       description="The toy world, where every figure can be checked against "
                       "exact labels: `toy render` draws shape scenes, `toy train-model` trains "
                       "the small text-to-image model on them (`--model toy` is the shipped one).")
    tsub = p.add_subparsers(dest="toy_command", required=True)
    r = tsub.add_parser("render", help="render scenes (images, exact label maps, captions) "
                        "into the synthetic dataset layout",
                        description="Render procedural scenes of shapes with their exact label "
                        "maps and captions into the layout `attnseg synth` writes, for training "
                        "or scoring; scene i depends on (--seed, i) only, and a rerun adds the "
                        "missing ones.")
    cli_args.add_config(r, "toy render")
    r.add_argument("--out", help="output folder (default: out/toy)")
    r.add_argument("--num-images", type=int, help="scenes to render (default: 100)")
    r.add_argument("--seed", type=int, help="scene i depends on (seed, i) only (default: 0)")
    r.add_argument("--domain", help="source (meadows, saturated objects) or target (streets, "
                   "darker and smaller objects) (default: source)")
    cli_args.add_size(r, default="64")  # ToyRenderConfig's
    r.add_argument("--max-objects", type=int, help="objects per scene, at most (default: 3)")
    cli_args.add_set(r, "max_objects=2")
    cli_args.add_no_progress(r)
    r.set_defaults(func=cmd_toy_render)
    t = tsub.add_parser("train-model", help="train the toy world's text-to-image model "
                        "(VAE, then UNet and text embeddings) on rendered source-domain scenes; "
                        "resumes where a run stopped",
                        description="Train the toy world's text-to-image model (a VAE, then a "
                        "UNet and text embeddings) on rendered source-domain scenes; the same "
                        "command resumes a stopped run; model/ at the end is a --model.")
    cli_args.add_config(t, "toy train-model")
    t.add_argument("--out", help="training folder: checkpoint/, loss curves, and model/ at the "
                   "end (default: out/toy-model)")
    t.add_argument("--seed", type=int, help="initial weights and batches (default: 0)")
    cli_args.add_device(t)
    cli_args.add_set(t, "unet_steps=8000 --set threads=1")
    cli_args.add_no_progress(t)
    t.set_defaults(func=cmd_toy_train_model)
