"""LoRAs at synthesis: which file a LoRA is, its content hash, and loading and fusing LoRAs into
a diffusers pipeline (`attnseg synth --lora PATH[:SCALE]`). Training one is `lora_train`.

Only safetensors files are loaded: a pickle (.bin, .pt) can run code.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError, first_line
from ..files import file_sha256

# The file name diffusers writes and `load_lora_weights` looks for in a LoRA folder.
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA to fuse: a folder holding one .safetensors LoRA, or the file, and its scale."""

    path: str
    scale: float = 1.0


def parse_lora_spec(text: str, default_scale: float = 1.0) -> LoraSpec:
    """`PATH` or `PATH:scale` (a trailing `:number` is the scale)."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return LoraSpec(head, float(tail))
        except ValueError:
            pass
    return LoraSpec(text, default_scale)


def lora_weights_file(path: str) -> Path:
    """The safetensors file of a LoRA given as a folder or a file. Pickle files are refused."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"LoRA {path} does not exist")
    if p.is_dir():
        if (p / LORA_WEIGHTS).is_file():
            return p / LORA_WEIGHTS
        files = sorted(p.glob("*.safetensors"))
        if len(files) == 1:
            return files[0]
        if files:
            raise UserError(f"LoRA folder {path} holds several .safetensors files; give one file")
        pickles = [f.name for f in p.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        hint = " (pickle files such as .bin are not loaded: convert to safetensors)" if pickles \
            else ""
        raise UserError(f"LoRA folder {path} holds no .safetensors file{hint}")
    if p.suffix != ".safetensors":
        raise UserError(f"LoRA file {path} is not a .safetensors file (pickle files can run code "
                        "and are not loaded)")
    return p


def _adapter_layers(module: torch.nn.Module, name: str) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(1 for m in module.modules()
               if isinstance(m, BaseTunerLayer) and name in getattr(m, "lora_A", {}))


def check_loras(specs: list[LoraSpec]) -> list[dict]:
    """Check that every LoRA file exists and is safetensors; a record per LoRA (path, scale,
    content hash) for job files, so a job resumed with other LoRAs is refused."""
    return [{"path": s.path, "scale": s.scale,
             "sha256": file_sha256(lora_weights_file(s.path))[:16]}
            for s in specs]


def peft_version_problem() -> str | None:
    """None when the installed peft is new enough for the installed transformers and diffusers
    (each states the oldest peft it works with); else one line naming the versions and the fix.
    transformers and peft are released separately, so a fresh unpinned install can pair a
    transformers with a peft that does not exist yet."""
    from importlib.metadata import version

    from packaging.version import Version

    have = version("peft")
    needs = []
    for lib, module in (("transformers", "transformers.integrations.peft"),
                        ("diffusers", "diffusers.utils.constants")):
        try:
            needed = getattr(__import__(module, fromlist=["MIN_PEFT_VERSION"]),
                             "MIN_PEFT_VERSION", None)
        except ImportError:
            continue
        if needed and Version(have) < Version(needed):
            needs.append(f"{lib} {version(lib)} needs peft >= {needed}")
    if not needs:
        return None
    return (f"LoRAs need a peft that matches the other libraries: peft {have} is installed, but "
            f"{'; '.join(needs)}. Install the tested set: pip install -c constraints.txt -e . "
            "(see the README), or a transformers/peft pair that fits")


def require_compatible_peft() -> None:
    problem = peft_version_problem()
    if problem:
        raise UserError(problem)


def apply_loras(pipe, specs: list[LoraSpec]) -> list[dict]:
    """Load LoRAs into a diffusers pipeline and fuse them, each with its scale, then remove the
    adapter layers: the UNet (and text encoder, for LoRAs that carry one) are plain modules with
    merged weights, which is what generation runs fastest on and what engines export.

    W' = W + sum_i scale_i * (alpha_i / r_i) * B_i A_i for every adapted layer.
    """
    if not specs:
        return []
    import transformers

    transformers.utils.logging.disable_progress_bar()  # text-encoder LoRAs show a loading bar
    records = check_loras(specs)
    require_compatible_peft()
    names = []
    for i, spec in enumerate(specs):
        file = lora_weights_file(spec.path)
        name = f"attnseg_lora_{i}"
        try:
            with warnings.catch_warnings():
                # peft warns whenever a second adapter is added; several LoRAs are intended.
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                pipe.load_lora_weights(str(file.parent), weight_name=file.name,
                                       adapter_name=name, use_safetensors=True)
        except Exception as e:  # diffusers/peft raise many types for incompatible files
            raise UserError(f"could not load LoRA {spec.path}: {first_line(e)}") from None
        layers = _adapter_layers(pipe.unet, name) + _adapter_layers(pipe.text_encoder, name)
        if layers == 0:
            raise UserError(f"LoRA {spec.path} matches no layer of this model (a LoRA for "
                            "another architecture?)")
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[s.scale for s in specs])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()
    return records
