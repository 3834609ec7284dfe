/*
 * What every WKV kernel family shares at the element level, for the CUDA kernels and for their CPU
 * builds alike: the host/device function qualifier, float16 availability, and float32/float16
 * loads and stores (all arithmetic is float32). Keep it free of anything only one compiler
 * understands: the CPU tests exercise exactly the code the GPU runs.
 */
#ifndef RWKV_ELEMENT_CUH
#define RWKV_ELEMENT_CUH

#if defined(__CUDACC__)
#define RWKV_HD __host__ __device__ __forceinline__
#else
#define RWKV_HD inline
#endif

// float16 needs cuda_fp16.h; its conversions are __host__ __device__, so a plain C++ compiler with
// the CUDA include directory gets the same rounding as the GPU. Without it: float32 only.
#if defined(__CUDACC__)
#include <cuda_fp16.h>
#define RWKV_HAS_HALF 1
#elif defined(__has_include)
#if __has_include(<cuda_fp16.h>)
#include <cuda_fp16.h>
#define RWKV_HAS_HALF 1
#endif
#endif
#ifndef RWKV_HAS_HALF
#define RWKV_HAS_HALF 0
#endif

namespace rwkv
{

RWKV_HD float load(float x)
{
    return x;
}

RWKV_HD void store(float x, float* dst)
{
    *dst = x;
}

#if RWKV_HAS_HALF
RWKV_HD float load(__half x)
{
    return __half2float(x);
}

RWKV_HD void store(float x, __half* dst)
{
    *dst = __float2half_rn(x); // round to nearest even, as a float16 cast in numpy/onnxruntime
}
#endif

} // namespace rwkv

#endif // RWKV_ELEMENT_CUH
