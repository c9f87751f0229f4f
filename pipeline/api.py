"""attnseg from Python, on a diffusers pipeline you already hold: images and their pseudo-masks.

    from attnseg.pipeline.api import generate_with_masks

    out = generate_with_masks(pipe, ["a photo of a dog on a sofa"], classes=["dog", "sofa"])
    out.labels[0]  # uint8 [H, W]: 0 background, 1 dog, 2 sofa, 255 unsure

It runs the same code as `attnseg synth` (`synth.job.Synthesizer`): the same preset, the same
per-sample seeds, so a prompt and seed give the same image and masks as the command line. The
lower-level pieces (the harvester, the mask stages) are in docs/python-api.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import UserError
from .prompts import ClassInfo, PromptSpec, find_word


@dataclass
class MaskedImages:
    """What `generate_with_masks` returns, one entry per prompt."""

    images: np.ndarray  # uint8 [B, H, W, 3]
    labels: np.ndarray  # uint8 [B, H, W]: 0 background, i + 1 for classes[i], 255 unsure
    reliability: np.ndarray  # uint8 [B, H, W]: 255 = most reliable
    classes: list[ClassInfo]


def generate_with_masks(pipe, prompts: list[str], classes: list[str] | dict[str, list[str]],
                        preset: str = "attnseg", steps: int = 30, guidance: float = 7.5,
                        height: int = 512, width: int = 512, seed: int = 0,
                        overrides: dict | None = None) -> MaskedImages:
    """Generate `prompts` with `pipe` (SD 1.x/2.x, SDXL, PixArt, SD3 or Flux) and harvest a
    pseudo-mask for each class named in them.

    classes: class names (label i + 1 is classes[i]), or {name: [words]} when the prompts name
    a class by other words too; a prompt's labels are the classes it names (by their first word
    found in it). overrides: preset settings, as
    `attnseg synth --set`, e.g. {"mask": {"bg_const": 0.4}}. Prompt i is generated from seed
    `sample_seed(seed, i)`, as sample i of an `attnseg synth` job.
    """
    from .config import SynthConfig
    from .models.loading import check_image_size
    from .seeds import sample_seed
    from .synth.job import Sample, Synthesizer

    words = classes if isinstance(classes, dict) else {name: [name] for name in classes}
    infos = [ClassInfo(i + 1, name, ws[0]) for i, (name, ws) in enumerate(words.items())]
    samples = []
    for i, text in enumerate(prompts):
        labels = []
        for c in infos:  # each class by the first of its words the prompt holds
            found = [w for w in words[c.name] if find_word(text, w) >= 0]
            if found:
                labels.append((c, found[0]))
        if not labels:
            raise UserError(f"prompt {text!r} names none of the classes {dict(words)}")
        samples.append(Sample(i, PromptSpec(text, tuple(labels)), sample_seed(seed, i)))
    cfg = SynthConfig(preset=preset, overrides=overrides or {})
    check_image_size(pipe, height, width)
    synth = Synthesizer(pipe, cfg.resolve_preset(pipe.vae_scale_factor), height, width, steps,
                        guidance)
    try:
        synth.check_prompts([s.spec for s in samples])
        images, labels, reliability = synth.generate(samples)
    finally:
        synth.harvester.remove()  # the caller's pipeline is left as it was
    return MaskedImages(images, labels, reliability, infos)
