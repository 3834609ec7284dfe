/*
 * C interface of the CUDA kernels of the RWKV-5, 6 and 7 WKV operators (matrix state per head).
 * Nothing here depends on TensorRT: the plugin (wkvHeadPlugin.cpp) and the kernels-only library
 * used by tests and CI share these launchers.
 *
 * Common conventions:
 *  - B batch, T tokens, H heads, N head size. Activations (r, k, v, w, a, b, y) are row-major
 *    [B, T, H, N] of `dtype` (the single-step ops pass T = 1 with [B, H, N] buffers). The state and
 *    the state output are row-major [B, H, N, N] float32; the [H, N] parameters are float32.
 *  - `wDtype` (WKV6, WKV7): the element type of the per-token decay w, either `dtype` or float32
 *    (float32 w with float16 activations keeps decays close to 1 exact).
 *  - One thread block per (b, h) with N threads, each owning one line of the state; the loop over
 *    T runs inside the block. Head sizes 16, 32, 64 and 128 keep the state in registers; any other
 *    N in [1, 1024] works with the state kept in the stateOut buffer.
 *  - Outputs may alias inputs (stateOut == state, y == r, ...). T = 0 copies the state through.
 *  - All pointers are device pointers. Returns cudaErrorInvalidValue for bad sizes, types or null
 *    pointers, else cudaGetLastError() after the launch (asynchronous: kernel faults surface at the
 *    next synchronisation).
 */
#ifndef RWKV_WKVHEAD_KERNEL_H
#define RWKV_WKVHEAD_KERNEL_H

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "../common/rwkvKernelApi.h"

#ifdef __cplusplus
extern "C"
{
#endif


    //! WKV5 / WKV5Seq: r, k, v, y [B, T, H, N]; w (decay factor), u (bonus) [H, N] float32.
    RWKV_KERNEL_API cudaError_t rwkvWkv5Forward(cudaStream_t stream, int32_t B, int32_t T, int32_t H, int32_t N,
        int32_t dtype, void const* r, void const* k, void const* v, float const* w, float const* u, float const* state,
        void* y, float* stateOut);

    //! WKV6 / WKV6Seq: r, k, v, y [B, T, H, N]; w (decay factor) [B, T, H, N] of wDtype; u [H, N] float32.
    RWKV_KERNEL_API cudaError_t rwkvWkv6Forward(cudaStream_t stream, int32_t B, int32_t T, int32_t H, int32_t N,
        int32_t dtype, int32_t wDtype, void const* r, void const* k, void const* v, void const* w, float const* u,
        float const* state, void* y, float* stateOut);

    //! WKV7 / WKV7Seq: r, k, v, a, b, y [B, T, H, N]; w (decay factor) [B, T, H, N] of wDtype.
    RWKV_KERNEL_API cudaError_t rwkvWkv7Forward(cudaStream_t stream, int32_t B, int32_t T, int32_t H, int32_t N,
        int32_t dtype, int32_t wDtype, void const* r, void const* w, void const* k, void const* v, void const* a,
        void const* b, float const* state, void* y, float* stateOut);

#ifdef __cplusplus
}
#endif

#endif // RWKV_WKVHEAD_KERNEL_H
