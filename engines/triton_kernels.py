"""Entry points of the Triton kernels for ahead-of-time use: the C-ABI library built by
CMakeLists.txt (`python -m triton.tools.compile`) and the TensorRT plugin (PTX).

They are thin wrappers around the kernels in `attnseg.kernels` (the single source of the GPU
code), adapting the argument lists to what each consumer can pass:

- the AOT tool's launch grid can only name kernel arguments, so the batch `B` is one; it
  passes fp32 scalars as C doubles (triton 3.9's C type map), which the kernel would read
  wrongly, so float parameters travel as their IEEE-754 bits in int32 (`*_bits`);
- TensorRT's AOT plugins pass (input pointers, int32 scalars, output pointers) and nothing
  else, so the softmax scale is a compile-time constant there.

This file is executed standalone by `triton.tools.compile`, hence absolute imports only.
"""

import triton
import triton.language as tl

from attnseg.kernels.class_attention import class_attn_kernel, class_attn_long_kernel
from attnseg.kernels.finalize import finalize_kernel


@triton.jit
def class_attention_maps_aot(q_ptr, k_ptr, tw_ptr, dst_ptr, B, N, L, D, C, H, scale_bits,
                             BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
                             BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
                             F32_DOT: tl.constexpr):
    # dst[b, c, n] = sum_l mean_h softmax(scale q k^T)[b, h, n, l] * tw[b, l, c]; grid (B, N/BN)
    scale = scale_bits.to(tl.float32, bitcast=True)
    class_attn_kernel(q_ptr, k_ptr, tw_ptr, dst_ptr, N, L, D, C, 0, H, H, H * N * D, N * D, D,
                       H * L * D, L * D, D, scale, 1.0, BLOCK_N, BLOCK_L, BLOCK_D, BLOCK_C,
                       F32_DOT, False, False)


@triton.jit
def class_attention_maps_plugin(q_ptr, k_ptr, tw_ptr, B, N, L, D, C, H, dst_ptr,
                                SCALE: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
                                BLOCK_C: tl.constexpr, F32_DOT: tl.constexpr,
                                LONG: tl.constexpr):
    # The same maps in TensorRT's AOT-plugin calling convention (contiguous q and k), with the
    # launcher's choice of kernel made at compile time: the two key sweeps for long text.
    if LONG:
        class_attn_long_kernel(q_ptr, k_ptr, tw_ptr, dst_ptr, N, L, D, C, 0, H, H, H * N * D,
                               N * D, D, H * L * D, L * D, D, SCALE, 1.0, BLOCK_N, BLOCK_L,
                               BLOCK_D, BLOCK_C, F32_DOT, False, False)
    else:
        class_attn_kernel(q_ptr, k_ptr, tw_ptr, dst_ptr, N, L, D, C, 0, H, H, H * N * D, N * D,
                          D, H * L * D, L * D, D, SCALE, 1.0, BLOCK_N, BLOCK_L, BLOCK_D,
                          BLOCK_C, F32_DOT, False, False)


@triton.jit
def finalize_masks_aot(norm_ptr, ids_ptr, iy_ptr, wy_ptr, ix_ptr, wx_ptr, lab_ptr, rel_ptr, B,
                       C, MH, MW, H, W, bg_const_bits, bg_slope_bits, ignore_low_bits,
                       ignore_high_bits, KY: tl.constexpr, KX: tl.constexpr,
                       BLOCK_P: tl.constexpr):
    # Labels and reliability from normalised maps; grid (B, H*W/BLOCK_P).
    finalize_kernel(norm_ptr, ids_ptr, iy_ptr, wy_ptr, ix_ptr, wx_ptr, lab_ptr, rel_ptr, C, MH,
                     MW, H, W, bg_const_bits.to(tl.float32, bitcast=True),
                     bg_slope_bits.to(tl.float32, bitcast=True),
                     ignore_low_bits.to(tl.float32, bitcast=True),
                     ignore_high_bits.to(tl.float32, bitcast=True), KY, KX, BLOCK_P)
