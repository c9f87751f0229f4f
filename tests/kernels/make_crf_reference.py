"""Make the stored pydensecrf reference for the lattice dense CRF (tests/kernels/test_crf.py).

Runs pydensecrf's ``DenseCRF2D`` mean field on a few small seeded cases and writes their inputs
and outputs to ``tests/kernels/data/crf_pydensecrf_reference.npz``, so that the test comparing
``attnseg.kernels.crf.dense_crf_lattice`` with pydensecrf runs everywhere, without pydensecrf.

Needs: numpy and ``pydensecrf2`` (``pip install 'pydensecrf2==1.1'``, or ``attnseg[crf]``; no
wheels, it builds from source with a C++ compiler in a few minutes). The reference was made with
pydensecrf2 1.1 and numpy 2.4 on x86-64, i.e. with pydensecrf's SSE lattice, the one attnseg
follows (a build without SSE, e.g. on ARM, takes its scalar path: other tie rounding, no padding
points; do not regenerate there). Run from anywhere:

    python tests/kernels/make_crf_reference.py

Each case stores (keys ``<case>_<name>``):
    image  uint8 [H, W, 3]   RGB (seeded): a scene (a colour gradient, ellipses and rectangles of
                             flat colour, a one-row stripe, mild noise; one case with a dark grey
                             top-left corner) or uniform noise
    probs  float16 [C, H, W] unary probabilities (seeded): the scene's labels plus noise and a
                             patch labelled wrong, or uniform noise; both pydensecrf and attnseg
                             get them as float32
    q      float32 [C, H, W] pydensecrf's marginals after ``inference(iterations)``
    labels uint8 [H, W]      their argmax
and ``cases`` (the names, in order), ``params`` (JSON: per case, the shape, labels, iterations,
seed, image kind, kernels and their parameters in attnseg's names, ``w_app = 0`` for smoothness
only; the eps), ``pydensecrf2_version`` and ``numpy_version``. pydensecrf's unary energy is
``-log(max(probs, 1e-5))`` in float32, the model ``dense_crf`` clamps at ``eps = 1e-5``.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "data" / "crf_pydensecrf_reference.npz"
EPS = 1e-5
DARK_GREY = 16.0  # the dark corner's grey level (before the noise)

# name, (H, W), labels, iterations, image, kernel parameters (attnseg's names; w_app = 0: only
# the smoothness kernel, pydensecrf's addPairwiseGaussian alone). Images: "scene" (blobs, see
# `scene`), "scene, dark corner" (the same with a dark grey top-left corner: H * W not a multiple
# of 4 and pixels near the feature origin, where pydensecrf's SSE lattice adds the vertices of its
# padding points), "noise" (uniform random image and probabilities: many weak unaries and points
# on lattice cell boundaries).
CASES = [
    ("s24x40_c2_smooth_it1", (24, 40), 2, 1, "scene",
     dict(w_app=0.0, sxy_app=40.0, srgb=13.0, w_smooth=3.0, sxy_smooth=3.0)),
    ("s24x40_c21_both_it5", (24, 40), 21, 5, "scene",
     dict(w_app=4.0, sxy_app=6.0, srgb=20.0, w_smooth=3.0, sxy_smooth=1.5)),
    ("s64x48_c6_both_it10", (64, 48), 6, 10, "scene",
     dict(w_app=4.0, sxy_app=40.0, srgb=13.0, w_smooth=3.0, sxy_smooth=3.0)),
    ("s48x64_c2_both_it10", (48, 64), 2, 10, "scene",
     dict(w_app=10.0, sxy_app=80.0, srgb=13.0, w_smooth=3.0, sxy_smooth=3.0)),
    ("s32x32_c6_smooth_it5", (32, 32), 6, 5, "scene",
     dict(w_app=0.0, sxy_app=40.0, srgb=13.0, w_smooth=5.0, sxy_smooth=2.0)),
    ("noise40x24_c6_both_it5", (40, 24), 6, 5, "noise",
     dict(w_app=4.0, sxy_app=6.0, srgb=20.0, w_smooth=3.0, sxy_smooth=1.5)),
    ("s23x41_c6_both_it5_dark", (23, 41), 6, 5, "scene, dark corner",
     dict(w_app=4.0, sxy_app=6.0, srgb=20.0, w_smooth=3.0, sxy_smooth=1.5)),
]


def scene(h: int, w: int, c: int, seed: int, kind: str = "scene"):
    """A seeded image (uint8 [H, W, 3]) and unary probabilities (float16 [C, H, W])."""
    rng = np.random.default_rng(seed)
    if kind == "noise":
        probs = rng.random((c, h, w))
        return (rng.integers(0, 256, (h, w, 3)).astype(np.uint8),
                (probs / probs.sum(0)).astype(np.float16))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    # Background: a colour gradient; label 0.
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = (xx / max(w - 1, 1))[..., None]
    image = (1 - t) * c0 + t * c1
    truth = np.zeros((h, w), np.int64)
    # Ellipses and rectangles of flat colour, each with a label (>= 1 when there are several).
    for k in range(max(4, min(2 * c, 12))):
        colour = rng.uniform(0, 255, 3)
        label = 1 + k % (c - 1)
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(0.12, 0.35) * h, rng.uniform(0.12, 0.35) * w
        if k % 2:
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        else:
            inside = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
        image[inside] = colour
        truth[inside] = label
    # A thin stripe (an edge the smoothness kernel would erase).
    row = int(rng.integers(2, h - 2))
    image[row] = rng.uniform(0, 255, 3)
    if kind == "scene, dark corner":
        corner = (yy / (0.4 * h)) ** 2 + (xx / (0.4 * w)) ** 2 <= 1
        image[corner] = DARK_GREY
        truth[corner] = 0
    image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).round().astype(np.uint8)
    # Unaries: the truth's label plus noise, and a patch labelled wrong.
    logits = 2.5 * np.eye(c)[truth].transpose(2, 0, 1) + 1.3 * rng.normal(size=(c, h, w))
    py, px = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
    logits[int(rng.integers(0, c)), py:py + h // 4, px:px + w // 4] += 3.0
    probs = np.exp(logits - logits.max(0))
    probs /= probs.sum(0)
    return image, probs.astype(np.float16)


def pydensecrf_marginals(image, probs, iterations, w_app, sxy_app, srgb, w_smooth, sxy_smooth):
    import pydensecrf.densecrf as densecrf

    c, h, w = probs.shape
    p = probs.astype(np.float32)
    d = densecrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(-np.log(np.maximum(p, EPS)).reshape(c, -1)))
    d.addPairwiseGaussian(sxy=sxy_smooth, compat=w_smooth)
    if w_app:
        d.addPairwiseBilateral(sxy=sxy_app, srgb=srgb, rgbim=np.ascontiguousarray(image),
                               compat=w_app)
    q = np.array(d.inference(iterations), dtype=np.float32).reshape(c, h, w)
    return q


def main():
    arrays, params = {}, {}
    for seed, (name, (h, w), c, iterations, kind, kernel) in enumerate(CASES):
        image, probs = scene(h, w, c, seed=100 + seed, kind=kind)
        q = pydensecrf_marginals(image, probs, iterations, **kernel)
        arrays[f"{name}_image"] = image
        arrays[f"{name}_probs"] = probs
        arrays[f"{name}_q"] = q
        arrays[f"{name}_labels"] = q.argmax(0).astype(np.uint8)
        params[name] = dict(height=h, width=w, labels=c, iterations=iterations, seed=100 + seed,
                            image=kind, kernels="smoothness" if kernel["w_app"] == 0 else
                            "smoothness+appearance", **kernel)
        top2 = np.sort(q, 0)[-2:]
        print(f"{name}: labels changed by the CRF "
              f"{(q.argmax(0) != probs.argmax(0)).mean():.1%}, smallest top-2 margin "
              f"{(top2[1] - top2[0]).min():.2e}")
    OUT.parent.mkdir(exist_ok=True)
    np.savez_compressed(
        OUT, cases=np.array([name for name, *_ in CASES]),
        params=np.array(json.dumps(dict(eps=EPS, cases=params), sort_keys=True)),
        pydensecrf2_version=np.array(importlib.metadata.version("pydensecrf2")),
        numpy_version=np.array(np.__version__), **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
