/*
 * RWKV-7 WKV (WKV7, WKV7Seq) behind its C launcher; the kernel is in wkvHeadKernel.cuh.
 */
#include "wkvHeadKernel.cuh"

extern "C" cudaError_t rwkvWkv7Forward(cudaStream_t stream, int32_t B, int32_t T, int32_t H, int32_t N, int32_t dtype,
    int32_t wDtype, void const* r, void const* w, void const* k, void const* v, void const* a, void const* b,
    float const* state, void* y, float* stateOut)
{
    using namespace rwkv::head;
    if (!validCall(B, T, H, N, dtype, wDtype))
    {
        return cudaErrorInvalidValue;
    }
    if (isEmpty(B, H, N))
    {
        return cudaSuccess;
    }
    if (!(state && stateOut) || (T > 0 && !(r && w && k && v && a && b && y)))
    {
        return cudaErrorInvalidValue;
    }
    if (dtype == RWKV_DTYPE_FLOAT32)
    {
        return launchWkv7<float, float>(stream, B, T, H, N, r, w, k, v, a, b, state, y, stateOut);
    }
    if (wDtype == RWKV_DTYPE_FLOAT16)
    {
        return launchWkv7<__half, __half>(stream, B, T, H, N, r, w, k, v, a, b, state, y, stateOut);
    }
    return launchWkv7<__half, float>(stream, B, T, H, N, r, w, k, v, a, b, state, y, stateOut);
}
