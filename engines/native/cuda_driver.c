/* The CUDA driver functions the AOT kernels call, resolved at run time with dlopen/dlsym.
 *
 * The generated kernel sources call cuModuleLoadData, cuLaunchKernel, ... as if linked to
 * libcuda. This file defines those functions (hidden: the library exports only attnseg_*) as
 * forwarders to the driver opened on first use, so the library has no link-time dependency on
 * libcuda and loads on machines without one. Symbol names are taken after cuda.h's macros
 * (e.g. versioned names), so each forwarder reaches the driver entry point of the same ABI.
 */
#include <cuda.h>
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

#include "cuda_driver.h"

#define ATTNSEG_STR2(x) #x
#define ATTNSEG_STR(x) ATTNSEG_STR2(x)

/* name, parameter list, argument list */
#define ATTNSEG_CUDA_FUNCS(X)                                                                  \
  X(cuGetErrorString, (CUresult error, const char **pStr), (error, pStr))                      \
  X(cuInit, (unsigned int Flags), (Flags))                                                     \
  X(cuModuleLoadData, (CUmodule * module, const void *image), (module, image))                 \
  X(cuModuleUnload, (CUmodule hmod), (hmod))                                                   \
  X(cuModuleGetFunction, (CUfunction * hfunc, CUmodule hmod, const char *name),              \
    (hfunc, hmod, name))                                                                       \
  X(cuDeviceGetAttribute, (int *pi, CUdevice_attribute attrib, CUdevice dev), (pi, attrib, dev)) \
  X(cuFuncSetCacheConfig, (CUfunction hfunc, CUfunc_cache config), (hfunc, config))            \
  X(cuFuncSetAttribute, (CUfunction hfunc, CUfunction_attribute attrib, int value),            \
    (hfunc, attrib, value))                                                                    \
  X(cuCtxGetDevice, (CUdevice * device), (device))                                             \
  X(cuLaunchKernel,                                                                            \
    (CUfunction f, unsigned int gridDimX, unsigned int gridDimY, unsigned int gridDimZ,        \
     unsigned int blockDimX, unsigned int blockDimY, unsigned int blockDimZ,                   \
     unsigned int sharedMemBytes, CUstream hStream, void **kernelParams, void **extra),        \
    (f, gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ, sharedMemBytes,         \
     hStream, kernelParams, extra))

#define ATTNSEG_PTR(name, params, args) static CUresult(CUDAAPI *p_##name) params = NULL;
ATTNSEG_CUDA_FUNCS(ATTNSEG_PTR)

static void *libcuda = NULL;
static char load_error[512] = "";

int attnseg_cuda_open(void) {
  if (libcuda != NULL) return 0;
  if (load_error[0] != '\0') return -1;
  void *h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (h == NULL) h = dlopen("libcuda.so", RTLD_NOW | RTLD_LOCAL);
  if (h == NULL) {
    const char *why = dlerror();
    snprintf(load_error, sizeof load_error, "cannot open the CUDA driver (libcuda.so.1): %s",
             why ? why : "unknown error");
    return -1;
  }
#define ATTNSEG_LOAD(name, params, args)                                                       \
  *(void **)(&p_##name) = dlsym(h, ATTNSEG_STR(name));                                         \
  if (p_##name == NULL) {                                                                      \
    snprintf(load_error, sizeof load_error, "the CUDA driver lacks %s", ATTNSEG_STR(name));    \
    dlclose(h);                                                                                \
    return -1;                                                                                 \
  }
  ATTNSEG_CUDA_FUNCS(ATTNSEG_LOAD)
  libcuda = h;
  return 0;
}

const char *attnseg_cuda_open_error(void) { return load_error; }

#define ATTNSEG_FORWARD(name, params, args)                                                    \
  CUresult CUDAAPI name params {                                                               \
    if (p_##name == NULL && attnseg_cuda_open() != 0) return CUDA_ERROR_NOT_INITIALIZED;      \
    return p_##name args;                                                                      \
  }
ATTNSEG_CUDA_FUNCS(ATTNSEG_FORWARD)
