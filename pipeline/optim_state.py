"""An optimiser's state as safetensors tensors plus JSON metadata, and back: what every resumable
training run (segmenters, LoRAs, the toy model) writes into its checkpoints, so nothing is ever
pickled."""

from __future__ import annotations

import torch


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str = "") -> tuple[dict, dict]:
    """(tensors named `{prefix}{param index}.{key}`, metadata): the metadata holds the parameter
    groups and the state's non-tensor values, both JSON-ready."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict, meta: dict | None = None,
                           prefix: str = "") -> None:
    """Restore `opt` from `optimizer_tensors`' output (tensors not under `prefix` are passed
    over); without metadata, the optimiser keeps its own parameter groups."""
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith(prefix):
            index, key = name[len(prefix):].split(".", 1)
            state.setdefault(int(index), {})[key] = value
    for name, value in (meta or {}).get("scalars", {}).items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = meta["param_groups"] if meta else opt.state_dict()["param_groups"]
    opt.load_state_dict({"state": state, "param_groups": groups})
