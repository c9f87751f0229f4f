"""`attnseg lora train`: LoRA domain adaptation of the UNet on unlabeled images."""

from __future__ import annotations

from .. import cli_args

_FIELDS = ("images", "model", "out", "caption", "rank", "alpha", "steps", "lr", "batch_size",
           "crop", "seed", "weight_decay", "max_grad_norm", "noise_offset", "checkpoint_every",
           "keep_checkpoints", "device", "dtype", "allow_pickle")


def _config(args):
    from ..adapt.lora_train import LoraTrainConfig
    from ..settings import config_from, config_values

    values = config_values(args, _FIELDS)
    if args.target_modules is not None:
        values["target_modules"] = tuple(t.strip() for t in args.target_modules.split(",")
                                         if t.strip())
    for flag, name, value in ((args.no_flip, "flip", False),
                              (args.center_crop, "center_crop", True),
                              (args.gradient_checkpointing, "gradient_checkpointing", True)):
        if flag:
            values[name] = value
    return config_from(LoraTrainConfig, values, "lora train")


def cmd_lora_train(args) -> int:
    from ..adapt.lora_train import train_lora
    from ..models.loading import random_model_notice

    cfg = _config(args)
    s = train_lora(cfg, progress=not args.no_progress)
    resumed = f" (resumed from step {s['resumed_from']})" if s["resumed_from"] else ""
    rate = f", {s['steps_per_s']:.2f} steps/s" if s["steps_per_s"] else ""
    print(f"trained LoRA to step {s['steps']}{resumed}: {s['new_steps']} new steps in "
          f"{s['seconds']:.1f} s{rate} on {s['device']} {s['dtype']}, {s['images']} images, "
          f"{s['trainable_params']} trainable parameters")
    print(f"probe loss {s['probe_loss_start']:.5f} -> {s['probe_loss_end']:.5f} "
          f"(step 0 -> {s['steps']})")
    print(f"LoRA: {s['weights']} (use: attnseg synth --lora {s['out']})")
    notice = random_model_notice(cfg.model)
    if notice:
        print(f"note: {notice}")
    return 0


def register(sub) -> None:
    """Add `attnseg lora train` to the `attnseg` parser."""
    lora = sub.add_parser("lora", help="LoRA domain adaptation of the diffusion UNet",
                          description="LoRA domain adaptation: `lora train` fits adapters on "
                          "unlabeled target-domain images; `synth --lora` generates with them.")
    lsub = lora.add_subparsers(dest="lora_command", required=True)
    p = lsub.add_parser(
        "train", help="train a LoRA on a folder of unlabeled target-domain images",
        description="Fine-tune LoRA adapters on the UNet's attention projections with the "
        "noise-prediction loss. Checkpoints are written every --checkpoint-every steps; run the "
        "same command again to resume, or with a larger --steps to train on.",
    )
    cli_args.add_config(p, "lora train")
    p.add_argument("--images", help="folder of training images (searched recursively); required")
    cli_args.add_model(p)
    p.add_argument("--out", help="output folder (default: out/lora)")
    p.add_argument("--caption", help="caption of images without a <image>.txt caption file "
                   "(default: none: every image needs one)")
    p.add_argument("--rank", type=int, help="LoRA rank (default: 4)")
    p.add_argument("--alpha", type=float, help="LoRA alpha (default: the rank)")
    p.add_argument("--target-modules", help="comma list of UNet Linear layers to adapt "
                   "(default: to_q,to_k,to_v,to_out.0)")
    p.add_argument("--steps", type=int, help="total optimiser steps (default: 1000)")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default: 1e-4)")
    p.add_argument("--batch-size", type=int, help="images per step (default: 1)")
    p.add_argument("--crop", type=int, help="square training crop side, multiple of 8 "
                   "(default: 128 for tiny, else 512)")
    p.add_argument("--seed", type=int, help="seed of initialisation and all draws (default: 0)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default: 0.01)")
    p.add_argument("--max-grad-norm", type=float, help="gradient clipping (default: 1.0)")
    p.add_argument("--noise-offset", type=float, help="std of a per-image, per-channel "
                   "constant added to the training noise, so the LoRA can move a domain's "
                   "colours, not only its textures (default: 0: plain noise)")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints "
                   "(default: 250)")
    p.add_argument("--keep-checkpoints", type=int, help="checkpoints kept (default: 2)")
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    p.add_argument("--center-crop", action="store_true", help="centre crops, not random ones")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute UNet activations in the backward pass (less memory)")
    cli_args.add_device(p)
    cli_args.add_dtype(p, help="frozen weights: auto (bf16 on GPU, fp32 on CPU), fp32, bf16 "
                       "(default: auto)")
    cli_args.add_allow_pickle(p)
    cli_args.add_no_progress(p)
    p.set_defaults(func=cmd_lora_train)
