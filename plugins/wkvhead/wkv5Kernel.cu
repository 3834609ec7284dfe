/*
 * RWKV-5 WKV (WKV5, WKV5Seq) behind its C launcher; the kernel is in wkvHeadKernel.cuh.
 */
#include "wkvHeadKernel.cuh"

extern "C" cudaError_t rwkvWkv5Forward(cudaStream_t stream, int32_t B, int32_t T, int32_t H, int32_t N, int32_t dtype,
    void const* r, void const* k, void const* v, float const* w, float const* u, float const* state, void* y,
    float* stateOut)
{
    using namespace rwkv::head;
    if (!validCall(B, T, H, N, dtype, RWKV_DTYPE_FLOAT32))
    {
        return cudaErrorInvalidValue;
    }
    if (isEmpty(B, H, N))
    {
        return cudaSuccess; // empty state: nothing to compute or copy
    }
    if (!(w && u && state && stateOut) || (T > 0 && !(r && k && v && y)))
    {
        return cudaErrorInvalidValue;
    }
    if (dtype == RWKV_DTYPE_FLOAT16)
    {
        return launchWkv56<__half, float, false>(stream, B, T, H, N, r, k, v, w, u, state, y, stateOut);
    }
    return launchWkv56<float, float, false>(stream, B, T, H, N, r, k, v, w, u, state, y, stateOut);
}
