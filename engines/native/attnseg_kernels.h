/* attnseg_kernels: attnseg's Triton kernels, compiled ahead of time (cubins for sm_80 and
 * sm_90 embedded), behind a plain C ABI for torch-free deployment (TensorRT + pycuda).
 *
 * The CUDA driver is not linked: it is opened at run time (dlopen "libcuda.so.1"), so the
 * library builds and loads on machines without a GPU. Every entry point runs on the CUDA
 * context current on the calling thread (e.g. pycuda's) and the given stream; device pointers
 * are plain 64-bit integers. Functions return ATTNSEG_OK (0) or an error code, with a message
 * from attnseg_kernels_last_error().
 */
#ifndef ATTNSEG_KERNELS_H
#define ATTNSEG_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define ATTNSEG_API __attribute__((visibility("default")))
#else
#define ATTNSEG_API
#endif

enum {
  ATTNSEG_OK = 0,
  ATTNSEG_ERR_NO_DRIVER = 1, /* libcuda could not be opened or lacks a function */
  ATTNSEG_ERR_ARCH = 2,      /* the current GPU's architecture has no embedded cubin */
  ATTNSEG_ERR_ARGS = 3,      /* sizes out of the compiled kernels' range */
  ATTNSEG_ERR_CUDA = 4       /* the driver reported an error (see the message) */
};

enum { ATTNSEG_FLOAT32 = 0, ATTNSEG_FLOAT16 = 1 };

/* Opens the CUDA driver; called by the other entry points on first use. */
ATTNSEG_API int attnseg_kernels_init(void);
/* The message of the last error on this thread ("" if none). */
ATTNSEG_API const char *attnseg_kernels_last_error(void);
/* Comma-separated SM architectures with embedded cubins, e.g. "80,90". */
ATTNSEG_API const char *attnseg_kernels_archs(void);

/* Class-token attention maps of one attention layer (the cond half):
 *   dst[b, c, n] = sum_l (1/H sum_h softmax_l(scale * q[b,h,n,:] . k[b,h,l,:])) * tw[b, l, c]
 * q [B, H, N, D], k [B, H, L, D] (dtype ATTNSEG_FLOAT16 or ATTNSEG_FLOAT32, contiguous),
 * tw [B, L, C] float32, dst [B, C, N] float32 (written). L <= 128, C <= 16. */
ATTNSEG_API int attnseg_class_attention_maps(void *stream, int dtype, uint64_t q, uint64_t k,
                                             uint64_t tw, uint64_t dst, int B, int N, int L,
                                             int D, int C, int H, float scale);

/* Label map and reliability from normalised maps norm [B, C, MH, MW] float32 and class ids
 * [B, C] int64, resampled to H x W with `taps` (1, 2 or 4) interpolation taps per axis given as
 * iy/ix [H|W, taps] int32 and wy/wx [H|W, taps] float32 (attnseg.kernels.interp.interp_taps).
 * labels and reliability: [B, H, W] uint8 (written). Same rules as
 * attnseg.kernels.finalize.finalize_masks. */
ATTNSEG_API int attnseg_finalize_masks(void *stream, uint64_t norm, uint64_t ids, uint64_t iy,
                                       uint64_t wy, uint64_t ix, uint64_t wx, uint64_t labels,
                                       uint64_t reliability, int B, int C, int MH, int MW, int H,
                                       int W, int taps, float bg_const, float bg_slope,
                                       float ignore_low, float ignore_high);

#ifdef __cplusplus
}
#endif
#endif /* ATTNSEG_KERNELS_H */
