/* Run-time loading of the CUDA driver (see cuda_driver.c). */
#ifndef ATTNSEG_CUDA_DRIVER_H
#define ATTNSEG_CUDA_DRIVER_H

/* 0 when libcuda is open and every needed function was found, -1 otherwise. */
int attnseg_cuda_open(void);
/* Why attnseg_cuda_open failed ("" if it did not). */
const char *attnseg_cuda_open_error(void);

#endif
