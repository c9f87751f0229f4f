"""Every loss against a value computed by hand on a tiny tensor; co-training's reliable set."""

from __future__ import annotations

import math

import pytest
import torch

from attnseg.pipeline.errors import UserError
from attnseg.pipeline.train.losses import (
    LossConfig,
    boundary_band,
    handover,
    reliable_mask,
    segmentation_loss,
)

IGN = 255

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def nll(z, t):
    """-log softmax(z)_t with math only."""
    return -(z[t] - math.log(sum(math.exp(v) for v in z)))


def _batch(label, rel, valid=None):
    label = torch.tensor([label])
    rel = torch.tensor([rel], dtype=torch.float32)
    valid = torch.ones_like(label, dtype=torch.bool) if valid is None else torch.tensor([valid])
    return {"label": label, "reliability": rel, "valid": valid}


def _logits(pixels):
    """[[z_class0, z_class1, ...] per pixel] of one row -> [1, C, 1, W]."""
    return torch.tensor(pixels, dtype=torch.float32).T[None, :, None, :].contiguous()


Z = [[2.0, 0.0], [0.0, 1.0], [0.5, -0.5], [-1.0, 1.5]]


def _loss(cfg, z, batch, **kw):
    loss, parts = segmentation_loss(cfg, [_logits(z)], batch, IGN, **kw)
    return float(loss), parts


def test_plain_ce():
    b = _batch([[0, 1, 255, 0]], [[1, 1, 1, 1]])
    got, _ = _loss(LossConfig("ce"), Z, b)
    assert got == pytest.approx((nll(Z[0], 0) + nll(Z[1], 1) + nll(Z[3], 0)) / 3)
    # Padding (valid False) is left out like ignore.
    b = _batch([[0, 1, 1, 0]], [[1, 1, 1, 1]], [[True, True, False, False]])
    assert _loss(LossConfig("ce"), Z, b)[0] == pytest.approx((nll(Z[0], 0) + nll(Z[1], 1)) / 2)
    assert torch.isclose(
        segmentation_loss(LossConfig("ce"), [_logits(Z)], _batch([[0, 1, 1, 0]], [[1] * 4]),
                          IGN)[0],
        torch.nn.functional.cross_entropy(_logits(Z), torch.tensor([[[0, 1, 1, 0]]])))


def test_ignore_band_ce():
    b = _batch([[0, 0, 1, 1]], [[0.9, 0.1, 0.5, 0.2]])
    got, parts = _loss(LossConfig("ignore-band", band_threshold=0.3), Z, b)
    assert got == pytest.approx((nll(Z[0], 0) + nll(Z[2], 1)) / 2)
    assert parts["weight_frac"] == 0.5
    # Boundary band: pixels 1 and 2 touch a different label within 1 px.
    got, _ = _loss(LossConfig("ignore-band", band_threshold=0.0, band_boundary=1), Z, b)
    assert got == pytest.approx((nll(Z[0], 0) + nll(Z[3], 1)) / 2)


def test_reliability_weighted_ce():
    b = _batch([[0, 1, 255, 1]], [[0.2, 0.6, 0.9, 0.0]])
    got, _ = _loss(LossConfig("reliability-weighted"), Z, b)
    assert got == pytest.approx((0.2 * nll(Z[0], 0) + 0.6 * nll(Z[1], 1)) / 0.8)
    got, _ = _loss(LossConfig("reliability-weighted", weight_power=2.0, weight_floor=0.1), Z, b)
    w = [0.1, 0.36, 0.1]  # 0.2 ** 2 and 0 ** 2 are raised to the floor
    expect = (w[0] * nll(Z[0], 0) + w[1] * nll(Z[1], 1) + w[2] * nll(Z[3], 1)) / sum(w)
    assert got == pytest.approx(expect)


def test_all_weights_zero_gives_zero_with_a_graph():
    z = _logits(Z).requires_grad_()
    loss, _ = segmentation_loss(LossConfig("reliability-weighted"), [z],
                                _batch([[0, 1, 1, 0]], [[0, 0, 0, 0]]), IGN)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.all(z.grad == 0)


def test_aux_head_adds_its_weighted_loss():
    b = _batch([[0, 1, 1, 0]], [[1, 1, 1, 1]])
    za, zb = _logits(Z), _logits([[1.0, 0.0]] * 4)
    loss, _ = segmentation_loss(LossConfig("ce"), [za], b, IGN, aux=[zb], aux_weight=0.4)
    main = sum(nll(Z[i], t) for i, t in enumerate([0, 1, 1, 0])) / 4
    aux = sum(nll([1.0, 0.0], t) for t in [0, 1, 1, 0]) / 4
    assert float(loss) == pytest.approx(main + 0.4 * aux)


def test_reliable_mask_top_half_per_class_and_image():
    label = torch.tensor([[[1, 1, 1, 0, 0, 255]], [[2, 2, 2, 2, 0, 0]]])
    rel = torch.tensor([[[0.9, 0.1, 0.5, 0.3, 0.3, 1.0]], [[0.1, 0.2, 0.3, 0.4, 0.0, 0.8]]])
    usable = label != 255
    got = reliable_mask(label, rel, usable, 0.5)
    expect = torch.tensor([
        # class 1: top 2 of 3 (0.9, 0.5); class 0: tie at the cut keeps both; 255: never.
        [[True, False, True, True, True, False]],
        # Per image: class 2's top half is 0.3, 0.4 even though image 0 has higher values.
        [[False, False, True, True, False, True]],
    ])
    assert torch.equal(got, expect)
    # A global top half would drop class 2 of image 1 almost entirely.
    assert reliable_mask(label, rel, usable, 1.0).sum() == usable.sum()


def test_boundary_band():
    label = torch.tensor([[[0, 0, 0, 1, 1], [0, 0, 0, 1, 1]]])
    assert torch.equal(boundary_band(label, 1)[0, 0], torch.tensor([0, 0, 1, 1, 0]).bool())
    assert torch.equal(boundary_band(label, 2)[0, 0], torch.tensor([0, 1, 1, 1, 1]).bool())
    assert not boundary_band(label, 0).any()


ZB = [[0.0, 1.0], [3.0, 0.0], [1.0, 0.0], [0.0, 0.2]]


def test_cotrain_hand_computed():
    # Class 1 pixels 0..2 (rel 0.9, 0.1, 0.5): reliable 0 and 2; class 0 pixel 3 reliable.
    b = _batch([[1, 1, 1, 0]], [[0.9, 0.1, 0.5, 0.3]])
    cfg = LossConfig("cotrain", peer_weight=0.5, boundary_width=0, peer_warmup=0,
                     peer_confidence=0.0)
    za, zb = _logits(Z), _logits(ZB)
    loss, parts = segmentation_loss(cfg, [za, zb], b, IGN, step=10)
    # Pixel 1 is unreliable: A learns B's prediction there (class 0), B learns A's (class 1).
    la = (nll(Z[0], 1) + nll(Z[2], 1) + nll(Z[3], 0) + 0.5 * nll(Z[1], 0)) / 3.5
    lb = (nll(ZB[0], 1) + nll(ZB[2], 1) + nll(ZB[3], 0) + 0.5 * nll(ZB[1], 1)) / 3.5
    assert float(loss) == pytest.approx(la + lb)
    assert parts["loss_net0"] == pytest.approx(la) and parts["loss_net1"] == pytest.approx(lb)
    assert parts["reliable_frac"] == 0.75
    # Boundary weighting: pixels 2 and 3 lie on the 1|0 edge and get weight 0.25.
    cfg = LossConfig("cotrain", peer_weight=0.5, boundary_width=1, boundary_weight=0.25,
                     peer_warmup=0, peer_confidence=0.0)
    loss, parts = segmentation_loss(cfg, [za, zb], b, IGN, step=10)
    la = ((nll(Z[0], 1) + 0.25 * nll(Z[2], 1) + 0.25 * nll(Z[3], 0) + 0.5 * nll(Z[1], 0))
          / (1.5 + 0.5))
    assert parts["loss_net0"] == pytest.approx(la)


def test_cotrain_ignore_band_learns_from_peer_and_padding_never():
    b = _batch([[1, 255, 1, 0]], [[0.9, 0.0, 0.5, 0.3]], [[True, True, True, False]])
    cfg = LossConfig("cotrain", peer_weight=1.0, boundary_width=0, peer_warmup=0,
                     peer_confidence=0.0, peer_on_ignore=True)
    _, parts = segmentation_loss(cfg, [_logits(Z), _logits(ZB)], b, IGN)
    # Reliable: pixel 0 (class 1's top half of {0.9, 0.5}); pixel 2 (unreliable) and pixel 1
    # (ignore) learn B's prediction (0 at both); pixel 3 is padding.
    expect = (nll(Z[0], 1) + nll(Z[1], 0) + nll(Z[2], 0)) / 3
    assert parts["loss_net0"] == pytest.approx(expect)
    cfg.peer_on_ignore = False
    _, parts = segmentation_loss(cfg, [_logits(Z), _logits(ZB)], b, IGN)
    assert parts["loss_net0"] == pytest.approx((nll(Z[0], 1) + nll(Z[2], 0)) / 2)


def test_cotrain_warmup_hands_unreliable_pixels_over_and_confidence_gates_the_peer():
    b = _batch([[1, 1, 1, 0]], [[0.9, 0.1, 0.5, 0.3]])
    za, zb = _logits(Z), _logits(ZB)
    cfg = LossConfig("cotrain", boundary_width=0, peer_warmup=8, peer_confidence=0.0)
    # Step 2 of 8: rho 0.25; pixel 1 learns its pseudo-label with weight 0.75 and B's
    # prediction (class 0) with weight 0.25.
    _, parts = segmentation_loss(cfg, [za, zb], b, IGN, step=2)
    la = (nll(Z[0], 1) + nll(Z[2], 1) + nll(Z[3], 0) + 0.75 * nll(Z[1], 1)
          + 0.25 * nll(Z[1], 0)) / 4
    assert parts["loss_net0"] == pytest.approx(la) and parts["rho"] == 0.25
    # At step 0 co-training is plain CE on every labelled pixel (boundary weight aside).
    _, parts = segmentation_loss(cfg, [za, zb], b, IGN, step=0)
    assert parts["loss_net0"] == pytest.approx(
        sum(nll(Z[i], t) for i, t in enumerate([1, 1, 1, 0])) / 4)
    # B's probability for class 0 at pixel 1 is softmax([3, 0])[0] = 0.953: it teaches A at a
    # 0.95 threshold, not at 0.96.
    for threshold, taught in ((0.95, True), (0.96, False)):
        cfg = LossConfig("cotrain", boundary_width=0, peer_warmup=0, peer_confidence=threshold)
        _, parts = segmentation_loss(cfg, [za, zb], b, IGN)
        assert parts["peer_frac0"] == (1.0 if taught else 0.0)
        expect = (nll(Z[0], 1) + nll(Z[2], 1) + nll(Z[3], 0) + (nll(Z[1], 0) if taught else 0))
        assert parts["loss_net0"] == pytest.approx(expect / (4 if taught else 3))


def test_cotrain_peer_targets_carry_no_gradient():
    b = _batch([[1, 1, 1, 0]], [[0.9, 0.1, 0.5, 0.3]])
    cfg = LossConfig("cotrain", boundary_width=0, peer_warmup=0, peer_confidence=0.0)
    za, zb = _logits(Z).requires_grad_(), _logits(ZB).requires_grad_()
    loss, _ = segmentation_loss(cfg, [za, zb], b, IGN)
    loss.backward()
    # B's gradient equals the gradient of B's own term alone (A's term uses B only through
    # a detached argmax).
    zb2 = _logits(ZB).requires_grad_()
    la = segmentation_loss(cfg, [_logits(Z), zb2], b, IGN)[1]["loss_net1"]
    lb_only = (nll(ZB[0], 1) + nll(ZB[2], 1) + nll(ZB[3], 0) + nll(ZB[1], 1)) / 4
    assert la == pytest.approx(lb_only)
    own = segmentation_loss(cfg, [_logits(Z), zb2], b, IGN)[0]
    own.backward()
    assert torch.allclose(zb.grad, zb2.grad)


def test_handover_and_validation():
    cfg = LossConfig("cotrain", peer_warmup=10)
    assert [handover(cfg, s) for s in (0, 5, 10, 50)] == [0.0, 0.5, 1.0, 1.0]
    with pytest.raises(UserError, match="unknown loss"):
        LossConfig("focal").validate()
    with pytest.raises(UserError, match="reliable_fraction"):
        LossConfig("cotrain", reliable_fraction=0).validate()
