/*
 * C interface of the RWKV-4 WKV CUDA kernels. Nothing here depends on TensorRT: the plugin
 * (wkv4Plugin.cpp) and the kernels-only library used by tests and CI share this launcher.
 */
#ifndef RWKV_WKV4_KERNEL_H
#define RWKV_WKV4_KERNEL_H

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "../common/rwkvKernelApi.h"

#ifdef __cplusplus
extern "C"
{
#endif


    //! Runs T tokens of the WKV recurrence for every (b, c) on `stream` (one thread per (b, c)).
    //! k, v, y: [B, T, C] of `dtype` (the single-step op passes T = 1 with [B, C] buffers);
    //! w, u: [C]; aa, bb, pp and the three outputs: [B, C] float32. All pointers are device pointers.
    //! Outputs may alias their inputs (aaOut == aa, y == k, ...). T = 0 copies the state through.
    //! Returns cudaErrorInvalidValue for bad sizes, dtype or null pointers, else cudaGetLastError()
    //! after the launch (asynchronous: kernel faults surface at the next synchronisation).
    RWKV_KERNEL_API cudaError_t rwkvWkv4Forward(cudaStream_t stream, int32_t B, int32_t T, int32_t C, int32_t dtype,
        void const* k, void const* v, float const* w, float const* u, float const* aa, float const* bb, float const* pp,
        void* y, float* aaOut, float* bbOut, float* ppOut);

#ifdef __cplusplus
}
#endif

#endif // RWKV_WKV4_KERNEL_H
