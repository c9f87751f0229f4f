"""Training losses for noisy pseudo-masks, from plain cross-entropy to reliability-aware
co-training.

Notation, per pixel p of a batch: logits ``z_p`` over C classes, pseudo-label ``y_p`` (or the
ignore index), reliability ``r_p`` in [0, 1] (attnseg's reliability map: the gap between the
two best class scores of the attention maps; 1 everywhere for human-labelled data), ``v_p``
(False on crop padding), and ``l(z, y) = -log softmax(z)_y``. Every loss is a weighted mean

    L = sum_p w_p l(z_p, t_p) / sum_p w_p          (0 when no pixel has weight)

and differs only in the weights ``w_p`` and targets ``t_p``. ``M_p = v_p and y_p != ignore``.

* ``ce`` (plain CE, the baseline): ``t = y``, ``w = M``.
* ``ignore-band`` (ignore-band CE): ``t = y``, ``w = M * [r_p >= tau] * [p not within
  band_boundary px of a label boundary]``: low-reliability pixels (and, optionally, a band
  around mask edges, where attention masks are least trustworthy) join the ignore set.
* ``reliability-weighted`` (reliability-weighted CE): ``t = y``,
  ``w = M * max(r_p ** gamma, floor)``.
* ``cotrain`` (reliability-aware co-training, two networks A and B): see
  :func:`cotrain_loss`; its reliable set is :func:`reliable_mask`.

UperNet's auxiliary head is trained with the same targets and weights, its loss scaled by
the model's auxiliary weight (0.4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..settings import NonNegativeFloat, NonNegativeInt, UnitFloat

LOSS_NAMES = ("ce", "ignore-band", "reliability-weighted", "cotrain")


@dataclass
class LossConfig:
    """Which loss and its settings (unused settings of other losses are ignored)."""

    name: str = "ce"
    # ignore-band: pixels with reliability below this join the ignore set ...
    band_threshold: UnitFloat = 0.2
    # ... and so do pixels within this many pixels of a label boundary (0: none).
    band_boundary: NonNegativeInt = 0
    # reliability-weighted: w = max(r ** weight_power, weight_floor).
    weight_power: NonNegativeFloat = 1.0
    weight_floor: UnitFloat = 0.0
    # cotrain: fraction of each class's pixels (per image, by reliability) that is reliable.
    reliable_fraction: UnitFloat = 0.5
    # cotrain: weight of the peer-supervised term.
    peer_weight: NonNegativeFloat = 1.0
    # cotrain: steps over which the unreliable pixels are handed from the pseudo-mask to the
    # peer (the peer's predictions are noise at the start); see cotrain_loss.
    peer_warmup: NonNegativeInt = 1000
    # cotrain: a peer prediction is only used as a target where the peer's softmax
    # probability reaches this (0: everywhere). Without it two networks confidently teach
    # each other a late-learned class away (seen in bench/robust_training.py).
    peer_confidence: UnitFloat = 0.9
    # cotrain: ignore-labelled pixels (attnseg's "unsure" band) learn from the peer too.
    peer_on_ignore: bool = False
    # cotrain: weight of reliable pixels within boundary_width px of a pseudo-mask boundary.
    boundary_width: NonNegativeInt = 2
    boundary_weight: NonNegativeFloat = 0.5

    def validate(self) -> None:
        if self.name not in LOSS_NAMES:
            raise UserError(f"unknown loss {self.name!r}; choose from {list(LOSS_NAMES)}")
        if not 0.0 < self.reliable_fraction <= 1.0:
            raise UserError("loss.reliable_fraction must be in (0, 1]")
        if not 0.0 <= self.peer_confidence < 1.0:
            raise UserError("loss.peer_confidence must be in [0, 1)")
        for name in ("band_boundary", "boundary_width", "peer_warmup"):
            if getattr(self, name) < 0:
                raise UserError(f"loss.{name} must be >= 0")
        for name in ("weight_power", "weight_floor", "peer_weight", "boundary_weight"):
            if getattr(self, name) < 0:
                raise UserError(f"loss.{name} must be >= 0")

    @property
    def networks(self) -> int:
        """How many networks the loss trains (2 for co-training)."""
        return 2 if self.name == "cotrain" else 1


def pixel_ce(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Per-pixel ``-log softmax(z)_t`` [B, H, W] in float32 (0 where ``t`` is ignore)."""
    return F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")


def weighted_mean(loss: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``sum(w * l) / sum(w)``; 0 (still attached to the graph) when every weight is 0."""
    weight = weight.to(loss.dtype)
    return (loss * weight).sum() / weight.sum().clamp_min(1e-12)


def boundary_band(label: torch.Tensor, width: int) -> torch.Tensor:
    """True where a pixel's (2 width + 1)^2 neighbourhood holds more than one label value
    (ignore counts as a value, so the edge of an ignore band is a boundary)."""
    if width <= 0:
        return torch.zeros_like(label, dtype=torch.bool)
    x = label[:, None].float()
    k = 2 * width + 1
    hi = F.max_pool2d(x, k, stride=1, padding=width)
    lo = -F.max_pool2d(-x, k, stride=1, padding=width)
    return (hi != lo)[:, 0]


def reliable_mask(label: torch.Tensor, reliability: torch.Tensor, usable: torch.Tensor,
                  fraction: float = 0.5) -> torch.Tensor:
    """Per image and per class, the ``ceil(fraction * n)`` most reliable of the class's ``n``
    usable pixels (ties at the cut are all kept).

    Ranking within a class keeps every class represented: a global threshold would keep the
    large, confidently-scored background and drop whole small objects.
    """
    out = torch.zeros_like(usable)
    for b in range(label.shape[0]):
        lab, rel, use = label[b], reliability[b], usable[b]
        for c in torch.unique(lab[use]).tolist():
            members = use & (lab == c)
            values = rel[members]
            k = math.ceil(fraction * values.numel())
            cut = torch.topk(values.float(), k).values[-1]
            out[b] |= members & (rel >= cut)
    return out


def _ce_weights(cfg: LossConfig, batch: dict, ignore_index: int) -> torch.Tensor:
    label, rel, valid = batch["label"], batch["reliability"], batch["valid"]
    usable = valid & (label != ignore_index)
    if cfg.name == "ce":
        return usable.float()
    if cfg.name == "ignore-band":
        keep = usable & (rel >= cfg.band_threshold) & ~boundary_band(label, cfg.band_boundary)
        return keep.float()
    if cfg.name == "reliability-weighted":
        w = rel.clamp(0.0, 1.0).pow(cfg.weight_power).clamp_min(cfg.weight_floor)
        return w * usable.float()
    raise UserError(f"loss {cfg.name!r} is not a single-network loss")


def handover(cfg: LossConfig, step: int) -> float:
    """rho in [0, 1]: how far the unreliable pixels have been handed from the pseudo-mask to
    the peer at optimiser step ``step`` (linear over ``peer_warmup`` steps)."""
    if cfg.peer_warmup <= 0:
        return 1.0
    return min(1.0, step / cfg.peer_warmup)


def cotrain_loss(logits: list[torch.Tensor], batch: dict, cfg: LossConfig, ignore_index: int,
                 step: int, aux: list[torch.Tensor | None] | None = None,
                 aux_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Reliability-aware co-training of two networks A and B (``logits = [z^A, z^B]``).

    Reliable pixels ``R`` (:func:`reliable_mask`: per image and class, the top
    ``reliable_fraction`` of the pseudo-mask's pixels by reliability, i.e. by the top-1/top-2
    margin of the attention scores) learn from the pseudo-mask; the other valid pixels ``U``
    (including the pseudo-mask's ignore band when ``peer_on_ignore``) learn from the *other*
    network's current prediction ``yhat^B = argmax z^B`` (no gradient through it), where that
    prediction's probability reaches ``peer_confidence`` (``U_B``). With ``b_p`` the boundary
    weight (``boundary_weight`` within ``boundary_width`` px of a pseudo-mask boundary, else 1)
    and ``lam = peer_weight``:

        L_A = [sum_{p in R} b_p l(z^A_p, y_p) + lam sum_{p in U_B} l(z^A_p, yhat^B_p)]
              / [sum_{p in R} b_p + lam |U_B|]

    and symmetrically for B; the loss is ``L_A + L_B``.

    Warm-up: two randomly initialised networks teach each other their early guesses, and a
    class they both learn late (or never) can vanish. So over the first ``peer_warmup`` steps
    the unreliable pixels are handed over gradually: with ``rho = step / peer_warmup``
    (capped at 1), ``U``'s pixels with a label learn from the pseudo-mask with weight
    ``b_p (1 - rho)`` and from the peer with weight ``lam rho``. At ``rho = 1`` this is the
    rule above; at ``rho = 0`` it is boundary-weighted CE.

    Two differently initialised networks disagree where the labels are noisy, so each one's
    view of the unreliable pixels is a second opinion rather than the noise itself; mask edges
    are where attention masks err most, hence the boundary weight.
    """
    label, rel, valid = batch["label"], batch["reliability"], batch["valid"]
    usable = valid & (label != ignore_index)
    reliable = reliable_mask(label, rel, usable, cfg.reliable_fraction)
    unreliable = valid & ~reliable
    if not cfg.peer_on_ignore:
        unreliable &= label != ignore_index
    near_edge = boundary_band(label, cfg.boundary_width)
    edge_w = torch.where(near_edge, cfg.boundary_weight, 1.0)
    rho = handover(cfg, step)
    # Weight of each pixel's pseudo-label term: reliable pixels fully, unreliable labelled
    # pixels fading out over the warm-up.
    w_pseudo = edge_w * (reliable.float() + (1.0 - rho) * (unreliable & usable).float())
    lam = cfg.peer_weight * rho
    target = torch.where(usable, label, 0)
    total = logits[0].new_zeros((), dtype=torch.float32)
    parts = {"reliable_frac": float(reliable.sum()) / max(1, int(usable.sum())), "rho": rho}
    for k in range(2):
        peer_prob, peer = logits[1 - k].detach().float().softmax(dim=1).max(dim=1)
        taught = unreliable & (peer_prob >= cfg.peer_confidence)
        w_peer = lam * taught.float()
        parts[f"peer_frac{k}"] = float(taught.sum()) / max(1, int(unreliable.sum()))
        heads = [(logits[k], 1.0)]
        if aux is not None and aux[k] is not None and aux_weight > 0:
            heads.append((aux[k], aux_weight))
        net_loss = 0.0
        for z, scale in heads:
            num = (pixel_ce(z, target, ignore_index) * w_pseudo).sum() + (
                pixel_ce(z, peer, ignore_index) * w_peer).sum()
            den = (w_pseudo.sum() + w_peer.sum()).clamp_min(1e-12)
            net_loss = net_loss + scale * num / den
        parts[f"loss_net{k}"] = float(net_loss.detach())
        total = total + net_loss
    return total, parts


def segmentation_loss(cfg: LossConfig, logits: list[torch.Tensor], batch: dict,
                      ignore_index: int, step: int = 0,
                      aux: list[torch.Tensor | None] | None = None,
                      aux_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """The configured loss for one batch: ``(loss, parts)``; ``logits`` holds one tensor per
    network ([B, C, H, W] at the label's resolution), ``aux`` their auxiliary logits."""
    if cfg.name == "cotrain":
        if len(logits) != 2:
            raise ValueError("cotrain needs the logits of two networks")
        return cotrain_loss(logits, batch, cfg, ignore_index, step, aux, aux_weight)
    w = _ce_weights(cfg, batch, ignore_index)
    target = torch.where(w > 0, batch["label"], 0)
    loss = weighted_mean(pixel_ce(logits[0], target, ignore_index), w)
    if aux is not None and aux[0] is not None and aux_weight > 0:
        loss = loss + aux_weight * weighted_mean(pixel_ce(aux[0], target, ignore_index), w)
    usable = (batch["valid"] & (batch["label"] != ignore_index)).sum()
    return loss, {"weight_frac": float(w.sum()) / max(1, int(usable))}
