"""Segmentation models from `transformers`: SegFormer (MiT-b0..b5) and UperNet + ConvNeXt.

Models are random-initialised from a named architecture or loaded from a local pretrained
folder (``config.json`` + ``model.safetensors``; pickle ``.bin`` weights are refused):

* a SegFormer folder (``nvidia/mit-b0`` encoder-only, or a fine-tuned SegFormer): its config
  sets the architecture; the classifier is re-initialised for this run's classes;
* an UperNet folder (``openmmlab/upernet-convnext-tiny``): likewise;
* a ConvNeXt folder (``facebook/convnext-tiny-224``): the backbone of a new UperNet.

:class:`SegModel` wraps either so the trainer sees one interface: ``forward(pixels)`` returns
``(logits, aux_logits or None)``, both at the input's resolution. ``spec()`` is a JSON-able
description (architecture, full config, class names) from which :func:`model_from_spec`
rebuilds the same network to load a checkpoint into, with no pretrained folder needed.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError, first_line
from ..jsonfile import read_json

# MiT encoder sizes (SegFormer paper, Table 6); heads, patch sizes and SR ratios are the same
# for every size. The all-MLP decoder is 256 wide for b0/b1 and 768 for b2..b5.
_MIT = {
    "b0": ([32, 64, 160, 256], [2, 2, 2, 2], 256),
    "b1": ([64, 128, 320, 512], [2, 2, 2, 2], 256),
    "b2": ([64, 128, 320, 512], [3, 4, 6, 3], 768),
    "b3": ([64, 128, 320, 512], [3, 4, 18, 3], 768),
    "b4": ([64, 128, 320, 512], [3, 8, 27, 3], 768),
    "b5": ([64, 128, 320, 512], [3, 6, 40, 3], 768),
}
# ConvNeXt sizes (Liu et al. 2022); UperNet channels 512 as in mmsegmentation's configs.
_CONVNEXT = {
    "tiny": ([96, 192, 384, 768], [3, 3, 9, 3]),
    "small": ([96, 192, 384, 768], [3, 3, 27, 3]),
    "base": ([128, 256, 512, 1024], [3, 3, 27, 3]),
    "large": ([192, 384, 768, 1536], [3, 3, 27, 3]),
    "xlarge": ([256, 512, 1024, 2048], [3, 3, 27, 3]),
}
TINY_MODELS = ("segformer-tiny", "upernet-tiny")
MODEL_NAMES = (
    tuple(f"segformer-{k}" for k in _MIT) + tuple(f"upernet-convnext-{k}" for k in _CONVNEXT)
    + TINY_MODELS
)
_STAGES = ["stage1", "stage2", "stage3", "stage4"]


def _labels(class_names: list[str]) -> dict:
    return {"num_labels": len(class_names),
            "id2label": {i: n for i, n in enumerate(class_names)},
            "label2id": {n: i for i, n in enumerate(class_names)}}


def _segformer_config(size: str, class_names: list[str]):
    from transformers import SegformerConfig

    if size == "tiny":  # for tests and the demo: a few thousand parameters
        return SegformerConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                               num_attention_heads=[1, 1, 2, 4], decoder_hidden_size=32,
                               **_labels(class_names))
    hidden, depths, decoder = _MIT[size]
    return SegformerConfig(hidden_sizes=hidden, depths=depths, decoder_hidden_size=decoder,
                           num_attention_heads=[1, 2, 5, 8], **_labels(class_names))


def _upernet_config(backbone_config, class_names: list[str], tiny: bool = False):
    from transformers import UperNetConfig

    width = 32 if tiny else 512
    return UperNetConfig(
        backbone_config=backbone_config, hidden_size=width,
        auxiliary_in_channels=backbone_config.hidden_sizes[2],
        auxiliary_channels=16 if tiny else 256, use_auxiliary_head=True,
        auxiliary_loss_weight=0.4, **_labels(class_names),
    )


def _convnext_config(size: str):
    from transformers import ConvNextConfig

    if size == "tiny":
        hidden, depths = [8, 16, 32, 64], [1, 1, 1, 1]
    else:
        hidden, depths = _CONVNEXT[size]
    return ConvNextConfig(hidden_sizes=hidden, depths=depths, drop_path_rate=0.3,
                          out_features=list(_STAGES))


def _family(name: str) -> str:
    if name not in MODEL_NAMES:
        raise UserError(f"unknown model {name!r}; choose from {list(MODEL_NAMES)}")
    return "segformer" if name.startswith("segformer") else "upernet"


def _check_pretrained_folder(path: Path) -> dict:
    if not (path / "config.json").is_file():
        raise UserError(f"pretrained folder {path} has no config.json")
    if not any(path.glob("*.safetensors")):
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise UserError(f"pretrained folder {path} holds only pickle weights (.bin/.pt), "
                            "which are not loaded (they can run code); convert to safetensors")
        raise UserError(f"pretrained folder {path} has no .safetensors weights")
    return read_json(path / "config.json")


def _from_pretrained(cls, path: Path, **kwargs):
    try:
        return cls.from_pretrained(str(path), use_safetensors=True,
                                   ignore_mismatched_sizes=True, **kwargs)
    except Exception as e:  # transformers raises many types; one line for the user
        first = first_line(e)
        raise UserError(f"could not load pretrained model from {path}: {first}") from None


def build_hf_model(name: str, class_names: list[str], pretrained: str | None = None):
    """The transformers model for ``name`` (see MODEL_NAMES), random or from ``pretrained``."""
    family = _family(name)
    size = name.rsplit("-", 1)[1]
    # Imported per family: each transformers model module takes seconds to import.
    if family == "segformer":
        from transformers import SegformerForSemanticSegmentation
    else:
        from transformers import ConvNextBackbone, UperNetForSemanticSegmentation
    if pretrained is None:
        if family == "segformer":
            return SegformerForSemanticSegmentation(_segformer_config(size, class_names))
        return UperNetForSemanticSegmentation(
            _upernet_config(_convnext_config(size), class_names, tiny=size == "tiny"))
    path = Path(pretrained).expanduser()
    if not path.is_dir():
        raise UserError(f"pretrained folder {pretrained} does not exist")
    model_type = _check_pretrained_folder(path).get("model_type")
    if family == "segformer":
        if model_type != "segformer":
            raise UserError(f"--pretrained {path} is a {model_type!r} model, not a SegFormer")
        return _from_pretrained(SegformerForSemanticSegmentation, path, **_labels(class_names))
    if model_type == "upernet":
        return _from_pretrained(UperNetForSemanticSegmentation, path, **_labels(class_names))
    if model_type == "convnext":
        backbone = _from_pretrained(ConvNextBackbone, path, out_features=list(_STAGES))
        model = UperNetForSemanticSegmentation(
            _upernet_config(backbone.config, class_names, tiny=size == "tiny"))
        model.backbone.load_state_dict(backbone.state_dict())
        return model
    raise UserError(f"--pretrained {path} is a {model_type!r} model; UperNet needs an UperNet "
                    "or ConvNeXt folder")


class FullResolutionHead(nn.Module):
    """Corrects the decoder's upsampled logits at the input's own resolution.

    SegFormer and UperNet predict at a quarter of their input, so an object's outline is
    drawn from logits four pixels apart: on small images (the toy world's 64x64) thin parts and
    corners are lost whatever the labels say. A shallow convolutional stream over the image
    itself sees every pixel's edges; it is fused with the upsampled logits and its output added
    to them (a residual: at initialisation the prediction is the decoder's).
    """

    def __init__(self, num_classes: int, width: int = 8):
        super().__init__()
        # One 3x3 convolution over the image and one over the fused maps: wider or deeper
        # streams, and batch norm, cost more than the whole tiny segmenter on a CPU at 64x64.
        self.image = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
        self.fuse = nn.Sequential(nn.Conv2d(width + num_classes, 2 * width, 3, padding=1),
                                  nn.ReLU(), nn.Conv2d(2 * width, num_classes, 1))
        nn.init.zeros_(self.fuse[-1].weight)
        nn.init.zeros_(self.fuse[-1].bias)

    def forward(self, pixels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return logits + self.fuse(torch.cat([logits, self.image(pixels)], 1))


class SegModel(nn.Module):
    """One segmentation network behind a common interface (see the module docstring).

    With ``full_res_head`` the logits pass through a :class:`FullResolutionHead`."""

    def __init__(self, hf_model, family: str, class_names: list[str], name: str,
                 full_res_head: bool = False):
        super().__init__()
        self.net = hf_model
        self.family = family
        self.class_names = list(class_names)
        self.name = name
        self.full_res = FullResolutionHead(len(class_names)) if full_res_head else None

    @property
    def aux_weight(self) -> float:
        """Weight of the auxiliary head's loss (UperNet's FCN head; 0 without one)."""
        if self.family == "upernet" and self.net.auxiliary_head is not None:
            return float(self.net.config.auxiliary_loss_weight)
        return 0.0

    def forward(self, pixels: torch.Tensor):
        size = pixels.shape[-2:]
        if self.family == "segformer":
            logits = self.net(pixel_values=pixels).logits
            aux = None
        else:
            # Called part by part because the library's forward drops the auxiliary logits.
            features = self.net.backbone(pixels).feature_maps
            logits = self.net.decode_head(features)
            aux = self.net.auxiliary_head(features) if self.net.auxiliary_head is not None \
                else None
        logits = _upsample(logits, size)
        if self.full_res is not None:
            logits = self.full_res(pixels, logits)
        if aux is not None:
            aux = _upsample(aux, size)
        return logits, aux

    def head_parameter_names(self) -> set[str]:
        """Parameters of the decoder head(s): trained with the head learning-rate multiplier."""
        prefixes = ("net.decode_head.", "net.auxiliary_head.", "full_res.")
        return {n for n, _ in self.named_parameters() if n.startswith(prefixes)}

    def spec(self) -> dict:
        """What :func:`model_from_spec` needs to rebuild this network (JSON-able)."""
        spec = {"name": self.name, "family": self.family, "class_names": self.class_names,
                "config": self.net.config.to_dict()}
        if self.full_res is not None:  # absent otherwise: older runs' specs stay as they were
            spec["full_res_head"] = True
        return spec


def _upsample(x: torch.Tensor, size) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def build_model(name: str, class_names: list[str], pretrained: str | None = None,
                full_res_head: bool = False) -> SegModel:
    """A :class:`SegModel` for ``name`` with one output per class in ``class_names``."""
    if len(class_names) < 2:
        raise UserError("a segmentation model needs at least two classes")
    hf = build_hf_model(name, class_names, pretrained)
    return SegModel(hf, _family(name), class_names, name, full_res_head)


def model_from_spec(spec: dict) -> SegModel:
    """A randomly initialised :class:`SegModel` with exactly the architecture of ``spec``."""
    try:
        family, config = spec["family"], spec["config"]
        if family == "segformer":
            from transformers import SegformerConfig, SegformerForSemanticSegmentation

            hf = SegformerForSemanticSegmentation(SegformerConfig.from_dict(config))
        elif family == "upernet":
            from transformers import UperNetConfig, UperNetForSemanticSegmentation

            hf = UperNetForSemanticSegmentation(UperNetConfig.from_dict(config))
        else:
            raise KeyError(family)
        return SegModel(hf, family, spec["class_names"], spec["name"],
                        bool(spec.get("full_res_head", False)))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"checkpoint's model description is invalid ({e})") from None
