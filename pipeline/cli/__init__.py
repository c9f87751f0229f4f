"""The `attnseg` command line: the union of every feature's subcommands.

Bad input is reported as one line, `attnseg: error: ...`, with exit code 2 and no traceback.
This module and the `register` functions it calls import no torch, so a bad argument is refused
in a fraction of a second.
"""

from __future__ import annotations

import argparse
import os
import sys

from ...bench import cli as bench_cli
from ...engines import cli as engines_cli
from ..errors import Terminated, UserError, os_error_line
from . import lora, prompts, report, synth, toy, train

# Each feature module exposes `register(subparsers)`; the command line is their union.
REGISTRARS = [synth.register, report.register, bench_cli.register, train.register,
              prompts.register, lora.register, toy.register, engines_cli.register]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("attnseg")
    except PackageNotFoundError:  # a source tree that is not installed
        return "0+unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnseg",
        description="Semantic-segmentation datasets from Stable Diffusion cross-attention.",
    )
    parser.add_argument("--version", action="version", version=f"attnseg {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in REGISTRARS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    if getattr(args, "synth_args", None) and args.synth_args[0] == "--":
        args.synth_args = args.synth_args[1:]
    try:
        return args.func(args)
    except UserError as e:
        print(f"attnseg: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`attnseg engine info | head`): stop quietly, as `cat` does.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except OSError as e:  # the user's disk or permissions (full disk, read-only folder)
        print(f"attnseg: error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except Terminated:
        print("attnseg: terminated; run the same command again to resume", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("attnseg: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
