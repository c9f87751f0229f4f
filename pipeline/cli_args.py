"""The flags that mean the same thing in every subcommand, defined once: one name, one help
text and one stated default per concept (`--config`, `--set`, `--device`, `--dtype`,
`--model`, `--scheduler`, `--height/--width`, `--allow-pickle`, `--no-progress`).

Defaults stay None where a `--config` file may set the value (a flag given overrides the file,
a flag not given does not); the help says what applies when neither does.
"""

from __future__ import annotations

import argparse

DTYPE_HELP = "auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16 (default: auto)"


def add_config(p: argparse.ArgumentParser, what: str, sections: str = "") -> None:
    """`--config FILE`: the command's settings from JSON or TOML; flags override it."""
    extra = f"sections: {sections}; " if sections else ""
    p.add_argument("--config", help=f"JSON or TOML file with {what} settings ({extra}flags "
                   "override it; default: none)")


def add_set(p: argparse.ArgumentParser, example: str, metavar: str = "KEY=VALUE") -> None:
    """`--set KEY=VALUE` (repeatable): any setting, over the config file and the flags."""
    p.add_argument("--set", action="append", default=[], metavar=metavar,
                   help=f"a setting, e.g. --set {example} (VALUE is JSON; repeatable; "
                   "default: none)")


def add_device(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--device", default=default,
                   help="auto, cpu, cuda, cuda:1 ... (default: auto)")


def add_dtype(p: argparse.ArgumentParser, default: str | None = None,
              help: str = DTYPE_HELP, choices=None) -> None:
    p.add_argument("--dtype", default=default, choices=choices, help=help)


def add_model(p: argparse.ArgumentParser, default: str | None = None) -> None:
    """`--model`: the text-to-image model, as every command that loads one takes it."""
    p.add_argument("--model", default=default,
                   help="'tiny', 'tiny-sdxl', 'tiny-pixart', 'tiny-sd3', 'tiny-flux' (built-in "
                   "random models of each family), 'sd15-random' / 'sdxl-random' / 'flux-random' "
                   "(the real architectures, random weights), 'toy' (the shipped toy-world model, "
                   "64x64), a hub id, a diffusers folder or one .safetensors file; SD 1.x/2.x, "
                   "SDXL, PixArt, SD3 and Flux (default: tiny)")


def add_scheduler(p: argparse.ArgumentParser) -> None:
    """`--scheduler`: replace the model's sampler (few-step sampling: lcm with an LCM-LoRA)."""
    p.add_argument("--scheduler", help="the model's own (default), or lcm, euler, euler-a, "
                   "ddim, dpm, turbo (euler-a with trailing timesteps, for 1-4 steps at "
                   "--guidance 0)")


def add_size(p: argparse.ArgumentParser) -> None:
    """`--height` and `--width` of the generated images."""
    p.add_argument("--height", type=int, help="image height, multiple of 8 "
                   "(default: 128 for the tiny models, 64 for toy, 1024 for sdxl-random and "
                   "flux-random, else 512; toy render: 64)")
    p.add_argument("--width", type=int, help="image width, multiple of 8 (default: as "
                   "--height's)")


def add_allow_pickle(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-pickle", action="store_true", default=None,
                   help="load pickle weights (.bin, .ckpt) too: they can run code, so only for "
                   "files you trust (default: safetensors only)")


def add_no_progress(p: argparse.ArgumentParser, what: str = "no progress bar") -> None:
    p.add_argument("--no-progress", action="store_true", help=what)
