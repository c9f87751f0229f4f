/* Test driver for libattnseg_kernels: without a CUDA driver it checks that the library loads
 * and reports the missing driver cleanly; with a GPU it runs both kernels on random inputs and
 * compares them with plain C references. Exit status 0 = pass. */
#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attnseg_kernels.h"

typedef int (*fn_i)(unsigned);
typedef int (*fn_dev)(int *, int);
typedef int (*fn_ctx_retain)(void **, int);
typedef int (*fn_ctx_set)(void *);
typedef int (*fn_alloc)(uint64_t *, size_t);
typedef int (*fn_free)(uint64_t);
typedef int (*fn_h2d)(uint64_t, const void *, size_t);
typedef int (*fn_d2h)(void *, uint64_t, size_t);
typedef int (*fn_sync)(void);

static struct {
  fn_i init;
  fn_dev device_get;
  fn_ctx_retain ctx_retain;
  fn_ctx_set ctx_set;
  fn_alloc alloc;
  fn_free free_;
  fn_h2d h2d;
  fn_d2h d2h;
  fn_sync sync;
} cu;

static int open_driver(void) {
  void *h = dlopen("libcuda.so.1", RTLD_NOW);
  if (!h) return -1;
  *(void **)&cu.init = dlsym(h, "cuInit");
  *(void **)&cu.device_get = dlsym(h, "cuDeviceGet");
  *(void **)&cu.ctx_retain = dlsym(h, "cuDevicePrimaryCtxRetain");
  *(void **)&cu.ctx_set = dlsym(h, "cuCtxSetCurrent");
  *(void **)&cu.alloc = dlsym(h, "cuMemAlloc_v2");
  *(void **)&cu.free_ = dlsym(h, "cuMemFree_v2");
  *(void **)&cu.h2d = dlsym(h, "cuMemcpyHtoD_v2");
  *(void **)&cu.d2h = dlsym(h, "cuMemcpyDtoH_v2");
  *(void **)&cu.sync = dlsym(h, "cuCtxSynchronize");
  return cu.init && cu.device_get && cu.ctx_retain && cu.ctx_set && cu.alloc && cu.free_ &&
                 cu.h2d && cu.d2h && cu.sync
             ? 0
             : -1;
}

static uint64_t upload(const void *host, size_t bytes) {
  uint64_t d = 0;
  if (cu.alloc(&d, bytes) != 0 || cu.h2d(d, host, bytes) != 0) {
    fprintf(stderr, "device allocation/copy failed\n");
    exit(1);
  }
  return d;
}

static float frand(unsigned *state) {
  *state = *state * 1664525u + 1013904223u;
  return ((*state >> 8) / 16777216.0f) * 2.0f - 1.0f;
}

/* IEEE half from float, round to nearest even (normal range only: the test's values are). */
static uint16_t to_half(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u;
  int32_t exp = (int32_t)((x >> 23) & 0xff) - 127 + 15;
  uint32_t mant = x & 0x7fffffu;
  if (exp <= 0) return (uint16_t)sign;
  uint32_t h = sign | ((uint32_t)exp << 10) | (mant >> 13);
  uint32_t rest = mant & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++;
  return (uint16_t)h;
}

static float from_half(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  uint32_t x = exp == 0 ? sign : sign | ((exp - 15 + 127) << 23) | (mant << 13);
  float f;
  memcpy(&f, &x, 4);
  return f;
}

static int check_class_attention(int dtype) {
  enum { B = 2, H = 2, N = 48, L = 77, D = 40, C = 3 };
  static float q[B * H * N * D], k[B * H * L * D], tw[B * L * C], ref[B * C * N], got[B * C * N];
  static uint16_t qh[B * H * N * D], kh[B * H * L * D];
  unsigned st = 1234u + (unsigned)dtype;
  for (int i = 0; i < B * H * N * D; i++) q[i] = frand(&st);
  for (int i = 0; i < B * H * L * D; i++) k[i] = frand(&st);
  for (int i = 0; i < B * L * C; i++) tw[i] = (frand(&st) > 0.6f) ? 1.0f : 0.0f;
  if (dtype == ATTNSEG_FLOAT16) {
    for (int i = 0; i < B * H * N * D; i++) q[i] = from_half(qh[i] = to_half(q[i]));
    for (int i = 0; i < B * H * L * D; i++) k[i] = from_half(kh[i] = to_half(k[i]));
  }
  float scale = 1.0f / sqrtf((float)D);
  for (int b = 0; b < B; b++)
    for (int n = 0; n < N; n++) {
      double mean[L] = {0};
      for (int h = 0; h < H; h++) {
        double s[L], mx = -1e30, tot = 0;
        for (int l = 0; l < L; l++) {
          double acc = 0;
          for (int d = 0; d < D; d++)
            acc += (double)q[((b * H + h) * N + n) * D + d] * k[((b * H + h) * L + l) * D + d];
          s[l] = acc * scale;
          if (s[l] > mx) mx = s[l];
        }
        for (int l = 0; l < L; l++) tot += (s[l] = exp(s[l] - mx));
        for (int l = 0; l < L; l++) mean[l] += s[l] / tot / H;
      }
      for (int c = 0; c < C; c++) {
        double v = 0;
        for (int l = 0; l < L; l++) v += mean[l] * tw[(b * L + l) * C + c];
        ref[(b * C + c) * N + n] = (float)v;
      }
    }
  size_t esz = dtype == ATTNSEG_FLOAT16 ? 2 : 4;
  uint64_t dq = upload(dtype == ATTNSEG_FLOAT16 ? (void *)qh : (void *)q, sizeof q / 4 * esz);
  uint64_t dk = upload(dtype == ATTNSEG_FLOAT16 ? (void *)kh : (void *)k, sizeof k / 4 * esz);
  uint64_t dtw = upload(tw, sizeof tw), ddst = upload(got, sizeof got);
  int status = attnseg_class_attention_maps(NULL, dtype, dq, dk, dtw, ddst, B, N, L, D, C, H,
                                            scale);
  if (status != ATTNSEG_OK) {
    printf("class_attention_maps failed: %s\n", attnseg_kernels_last_error());
    return 1;
  }
  cu.sync();
  cu.d2h(got, ddst, sizeof got);
  double err = 0;
  for (int i = 0; i < B * C * N; i++) err = fmax(err, fabs((double)got[i] - ref[i]));
  double tol = dtype == ATTNSEG_FLOAT16 ? 2e-3 : 1e-5;
  printf("class_attention_maps %s: max abs err %.3g (tolerance %.0g) %s\n",
         dtype == ATTNSEG_FLOAT16 ? "f16" : "f32", err, tol, err <= tol ? "OK" : "FAILED");
  cu.free_(dq), cu.free_(dk), cu.free_(dtw), cu.free_(ddst);
  return err <= tol ? 0 : 1;
}

static int check_finalize(void) {
  /* Same-size maps (1 tap): labels are the argmax over [bg, classes] as the Python op does. */
  enum { B = 2, C = 3, S = 16 };
  static float norm[B * C * S * S], wy[S], wx[S];
  static int64_t ids[B * C] = {3, 7, 0, 12, 5, 9};
  static int32_t iy[S], ix[S];
  static uint8_t lab[B * S * S], rel[B * S * S];
  unsigned st = 99u;
  for (int i = 0; i < B * C * S * S; i++) norm[i] = 0.5f * (frand(&st) + 1.0f);
  for (int i = 0; i < S; i++) iy[i] = ix[i] = i, wy[i] = wx[i] = 1.0f;
  const float bg = 0.45f;
  uint64_t dn = upload(norm, sizeof norm), di = upload(ids, sizeof ids);
  uint64_t diy = upload(iy, sizeof iy), dwy = upload(wy, sizeof wy);
  uint64_t dix = upload(ix, sizeof ix), dwx = upload(wx, sizeof wx);
  uint64_t dl = upload(lab, sizeof lab), dr = upload(rel, sizeof rel);
  int status = attnseg_finalize_masks(NULL, dn, di, diy, dwy, dix, dwx, dl, dr, B, C, S, S, S,
                                      S, 1, bg, 0.0f, 1.0f, 1.0f);
  if (status != ATTNSEG_OK) {
    printf("finalize_masks failed: %s\n", attnseg_kernels_last_error());
    return 1;
  }
  cu.sync();
  cu.d2h(lab, dl, sizeof lab);
  int wrong = 0;
  for (int b = 0; b < B; b++)
    for (int p = 0; p < S * S; p++) {
      float best = bg;
      int label = 0;
      for (int c = 0; c < C; c++) {
        float v = norm[(b * C + c) * S * S + p];
        if (ids[b * C + c] != 0 && v > best) best = v, label = (int)ids[b * C + c];
      }
      wrong += lab[b * S * S + p] != label;
    }
  printf("finalize_masks: %d of %d labels differ %s\n", wrong, B * S * S, wrong ? "FAILED" : "OK");
  return wrong != 0;
}

int main(void) {
  printf("libattnseg_kernels: cubins for sm %s\n", attnseg_kernels_archs());
  if (attnseg_kernels_init() != ATTNSEG_OK) {
    printf("no CUDA driver here (%s): library loads, GPU check skipped\n",
           attnseg_kernels_last_error());
    /* The entry points must fail cleanly, not crash or exit. */
    int s = attnseg_class_attention_maps(NULL, ATTNSEG_FLOAT32, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1);
    if (s != ATTNSEG_ERR_NO_DRIVER) {
      printf("expected ATTNSEG_ERR_NO_DRIVER, got %d\n", s);
      return 1;
    }
    return 0;
  }
  int dev = 0;
  void *ctx = NULL;
  if (open_driver() != 0 || cu.init(0) != 0 || cu.device_get(&dev, 0) != 0 ||
      cu.ctx_retain(&ctx, dev) != 0 || cu.ctx_set(ctx) != 0) {
    printf("a CUDA driver is present but no device context could be made: GPU check skipped\n");
    return 0;
  }
  int failures = check_class_attention(ATTNSEG_FLOAT32) + check_class_attention(ATTNSEG_FLOAT16) +
                 check_finalize();
  if (attnseg_class_attention_maps(NULL, ATTNSEG_FLOAT32, 0, 0, 0, 0, 1, 1, 200, 1, 1, 1, 1) !=
      ATTNSEG_ERR_ARGS) {
    printf("an oversized L was not refused\n");
    failures++;
  }
  printf(failures ? "FAILED\n" : "all GPU checks passed\n");
  return failures ? 1 : 0;
}
