"""Op (c): fully-connected CRF refinement of soft label maps (mean-field inference).

The dense CRF of Krähenbühl and Koltun (2011) with a Potts model, in the form `pydensecrf`
implements (`DenseCRF2D` with `addPairwiseGaussian` and `addPairwiseBilateral`, symmetric
kernel normalisation), two ways: exactly (torch reference, numba and Triton kernels), and through
pydensecrf's permutohedral lattice (`PermutohedralLattice`, equal to pydensecrf's results to
float32 rounding where the pixel count is a multiple of 4: elsewhere pydensecrf's SSE build adds
up to 3 padding points at the feature origin, which attnseg does not). The exact model:

    k_a(i, j) = exp(-|p_i - p_j|^2 / (2 sxy_a^2) - |I_i - I_j|^2 / (2 srgb^2))   (appearance)
    k_s(i, j) = exp(-|p_i - p_j|^2 / (2 sxy_s^2))                               (smoothness)
    n_k(i)    = 1 / sqrt(sum_j k(i, j))                                 (the kernel's normaliser)
    Q_0       = softmax(log P)          (P: the unary probabilities, clamped at `eps`)
    Q_{t+1}   = softmax(log P + sum_k w_k n_k(i) sum_j k(i, j) n_k(j) Q_t(j))

(`j` runs over every pixel, `i` included, as the lattice's blur does.) Pixel positions are in
pixels, colours in 0-255. The fused kernels never materialise the N x N kernel: they walk tiles
of pixel pairs and accumulate the messages, as attention kernels walk keys (a Gaussian kernel is
the exponential of -|f_i - f_j|^2 / 2 over scaled features). Their cost is O(N^2 C) per
iteration: on a GPU the Triton kernel is the default up to `EXACT_MAX_PIXELS`; above it, and on
a CPU, the lattice (O(N d^2 C)) is. The lattice runs two ways: on a CPU in numba, the whole mean
field per image on one thread (faster than pydensecrf's single thread: `attnseg bench crf`); on
any other device as torch ops (`PermutohedralLattice`: sparse splat and slice), its blur a
Triton kernel on CUDA (`lattice_blur_kernel`).
"""

from __future__ import annotations

import os
import threading
import warnings

import numpy as np
import torch

from ._dispatch import ENV_VAR, numba_module, resolve_impl, torch_threads_kept, triton_modules

__all__ = ["PermutohedralLattice", "crf_threads", "dense_crf", "dense_crf_lattice",
           "dense_crf_numba", "dense_crf_ref", "dense_crf_triton", "lattice_blur_ref",
           "lattice_blur_triton"]


def _features(image: torch.Tensor, sxy_a: float, srgb: float, sxy_s: float):
    """Scaled features [B, N, 5] (appearance: y, x, r, g, b) and [B, N, 2] (smoothness)."""
    b, _, h, w = image.shape
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=image.device),
                            torch.arange(w, dtype=torch.float32, device=image.device),
                            indexing="ij")
    pos = torch.stack([yy, xx], -1).reshape(1, h * w, 2).expand(b, -1, -1)
    rgb = image.float().permute(0, 2, 3, 1).reshape(b, h * w, 3)
    app = torch.cat([pos / sxy_a, rgb / srgb], -1).contiguous()
    smooth = (pos / sxy_s).contiguous()
    return app, smooth


def _check_args(probs, image, iterations):
    if probs.dim() != 4 or image.dim() != 4:
        raise ValueError(f"probs [B, C, H, W] and image [B, 3, H, W], got "
                         f"{tuple(probs.shape)}, {tuple(image.shape)}")
    if image.shape[1] != 3 or image.shape[0] != probs.shape[0] or \
            image.shape[2:] != probs.shape[2:]:
        raise ValueError(f"image {tuple(image.shape)} does not match probs {tuple(probs.shape)}")
    if iterations < 0:
        raise ValueError("iterations must be >= 0")


def dense_crf_ref(probs, image, *, iterations=5, w_app=4.0, sxy_app=40.0, srgb=13.0,
                  w_smooth=3.0, sxy_smooth=3.0, eps=1e-5):
    """Reference (plain torch, N x N kernels in memory) version of :func:`dense_crf`."""
    _check_args(probs, image, iterations)
    b, c, h, w = probs.shape
    app, smooth = _features(image, sxy_app, srgb, sxy_smooth)
    unary = probs.float().clamp_min(eps).log().reshape(b, c, h * w).transpose(1, 2)  # [B, N, C]
    kernels = []
    for f, wk in ((app, w_app), (smooth, w_smooth)):
        # Differences, not cdist's |a|^2 + |b|^2 - 2ab, whose cancellation costs digits.
        k = torch.exp(-0.5 * (f[:, :, None] - f[:, None, :]).square().sum(-1))  # [B, N, N]
        norm = k.sum(-1).clamp_min(1e-20).rsqrt()
        kernels.append((k, norm, wk))
    q = unary.softmax(-1)
    for _ in range(iterations):
        logits = unary.clone()
        for k, norm, wk in kernels:
            logits += wk * norm[..., None] * torch.bmm(k, norm[..., None] * q)
        q = logits.softmax(-1)
    return q.transpose(1, 2).reshape(b, c, h, w)


# --------------------------------------------------------------------------------------------
# numba (CPU)
# --------------------------------------------------------------------------------------------

_nb = numba_module()

if _nb is not None:
    @_nb.njit(parallel=True, fastmath=False, cache=True)
    def _crf_messages_nb(app, smooth, src_a, src_s, out_a, out_s):
        """out_k[b, i, :] = sum_j exp(-|f_i - f_j|^2 / 2) src_k[b, j, :] for both kernels."""
        n_b, n, da = app.shape
        ds = smooth.shape[2]
        c = src_a.shape[2]
        for job in _nb.prange(n_b * n):
            bb = job // n
            i = job - bb * n
            acc_a = np.zeros(c, np.float32)
            acc_s = np.zeros(c, np.float32)
            for j in range(n):
                d2 = np.float32(0.0)
                for t in range(da):
                    diff = app[bb, i, t] - app[bb, j, t]
                    d2 += diff * diff
                ka = np.exp(np.float32(-0.5) * d2)
                d2 = np.float32(0.0)
                for t in range(ds):
                    diff = smooth[bb, i, t] - smooth[bb, j, t]
                    d2 += diff * diff
                ks = np.exp(np.float32(-0.5) * d2)
                for cc in range(c):
                    acc_a[cc] += ka * src_a[bb, j, cc]
                    acc_s[cc] += ks * src_s[bb, j, cc]
            for cc in range(c):
                out_a[bb, i, cc] = acc_a[cc]
                out_s[bb, i, cc] = acc_s[cc]


def _mean_field(unary, messages, iterations, w_app, w_smooth):
    """The mean-field loop around a `messages(src_a, src_s) -> (m_a, m_s)` function (the
    normalisers come from the messages of ones). unary [B, N, C] float32."""
    b, n, c = unary.shape
    ones = torch.ones((b, n, 1), dtype=torch.float32, device=unary.device)
    sum_a, sum_s = messages(ones, ones)
    norm_a = sum_a.clamp_min(1e-20).rsqrt()
    norm_s = sum_s.clamp_min(1e-20).rsqrt()
    q = unary.softmax(-1)
    for _ in range(iterations):
        m_a, m_s = messages((norm_a * q).contiguous(), (norm_s * q).contiguous())
        q = (unary + w_app * norm_a * m_a + w_smooth * norm_s * m_s).softmax(-1)
    return q


def dense_crf_numba(probs, image, *, iterations=5, w_app=4.0, sxy_app=40.0, srgb=13.0,
                    w_smooth=3.0, sxy_smooth=3.0, eps=1e-5):
    """numba (CPU, parallel) version of :func:`dense_crf`."""
    if _nb is None:
        raise RuntimeError("numba is not available")
    _check_args(probs, image, iterations)
    b, c, h, w = probs.shape
    dev = probs.device
    app, smooth = _features(image.cpu(), sxy_app, srgb, sxy_smooth)
    app_np, smooth_np = app.numpy(), smooth.numpy()
    unary = probs.detach().float().cpu().clamp_min(eps).log().reshape(b, c, h * w)
    unary = unary.transpose(1, 2).contiguous()

    def messages(src_a, src_s):
        out_a = np.empty((b, h * w, src_a.shape[2]), np.float32)
        out_s = np.empty_like(out_a)
        with torch_threads_kept():
            _crf_messages_nb(app_np, smooth_np, src_a.numpy(), src_s.numpy(), out_a, out_s)
        return torch.from_numpy(out_a), torch.from_numpy(out_s)

    q = _mean_field(unary, messages, iterations, w_app, w_smooth)
    return q.transpose(1, 2).reshape(b, c, h, w).to(dev)


# --------------------------------------------------------------------------------------------
# triton (GPU; CPU tensors under TRITON_INTERPRET=1)
# --------------------------------------------------------------------------------------------

_tr = triton_modules()
# Widest channel tile of the exact messages kernel: a 128-wide tile spilled registers at sm_80
# and sm_90 (ptxas -v), so 65 channels and more are walked in tiles of 64.
CRF_MAX_BLOCK_C = 64

if _tr is not None:
    triton, tl = _tr

    @triton.jit
    def crf_messages_kernel(app_ptr, smooth_ptr, src_a_ptr, src_s_ptr, out_a_ptr, out_s_ptr, N,
                            C, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                            BLOCK_C: tl.constexpr):
        # One program: one image b, BLOCK_I pixels i, BLOCK_C channels (grid axis 2 walks
        # wider channel counts in tiles); walks every pixel j in BLOCK_J tiles. Features are
        # padded to 8 (appearance: 5 used) and 2 (smoothness) columns.
        b = tl.program_id(0)
        offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        offs_f = tl.arange(0, 8)
        mask_i = offs_i < N
        mask_c = offs_c < C
        fa_i = tl.load(app_ptr + (b * N + offs_i[:, None]) * 8 + offs_f[None, :],
                       mask=mask_i[:, None], other=0.0)
        fs_i = tl.load(smooth_ptr + (b * N + offs_i[:, None]) * 8 + offs_f[None, :],
                       mask=mask_i[:, None], other=0.0)
        acc_a = tl.zeros([BLOCK_I, BLOCK_C], dtype=tl.float32)
        acc_s = tl.zeros([BLOCK_I, BLOCK_C], dtype=tl.float32)
        for j0 in range(0, N, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            mask_j = offs_j < N
            fa_j = tl.load(app_ptr + (b * N + offs_j[:, None]) * 8 + offs_f[None, :],
                           mask=mask_j[:, None], other=0.0)
            fs_j = tl.load(smooth_ptr + (b * N + offs_j[:, None]) * 8 + offs_f[None, :],
                           mask=mask_j[:, None], other=0.0)
            # |f_i - f_j|^2 summed over the (padded) feature columns, as a [BLOCK_I, BLOCK_J]
            # tile: exact in fp32 (no tensor-core rounding of the features).
            da = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
            ds = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
            for t in tl.static_range(8):
                sel = (offs_f == t)[None, :]
                ai = tl.sum(tl.where(sel, fa_i, 0.0), axis=1)
                aj = tl.sum(tl.where(sel, fa_j, 0.0), axis=1)
                si = tl.sum(tl.where(sel, fs_i, 0.0), axis=1)
                sj = tl.sum(tl.where(sel, fs_j, 0.0), axis=1)
                dd = ai[:, None] - aj[None, :]
                da += dd * dd
                dd = si[:, None] - sj[None, :]
                ds += dd * dd
            ka = tl.where(mask_j[None, :], tl.exp(-0.5 * da), 0.0)
            ks = tl.where(mask_j[None, :], tl.exp(-0.5 * ds), 0.0)
            sa = tl.load(src_a_ptr + (b * N + offs_j[:, None]) * C + offs_c[None, :],
                         mask=mask_j[:, None] & mask_c[None, :], other=0.0)
            ss = tl.load(src_s_ptr + (b * N + offs_j[:, None]) * C + offs_c[None, :],
                         mask=mask_j[:, None] & mask_c[None, :], other=0.0)
            acc_a += tl.dot(ka, sa, input_precision="ieee")
            acc_s += tl.dot(ks, ss, input_precision="ieee")
        out = (b * N + offs_i[:, None]) * C + offs_c[None, :]
        mask = mask_i[:, None] & mask_c[None, :]
        tl.store(out_a_ptr + out, acc_a, mask=mask)
        tl.store(out_s_ptr + out, acc_s, mask=mask)


def dense_crf_triton(probs, image, *, iterations=5, w_app=4.0, sxy_app=40.0, srgb=13.0,
                     w_smooth=3.0, sxy_smooth=3.0, eps=1e-5):
    """Triton version of :func:`dense_crf` (CUDA, or CPU tensors under TRITON_INTERPRET=1)."""
    if _tr is None:
        raise RuntimeError("triton is not available")
    _check_args(probs, image, iterations)
    b, c, h, w = probs.shape
    n = h * w
    app, smooth = _features(image, sxy_app, srgb, sxy_smooth)
    pad = torch.zeros((b, n, 8), dtype=torch.float32, device=probs.device)
    app8 = pad.clone()
    app8[..., :5] = app
    smooth8 = pad
    smooth8[..., :2] = smooth
    unary = probs.float().clamp_min(eps).log().reshape(b, c, n).transpose(1, 2).contiguous()
    block_i, block_j = 32, 32

    def messages(src_a, src_s):
        cc = src_a.shape[2]
        out_a = torch.empty((b, n, cc), dtype=torch.float32, device=probs.device)
        out_s = torch.empty_like(out_a)
        # Channel tiles up to CRF_MAX_BLOCK_C wide; each recomputes the pixel kernel tiles.
        block_c = min(CRF_MAX_BLOCK_C, max(16, 1 << (cc - 1).bit_length()))
        crf_messages_kernel[(b, triton.cdiv(n, block_i), triton.cdiv(cc, block_c))](
            app8, smooth8, src_a, src_s, out_a, out_s, n, cc, BLOCK_I=block_i,
            BLOCK_J=block_j, BLOCK_C=block_c, num_warps=4)
        return out_a, out_s

    q = _mean_field(unary, messages, iterations, w_app, w_smooth)
    return q.transpose(1, 2).reshape(b, c, h, w)


# --------------------------------------------------------------------------------------------
# permutohedral lattice (any device; the CPU default)
# --------------------------------------------------------------------------------------------
#
# The exact kernels cost O(N^2) per iteration; pydensecrf filters through a permutohedral lattice
# (Adams, Baek and Davis, 2010) in O(N d^2): each pixel's features are lifted onto the plane
# x . 1 = 0 in d+1 dimensions, splatted onto the d+1 vertices of the lattice simplex around it
# (barycentric weights), blurred with [1 2 1] along the d+1 lattice axes, and read back
# (sliced) with the same weights. The result approximates the Gaussian filter up to a constant
# factor, which the symmetric normalisation cancels. Here the lattice is built with torch ops
# (vertex keys packed into int64 codes, torch.unique as the hash table, sparse matrices for
# splat and slice), once per image; every mean-field iteration reuses it.


class PermutohedralLattice:
    """The lattice of one image's features ``[N, d]`` (already divided by their scales)."""

    def __init__(self, features: torch.Tensor):
        f = features.to(torch.float32)
        n, d = f.shape
        dev = f.device
        self.d = d
        # Lift onto the plane, scaled so that the blur below is a unit Gaussian in f.
        # float32 arithmetic in pydensecrf's order, so that points on a cell boundary fall on
        # the same side as there (its scale factors: float32 of a float64 product).
        inv_std = float(np.float32((2.0 / 3.0) ** 0.5 * (d + 1)))
        scale = torch.tensor([1.0 / ((i + 2) * (i + 1)) ** 0.5 * inv_std for i in range(d)],
                             dtype=torch.float32, device=dev)
        cf = f * scale  # [N, d]
        down_factor = torch.tensor(1.0 / (d + 1), dtype=torch.float32, device=dev)
        # elevated[j] = sum_{i >= j} cf_i - j cf_{j-1}, summed from the last coordinate down
        # one float32 addition at a time (torch.cumsum would accumulate in double).
        elevated = torch.zeros((n, d + 1), dtype=torch.float32, device=dev)
        sm = torch.zeros(n, dtype=torch.float32, device=dev)
        for j in range(d, 0, -1):
            elevated[:, j] = sm - j * cf[:, j - 1]
            sm = sm + cf[:, j - 1]
        elevated[:, 0] = sm
        # Round to nearest, ties to even, in the scaled coordinates: pydensecrf's SSE path
        # (every x86-64 build; its scalar fallback breaks ties downwards instead).
        v0 = torch.round(elevated * down_factor)
        rem0 = v0 * (d + 1)
        total = v0.sum(1).to(torch.int64)  # [N]
        diff = elevated - rem0
        later = torch.triu(torch.ones(d + 1, d + 1, dtype=torch.bool, device=dev), 1)
        # rank[i] = #{j > i: diff_j > diff_i} + #{j < i: diff_j >= diff_i}
        greater = diff[:, None, :] > diff[:, :, None]  # [N, i, j]: diff_j > diff_i
        geq = diff[:, None, :] >= diff[:, :, None]
        rank = (greater & later).sum(2) + (geq & later.T).sum(2)
        rank = rank + total[:, None]
        low, high = rank < 0, rank > d
        rank = torch.where(low, rank + d + 1, torch.where(high, rank - d - 1, rank))
        rem0 = torch.where(low, rem0 + d + 1, torch.where(high, rem0 - d - 1, rem0))
        # Barycentric weights of the d+1 vertices.
        v = (elevated - rem0) * down_factor
        bary = torch.zeros((n, d + 2), dtype=torch.float32, device=dev)
        rows = torch.arange(n, device=dev)
        for j in range(d + 1):
            bary[rows, d - rank[:, j]] += v[:, j]
            bary[rows, d + 1 - rank[:, j]] -= v[:, j]
        bary[:, 0] += 1.0 + bary[:, d + 1]
        bary = bary[:, :d + 1]
        # Vertex keys (the first d coordinates; the last follows from the plane).
        rem0 = rem0.to(torch.int64)[:, :d]
        rank = rank[:, :d]
        keys = torch.stack([rem0 + torch.where(rank <= d - r, r, r - d - 1)
                            for r in range(d + 1)], 1)  # [N, d+1, d]
        lo = int(keys.min()) - d - 2
        radix = int(keys.max()) - lo + d + 3
        if radix ** d >= 2 ** 62:
            raise ValueError("CRF feature scales too small for the lattice's key codes; "
                             "use an exact implementation (impl='numba' or 'triton')")
        self._lo, self._radix = lo, radix
        codes, inverse = torch.unique(self._encode(keys.reshape(-1, d)), return_inverse=True)
        m = codes.numel()
        # Blur neighbours along each lattice axis j: key - 1 everywhere (+ (d+1) at j), and
        # key + 1 (- (d+1) at j); a missing neighbour reads row m (zeros).
        ukeys = self._decode(codes)
        self.neighbours = []
        for j in range(d + 1):
            n1, n2 = ukeys - 1, ukeys + 1
            if j < d:
                n1[:, j] += d + 1
                n2[:, j] -= d + 1
            self.neighbours.append((self._find(codes, n1), self._find(codes, n2)))
        # Splat [M, N] and slice [N, M] as sparse matrices of the barycentric weights (CSR:
        # its products are deterministic and the fastest of torch's sparse layouts on a CPU).
        point = rows[:, None].expand(n, d + 1).reshape(-1)
        vertex = inverse.reshape(-1)
        w = bary.reshape(-1)
        alpha = 1.0 / (1.0 + 2.0 ** (-d))  # the blur's gain at the centre, as pydensecrf
        # Built directly in CSR form (no coalescing): the slice's rows are the points, each
        # with its d+1 distinct vertices; the splat's are the vertices (a stable sort).
        order = torch.argsort(vertex, stable=True)
        splat_rows = torch.zeros(m + 1, dtype=torch.int64, device=dev)
        splat_rows[1:] = torch.cumsum(torch.bincount(vertex, minlength=m), 0)
        slice_rows = torch.arange(0, n * (d + 1) + 1, d + 1, device=dev)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support")
            self.splat = torch.sparse_csr_tensor(splat_rows, point[order], w[order], (m, n),
                                                 check_invariants=False)
            self.slice = torch.sparse_csr_tensor(slice_rows, vertex, w * alpha, (n, m),
                                                 check_invariants=False)

    def _encode(self, keys: torch.Tensor) -> torch.Tensor:
        code = torch.zeros(keys.shape[0], dtype=torch.int64, device=keys.device)
        for j in range(keys.shape[1]):
            code = code * self._radix + (keys[:, j] - self._lo)
        return code

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        out = []
        for _ in range(self.d):
            out.append(codes % self._radix + self._lo)
            codes = codes // self._radix
        return torch.stack(out[::-1], 1)

    def _find(self, codes: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        c = self._encode(keys)
        at = torch.searchsorted(codes, c).clamp_max(codes.numel() - 1)
        return torch.where(codes[at] == c, at, torch.full_like(at, codes.numel()))

    def filter(self, values: torch.Tensor, blur: str | None = None) -> torch.Tensor:
        """Approximately sum_j exp(-|f_i - f_j|^2 / 2) values_j (times a constant): [N, C].
        `blur`: "triton" (the default on CUDA where triton imports) or "torch"."""
        lat = torch.sparse.mm(self.splat, values.float())
        # Row m stays zero: the value of every missing neighbour.
        lat = torch.cat([lat, lat.new_zeros((1, lat.shape[1]))])
        if blur is None:
            blur = "triton" if lat.device.type == "cuda" and _tr is not None else "torch"
        blurred = (lattice_blur_triton if blur == "triton" else lattice_blur_ref)(
            lat, self.neighbours)
        return torch.sparse.mm(self.slice, blurred[:-1])


def lattice_blur_ref(lat: torch.Tensor, neighbours) -> torch.Tensor:
    """The lattice's [1 2 1] blur along each axis in turn: lat [M+1, C] (row M, the missing
    neighbour, zero), neighbours [(n1, n2)] per axis, each [M]."""
    for n1, n2 in neighbours:
        lat = torch.cat([lat[:-1] + 0.5 * (lat[n1] + lat[n2]), lat[-1:]])
    return lat


# Vertex rows per program of the Triton blur, and its widest channel tile (wider channel counts
# take more programs along grid axis 1): a 64x32 tile spilled 8 bytes at sm_90 (ptxas -v; each
# element carries two gathered 64-bit addresses).
BLUR_BLOCK_V = 64
BLUR_MAX_BLOCK_C = 16

if _tr is not None:
    @triton.jit
    def lattice_blur_kernel(lat_ptr, n1_ptr, n2_ptr, out_ptr, M, C, BLOCK_V: tl.constexpr,
                            BLOCK_C: tl.constexpr):
        # One program: BLOCK_V vertex rows, BLOCK_C channels of one blur axis; out[v] =
        # lat[v] + 0.5 * (lat[n1[v]] + lat[n2[v]]) in float32, as the reference. Row M (zeros)
        # is never written.
        offs_v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_v = offs_v < M
        mask = mask_v[:, None] & (offs_c < C)[None, :]
        a = tl.load(n1_ptr + offs_v, mask=mask_v, other=0)
        b = tl.load(n2_ptr + offs_v, mask=mask_v, other=0)
        x = tl.load(lat_ptr + offs_v[:, None] * C + offs_c[None, :], mask=mask, other=0.0)
        xa = tl.load(lat_ptr + a[:, None] * C + offs_c[None, :], mask=mask, other=0.0)
        xb = tl.load(lat_ptr + b[:, None] * C + offs_c[None, :], mask=mask, other=0.0)
        tl.store(out_ptr + offs_v[:, None] * C + offs_c[None, :], x + 0.5 * (xa + xb),
                 mask=mask)


def lattice_blur_triton(lat: torch.Tensor, neighbours) -> torch.Tensor:
    """Triton version of :func:`lattice_blur_ref` (CUDA, or CPU tensors under
    TRITON_INTERPRET=1): one launch per axis, between two buffers."""
    if _tr is None:
        raise RuntimeError("triton is not available")
    lat = lat.float().contiguous()
    m, c = lat.shape[0] - 1, lat.shape[1]
    other = torch.empty_like(lat)
    other[m] = 0.0
    block_c = min(BLUR_MAX_BLOCK_C, max(2, 1 << (c - 1).bit_length()))
    grid = (triton.cdiv(max(m, 1), BLUR_BLOCK_V), triton.cdiv(c, block_c))
    for n1, n2 in neighbours:
        lattice_blur_kernel[grid](lat, n1, n2, other, m, c, BLOCK_V=BLUR_BLOCK_V,
                                  BLOCK_C=block_c, num_warps=4)
        lat, other = other, lat
    return lat


# --------------------------------------------------------------------------------------------
# The lattice mean field in numba (the CPU default)
# --------------------------------------------------------------------------------------------
#
# The same lattice and the same arithmetic as pydensecrf's (its hash-table build, its point-order
# splat, its blur and slice: (w * alpha) * value and a float32 half where it takes its SSE path,
# more than 2 channels, (w * value) * alpha and a float64 half where it does not), built and run
# in numba, one image per call with no torch op inside: torch's sparse products and per-iteration
# tensors cost more than the filtering itself. An image runs on one thread: the lattice's phases
# (splat, d+1 blur passes, slice) each need every thread at a barrier, and on a loaded machine a
# thread that is not scheduled stalls each of them (an image's phases split over two threads
# took 0.98 s against 0.027 s on one at 64x64, 2.0 s against 1.2 s at 512x512, on a loaded
# 2-core machine). More threads split a batch's images instead: one parallel region per call,
# and the bits do not depend on the split.


def _lattice_constants(d: int):
    """pydensecrf's per-coordinate scale factors (float32 of a float64 product), 1 / (d + 1)
    and the slice's alpha, all float32."""
    inv_std = float(np.float32((2.0 / 3.0) ** 0.5 * (d + 1)))
    scale = np.array([1.0 / ((i + 2) * (i + 1)) ** 0.5 * inv_std for i in range(d)],
                     np.float32)
    alpha = np.float32(1.0) / (np.float32(1.0) + np.float32(2.0 ** -d))
    return scale, np.float32(1.0 / (d + 1)), np.float32(alpha)


_LATTICE_CONSTANTS = {d: _lattice_constants(d) for d in (2, 5)}


if _nb is not None:
    @_nb.njit(cache=True)
    def _hash_slot(keys, table, key):
        """The slot of `key` in the open-addressing `table` (vertex numbers, -1: empty): where
        it is, or the empty slot where it would go."""
        d = key.shape[0]
        h = np.int64(0)
        for k in range(d):
            h = h * np.int64(2531011) + np.int64(key[k])
        mask = table.shape[0] - 1
        slot = h & mask
        while True:
            at = table[slot]
            if at < 0:
                return slot
            same = True
            for k in range(d):
                if keys[at, k] != key[k]:
                    same = False
                    break
            if same:
                return slot
            slot = (slot + 1) & mask

    @_nb.njit(cache=True)
    def _lattice_build_nb(f, scale, down):
        """One image's lattice from its features [N, d]: each point's d+1 vertices and
        barycentric weights ([N, d+1] each) and each vertex's blur neighbours along the d+1
        axes ([d+1, M, 2]; M, a zero row, where one is missing). The arithmetic of
        `PermutohedralLattice`; vertices are numbered as they are first met."""
        n, d = f.shape
        d1 = d + 1
        table = np.full(1024, -1, np.int32)  # doubled as it fills: small enough to stay cached
        keys = np.empty((n * d1, d), np.int32)
        offsets = np.empty((n, d1), np.int32)
        weights = np.empty((n, d1), np.float32)
        cf = np.empty(d, np.float32)
        elevated = np.empty(d1, np.float32)
        rem0 = np.empty(d1, np.float32)
        diff = np.empty(d1, np.float32)
        rank = np.empty(d1, np.int64)
        bary = np.empty(d + 2, np.float32)
        key = np.empty(d, np.int32)
        m = 0
        for p in range(n):
            for j in range(d):
                cf[j] = f[p, j] * scale[j]
            sm = np.float32(0.0)
            for j in range(d, 0, -1):
                elevated[j] = sm - np.float32(j) * cf[j - 1]
                sm = sm + cf[j - 1]
            elevated[0] = sm
            total = 0
            for j in range(d1):
                v0 = np.rint(elevated[j] * down)  # ties to even, as pydensecrf's SSE build
                rem0[j] = v0 * np.float32(d1)
                total += np.int64(v0)
                diff[j] = elevated[j] - rem0[j]
            for i in range(d1):
                r = 0
                for j in range(d1):
                    if (j > i and diff[j] > diff[i]) or (j < i and diff[j] >= diff[i]):
                        r += 1
                r += total
                if r < 0:
                    r += d1
                    rem0[i] += np.float32(d1)
                elif r > d:
                    r -= d1
                    rem0[i] -= np.float32(d1)
                rank[i] = r
            for j in range(d + 2):
                bary[j] = 0.0
            for j in range(d1):
                v = (elevated[j] - rem0[j]) * down
                bary[d - rank[j]] += v
                bary[d1 - rank[j]] -= v
            bary[0] += np.float32(1.0) + bary[d1]
            for r in range(d1):
                for k in range(d):
                    key[k] = np.int32(rem0[k]) + (r if rank[k] <= d - r else r - d1)
                slot = _hash_slot(keys, table, key)
                if table[slot] < 0:
                    keys[m] = key
                    table[slot] = m
                    m += 1
                    if 2 * m > table.shape[0]:
                        table = np.full(2 * table.shape[0], -1, np.int32)
                        for i in range(m):
                            table[_hash_slot(keys, table, keys[i])] = i
                        slot = _hash_slot(keys, table, key)
                offsets[p, r] = table[slot]
                weights[p, r] = bary[r]
        # Blur neighbours along axis j: key - 1 everywhere (+ (d+1) at j), key + 1 (- (d+1) at
        # j).
        nbrs = np.empty((d1, m, 2), np.int32)
        for i in range(m):
            for j in range(d1):
                for side in range(2):
                    step = -1 if side == 0 else 1
                    for k in range(d):
                        key[k] = keys[i, k] + step
                    if j < d:
                        key[j] -= step * d1
                    at = table[_hash_slot(keys, table, key)]
                    nbrs[j, i, side] = at if at >= 0 else m
        return offsets, weights, nbrs

    @_nb.njit(cache=True)
    def _splat_blur_nb(offsets, weights, nbrs, src, scale, val, new, sse):
        """pydensecrf's splat of scale[:, None] * src [N, C] (point by point, in order) and its
        blur (`sse`: its SSE path's arithmetic, for more than 2 labels); returns whichever of the
        [M+1, C] work rows val / new holds the result (row M, the missing neighbour, stays
        zero)."""
        n, c = src.shape
        m = nbrs.shape[1]
        d1 = offsets.shape[1]
        val[:] = 0.0
        row = np.empty(c, np.float32)
        for p in range(n):
            for k in range(c):
                row[k] = scale[p] * src[p, k]
            for r in range(d1):
                o = offsets[p, r]
                w = weights[p, r]
                for k in range(c):
                    val[o, k] += w * row[k]
        new[m, :] = 0.0
        for j in range(d1):
            nj = nbrs[j]
            if sse:  # a float32 half
                for v in range(m):
                    a, b = nj[v, 0], nj[v, 1]
                    for k in range(c):
                        new[v, k] = val[v, k] + np.float32(0.5) * (val[a, k] + val[b, k])
            else:  # its scalar path: the C++ double 0.5
                for v in range(m):
                    a, b = nj[v, 0], nj[v, 1]
                    for k in range(c):
                        new[v, k] = val[v, k] + 0.5 * (val[a, k] + val[b, k])
            val, new = new, val
        return val

    @_nb.njit(cache=True)
    def _slice_row_nb(i, offsets, weights, val, alpha, out, sse):
        """pydensecrf's slice of point i into out [C]."""
        c = val.shape[1]
        for k in range(c):
            out[k] = 0.0
        for r in range(offsets.shape[1]):
            o = offsets[i, r]
            if sse:
                wa = weights[i, r] * alpha
                for k in range(c):
                    out[k] += wa * val[o, k]
            else:
                w = weights[i, r]
                for k in range(c):
                    out[k] += w * val[o, k] * alpha

    @_nb.njit(cache=True)
    def _lattice_kernel_nb(f, scale, down, alpha, c):
        """A kernel's lattice, its symmetric normaliser 1 / sqrt(filter(ones)) (in float64, as
        pydensecrf), and its [M+1, C] work rows."""
        offsets, weights, nbrs = _lattice_build_nb(f, scale, down)
        n, m = f.shape[0], nbrs.shape[1]
        ones = np.ones((n, 1), np.float32)
        val = _splat_blur_nb(offsets, weights, nbrs, ones, ones[:, 0],
                             np.empty((m + 1, 1), np.float32), np.empty((m + 1, 1), np.float32),
                             False)
        total = np.empty(1, np.float32)
        norm = np.empty(n, np.float32)
        for i in range(n):
            _slice_row_nb(i, offsets, weights, val, alpha, total, False)
            norm[i] = np.float32(1.0 / np.sqrt(np.float64(total[0]) + 1e-20))
        return (offsets, weights, nbrs, norm, np.empty((m + 1, c), np.float32),
                np.empty((m + 1, c), np.float32))

    @_nb.njit(cache=True)
    def _exp_nonpositive_nb(x, bits):
        """exp(x) in place, for x <= 0 (a softmax's logits less their maximum; below -87,
        where exp underflows, exp(-87)): Cephes' float32 polynomial (as Eigen's exp, which
        pydensecrf's softmax runs), 2 ulp at most, in a loop the compiler vectorises where
        calls to the C library's exp do not (3-4x faster). `bits`: int32 scratch of x's size."""
        scale = bits.view(np.float32)
        for k in range(x.shape[0]):
            t = max(x[k], np.float32(-87.0))
            n = np.floor(t * np.float32(1.44269504088896341) + np.float32(0.5))
            r = t - n * np.float32(0.693359375)  # t - n ln 2, in two steps (Cody and Waite)
            r = r - n * np.float32(-2.12194440e-4)
            y = np.float32(1.9875691500e-4)
            y = y * r + np.float32(1.3981999507e-3)
            y = y * r + np.float32(8.3334519073e-3)
            y = y * r + np.float32(4.1665795894e-2)
            y = y * r + np.float32(1.6666665459e-1)
            y = y * r + np.float32(5.0000001201e-1)
            x[k] = y * (r * r) + r + np.float32(1.0)
            bits[k] = (np.int32(n) + np.int32(127)) << 23  # 2^n, n in [-126, 0]
        for k in range(x.shape[0]):
            x[k] = x[k] * scale[k]

    @_nb.njit(cache=True)
    def _softmax_nb(logits, q, bits):
        """pydensecrf's expAndNormalize row by row: exp(x - max) / sum, into q [N, C]; logits
        [N, C] (contiguous) are overwritten."""
        n, c = logits.shape
        for i in range(n):
            mx = logits[i, 0]
            for k in range(1, c):
                mx = max(mx, logits[i, k])
            for k in range(c):
                logits[i, k] = logits[i, k] - mx
        _exp_nonpositive_nb(logits.reshape(n * c), bits)
        for i in range(n):
            total = np.float32(0.0)
            for k in range(c):
                total += logits[i, k]
            for k in range(c):
                q[i, k] = logits[i, k] / total

    @_nb.njit(cache=True)
    def _lattice_features_nb(rgb, width, sxy_a, srgb, sxy_s):
        """`_lattice_features` of one image, rgb [3, N] float32: [N, 5] and [N, 2], float32
        divisions as pydensecrf's."""
        n = rgb.shape[1]
        app = np.empty((n, 5), np.float32)
        smooth = np.empty((n, 2), np.float32)
        for i in range(n):
            y = np.float32(i // width)
            x = np.float32(i % width)
            app[i, 0] = x / sxy_a
            app[i, 1] = y / sxy_a
            for k in range(3):
                app[i, 2 + k] = rgb[k, i] / srgb
            smooth[i, 0] = x / sxy_s
            smooth[i, 1] = y / sxy_s
        return app, smooth

    @_nb.njit(cache=True)
    def _dense_crf_image_nb(probs, rgb, width, scales, consts_s, consts_a, w_smooth, w_app,
                            eps, iterations, q):
        """One image: probs [C, N], rgb [3, N] (0-255), `scales` (sxy_app, srgb, sxy_smooth),
        q [N, C] out. A kernel of weight 0 is left out, as pydensecrf never adds it (w * m adds
        nothing)."""
        c, n = probs.shape
        sse = c > 2
        app, smooth = _lattice_features_nb(rgb, width, scales[0], scales[1], scales[2])
        logp = np.empty((n, c), np.float32)
        for i in range(n):
            for k in range(c):
                logp[i, k] = np.log(max(probs[k, i], eps))
        logits = logp.copy()
        bits = np.empty(n * c, np.int32)
        _softmax_nb(logits, q, bits)
        if iterations == 0:
            return
        scale_s, down_s, alpha_s = consts_s
        scale_a, down_a, alpha_a = consts_a
        ks = _lattice_kernel_nb(smooth, scale_s, down_s, alpha_s, c)
        ka = _lattice_kernel_nb(app, scale_a, down_a, alpha_a, c)
        msg = np.empty(c, np.float32)
        val_s, val_a = ks[4], ka[4]
        for _ in range(iterations):
            # Both splats read this iteration's q before any row of it is replaced.
            if w_smooth != 0.0:
                val_s = _splat_blur_nb(ks[0], ks[1], ks[2], q, ks[3], ks[4], ks[5], sse)
            if w_app != 0.0:
                val_a = _splat_blur_nb(ka[0], ka[1], ka[2], q, ka[3], ka[4], ka[5], sse)
            for i in range(n):
                # pydensecrf's order: the unary, + the smoothness kernel's, + the appearance's.
                for k in range(c):
                    logits[i, k] = logp[i, k]
                if w_smooth != 0.0:
                    _slice_row_nb(i, ks[0], ks[1], val_s, alpha_s, msg, sse)
                    for k in range(c):
                        logits[i, k] += w_smooth * (msg[k] * ks[3][i])
                if w_app != 0.0:
                    _slice_row_nb(i, ka[0], ka[1], val_a, alpha_a, msg, sse)
                    for k in range(c):
                        logits[i, k] += w_app * (msg[k] * ka[3][i])
            _softmax_nb(logits, q, bits)

    @_nb.njit(cache=True)
    def _dense_crf_batch_seq(probs, rgb, width, scales, consts_s, consts_a, w_smooth, w_app,
                             eps, iterations, q):
        for b in range(probs.shape[0]):
            _dense_crf_image_nb(probs[b], rgb[b], width, scales, consts_s, consts_a, w_smooth,
                                w_app, eps, iterations, q[b])

    @_nb.njit(parallel=True, cache=True)
    def _dense_crf_batch_par(probs, rgb, width, scales, consts_s, consts_a, w_smooth, w_app,
                             eps, iterations, q):
        for b in _nb.prange(probs.shape[0]):
            _dense_crf_image_nb(probs[b], rgb[b], width, scales, consts_s, consts_a, w_smooth,
                                w_app, eps, iterations, q[b])


def _lattice_features(image: torch.Tensor, sxy_a: float, srgb: float, sxy_s: float):
    """pydensecrf's feature order: (x, y, r, g, b) / scales and (x, y) / scale, [B, N, *]."""
    app, smooth = _features(image, sxy_a, srgb, sxy_s)
    return (torch.cat([app[..., 1:2], app[..., 0:1], app[..., 2:]], -1),
            smooth[..., [1, 0]])


def dense_crf_lattice(probs, image, *, iterations=5, w_app=4.0, sxy_app=40.0, srgb=13.0,
                      w_smooth=3.0, sxy_smooth=3.0, eps=1e-5, threads=None):
    """Permutohedral-lattice version of :func:`dense_crf` (approximate, as pydensecrf; O(N)).

    CPU tensors run the numba lattice where numba imports (`threads`: over how many threads
    the batch's images are split, default `crf_threads`; the result does not depend on it);
    other devices, or no numba, run `PermutohedralLattice` (torch ops)."""
    _check_args(probs, image, iterations)
    if _nb is not None and probs.device.type == "cpu":
        return _dense_crf_lattice_nb(probs, image, iterations, w_app, sxy_app, srgb, w_smooth,
                                     sxy_smooth, eps, threads)
    b, c, h, w = probs.shape
    app, smooth = _lattice_features(image, sxy_app, srgb, sxy_smooth)
    unary = probs.float().clamp_min(eps).log().reshape(b, c, h * w).transpose(1, 2)
    out = []
    for i in range(b):
        lat_a, lat_s = PermutohedralLattice(app[i]), PermutohedralLattice(smooth[i])

        def messages(src_a, src_s, lat_a=lat_a, lat_s=lat_s):
            return lat_a.filter(src_a[0])[None], lat_s.filter(src_s[0])[None]

        out.append(_mean_field(unary[i:i + 1].contiguous(), messages, iterations, w_app,
                               w_smooth))
    q = torch.cat(out) if out else unary.softmax(-1)
    return q.transpose(1, 2).reshape(b, c, h, w)


# Below this many pixels per image the numba lattice runs a batch on one thread: a parallel
# region's start and its wait for the slowest thread cost more than they save on small images
# when other work holds the cores (`attnseg bench crf`, bench/results/crf.md: two threads on a
# batch of two 64x64 images were slower than one, at 256x256 and above faster).
CRF_PARALLEL_MIN_PIXELS = 256 * 256


def crf_threads(batch: int, pixels: int) -> int:
    """The numba lattice's default thread count for a batch of `batch` images of `pixels`
    pixels: torch's, at most one per image (an image runs on one thread); one below
    `CRF_PARALLEL_MIN_PIXELS`, and off the main thread, where the caller's threads (a write
    pool's) are the parallelism and numba's threading layers do not all take parallel launches
    from several threads at once."""
    if _nb is None or pixels < CRF_PARALLEL_MIN_PIXELS or \
            threading.current_thread() is not threading.main_thread():
        return 1
    return max(1, min(batch, torch.get_num_threads(), _nb.config.NUMBA_NUM_THREADS))


def _dense_crf_lattice_nb(probs, image, iterations, w_app, sxy_app, srgb, w_smooth, sxy_smooth,
                          eps, threads):
    b, c, h, w = probs.shape
    n = h * w
    # No torch op on the way in: on a loaded machine torch's threads cost more than the
    # features themselves.
    p = probs.detach().float().cpu().reshape(b, c, n).contiguous().numpy()
    rgb = image.detach().float().cpu().reshape(b, 3, n).contiguous().numpy()
    # Lattice coordinates are below 64x the largest feature, and vertex keys are int32.
    largest = max(max(h, w) / min(sxy_app, sxy_smooth), float(np.abs(rgb).max(initial=0.0)) / srgb)
    if not largest * 64 < 2 ** 31:
        raise ValueError("CRF feature scales too small for the lattice's key codes; use an exact "
                         "implementation (impl='numba' or 'triton')")
    q = np.empty((b, n, c), np.float32)
    scales = (np.float32(sxy_app), np.float32(srgb), np.float32(sxy_smooth))
    args = (p, rgb, w, scales, _LATTICE_CONSTANTS[2], _LATTICE_CONSTANTS[5],
            np.float32(w_smooth), np.float32(w_app), np.float32(eps), iterations, q)
    threads = crf_threads(b, n) if threads is None else max(1, min(int(threads), b))
    if threads == 1:
        _dense_crf_batch_seq(*args)  # no parallel region: torch's OpenMP runtime is untouched
    else:
        with torch_threads_kept(threads):
            _dense_crf_batch_par(*args)
    return torch.from_numpy(q).transpose(1, 2).reshape(b, c, h, w).to(probs.device)


# Above this many pixels the GPU default is the lattice, not the exact Triton kernel.
EXACT_MAX_PIXELS = 128 * 128

_IMPLS = {"ref": dense_crf_ref, "numba": dense_crf_numba, "triton": dense_crf_triton,
          "lattice": dense_crf_lattice}


def dense_crf(probs, image, *, iterations=5, w_app=4.0, sxy_app=40.0, srgb=13.0, w_smooth=3.0,
              sxy_smooth=3.0, eps=1e-5, impl=None):
    """Refine soft label maps with a fully-connected CRF (mean field, Potts model).

    Args:
        probs: ``[B, C, H, W]`` label probabilities (background included), each pixel's
            summing to 1 (or any positive scores: only their logs matter).
        image: ``[B, 3, H, W]`` RGB in 0-255.
        iterations: mean-field iterations (pydensecrf's ``inference(n)``).
        w_app, sxy_app, srgb: appearance kernel weight, position and colour scales
            (``addPairwiseBilateral(sxy, srgb, compat)``).
        w_smooth, sxy_smooth: smoothness kernel weight and position scale
            (``addPairwiseGaussian(sxy, compat)``).
        eps: probabilities are clamped at this before the log (the unary).
        impl: ``None``: Triton (exact) on CUDA, the lattice on a CPU (unless
            ``ATTNSEG_KERNEL_IMPL`` names another); ``"ref"``, ``"triton"``, ``"numba"``
            (exact, O(N^2) per iteration) or ``"lattice"`` (pydensecrf's approximation, O(N)).

    Returns the refined probabilities, ``[B, C, H, W]`` float32.
    """
    if impl == "lattice":
        which = "lattice"
    else:
        which = resolve_impl(impl, probs.device)
        chosen = impl is None and not os.environ.get(ENV_VAR, "").strip()
        # The exact kernels walk all N^2 pixel pairs: on a CPU the lattice is 100x faster at
        # 64x64 (bench toy) and the only practical choice above it; on a GPU past
        # EXACT_MAX_PIXELS (a choice not yet timed on a GPU).
        if chosen and (which == "numba" or (which == "triton" and
                                            probs.shape[2] * probs.shape[3] > EXACT_MAX_PIXELS)):
            which = "lattice"
    return _IMPLS[which](probs, image, iterations=iterations, w_app=w_app, sxy_app=sxy_app,
                         srgb=srgb, w_smooth=w_smooth, sxy_smooth=sxy_smooth, eps=eps)
