/*
 * RWKV-6 WKV (WKV6, WKV6Seq) behind its C launcher; the kernel is in wkvHeadKernel.cuh.
 */
#include "wkvHeadKernel.cuh"

extern "C" cudaError_t rwkvWkv6Forward(cudaStream_t stream, int32_t B, int32_t T, int32_t H, int32_t N, int32_t dtype,
    int32_t wDtype, void const* r, void const* k, void const* v, void const* w, float const* u, float const* state,
    void* y, float* stateOut)
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
    if (!(u && state && stateOut) || (T > 0 && !(r && k && v && w && y)))
    {
        return cudaErrorInvalidValue;
    }
    if (dtype == RWKV_DTYPE_FLOAT32)
    {
        return launchWkv56<float, float, true>(stream, B, T, H, N, r, k, v, w, u, state, y, stateOut);
    }
    if (wDtype == RWKV_DTYPE_FLOAT16)
    {
        return launchWkv56<__half, __half, true>(stream, B, T, H, N, r, k, v, w, u, state, y, stateOut);
    }
    return launchWkv56<__half, float, true>(stream, B, T, H, N, r, k, v, w, u, state, y, stateOut);
}
