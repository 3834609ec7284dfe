/*
 * CUDA kernels of the RWKV-5/6/7 WKV operators, as templates; wkv5Kernel.cu, wkv6Kernel.cu and
 * wkv7Kernel.cu instantiate them behind the C launchers of wkvHeadKernel.h (three files so that
 * they compile in parallel).
 *
 * Layout: one thread block per (batch row, head), one thread per value index. Each thread owns
 * one line of the head's [N, N] float32 state (WKV5/6: a column, WKV7: a row) and keeps it in
 * registers for the whole sequence when the head size is a compile-time constant (16, 32, 64,
 * 128); otherwise (kN == 0) the line lives in the stateOut buffer in global memory. Per token the
 * block stages the head's r, k, w, ... vectors in shared memory (every thread reads all of them,
 * as broadcasts), then each thread runs the lane update of wkvHeadMath.cuh. The loop over T is
 * inside the kernel, so the state is read and written once per call.
 *
 * Aliasing: every thread reads its elements of token t before the barrier that precedes any write
 * of token t, and the state line is only ever touched by its owner, so y may alias an input and
 * stateOut may alias state.
 *
 * A host compiler can compile this file too, for the tests: plugins/tests/wkvhead_emulator.cpp
 * defines RWKV_WKVHEAD_EMULATION, threadIdx/blockIdx, __syncthreads() and rwkvEmulateLaunch()
 * (one CPU thread per CUDA thread, a barrier per block) and so runs these very kernels on the CPU.
 */
#ifndef RWKV_WKVHEAD_KERNEL_CUH
#define RWKV_WKVHEAD_KERNEL_CUH

#include "wkvHeadKernel.h"
#include "wkvHeadMath.cuh"

#include <cuda_fp16.h>
#include <stdint.h>
#include <type_traits>

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#elif !defined(RWKV_WKVHEAD_EMULATION)
#error "wkvHeadKernel.cuh is CUDA code: compile it with nvcc (or with the test emulator's shims)"
#endif

namespace rwkv
{
namespace head
{

//! Head sizes with a register-resident specialisation; anything else in [1, 1024] takes kN = 0.
#define RWKV_WKVHEAD_FOR_EACH_SIZE(X) X(16) X(32) X(64) X(128)

//! Sizes and element types the launchers accept. B * H becomes the grid size.
inline bool validCall(int32_t B, int32_t T, int32_t H, int32_t N, int32_t dtype, int32_t wDtype) noexcept
{
    bool const sizesOk =
        B >= 0 && T >= 0 && H >= 0 && N >= 0 && N <= kMAX_HEAD_SIZE && static_cast<int64_t>(B) * H <= INT32_MAX;
    bool const typesOk = (dtype == RWKV_DTYPE_FLOAT32 || dtype == RWKV_DTYPE_FLOAT16)
        && (wDtype == dtype || wDtype == RWKV_DTYPE_FLOAT32);
    return sizesOk && typesOk;
}

inline bool isEmpty(int32_t B, int32_t H, int32_t N) noexcept
{
    return static_cast<int64_t>(B) * H * N == 0;
}

//! Launches `kernel` with `grid` blocks of `block` threads and `shmBytes` of dynamic shared memory.
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), unsigned int grid, unsigned int block, size_t shmBytes,
    cudaStream_t stream, Args... args)
{
#if defined(__CUDACC__)
    kernel<<<grid, block, shmBytes, stream>>>(args...);
    return cudaGetLastError();
#else
    return rwkvEmulateLaunch(kernel, grid, block, shmBytes, stream, args...);
#endif
}

//! Launches the kernel `kernelFor(std::integral_constant<int32_t, S>{})` returns, specialised for head size
//! S = N where RWKV_WKVHEAD_FOR_EACH_SIZE has N (else S = 0, the generic kernel): one block of N threads per
//! (batch, head), `vectors` float vectors of N in dynamic shared memory.
template <typename KernelFor, typename... Args>
cudaError_t launchPerHead(
    KernelFor kernelFor, cudaStream_t stream, int32_t B, int32_t H, int32_t N, size_t vectors, Args... args)
{
    auto const grid = static_cast<unsigned int>(static_cast<int64_t>(B) * H);
    auto const block = static_cast<unsigned int>(N);
    size_t const shmBytes = vectors * static_cast<size_t>(N) * sizeof(float);
    switch (N)
    {
#define RWKV_CASE(S)                                                                                                   \
    case S: return launch(kernelFor(std::integral_constant<int32_t, S>{}), grid, block, shmBytes, stream, args...);
        RWKV_WKVHEAD_FOR_EACH_SIZE(RWKV_CASE)
#undef RWKV_CASE
    default: break;
    }
    return launch(kernelFor(std::integral_constant<int32_t, 0>{}), grid, block, shmBytes, stream, args...);
}

// ---- WKV5 / WKV6 --------------------------------------------------------------------------------

//! kTokenDecay false (WKV5): w is the float32 [H, N] decay; true (WKV6): w is [B, T, H, N] of WT.
template <typename Act, typename WT, int32_t kN, bool kTokenDecay>
__global__ void __launch_bounds__(kN > 0 ? kN : kMAX_HEAD_SIZE, 1) wkv56Kernel(int32_t T, int32_t H, int32_t n,
    Act const* r, Act const* k, Act const* v, WT const* w, float const* u, float const* state, Act* y, float* stateOut)
{
    int32_t const N = headSize<kN>(n);
    int64_t const bh = blockIdx.x;
    int64_t const b = bh / H;
    int32_t const h = static_cast<int32_t>(bh % H);
    int32_t const j = threadIdx.x; // this thread's value index: it owns the column S[., j]
    int64_t const NN = static_cast<int64_t>(N) * N;
    float const* const sIn = state + bh * NN;
    float* const sOut = stateOut + bh * NN;

    extern __shared__ float shm[]; // r, k, w, u of the current token: 4 x N floats
    float* const shR = shm;
    float* const shK = shm + N;
    float* const shW = shm + 2 * N;
    float* const shU = shm + 3 * N;

    float line[kN > 0 ? kN : 1]; // the column in registers (kN > 0)
    (void)line;
    if constexpr (kN > 0)
    {
        RWKV_WKVH_UNROLL
        for (int32_t i = 0; i < kN; ++i)
        {
            line[i] = sIn[i * kN + j]; // coalesced: consecutive threads read consecutive j
        }
    }
    else if (sOut != sIn)
    {
        for (int32_t i = 0; i < N; ++i)
        {
            sOut[i * N + j] = sIn[i * N + j];
        }
    }
    shU[j] = u[h * N + j];
    if constexpr (!kTokenDecay)
    {
        shW[j] = load(w[h * N + j]);
    }

    for (int32_t t = 0; t < T; ++t)
    {
        int64_t const idx = actIndex(b, t, h, j, T, H, N);
        __syncthreads(); // every thread is done with the previous token's vectors
        shR[j] = load(r[idx]);
        shK[j] = load(k[idx]);
        if constexpr (kTokenDecay)
        {
            shW[j] = load(w[idx]);
        }
        float const vj = load(v[idx]);
        __syncthreads();
        float yj;
        if constexpr (kN > 0)
        {
            yj = wkv5Lane<kN>(kN, line, 1, shR, shK, shW, shU, vj);
        }
        else
        {
            yj = wkv5Lane<0>(N, sOut + j, N, shR, shK, shW, shU, vj);
        }
        store(yj, &y[idx]);
    }

    if constexpr (kN > 0)
    {
        RWKV_WKVH_UNROLL
        for (int32_t i = 0; i < kN; ++i)
        {
            sOut[i * kN + j] = line[i];
        }
    }
}

template <typename Act, typename WT, bool kTokenDecay>
cudaError_t launchWkv56(cudaStream_t stream, int32_t B, int32_t T, int32_t H, int32_t N, void const* r, void const* k,
    void const* v, void const* w, float const* u, float const* state, void* y, float* stateOut)
{
    auto const kernelFor = [](auto size) { return &wkv56Kernel<Act, WT, decltype(size)::value, kTokenDecay>; };
    return launchPerHead(kernelFor, stream, B, H, N, 4, T, H, N, static_cast<Act const*>(r), static_cast<Act const*>(k),
        static_cast<Act const*>(v), static_cast<WT const*>(w), u, state, static_cast<Act*>(y), stateOut);
}

// ---- WKV7 ---------------------------------------------------------------------------------------

template <typename Act, typename WT, int32_t kN>
__global__ void __launch_bounds__(kN > 0 ? kN : kMAX_HEAD_SIZE, 1)
    wkv7Kernel(int32_t T, int32_t H, int32_t n, Act const* r, WT const* w, Act const* k, Act const* v, Act const* a,
        Act const* bb, float const* state, Act* y, float* stateOut)
{
    int32_t const N = headSize<kN>(n);
    int64_t const bh = blockIdx.x;
    int64_t const b = bh / H;
    int32_t const h = static_cast<int32_t>(bh % H);
    int32_t const i = threadIdx.x; // this thread's value index: it owns the row S[i, .]
    int64_t const NN = static_cast<int64_t>(N) * N;
    float const* const sIn = state + bh * NN + static_cast<int64_t>(i) * N;
    float* const sOut = stateOut + bh * NN + static_cast<int64_t>(i) * N;

    extern __shared__ float shm[]; // r, w, k, a, b of the current token: 5 x N floats
    float* const shR = shm;
    float* const shW = shm + N;
    float* const shK = shm + 2 * N;
    float* const shA = shm + 3 * N;
    float* const shB = shm + 4 * N;

    // A row is contiguous: 16-byte loads/stores when both rows are aligned (N % 4 == 0 for every
    // specialised size, so this depends on the base pointers only and is uniform over the block).
    bool const vec4 = ((reinterpret_cast<uintptr_t>(sIn) | reinterpret_cast<uintptr_t>(sOut)) & 15U) == 0;
    float line[kN > 0 ? kN : 1]; // the row in registers (kN > 0)
    (void)line;
    (void)vec4;
    if constexpr (kN > 0)
    {
        if (vec4)
        {
            RWKV_WKVH_UNROLL
            for (int32_t q = 0; q < kN / 4; ++q)
            {
                float4 const x = reinterpret_cast<float4 const*>(sIn)[q];
                line[4 * q] = x.x;
                line[4 * q + 1] = x.y;
                line[4 * q + 2] = x.z;
                line[4 * q + 3] = x.w;
            }
        }
        else
        {
            RWKV_WKVH_UNROLL
            for (int32_t j = 0; j < kN; ++j)
            {
                line[j] = sIn[j];
            }
        }
    }
    else if (sOut != sIn)
    {
        for (int32_t j = 0; j < N; ++j)
        {
            sOut[j] = sIn[j];
        }
    }

    for (int32_t t = 0; t < T; ++t)
    {
        int64_t const idx = actIndex(b, t, h, i, T, H, N);
        __syncthreads(); // every thread is done with the previous token's vectors
        shR[i] = load(r[idx]);
        shW[i] = load(w[idx]);
        shK[i] = load(k[idx]);
        shA[i] = load(a[idx]);
        shB[i] = load(bb[idx]);
        float const vi = load(v[idx]);
        __syncthreads();
        float yi;
        if constexpr (kN > 0)
        {
            yi = wkv7Lane<kN>(kN, line, 1, shR, shW, shK, shA, shB, vi);
        }
        else
        {
            yi = wkv7Lane<0>(N, sOut, 1, shR, shW, shK, shA, shB, vi);
        }
        store(yi, &y[idx]);
    }

    if constexpr (kN > 0)
    {
        if (vec4)
        {
            RWKV_WKVH_UNROLL
            for (int32_t q = 0; q < kN / 4; ++q)
            {
                reinterpret_cast<float4*>(sOut)[q] =
                    make_float4(line[4 * q], line[4 * q + 1], line[4 * q + 2], line[4 * q + 3]);
            }
        }
        else
        {
            RWKV_WKVH_UNROLL
            for (int32_t j = 0; j < kN; ++j)
            {
                sOut[j] = line[j];
            }
        }
    }
}

template <typename Act, typename WT>
cudaError_t launchWkv7(cudaStream_t stream, int32_t B, int32_t T, int32_t H, int32_t N, void const* r, void const* w,
    void const* k, void const* v, void const* a, void const* b, float const* state, void* y, float* stateOut)
{
    auto const kernelFor = [](auto size) { return &wkv7Kernel<Act, WT, decltype(size)::value>; };
    return launchPerHead(kernelFor, stream, B, H, N, 5, T, H, N, static_cast<Act const*>(r), static_cast<WT const*>(w),
        static_cast<Act const*>(k), static_cast<Act const*>(v), static_cast<Act const*>(a), static_cast<Act const*>(b),
        state, static_cast<Act*>(y), stateOut);
}

} // namespace head
} // namespace rwkv

#endif // RWKV_WKVHEAD_KERNEL_CUH
