"""The flags that mean the same thing in every subcommand, defined once: one name, one help
text and one stated default per concept (`--config`, `--set`, `--device`, `--dtype`,
`--model`, `--scheduler`, `--height/--width`, `--backend`, `--classes`, `--allow-pickle`,
`--no-progress`).

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


SET_METAVAR = "KEY=VALUE"  # the one placeholder of `--set`, in every command


def add_set(p: argparse.ArgumentParser, example: str, sections: str = "",
            sections_only: bool = False) -> None:
    """`--set KEY=VALUE` (repeatable): any setting, over the config file and the flags. A
    command whose settings have sections names them (`sections`); with `sections_only` every
    KEY is SECTION.NAME."""
    if sections:
        keys = (f"KEY is SECTION.NAME, sections: {sections}; " if sections_only else
                f"KEY is NAME, or SECTION.NAME for sections {sections}; ")
    else:
        keys = ""
    p.add_argument("--set", action="append", default=[], metavar=SET_METAVAR,
                   help=f"a setting, e.g. --set {example} ({keys}VALUE is JSON; repeatable; "
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
                   "--guidance 0; lcm needs an LCM-LoRA), for SD 1.x/2.x, SDXL and PixArt; SD3 "
                   "and Flux keep their own flow-matching sampler")


def model_size_default() -> str:
    """The default image size of the commands that generate with a `--model`, in words, from
    the table `default_size` reads (so the help cannot drift from the code)."""
    from .models.loading import DEFAULT_SIZE, DEFAULT_SIZES

    by_size: dict[int, list[str]] = {}
    for model, size in DEFAULT_SIZES.items():
        by_size.setdefault(size, []).append(model)
    parts = [f"{size} for {', '.join(models)}" for size, models in by_size.items()]
    return "; ".join(parts) + f"; else {DEFAULT_SIZE}"


def add_size(p: argparse.ArgumentParser, default: str | None = None) -> None:
    """`--height` and `--width` of the generated images; `default` is this command's default
    height in words (default: the --model's, `model_size_default()`)."""
    default = model_size_default() if default is None else default
    p.add_argument("--height", type=int, help=f"image height, multiple of 8 (default: "
                   f"{default})")
    p.add_argument("--width", type=int, help="image width, multiple of 8 (default: as "
                   "--height's)")


def add_backend(p: argparse.ArgumentParser, default: str = "torch", several: bool = False,
                engines_only: bool = False, extra: str = "") -> None:
    """`--backend`: where the denoiser runs, its names listed the same way in every command
    (`several`: a comma list of them; `engines_only`: the engine backends, and the flag is
    required). The value is checked by the command's config, in one line."""
    from .config import BACKENDS

    listed = ", ".join(BACKENDS[1:] if engines_only else BACKENDS)
    what = f"one of {listed}, or a comma list of them" if several else f"one of {listed}"
    end = "required" if engines_only else f"default: {default}"
    p.add_argument("--backend", required=engines_only,
                   metavar="BACKEND[,BACKEND...]" if several else "BACKEND",
                   help=f"where the denoiser runs: {what}{'; ' + extra if extra else ''} "
                   f"({end})")


def class_sets() -> str:
    """The built-in class sets' names, from their registry (`pipeline.prompts.CLASS_SETS`)."""
    from .prompts import CLASS_SETS

    return ", ".join(CLASS_SETS)


def add_classes(p: argparse.ArgumentParser, default: str = "voc") -> None:
    """`--classes`: a built-in class set, a class file or a comma list."""
    p.add_argument("--classes", help=f"a built-in class set ({class_sets()}), a file with one "
                   f"class per line, or 'a,b,c' (default: {default})")


def add_allow_pickle(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-pickle", action="store_true", default=None,
                   help="load pickle weights (.bin, .ckpt) too: they can run code, so only for "
                   "files you trust (default: safetensors only)")


def add_no_progress(p: argparse.ArgumentParser, what: str = "no progress bar") -> None:
    p.add_argument("--no-progress", action="store_true", help=f"{what} (default: shown)")
