"""Op (c): fully-connected CRF refinement of soft label maps (mean-field inference).

The dense CRF of Krähenbühl and Koltun (2011) with a Potts model, in the form `pydensecrf`
implements (`DenseCRF2D` with `addPairwiseGaussian` and `addPairwiseBilateral`, symmetric
kernel normalisation), computed exactly instead of through a permutohedral lattice:

    k_a(i, j) = exp(-|p_i - p_j|^2 / (2 sxy_a^2) - |I_i - I_j|^2 / (2 srgb^2))   (appearance)
    k_s(i, j) = exp(-|p_i - p_j|^2 / (2 sxy_s^2))                               (smoothness)
    n_k(i)    = 1 / sqrt(sum_j k(i, j))                                 (the kernel's normaliser)
    Q_0       = softmax(log P)          (P: the unary probabilities, clamped at `eps`)
    Q_{t+1}   = softmax(log P + sum_k w_k n_k(i) sum_j k(i, j) n_k(j) Q_t(j))

(`j` runs over every pixel, `i` included, as the lattice's blur does.) Pixel positions are in
pixels, colours in 0-255. The fused kernels never materialise the N x N kernel: they walk tiles
of pixel pairs and accumulate the messages, as attention kernels walk keys (a Gaussian kernel is
the exponential of -|f_i - f_j|^2 / 2 over scaled features). The cost is O(N^2 C) per iteration,
so the CRF runs on maps of at most a few hundred thousand pair-tiles: `mask.crf` resizes larger
images down first.
"""

from __future__ import annotations

import numpy as np
import torch

from ._dispatch import numba_module, resolve_impl, torch_threads_kept, triton_modules

__all__ = ["dense_crf", "dense_crf_numba", "dense_crf_ref", "dense_crf_triton"]


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

if _tr is not None:
    triton, tl = _tr

    @triton.jit
    def crf_messages_kernel(app_ptr, smooth_ptr, src_a_ptr, src_s_ptr, out_a_ptr, out_s_ptr, N,
                            C, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                            BLOCK_C: tl.constexpr):
        # One program: one image b, BLOCK_I pixels i; walks every pixel j in BLOCK_J tiles.
        # Features are padded to 8 (appearance: 5 used) and 2 (smoothness) columns.
        b = tl.program_id(0)
        offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        offs_c = tl.arange(0, BLOCK_C)
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
        crf_messages_kernel[(b, triton.cdiv(n, block_i))](
            app8, smooth8, src_a, src_s, out_a, out_s, n, cc, BLOCK_I=block_i,
            BLOCK_J=block_j, BLOCK_C=max(16, 1 << (cc - 1).bit_length()), num_warps=4)
        return out_a, out_s

    q = _mean_field(unary, messages, iterations, w_app, w_smooth)
    return q.transpose(1, 2).reshape(b, c, h, w)


_IMPLS = {"ref": dense_crf_ref, "numba": dense_crf_numba, "triton": dense_crf_triton}


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
        impl: ``None`` (``ATTNSEG_KERNEL_IMPL`` or by device), ``"ref"``, ``"triton"``,
            ``"numba"``.

    Returns the refined probabilities, ``[B, C, H, W]`` float32.
    """
    which = resolve_impl(impl, probs.device)
    return _IMPLS[which](probs, image, iterations=iterations, w_app=w_app, sxy_app=sxy_app,
                         srgb=srgb, w_smooth=w_smooth, sxy_smooth=sxy_smooth, eps=eps)

