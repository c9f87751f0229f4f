"""Op (a): class-token cross-attention maps, head mean, upsample and weighted accumulate.

For one cross-attention layer call the conditional-half queries ``q [B, H, N, D]`` (``N = h*w``)
and the text keys ``k [B, H, L, D]`` give ``P = softmax(scale * q @ k^T)`` over the L tokens.
The head mean of P, multiplied by ``token_weights [B, L, C]``, is a map per class; it is resized
to the accumulator's spatial size, optionally clamped at zero, and added (times ``weight``) into
``out [B, C, R_h, R_w]``. The fused kernels never materialise the ``[B, H, N, L]`` probabilities.
"""

from __future__ import annotations

import numpy as np
import torch

from ._dispatch import (
    numba_module,
    resolve_impl,
    torch_threads_kept,
    triton_interpreting,
    triton_modules,
)
from .interp import MODES, interp_matrix, interp_taps_np, resize

__all__ = [
    "accumulate_class_attention",
    "accumulate_class_attention_numba",
    "accumulate_class_attention_ref",
    "accumulate_class_attention_triton",
]

# Widest map the triton resize kernel holds in one tile; wider maps resize in torch.
_TRITON_MAX_SIDE = 128
# Most text keys `class_attn_kernel` holds in one tile (a query row's every score at once);
# longer text goes through `class_attn_long_kernel`. A 256-key tile spilled registers at 255
# per thread at sm_80 or sm_90 for every row tile (16, 32) and warp count (8, 16) tried
# (ptxas -v), so 129-256 keys take the two sweeps too: the scores are computed twice, but
# nothing held grows with L.
TRITON_MAX_KEYS = 128
# Widest class tile of both attention kernels; the launcher runs more classes in launches of
# this many (each computes the softmax again).
TRITON_MAX_BLOCK_C = 64
# Warps per program of the triton kernels. With 4, most tile sets spill registers at sm_80 and
# sm_90; with 8 the tiles `attn_tiles` and `resize_blocks` pick do not (ptxas -v, asserted in
# tests/kernels/test_class_attention.py).
_TRITON_NUM_WARPS = 8
# Under Triton's interpreter bf16 takes the exact-fp32 (FMA) dot path: the interpreter's
# tl.dot (triton 3.7's InterpreterBuilder.create_dot) multiplies bf16 operands as their raw
# uint16 bits. Tests set this, with that dot patched, to run the tensor-core path there.
_INTERPRETER_BF16_MMA = False


def _next_pow2(n: int, floor: int = 16) -> int:
    return max(floor, 1 << (max(int(n), 1) - 1).bit_length())


def _check_args(q, k, token_weights, out, hw, mode):
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"q and k must be 4-D [B, H, *, D], got {tuple(q.shape)}, {tuple(k.shape)}")
    b, heads, n, d = q.shape
    if k.shape[0] != b or k.shape[1] != heads or k.shape[3] != d:
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)}")
    h, w = int(hw[0]), int(hw[1])
    if h * w != n:
        raise ValueError(f"hw={tuple(hw)} does not match N={n}")
    l_tokens = k.shape[2]
    if token_weights.dim() != 3 or token_weights.shape[:2] != (b, l_tokens):
        raise ValueError(
            f"token_weights must be [B={b}, L={l_tokens}, C], got {tuple(token_weights.shape)}")
    c = token_weights.shape[2]
    if out.dim() != 4 or out.shape[:2] != (b, c):
        raise ValueError(f"out must be [B={b}, C={c}, R_h, R_w], got {tuple(out.shape)}")
    if out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError("out must be a contiguous float32 tensor")
    if out.device != q.device or k.device != q.device:
        raise ValueError("q, k and out must be on the same device")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if mode == "none" and (h, w) != tuple(out.shape[2:]):
        raise ValueError(
            f"mode 'none' needs hw == out's size, got {(h, w)} vs {tuple(out.shape[2:])}")
    return b, heads, n, d, l_tokens, c, h, w


def accumulate_class_attention_ref(q, k, token_weights, out, *, hw, scale, weight=1.0,
                                   mode="none", clamp=False, key_valid=None):
    """Reference (plain torch) version of :func:`accumulate_class_attention`; the definition.

    key_valid: optional [B, L] bool, the keys each sample's softmax runs over (a padded
    prompt); the kernels take none, their callers pass each sample's valid prefix instead.
    """
    b, _, _, _, _, c, h, w = _check_args(q, k, token_weights, out, hw, mode)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if key_valid is not None:
        scores = scores.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1)
    mean = probs.mean(dim=1)  # [B, N, L]
    maps = torch.matmul(mean, token_weights.to(device=q.device, dtype=torch.float32))
    maps = maps.transpose(1, 2).reshape(b, c, h, w)
    maps = resize(maps, tuple(out.shape[2:]), mode)
    if clamp:
        maps = maps.clamp_min(0.0)
    out.add_(maps, alpha=weight)
    return out


# --------------------------------------------------------------------------------------------
# numba (CPU)
# --------------------------------------------------------------------------------------------

# Constants of the float32 exp used by the numba kernel (Cephes' expf: Cody-Waite reduction by
# ln 2 split in two parts, degree-6 polynomial; <= 2 ulp on the range a softmax needs).
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_P0 = np.float32(1.9875691500e-4)
_EXP_P1 = np.float32(1.3981999507e-3)
_EXP_P2 = np.float32(8.3334519073e-3)
_EXP_P3 = np.float32(4.1665795894e-2)
_EXP_P4 = np.float32(1.6666665459e-1)
_EXP_P5 = np.float32(5.0000001201e-1)
# exp(x) for x below this is < 2^-125; clamping keeps the exponent bits valid and the error
# absolute (<= 2e-38), which is irrelevant next to the row maximum's exp(0) = 1.
_EXP_MIN = np.float32(-87.0)

_nb = numba_module()

if _nb is not None:
    @_nb.njit(parallel=True, fastmath=False, cache=True)
    def _class_maps_nb(q, k, tw, scale, weight, clamp, direct, dst, tile):
        """q [B,H,N,D], k [B,H,L,D], tw [B,L,C] (float32); dst [B,C,N] is written, or
        accumulated into as ``dst += weight * clamp?(maps)`` when ``direct``. ``tile`` query
        rows form one parallel work item."""
        n_b, n_h, n_q, n_d = q.shape
        n_l = k.shape[2]
        n_c = tw.shape[2]
        n_tiles = (n_q + tile - 1) // tile
        zero = np.float32(0.0)
        heads = np.float32(n_h)
        l4 = n_l - n_l % 4
        d4 = n_d - n_d % 4
        for job in _nb.prange(n_b * n_tiles):
            b = job // n_tiles
            n0 = (job - b * n_tiles) * tile
            t = min(tile, n_q - n0)
            # Everything is laid out [token, row] so that every inner loop runs over the
            # contiguous rows: softmax max/sum become element-wise across rows, and nothing needs
            # the re-association that fastmath=False forbids.
            qs = np.empty((n_d, t), np.float32)
            s = np.empty((n_l, t), np.float32)
            acc = np.zeros((n_l, t), np.float32)
            mx = np.empty(t, np.float32)
            tot = np.empty(t, np.float32)
            bits = np.empty(t, np.int32)
            pow2 = bits.view(np.float32)
            for hd in range(n_h):
                for i in range(t):
                    for dd in range(n_d):
                        qs[dd, i] = q[b, hd, n0 + i, dd]
                # Scores, 4 tokens x 4 dims per pass: each dot product is still summed in
                # order d = 0, 1, 2, ... (bitwise the naive loop), with 4x fewer loads/stores.
                for j in range(0, l4, 4):
                    for i in range(t):
                        s[j, i] = zero
                        s[j + 1, i] = zero
                        s[j + 2, i] = zero
                        s[j + 3, i] = zero
                    for dd in range(0, d4, 4):
                        a0 = k[b, hd, j, dd]
                        a1 = k[b, hd, j, dd + 1]
                        a2 = k[b, hd, j, dd + 2]
                        a3 = k[b, hd, j, dd + 3]
                        b0 = k[b, hd, j + 1, dd]
                        b1 = k[b, hd, j + 1, dd + 1]
                        b2 = k[b, hd, j + 1, dd + 2]
                        b3 = k[b, hd, j + 1, dd + 3]
                        c0 = k[b, hd, j + 2, dd]
                        c1 = k[b, hd, j + 2, dd + 1]
                        c2 = k[b, hd, j + 2, dd + 2]
                        c3 = k[b, hd, j + 2, dd + 3]
                        e0 = k[b, hd, j + 3, dd]
                        e1 = k[b, hd, j + 3, dd + 1]
                        e2 = k[b, hd, j + 3, dd + 2]
                        e3 = k[b, hd, j + 3, dd + 3]
                        for i in range(t):
                            x0 = qs[dd, i]
                            x1 = qs[dd + 1, i]
                            x2 = qs[dd + 2, i]
                            x3 = qs[dd + 3, i]
                            s[j, i] = (((s[j, i] + x0 * a0) + x1 * a1) + x2 * a2) + x3 * a3
                            s[j + 1, i] = (((s[j + 1, i] + x0 * b0) + x1 * b1) + x2 * b2) + x3 * b3
                            s[j + 2, i] = (((s[j + 2, i] + x0 * c0) + x1 * c1) + x2 * c2) + x3 * c3
                            s[j + 3, i] = (((s[j + 3, i] + x0 * e0) + x1 * e1) + x2 * e2) + x3 * e3
                    for dd in range(d4, n_d):
                        a0 = k[b, hd, j, dd]
                        b0 = k[b, hd, j + 1, dd]
                        c0 = k[b, hd, j + 2, dd]
                        e0 = k[b, hd, j + 3, dd]
                        for i in range(t):
                            x0 = qs[dd, i]
                            s[j, i] += x0 * a0
                            s[j + 1, i] += x0 * b0
                            s[j + 2, i] += x0 * c0
                            s[j + 3, i] += x0 * e0
                for j in range(l4, n_l):
                    for i in range(t):
                        s[j, i] = zero
                    for dd in range(n_d):
                        a0 = k[b, hd, j, dd]
                        for i in range(t):
                            s[j, i] += qs[dd, i] * a0
                # Softmax over tokens, per row.
                for i in range(t):
                    mx[i] = np.float32(-np.inf)
                    tot[i] = zero
                for j in range(n_l):
                    for i in range(t):
                        v = s[j, i] * scale
                        s[j, i] = v
                        mx[i] = max(mx[i], v)
                for j in range(n_l):
                    # exp(v) = 2^n * p(r): libm's expf is a call per element that blocks
                    # vectorisation; this polynomial vectorises and stays within ~2 ulp.
                    for i in range(t):
                        v = max(s[j, i] - mx[i], _EXP_MIN)
                        n = np.floor(v * _LOG2E + np.float32(0.5))
                        r = (v - n * _LN2_HI) - n * _LN2_LO
                        p = _EXP_P0
                        p = p * r + _EXP_P1
                        p = p * r + _EXP_P2
                        p = p * r + _EXP_P3
                        p = p * r + _EXP_P4
                        p = p * r + _EXP_P5
                        s[j, i] = (p * r * r + r) + np.float32(1.0)
                        bits[i] = (np.int32(n) + np.int32(127)) << np.int32(23)
                    for i in range(t):
                        e = s[j, i] * pow2[i]
                        s[j, i] = e
                        tot[i] += e
                for j in range(n_l):
                    for i in range(t):
                        acc[j, i] += s[j, i] / tot[i]
            # Head mean, then the class columns.
            for cc in range(n_c):
                for i in range(t):
                    mx[i] = zero
                for j in range(n_l):
                    wj = tw[b, j, cc]
                    for i in range(t):
                        mx[i] += (acc[j, i] / heads) * wj
                if direct:
                    for i in range(t):
                        v = mx[i]
                        if clamp and v < zero:
                            v = zero
                        dst[b, cc, n0 + i] += weight * v
                else:
                    for i in range(t):
                        dst[b, cc, n0 + i] = mx[i]

    @_nb.njit(parallel=True, fastmath=False, cache=True)
    def _resize_acc_nb(maps, iy, wy, ix, wx, weight, clamp, out):
        """out[b,c] += weight * clamp?(Wy @ maps[b,c] @ Wx^T), with the matrices as sparse taps."""
        n_b, n_c, _, n_w = maps.shape
        out_h = out.shape[2]
        out_w = out.shape[3]
        ky = iy.shape[1]
        kx = ix.shape[1]
        zero = np.float32(0.0)
        for job in _nb.prange(n_b * n_c * out_h):
            bc = job // out_h
            y = job - bc * out_h
            b = bc // n_c
            c = bc - b * n_c
            row = np.zeros(n_w, np.float32)
            for a in range(ky):
                src = iy[y, a]
                wa = wy[y, a]
                for j in range(n_w):
                    row[j] += wa * maps[b, c, src, j]
            for x in range(out_w):
                v = zero
                for tap in range(kx):
                    v += wx[x, tap] * row[ix[x, tap]]
                if clamp and v < zero:
                    v = zero
                out[b, c, y, x] += weight * v


def accumulate_class_attention_numba(q, k, token_weights, out, *, hw, scale, weight=1.0,
                                     mode="none", clamp=False):
    """numba (CPU, parallel) version of :func:`accumulate_class_attention`.

    CUDA tensors are copied to the host and the result copied back (slow; for testing).
    """
    if _nb is None:
        raise RuntimeError("numba is not available")
    _, _, _, _, _, _, h, w = _check_args(q, k, token_weights, out, hw, mode)
    host_out = out if out.device.type == "cpu" else out.cpu()
    qn = q.detach().to("cpu", torch.float32).contiguous().numpy()
    kn = k.detach().to("cpu", torch.float32).contiguous().numpy()
    twn = token_weights.detach().to("cpu", torch.float32).contiguous().numpy()
    out_np = host_out.numpy()
    f_scale = np.float32(scale)
    f_weight = np.float32(weight)
    with torch_threads_kept():
        _class_maps_numba(qn, kn, twn, out_np, f_scale, f_weight, bool(clamp), mode, (h, w))
    if host_out is not out:
        out.copy_(host_out)
    return out


def _class_maps_numba(qn, kn, twn, out_np, f_scale, f_weight, clamp, mode, hw):
    b, _, n, _ = qn.shape
    c = twn.shape[2]
    h, w = hw
    out_h, out_w = out_np.shape[2], out_np.shape[3]
    # The kernel vectorises along the query rows of a tile, so tiles should fill several SIMD
    # registers; halve them when that would leave a core idle (e.g. the 8x8 layers).
    tile = 64
    if b * -(-n // tile) < 2 * _nb.get_num_threads():
        tile = 32
    if mode == "none":
        _class_maps_nb(qn, kn, twn, f_scale, f_weight, bool(clamp), True,
                       out_np.reshape(b, c, n), tile)
    else:
        maps = np.empty((b, c, n), np.float32)
        _class_maps_nb(qn, kn, twn, f_scale, f_weight, bool(clamp), False, maps, tile)
        iy, wy = interp_taps_np(h, out_h, mode)
        ix, wx = interp_taps_np(w, out_w, mode)
        _resize_acc_nb(maps.reshape(b, c, h, w), iy, wy, ix, wx, f_weight, bool(clamp), out_np)


# --------------------------------------------------------------------------------------------
# triton (GPU; CPU tensors under TRITON_INTERPRET=1)
# --------------------------------------------------------------------------------------------

_tr = triton_modules()

if _tr is not None:
    triton, tl = _tr

    @triton.jit
    def _head_scores(q_base, k_base, offs_n, mask_n, offs_l, mask_l, D, sq_n, sk_l, scale,
                     BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
                     F32_DOT: tl.constexpr):
        # One head's scaled scores of BLOCK_N query rows against BLOCK_L keys, -inf on keys
        # past L; the head dim walked in BLOCK_D chunks.
        s = tl.zeros([BLOCK_N, BLOCK_L], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            q = tl.load(q_base + offs_n[:, None] * sq_n + offs_d[None, :],
                        mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            k = tl.load(k_base + offs_l[:, None] * sk_l + offs_d[None, :],
                        mask=mask_l[:, None] & mask_d[None, :], other=0.0)
            if F32_DOT:
                # "ieee": tf32 would cost ~1e-3 relative error in the scores.
                s += tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)),
                            input_precision="ieee")
            else:
                # fp16/bf16 products are exact in fp32 and the tensor cores accumulate in
                # fp32, so this equals the fp32 reference up to summation order.
                s += tl.dot(q, tl.trans(k), out_dtype=tl.float32)
        return tl.where(mask_l[None, :], s * scale, float("-inf"))

    @triton.jit
    def _store_maps(dst_ptr, m, b, g, offs_n, mask_n, offs_c, mask_c, N, C, weight,
                    DIRECT: tl.constexpr, CLAMP: tl.constexpr):
        # This program's class maps [BLOCK_N, BLOCK_C]: added into the accumulator (DIRECT),
        # else stored at dst[g] for the launcher to combine.
        dst = dst_ptr + ((g * tl.num_programs(0) + b) * C + offs_c[None, :]) * N + offs_n[:, None]
        mask = mask_n[:, None] & mask_c[None, :]
        if DIRECT:
            if CLAMP:
                m = tl.maximum(m, 0.0)
            old = tl.load(dst, mask=mask, other=0.0)
            tl.store(dst, old + weight * m, mask=mask)
        else:
            tl.store(dst, m, mask=mask)

    @triton.jit
    def class_attn_kernel(q_ptr, k_ptr, tw_ptr, dst_ptr, N, L, D, C, C0: tl.constexpr, H, HPG,
                           sq_b, sq_h, sq_n, sk_b, sk_h, sk_l, scale, weight,
                           BLOCK_N: tl.constexpr,
                           BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
                           F32_DOT: tl.constexpr, DIRECT: tl.constexpr, CLAMP: tl.constexpr):
        # One program: one sample b, BLOCK_N query rows, the HPG heads of head group g, the
        # classes C0 .. C0 + BLOCK_C of C (a compile-time offset: a runtime one held more
        # registers, and ptxas spilled 4-16 bytes at sm_90). q and k are read through their
        # strides (the head dim must be contiguous): the projections' [B, N, H*D] views need
        # no copy. The head dim is walked in BLOCK_D chunks (one chunk for D <= BLOCK_D). With
        # several head groups (grid axis 2), each stores its partial maps at dst[g] and the
        # launcher sums them in a fixed order.
        b = tl.program_id(0)
        pid_n = tl.program_id(1)
        g = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_l = tl.arange(0, BLOCK_L)
        offs_c = C0 + tl.arange(0, BLOCK_C)
        mask_n = offs_n < N
        mask_l = offs_l < L
        mask_c = offs_c < C
        acc = tl.zeros([BLOCK_N, BLOCK_L], dtype=tl.float32)
        for hd in range(g * HPG, tl.minimum(H, g * HPG + HPG)):
            s = _head_scores(q_ptr + b * sq_b + hd * sq_h, k_ptr + b * sk_b + hd * sk_h,
                             offs_n, mask_n, offs_l, mask_l, D, sq_n, sk_l, scale,
                             BLOCK_N, BLOCK_L, BLOCK_D, F32_DOT)
            mx = tl.max(s, axis=1)
            p = tl.exp(s - mx[:, None])
            den = tl.sum(p, axis=1)
            acc += p / den[:, None]
        acc = acc / H
        tw = tl.load(tw_ptr + (b * L + offs_l[:, None]) * C + offs_c[None, :],
                     mask=mask_l[:, None] & mask_c[None, :], other=0.0)
        m = tl.dot(acc, tw, input_precision="ieee")  # [BLOCK_N, BLOCK_C]
        _store_maps(dst_ptr, m, b, g, offs_n, mask_n, offs_c, mask_c, N, C, weight, DIRECT,
                    CLAMP)

    @triton.jit
    def class_attn_long_kernel(q_ptr, k_ptr, tw_ptr, dst_ptr, N, L, D, C, C0: tl.constexpr,
                               H, HPG, sq_b,
                               sq_h, sq_n, sk_b, sk_h, sk_l, scale, weight,
                               BLOCK_N: tl.constexpr,
                               BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
                               BLOCK_C: tl.constexpr, F32_DOT: tl.constexpr,
                               DIRECT: tl.constexpr, CLAMP: tl.constexpr):
        # `class_attn_kernel` for text longer than one tile (T5 contexts: PixArt's 300 keys,
        # SD3's 333, Flux's 512): per head, a first sweep over the key tiles keeps each row's
        # running softmax maximum and normaliser (rescaled as the maximum grows, as flash
        # attention does); a second sweep recomputes each tile's scores and adds its
        # probabilities times that tile's token weights into the class tile. Nothing held
        # grows with L; the scores cost two passes.
        b = tl.program_id(0)
        pid_n = tl.program_id(1)
        g = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_c = C0 + tl.arange(0, BLOCK_C)
        mask_n = offs_n < N
        mask_c = offs_c < C
        acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
        for hd in range(g * HPG, tl.minimum(H, g * HPG + HPG)):
            q_base = q_ptr + b * sq_b + hd * sq_h
            k_base = k_ptr + b * sk_b + hd * sk_h
            row_max = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
            row_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
            for l0 in range(0, L, BLOCK_L):
                offs_l = l0 + tl.arange(0, BLOCK_L)
                s = _head_scores(q_base, k_base, offs_n, mask_n, offs_l, offs_l < L, D, sq_n,
                                 sk_l, scale, BLOCK_N, BLOCK_L, BLOCK_D, F32_DOT)
                new_max = tl.maximum(row_max, tl.max(s, axis=1))
                row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(
                    tl.exp(s - new_max[:, None]), axis=1)
                row_max = new_max
            for l0 in range(0, L, BLOCK_L):
                offs_l = l0 + tl.arange(0, BLOCK_L)
                mask_l = offs_l < L
                s = _head_scores(q_base, k_base, offs_n, mask_n, offs_l, mask_l, D, sq_n, sk_l,
                                 scale, BLOCK_N, BLOCK_L, BLOCK_D, F32_DOT)
                p = tl.exp(s - row_max[:, None]) / row_sum[:, None]
                tw = tl.load(tw_ptr + (b * L + offs_l[:, None]) * C + offs_c[None, :],
                             mask=mask_l[:, None] & mask_c[None, :], other=0.0)
                acc += tl.dot(p, tw, input_precision="ieee")
        acc = acc / H
        _store_maps(dst_ptr, acc, b, g, offs_n, mask_n, offs_c, mask_c, N, C, weight, DIRECT,
                    CLAMP)

    @triton.jit
    def _resize_acc_kernel(src_ptr, wy_ptr, wx_ptr, out_ptr, h, w, RH, RW, weight,
                           BLOCK_R: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                           BLOCK_W: tl.constexpr, CLAMP: tl.constexpr):
        # One program: one (b, c) map, a BLOCK_R x BLOCK_Q tile of output pixels:
        # tile = (Wy[rows, :] @ map) @ Wx[cols, :]^T, the first product summed over BLOCK_K
        # chunks of source rows (exact-fp32 dots unroll per chunk, so chunks bound the code).
        bc = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        offs_w = tl.arange(0, BLOCK_W)
        mask_r = rows < RH
        mask_q = cols < RW
        mask_w = offs_w < w
        t = tl.zeros([BLOCK_R, BLOCK_W], dtype=tl.float32)
        for k0 in range(0, h, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < h
            wy = tl.load(wy_ptr + rows[:, None] * h + offs_k[None, :],
                         mask=mask_r[:, None] & mask_k[None, :], other=0.0)
            mp = tl.load(src_ptr + bc * h * w + offs_k[:, None] * w + offs_w[None, :],
                         mask=mask_k[:, None] & mask_w[None, :], other=0.0)
            t += tl.dot(wy, mp, input_precision="ieee")
        wx = tl.load(wx_ptr + cols[:, None] * w + offs_w[None, :],
                     mask=mask_q[:, None] & mask_w[None, :], other=0.0)
        v = tl.dot(t, tl.trans(wx), input_precision="ieee")  # [BLOCK_R, BLOCK_Q]
        if CLAMP:
            v = tl.maximum(v, 0.0)
        dst = out_ptr + bc * RH * RW + rows[:, None] * RW + cols[None, :]
        mask = mask_r[:, None] & mask_q[None, :]
        old = tl.load(dst, mask=mask, other=0.0)
        tl.store(dst, old + weight * v, mask=mask)


def attn_blocks(l_tokens: int, d: int, c: int, dtype: torch.dtype) -> dict:
    """Tile sizes and dot flavour of ``class_attn_kernel`` for these shapes (the launcher
    takes them from `attn_tiles`, which says which shapes go to which kernel).

    The score and probability tiles grow with BLOCK_N x BLOCK_L and the class tile with
    BLOCK_N x BLOCK_C, so BLOCK_N shrinks as the class tile grows (the launcher passes at most
    ``TRITON_MAX_BLOCK_C`` classes: it runs more in launches of that many). A 64-wide D chunk
    alone pushed the fp16 kernel to 255 registers and spills, 32 does not.
    """
    # fp16/bf16 scores use the tensor cores directly. fp32 inputs need exact-fp32 (FMA) dots;
    # so does bf16 in the interpreter (see _INTERPRETER_BF16_MMA).
    f32_dot = dtype == torch.float32 or (
        dtype == torch.bfloat16 and triton_interpreting() and not _INTERPRETER_BF16_MMA)
    block_l = _next_pow2(l_tokens)
    block_c = _next_pow2(c)
    if f32_dot:
        # FMA dots unroll into code that grows with the tile. 32 rows with 32 or 64 classes
        # spilled 12 bytes at sm_80 with 32-key tiles (ptxas -v); 16 rows do not.
        block_n = 32 if block_c <= 16 else 16
        block_d = 16
    else:
        block_n = 64 if block_c <= 16 else 32 if block_c <= 32 else 16
        block_d = 32
    if block_l > 128:  # more than 128 tokens: keep the score rows in registers
        block_n = min(block_n, 32)
    return {
        "BLOCK_N": block_n,
        "BLOCK_L": block_l,
        # D = 40 -> two chunks of 32 (fp32: three of 16); D = 80/160 -> 3/5 chunks of 32.
        "BLOCK_D": min(_next_pow2(d), block_d),
        "BLOCK_C": block_c,
        "F32_DOT": f32_dot,
    }


def attn_blocks_long(d: int, c: int, dtype: torch.dtype) -> dict:
    """Tiles of ``class_attn_long_kernel``: a fixed key tile (the sweeps walk L) of 64 keys,
    32 for exact-fp32 dots, and `attn_blocks`'s row tile for it, 32 rows for exact-fp32 dots.
    Per ptxas -v, fp32 with 64-key tiles spilled 12-32 bytes at sm_80 whatever the row tile
    (16 or 32); with 32-key tiles, 16 rows spilled 12-40 bytes at sm_90 (32 or 64 classes) and
    32 rows use 106-110 registers and do not spill."""
    blocks = attn_blocks(64, d, c, dtype)
    if blocks["F32_DOT"]:
        blocks = dict(attn_blocks(32, d, c, dtype), BLOCK_N=32)
    return blocks


def attn_tiles(l_tokens: int, d: int, c: int, dtype: torch.dtype) -> tuple[bool, dict]:
    """``(long, tiles)``: whether the launcher runs these shapes (at most ``TRITON_MAX_BLOCK_C``
    classes: it launches more in tiles of that many) with `class_attn_long_kernel` rather than
    `class_attn_kernel`, and that kernel's tiles.

    For head dims above 16 (every model family's: 40-160) every tile this returns, for any
    text length, compiles at 8 warps for sm_80 and sm_90 with no register spills, per ptxas
    -v, in fp16, bf16 and fp32 (tests/kernels/test_class_attention.py asserts it for every
    tile the launchers pick); fp16/bf16 with head dims up to 16 take a 16-wide D chunk, which
    is not checked. The one-tile kernel takes up to ``TRITON_MAX_KEYS`` keys, except with
    exact-fp32 dots, 65-128 keys and more than 32 classes, where every row tile (16, 32, 64)
    spilled 12 to about 700 bytes at sm_80 or sm_90: those take the two sweeps too.
    """
    blocks = attn_blocks(l_tokens, d, c, dtype)
    long_text = blocks["BLOCK_L"] > TRITON_MAX_KEYS or (
        blocks["F32_DOT"] and blocks["BLOCK_L"] > 64 and blocks["BLOCK_C"] > 32)
    return (True, attn_blocks_long(d, c, dtype)) if long_text else (False, blocks)


def resize_blocks(w: int) -> dict:
    """Tiles of ``_resize_acc_kernel`` for maps ``w`` wide (up to ``_TRITON_MAX_SIDE``): a
    full map row (BLOCK_W), source rows in chunks of 32 and 32 x 32 output pixels per program;
    16 x 16 for 128-wide rows, where 32 x 32 spilled 152-208 bytes at 255 registers (sm_80,
    sm_90; ptxas -v)."""
    block_w = _next_pow2(w)
    side = 16 if block_w > 64 else 32
    return {"BLOCK_R": side, "BLOCK_Q": side, "BLOCK_K": 32, "BLOCK_W": block_w}


_SM_COUNTS: dict = {}


def head_groups(programs: int, heads: int, device: torch.device) -> int:
    """Head groups (grid axis 2) for a launch of `programs` (sample, row-tile) programs: on a
    GPU with more SMs than that (the 16x16 layers of SD at batch 1: 4 programs on 132 SMs),
    the heads are split so that the launch fills the SMs; 1 elsewhere."""
    if device.type != "cuda" or heads <= 1:
        return 1
    sms = _SM_COUNTS.get(device.index)
    if sms is None:
        sms = _SM_COUNTS[device.index] = torch.cuda.get_device_properties(
            device).multi_processor_count
    if programs >= sms:
        return 1
    return min(heads, -(-sms // programs))


def accumulate_class_attention_triton(q, k, token_weights, out, *, hw, scale, weight=1.0,
                                      mode="none", clamp=False, groups=None):
    """Triton version of :func:`accumulate_class_attention` (CUDA, or CPU tensors under
    ``TRITON_INTERPRET=1``). Up to ``TRITON_MAX_KEYS`` text keys a query row's every score
    is held in one tile (`class_attn_kernel`); longer text sweeps the keys in tiles twice
    (`class_attn_long_kernel`; `attn_tiles` chooses). q and k are read through their strides
    (only the head dim must be contiguous). ``groups``: head groups, each a set of programs
    whose partial maps are summed afterwards (None: `head_groups`, which splits small layers
    on a GPU)."""
    if _tr is None:
        raise RuntimeError("triton is not available")
    b, heads, n, d, l_tokens, c, h, w = _check_args(q, k, token_weights, out, hw, mode)
    out_h, out_w = out.shape[2], out.shape[3]
    if q.dtype != k.dtype or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        q, k = q.float(), k.float()
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    tw = token_weights.to(device=q.device, dtype=torch.float32).contiguous()
    # More classes than the widest class tile: a launch per tile of classes (each computes
    # the softmax again), so that no tile wider than the ones checked is built.
    c_tile = min(c, TRITON_MAX_BLOCK_C)
    long_text, blocks = attn_tiles(l_tokens, d, c_tile, q.dtype)
    tiles = triton.cdiv(n, blocks["BLOCK_N"])
    groups = groups or head_groups(b * tiles, heads, q.device)
    per_group = -(-heads // groups)
    groups = -(-heads // per_group)  # no empty group
    direct = mode == "none" and groups == 1
    if direct:
        dst = out
    elif groups == 1:
        dst = torch.empty((b, c, h, w), device=q.device, dtype=torch.float32)
    else:
        dst = torch.empty((groups, b, c, h, w), device=q.device, dtype=torch.float32)
    kernel = class_attn_long_kernel if long_text else class_attn_kernel
    for c0 in range(0, c, c_tile):
        # CLAMP only acts with DIRECT (else it is applied after the combine or the resize):
        # one specialisation less to compile.
        kernel[(b, tiles, groups)](
            q, k, tw, dst, n, l_tokens, d, c, c0, heads, per_group, q.stride(0), q.stride(1),
            q.stride(2), k.stride(0), k.stride(1), k.stride(2), float(scale), float(weight),
            DIRECT=direct, CLAMP=direct and bool(clamp), num_warps=_TRITON_NUM_WARPS,
            **blocks)
    if groups > 1:
        dst = dst.sum(dim=0)  # a fixed order: the same bits every run
        if mode == "none":
            out.add_(dst.clamp_min(0.0) if clamp else dst, alpha=weight)
            return out
    if direct:
        return out
    if w > _TRITON_MAX_SIDE:
        maps = resize(dst, (out_h, out_w), mode)
        if clamp:
            maps = maps.clamp_min(0.0)
        out.add_(maps, alpha=weight)
        return out
    wy = interp_matrix(h, out_h, mode, device=q.device)
    wx = interp_matrix(w, out_w, mode, device=q.device)
    rblocks = resize_blocks(w)
    grid2 = (b * c, triton.cdiv(out_h, rblocks["BLOCK_R"]),
             triton.cdiv(out_w, rblocks["BLOCK_Q"]))
    _resize_acc_kernel[grid2](dst, wy, wx, out, h, w, out_h, out_w, float(weight),
                              CLAMP=bool(clamp), num_warps=_TRITON_NUM_WARPS, **rblocks)
    return out


_IMPLS = {
    "ref": accumulate_class_attention_ref,
    "numba": accumulate_class_attention_numba,
    "triton": accumulate_class_attention_triton,
}


def accumulate_class_attention(q, k, token_weights, out, *, hw, scale, weight=1.0, mode="none",
                               clamp=False, impl=None):
    """Add the class-token attention maps of one attention call into ``out`` (in place).

    Args:
        q: ``[B, H, N, D]`` queries (conditional half), ``N = hw[0] * hw[1]``; fp32/fp16/bf16.
        k: ``[B, H, L, D]`` text keys.
        token_weights: ``[B, L, C]`` float32; column c weights the tokens of class c.
        out: ``[B, C, R_h, R_w]`` contiguous float32 accumulator.
        hw: ``(h, w)`` of the query grid.
        scale: softmax scale (usually ``D ** -0.5``).
        weight: factor applied to this call's maps before accumulation.
        mode: ``"none"`` (needs ``hw == (R_h, R_w)``), ``"nearest"``, ``"bilinear"`` or
            ``"bicubic"`` (``F.interpolate`` semantics, ``align_corners=False``).
        clamp: clamp the resized maps at zero before accumulating.
        impl: ``None`` (``ATTNSEG_KERNEL_IMPL`` or by device), ``"ref"``, ``"triton"``,
            ``"numba"``.

    Computes ``out += weight * [clamp](resize(mean_h(softmax(scale * q k^T)) @ token_weights))``
    with the softmax in float32, and returns ``out``.
    """
    which = resolve_impl(impl, q.device)
    return _IMPLS[which](q, k, token_weights, out, hw=hw, scale=scale, weight=weight, mode=mode,
                         clamp=clamp)
