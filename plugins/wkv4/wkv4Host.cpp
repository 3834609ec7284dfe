/*
 * CPU build of the WKV recurrence, for tests only: the same wkv4Math.cuh the CUDA kernel runs,
 * behind an entry point that mirrors rwkvWkv4Forward (host pointers, no stream).
 * Build: g++ -O2 -shared -fPIC [-I<cuda>/include for float16] wkv4Host.cpp -o librwkv_wkv4_host.so
 */
#include "wkv4Math.cuh"

#include <stdint.h>

extern "C" __attribute__((visibility("default"))) int32_t rwkvWkv4HasHalf()
{
    return RWKV_WKV4_HAS_HALF;
}

//! Returns 0 on success, 1 for bad sizes/dtype/pointers, 2 for float16 in a build without cuda_fp16.h.
extern "C" __attribute__((visibility("default"))) int32_t rwkvWkv4ForwardHost(int32_t B, int32_t T, int32_t C,
    int32_t dtype, void const* k, void const* v, float const* w, float const* u, float const* aa, float const* bb,
    float const* pp, void* y, float* aaOut, float* bbOut, float* ppOut)
{
    if (B < 0 || T < 0 || C < 0 || (dtype != 0 && dtype != 1))
    {
        return 1;
    }
    if (static_cast<int64_t>(B) * C == 0)
    {
        return 0;
    }
    if (!(w && u && aa && bb && pp && aaOut && bbOut && ppOut) || (T > 0 && !(k && v && y)))
    {
        return 1;
    }
    for (int64_t b = 0; b < B; ++b)
    {
        for (int64_t c = 0; c < C; ++c)
        {
            if (dtype == 0)
            {
                rwkv::wkv4Channel<float>(b, c, T, C, static_cast<float const*>(k), static_cast<float const*>(v), w, u,
                    aa, bb, pp, static_cast<float*>(y), aaOut, bbOut, ppOut);
            }
            else
            {
#if RWKV_WKV4_HAS_HALF
                rwkv::wkv4Channel<__half>(b, c, T, C, static_cast<__half const*>(k), static_cast<__half const*>(v), w,
                    u, aa, bb, pp, static_cast<__half*>(y), aaOut, bbOut, ppOut);
#else
                return 2;
#endif
            }
        }
    }
    return 0;
}
