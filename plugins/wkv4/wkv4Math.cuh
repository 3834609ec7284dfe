/*
 * RWKV-4 WKV recurrence, shared by the CUDA kernel (wkv4Kernel.cu) and the CPU build used by the
 * tests (wkv4Host.cpp). Keep this header free of anything that only one compiler understands:
 * the point is that the CPU test exercises exactly the code the GPU runs.
 *
 * Math per (b, c), t = 0..T-1, in float32 (see plugins/README.md):
 *   ww = u + k; p = max(pp, ww); e1 = exp(pp - p); e2 = exp(ww - p)
 *   y  = (e1*aa + e2*v) / (e1*bb + e2)
 *   ww = w + pp; p = max(ww, k); e1 = exp(ww - p); e2 = exp(k - p)
 *   aa = e1*aa + e2*v; bb = e1*bb + e2; pp = p
 */
#ifndef RWKV_WKV4_MATH_CUH
#define RWKV_WKV4_MATH_CUH

#include <math.h>
#include <stdint.h>

#include "../common/rwkvElement.cuh"

#define RWKV_WKV4_HAS_HALF RWKV_HAS_HALF

namespace rwkv
{

//! One token for one channel: returns y, updates (aa, bb, pp) in place.
RWKV_HD float wkv4Step(float k, float v, float w, float u, float& aa, float& bb, float& pp)
{
    float ww = u + k;
    float p = fmaxf(pp, ww);
    float e1 = expf(pp - p);
    float e2 = expf(ww - p);
    float const y = (e1 * aa + e2 * v) / (e1 * bb + e2);

    ww = w + pp;
    p = fmaxf(ww, k);
    e1 = expf(ww - p);
    e2 = expf(k - p);
    aa = e1 * aa + e2 * v;
    bb = e1 * bb + e2;
    pp = p;
    return y;
}

//! The whole sequence for channel c of batch row b. Layouts (row-major): k, v, y [B, T, C]
//! (the single-step op is T = 1); w, u [C]; states [B, C].
//! Each element is read before it is written by the same caller, so the outputs may alias the
//! matching inputs (y with k or v, aaOut with aa, ...).
template <typename Elem>
RWKV_HD void wkv4Channel(int64_t b, int64_t c, int64_t steps, int64_t channels, Elem const* k, Elem const* v,
    float const* w, float const* u, float const* aaIn, float const* bbIn, float const* ppIn, Elem* y, float* aaOut,
    float* bbOut, float* ppOut)
{
    int64_t const s = b * channels + c;
    float aa = aaIn[s];
    float bb = bbIn[s];
    float pp = ppIn[s];
    float const wc = w[c];
    float const uc = u[c];
    int64_t idx = b * steps * channels + c;
    for (int64_t t = 0; t < steps; ++t, idx += channels)
    {
        float const yt = wkv4Step(load(k[idx]), load(v[idx]), wc, uc, aa, bb, pp);
        store(yt, &y[idx]);
    }
    aaOut[s] = aa;
    bbOut[s] = bb;
    ppOut[s] = pp;
}

} // namespace rwkv

#endif // RWKV_WKV4_MATH_CUH
