/*
 * CPU build of the RWKV-5/6/7 WKV operators, for tests only: the lane functions of wkvHeadMath.cuh
 * that the CUDA kernels run, driven the way a thread block drives them (per token: stage the
 * head's vectors, then every lane updates its own state line), behind entry points that mirror
 * the launchers of wkvHeadKernel.h (host pointers, no stream).
 *
 * Head sizes 16, 32, 64 and 128 use the kernels' register path (each lane's line copied into a
 * contiguous buffer, the specialised lane function with a compile-time size); other sizes use the
 * generic path (the line updated in place in stateOut, with the kernels' strides).
 *
 * Build: g++ -std=c++17 -O2 -shared -fPIC [-isystem <cuda>/include for float16] wkvHeadHost.cpp
 */
#include "wkvHeadMath.cuh"

#include <cstring>
#include <new>
#include <stdint.h>
#include <vector>

#define RWKV_HOST_API extern "C" __attribute__((visibility("default")))

namespace
{

using namespace rwkv::head;

enum class Op
{
    kWKV5,
    kWKV6,
    kWKV7
};

struct Ptrs
{
    void const* r;
    void const* w; //!< WKV5: float32 [H, N]; WKV6/7: [B, T, H, N]
    void const* k;
    void const* v;
    void const* a;
    void const* b;
    float const* u;
    float const* state;
    void* y;
    float* stateOut;
};

template <typename E>
void gather(void const* src, int64_t base, int32_t N, float* dst)
{
    auto const* s = static_cast<E const*>(src);
    for (int32_t n = 0; n < N; ++n)
    {
        dst[n] = load(s[base + n]);
    }
}

//! One (batch row, head), all T tokens: what one thread block of the kernel does.
template <Op kOp, typename Act, typename WT, int32_t kN>
void runHead(Ptrs const& p, int64_t b, int32_t h, int32_t T, int32_t H, int32_t N)
{
    bool const columns = kOp != Op::kWKV7; // WKV5/6: lane j owns S[., j]; WKV7: lane i owns S[i, .]
    int64_t const NN = static_cast<int64_t>(N) * N;
    int64_t const bh = b * H + h;
    float const* const sIn = p.state + bh * NN;
    float* const sOut = p.stateOut + bh * NN;

    std::vector<float> lines; // register path: element e of lane l's line at lines[l * N + e]
    if (kN > 0)
    {
        lines.resize(static_cast<size_t>(NN));
        for (int64_t l = 0; l < N; ++l)
        {
            for (int64_t e = 0; e < N; ++e)
            {
                lines[l * N + e] = columns ? sIn[e * N + l] : sIn[l * N + e];
            }
        }
    }
    else if (sOut != sIn)
    {
        std::memmove(sOut, sIn, static_cast<size_t>(NN) * sizeof(float));
    }

    std::vector<float> buf(8 * static_cast<size_t>(N));
    float* const r = buf.data();
    float* const k = r + N;
    float* const v = k + N;
    float* const w = v + N;
    float* const u = w + N;
    float* const a = u + N;
    float* const bv = a + N;
    float* const y = bv + N;
    if (kOp != Op::kWKV7)
    {
        gather<float>(p.u, h * static_cast<int64_t>(N), N, u);
    }
    if (kOp == Op::kWKV5)
    {
        gather<float>(p.w, h * static_cast<int64_t>(N), N, w);
    }

    for (int32_t t = 0; t < T; ++t)
    {
        // Stage every input of token t before any output of token t is written (aliasing).
        int64_t const base = actIndex(b, t, h, 0, T, H, N);
        gather<Act>(p.r, base, N, r);
        gather<Act>(p.k, base, N, k);
        gather<Act>(p.v, base, N, v);
        if (kOp != Op::kWKV5)
        {
            gather<WT>(p.w, base, N, w);
        }
        if (kOp == Op::kWKV7)
        {
            gather<Act>(p.a, base, N, a);
            gather<Act>(p.b, base, N, bv);
        }
        for (int32_t l = 0; l < N; ++l)
        {
            float* s;
            int64_t stride;
            if (kN > 0)
            {
                s = &lines[static_cast<size_t>(l) * N];
                stride = 1;
            }
            else
            {
                s = columns ? sOut + l : sOut + static_cast<int64_t>(l) * N;
                stride = columns ? N : 1;
            }
            y[l] = kOp == Op::kWKV7 ? wkv7Lane<kN>(N, s, stride, r, w, k, a, bv, v[l])
                                    : wkv5Lane<kN>(N, s, stride, r, k, w, u, v[l]);
        }
        auto* yOut = static_cast<Act*>(p.y);
        for (int32_t l = 0; l < N; ++l)
        {
            store(y[l], &yOut[base + l]);
        }
    }

    if (kN > 0)
    {
        for (int64_t l = 0; l < N; ++l)
        {
            for (int64_t e = 0; e < N; ++e)
            {
                (columns ? sOut[e * N + l] : sOut[l * N + e]) = lines[l * N + e];
            }
        }
    }
}

template <Op kOp, typename Act, typename WT>
void runAll(Ptrs const& p, int32_t B, int32_t T, int32_t H, int32_t N)
{
    for (int64_t b = 0; b < B; ++b)
    {
        for (int32_t h = 0; h < H; ++h)
        {
            switch (N)
            {
            case 16: runHead<kOp, Act, WT, 16>(p, b, h, T, H, N); break;
            case 32: runHead<kOp, Act, WT, 32>(p, b, h, T, H, N); break;
            case 64: runHead<kOp, Act, WT, 64>(p, b, h, T, H, N); break;
            case 128: runHead<kOp, Act, WT, 128>(p, b, h, T, H, N); break;
            default: runHead<kOp, Act, WT, 0>(p, b, h, T, H, N); break;
            }
        }
    }
}

//! 0 on success, 1 for bad sizes/types/pointers, 2 for float16 in a build without cuda_fp16.h,
//! 3 when out of host memory.
template <Op kOp>
int32_t forward(int32_t B, int32_t T, int32_t H, int32_t N, int32_t dtype, int32_t wDtype, Ptrs const& p)
{
    bool const sizesOk = B >= 0 && T >= 0 && H >= 0 && N >= 0 && N <= kMAX_HEAD_SIZE;
    bool const typesOk = (dtype == 0 || dtype == 1) && (wDtype == dtype || wDtype == 0);
    if (!sizesOk || !typesOk)
    {
        return 1;
    }
    if (static_cast<int64_t>(B) * H * N == 0)
    {
        return 0;
    }
    bool const always = p.state && p.stateOut && (kOp == Op::kWKV7 || p.u) && (kOp != Op::kWKV5 || p.w);
    bool const perToken = p.r && p.k && p.v && p.y && (kOp == Op::kWKV5 || p.w) && (kOp != Op::kWKV7 || (p.a && p.b));
    if (!always || (T > 0 && !perToken))
    {
        return 1;
    }
    try
    {
        if (dtype == 0)
        {
            runAll<kOp, float, float>(p, B, T, H, N);
            return 0;
        }
#if RWKV_WKVHEAD_HAS_HALF
        if (wDtype == 1)
        {
            runAll<kOp, __half, __half>(p, B, T, H, N);
        }
        else
        {
            runAll<kOp, __half, float>(p, B, T, H, N);
        }
        return 0;
#else
        return 2;
#endif
    }
    catch (std::bad_alloc const&)
    {
        return 3;
    }
}

} // namespace

RWKV_HOST_API int32_t rwkvWkvHeadHasHalf()
{
    return RWKV_WKVHEAD_HAS_HALF;
}

RWKV_HOST_API int32_t rwkvWkv5ForwardHost(int32_t B, int32_t T, int32_t H, int32_t N, int32_t dtype, void const* r,
    void const* k, void const* v, float const* w, float const* u, float const* state, void* y, float* stateOut)
{
    Ptrs const p{r, w, k, v, nullptr, nullptr, u, state, y, stateOut};
    return forward<Op::kWKV5>(B, T, H, N, dtype, 0, p);
}

RWKV_HOST_API int32_t rwkvWkv6ForwardHost(int32_t B, int32_t T, int32_t H, int32_t N, int32_t dtype, int32_t wDtype,
    void const* r, void const* k, void const* v, void const* w, float const* u, float const* state, void* y,
    float* stateOut)
{
    Ptrs const p{r, w, k, v, nullptr, nullptr, u, state, y, stateOut};
    return forward<Op::kWKV6>(B, T, H, N, dtype, wDtype, p);
}

RWKV_HOST_API int32_t rwkvWkv7ForwardHost(int32_t B, int32_t T, int32_t H, int32_t N, int32_t dtype, int32_t wDtype,
    void const* r, void const* w, void const* k, void const* v, void const* a, void const* b, float const* state,
    void* y, float* stateOut)
{
    Ptrs const p{r, w, k, v, a, b, nullptr, state, y, stateOut};
    return forward<Op::kWKV7>(B, T, H, N, dtype, wDtype, p);
}
