/*
 * The matrix-state WKV recurrences of RWKV-5, 6 and 7 (one [N, N] float32 state per batch row and
 * head), shared by the CUDA kernels (wkvHeadKernel.cuh) and the CPU build used by the tests
 * (wkvHeadHost.cpp). Keep this header free of anything that only one compiler understands: the
 * point is that the CPU test exercises exactly the code the GPU runs.
 *
 * The work is split the way the GPU splits it: one "lane" (a CUDA thread) per value index owns
 * one line of the state and runs the per-token update below for that line. Each lane needs the
 * whole of this token's r, k, w, ... vectors of its head (shared memory on the GPU) and only its own
 * element of v. Index order of the state S[b, h, i, j] (row-major [B, H, N, N]) as in
 * exporter/arch/headwise.py:
 *
 * WKV5 / WKV6 (i over keys, j over values), lane j owns the column S[., j]:
 *     y_j  = sum_i r_i (u_i k_i v_j + S_ij)
 *     S_ij = k_i v_j + w_i S_ij                 (WKV5: w, u [H, N] constant; WKV6: w per token)
 * WKV7 (i over values, j over keys), lane i owns the row S[i, .]:
 *     sa   = sum_j S_ij a_j
 *     S_ij = S_ij w_j + sa b_j + v_i k_j
 *     y_i  = sum_j S_ij r_j                     (with the updated S)
 * All arithmetic is float32, in this order, summing over the index in increasing order.
 */
#ifndef RWKV_WKVHEAD_MATH_CUH
#define RWKV_WKVHEAD_MATH_CUH

#include <math.h>
#include <stdint.h>

#include "../common/rwkvElement.cuh"

#define RWKV_WKVH_HD RWKV_HD
#define RWKV_WKVHEAD_HAS_HALF RWKV_HAS_HALF

// Full unrolling in device code, where a head size known at compile time keeps the state line in
// registers; a no-op for the host compilers (no "unknown pragma" warnings).
#if defined(__CUDA_ARCH__)
#define RWKV_WKVH_UNROLL _Pragma("unroll")
#else
#define RWKV_WKVH_UNROLL
#endif

namespace rwkv
{
namespace head
{

//! Largest head size: one CUDA thread per value index, and a block holds at most 1024 threads.
constexpr int32_t kMAX_HEAD_SIZE = 1024;

using ::rwkv::load;
using ::rwkv::store;

//! Element (b, t, h, n) of a row-major [B, T, H, N] activation (the single-step ops are T = 1).
RWKV_WKVH_HD int64_t actIndex(int64_t b, int64_t t, int64_t h, int64_t n, int64_t T, int64_t H, int64_t N)
{
    return ((b * T + t) * H + h) * N + n;
}

//! The head size: the compile-time kN of a specialised kernel, else (kN == 0) the run-time n.
template <int32_t kN>
RWKV_WKVH_HD int32_t headSize(int32_t n)
{
    return kN > 0 ? kN : n;
}

//! WKV5/WKV6, one token, lane j: updates the column s[i * stride] = S[i, j] (i = 0..N-1) in place
//! and returns y_j. r, k, w, u: the head's N-vectors for this token; vj = v[j].
template <int32_t kN>
RWKV_WKVH_HD float wkv5Lane(
    int32_t n, float* s, int64_t stride, float const* r, float const* k, float const* w, float const* u, float vj)
{
    float y = 0.F;
    RWKV_WKVH_UNROLL
    for (int32_t i = 0; i < headSize<kN>(n); ++i)
    {
        float const kv = k[i] * vj;
        float const si = s[i * stride];
        y += r[i] * (u[i] * kv + si);
        s[i * stride] = kv + w[i] * si;
    }
    return y;
}

//! WKV7, one token, lane i: updates the row s[j * stride] = S[i, j] (j = 0..N-1) in place and
//! returns y_i (read from the updated row). r, w, k, a, b: the head's N-vectors; vi = v[i].
template <int32_t kN>
RWKV_WKVH_HD float wkv7Lane(int32_t n, float* s, int64_t stride, float const* r, float const* w, float const* k,
    float const* a, float const* b, float vi)
{
    float sa = 0.F;
    RWKV_WKVH_UNROLL
    for (int32_t j = 0; j < headSize<kN>(n); ++j)
    {
        sa += s[j * stride] * a[j];
    }
    float y = 0.F;
    RWKV_WKVH_UNROLL
    for (int32_t j = 0; j < headSize<kN>(n); ++j)
    {
        float const sj = s[j * stride] * w[j] + sa * b[j] + vi * k[j];
        s[j * stride] = sj;
        y += sj * r[j];
    }
    return y;
}

} // namespace head
} // namespace rwkv

#endif // RWKV_WKVHEAD_MATH_CUH
