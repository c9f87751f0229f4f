"""Op (d): small-region removal and hole filling on label maps (DiffuMask's contour step).

DiffuMask cleans each label map by tracing the external contours of its foreground, dropping
every contour whose bounding box covers fewer than 250 pixels (of a 512x512 image) and filling
the rest (so holes inside an object take its class). Here the same, per class, on label maps
with several classes and an ignore label:

    for each class c in the map (not background 0, not ignore 255):
        components of (labels == c), 8-connected (what a contour encloses);
        a component whose bounding box (height x width, in pixels) is smaller than
        `min_box` becomes background;
        background pixels enclosed by class c (4-connected background regions that do not
        reach the border through non-c pixels) become c.

Other classes and the ignore label inside an object are left as they are (a contour fill would
overwrite them; with one class per image, DiffuMask's case, the two agree). Changed pixels get
reliability 0: the recipe's scores did not choose their new label.

Label maps are small integers on the host by the time masks are written, so this runs on the
CPU: a union-find labelling in numba, and a plain breadth-first reference it is tested against.
There is no Triton kernel: connected components are sequential, and the maps are written from
the host anyway.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

from ._dispatch import numba_module
from .labels import BACKGROUND_LABEL, IGNORE_LABEL

__all__ = ["connected_components", "connected_components_ref", "remove_small_regions",
           "remove_small_regions_numba", "remove_small_regions_ref"]

_N8 = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
_N4 = ((-1, 0), (0, -1), (0, 1), (1, 0))


def connected_components_ref(mask: np.ndarray, eight: bool = False) -> np.ndarray:
    """Reference of :func:`connected_components`: label propagation (each pixel takes the
    smallest id among its neighbours until nothing changes), numpy."""
    h, w = mask.shape
    big = h * w + 1
    lab = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big)
    shifts = _N8 if eight else _N4
    while True:
        p = np.pad(lab, 1, constant_values=big)
        nxt = np.minimum.reduce([lab] + [p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                                         for dy, dx in shifts])
        nxt = np.where(mask, nxt, big)
        if np.array_equal(nxt, lab):
            break
        lab = nxt
    return np.where(mask, lab, 0)


def connected_components(mask: np.ndarray, eight: bool = False, impl: str | None = None
                         ) -> np.ndarray:
    """Connected components of a boolean [H, W] mask: int64 ids, 0 outside the mask, each
    component's id 1 + the flat index of its first pixel (row-major). 4-connected unless
    `eight`. `impl`: "numba" (default where numba imports) or "ref"."""
    which = impl or ("numba" if _nb is not None else "ref")
    if which == "ref":
        return connected_components_ref(mask, eight)
    if which != "numba":
        raise ValueError(f"unknown impl {which!r} for connected_components; use 'numba' or 'ref'")
    m = np.ascontiguousarray(mask, dtype=np.bool_)
    parent = np.empty(m.size, np.int64)
    _components_nb(m, eight, parent)
    return _roots_nb(m, parent) if m.size else np.zeros(m.shape, np.int64)


def _clean_one_ref(lab: np.ndarray, min_box: int) -> np.ndarray:
    """One [H, W] uint8 map, breadth-first search in Python (slow, plain)."""
    h, w = lab.shape
    out = lab.copy()
    for c in np.unique(lab):
        if c in (BACKGROUND_LABEL, IGNORE_LABEL):
            continue
        seen = np.zeros((h, w), bool)
        for y0, x0 in zip(*np.nonzero(lab == c), strict=True):
            if seen[y0, x0]:
                continue
            seen[y0, x0] = True
            queue, pixels = deque([(y0, x0)]), []
            while queue:
                y, x = queue.popleft()
                pixels.append((y, x))
                for dy, dx in _N8:
                    v, u = y + dy, x + dx
                    if 0 <= v < h and 0 <= u < w and not seen[v, u] and lab[v, u] == c:
                        seen[v, u] = True
                        queue.append((v, u))
            ys = [p[0] for p in pixels]
            xs = [p[1] for p in pixels]
            if (max(ys) - min(ys) + 1) * (max(xs) - min(xs) + 1) < min_box:
                for y, x in pixels:
                    out[y, x] = 0
        # Holes: non-c regions (4-connected) that never reach the border.
        outside = np.zeros((h, w), bool)
        queue = deque()
        for y in range(h):
            for x in range(w):
                if (y in (0, h - 1) or x in (0, w - 1)) and out[y, x] != c:
                    outside[y, x] = True
                    queue.append((y, x))
        while queue:
            y, x = queue.popleft()
            for dy, dx in _N4:
                v, u = y + dy, x + dx
                if 0 <= v < h and 0 <= u < w and not outside[v, u] and out[v, u] != c:
                    outside[v, u] = True
                    queue.append((v, u))
        out[(~outside) & (out == 0)] = c
    return out


def remove_small_regions_ref(labels: torch.Tensor, reliability: torch.Tensor, min_box: int
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference (plain Python) version of :func:`remove_small_regions`."""
    lab = labels.cpu().numpy()
    out = np.stack([_clean_one_ref(m, min_box) for m in lab]) if len(lab) else lab.copy()
    return _with_reliability(labels, reliability, out)


def _with_reliability(labels, reliability, out: np.ndarray):
    new = torch.from_numpy(out).to(labels.device)
    changed = new != labels
    return new, torch.where(changed, torch.zeros_like(reliability), reliability)


_nb = numba_module()

if _nb is not None:
    @_nb.njit(cache=True)
    def _find(parent, i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving
            i = parent[i]
        return i

    @_nb.njit(cache=True)
    def _components_nb(member, eight, parent):
        """Union-find labelling of the True pixels of `member` [H, W]: each pixel's root index
        in `parent` (flat pixel indices), 8- or 4-connected."""
        h, w = member.shape
        for y in range(h):
            for x in range(w):
                i = y * w + x
                parent[i] = i
                if not member[y, x]:
                    continue
                # Neighbours already visited: left, up (and both upper diagonals if 8-conn).
                for k in range(4):
                    if k == 0:
                        v, u = y, x - 1
                    elif k == 1:
                        v, u = y - 1, x
                    elif k == 2:
                        if not eight:
                            continue
                        v, u = y - 1, x - 1
                    else:
                        if not eight:
                            continue
                        v, u = y - 1, x + 1
                    if v < 0 or u < 0 or u >= w or not member[v, u]:
                        continue
                    a = _find(parent, i)
                    b = _find(parent, v * w + u)
                    if a != b:
                        if a < b:
                            parent[b] = a
                        else:
                            parent[a] = b

    @_nb.njit(cache=True)
    def _roots_nb(member, parent):
        h, w = member.shape
        out = np.zeros((h, w), np.int64)
        for y in range(h):
            for x in range(w):
                if member[y, x]:
                    out[y, x] = _find(parent, y * w + x) + 1
        return out

    @_nb.njit(cache=True)
    def _clean_nb(lab, min_box):
        h, w = lab.shape
        n = h * w
        out = lab.copy()
        parent = np.empty(n, np.int64)
        present = np.zeros(256, np.bool_)
        for y in range(h):
            for x in range(w):
                present[lab[y, x]] = True
        for c in range(1, 255):
            if not present[c]:
                continue
            member = lab == c
            _components_nb(member, True, parent)
            y0 = np.full(n, h, np.int64)
            y1 = np.full(n, -1, np.int64)
            x0 = np.full(n, w, np.int64)
            x1 = np.full(n, -1, np.int64)
            for y in range(h):
                for x in range(w):
                    if member[y, x]:
                        r = _find(parent, y * w + x)
                        y0[r] = min(y0[r], y)
                        y1[r] = max(y1[r], y)
                        x0[r] = min(x0[r], x)
                        x1[r] = max(x1[r], x)
            for y in range(h):
                for x in range(w):
                    if member[y, x]:
                        r = _find(parent, y * w + x)
                        if (y1[r] - y0[r] + 1) * (x1[r] - x0[r] + 1) < min_box:
                            out[y, x] = 0
            # Holes: 4-connected non-c regions that have no pixel on the border.
            other = out != c
            _components_nb(other, False, parent)
            border = np.zeros(n, np.bool_)
            for y in range(h):
                for x in range(w):
                    if other[y, x] and (y == 0 or y == h - 1 or x == 0 or x == w - 1):
                        border[_find(parent, y * w + x)] = True
            for y in range(h):
                for x in range(w):
                    if out[y, x] == 0 and not border[_find(parent, y * w + x)]:
                        out[y, x] = c
        return out


def remove_small_regions_numba(labels: torch.Tensor, reliability: torch.Tensor, min_box: int
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Numba (union-find) version of :func:`remove_small_regions`."""
    if _nb is None:
        raise RuntimeError("numba cannot be imported")
    lab = np.ascontiguousarray(labels.cpu().numpy())
    out = np.stack([_clean_nb(m, min_box) for m in lab]) if len(lab) else lab.copy()
    return _with_reliability(labels, reliability, out)


def remove_small_regions(labels: torch.Tensor, reliability: torch.Tensor, min_box: int,
                         impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop small connected regions of each class and fill the holes of the rest.

    Args:
        labels: ``[B, H, W]`` uint8 label maps (0 background, 255 ignore).
        reliability: ``[B, H, W]`` uint8; pixels whose label changes get 0.
        min_box: a component whose bounding box covers fewer pixels becomes background.
        impl: ``"numba"`` (default where numba imports) or ``"ref"``.
    Returns the new labels and reliability, on the input's device.
    """
    if labels.dtype != torch.uint8 or labels.dim() != 3 or reliability.shape != labels.shape:
        raise ValueError(f"labels and reliability must be uint8 [B, H, W], got "
                         f"{labels.dtype} {tuple(labels.shape)}, {tuple(reliability.shape)}")
    which = impl or ("numba" if _nb is not None else "ref")
    if which == "numba":
        return remove_small_regions_numba(labels, reliability, min_box)
    if which == "ref":
        return remove_small_regions_ref(labels, reliability, min_box)
    raise ValueError(f"unknown impl {which!r} for remove_small_regions; use 'numba' or 'ref'")
