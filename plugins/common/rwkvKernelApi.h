/*
 * The C launcher conventions every WKV kernel family shares: exported symbol visibility and the
 * element-type codes the launchers take (the state and float32 parameters are always float32).
 */
#ifndef RWKV_KERNEL_API_H
#define RWKV_KERNEL_API_H

#if defined(_WIN32)
#define RWKV_KERNEL_API
#else
#define RWKV_KERNEL_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C"
{
#endif

    //! Element type of a launcher's activations (and of a per-token decay, where it may differ).
    enum RwkvDType
    {
        RWKV_DTYPE_FLOAT32 = 0,
        RWKV_DTYPE_FLOAT16 = 1
    };

#ifdef __cplusplus
}
#endif

#endif // RWKV_KERNEL_API_H
