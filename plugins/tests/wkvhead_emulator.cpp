/*
 * Runs the RWKV-5/6/7 CUDA kernels (plugins/wkvhead/wkv{5,6,7}Kernel.cu, wkvHeadKernel.cuh) on the
 * CPU, for machines without a GPU: the kernel sources are compiled by the host compiler with the
 * few CUDA built-ins they use supplied here. Every CUDA thread of a block is a std::thread, blocks
 * run one after another, __syncthreads() is a std::barrier, and the dynamic shared memory is a
 * buffer of exactly the requested size (poisoned beyond it under AddressSanitizer, NaN-filled
 * between blocks so stale data shows). The result is a library with the very launchers
 * rwkvWkv5Forward, rwkvWkv6Forward, rwkvWkv7Forward (host pointers stand in for device pointers;
 * the stream is ignored), including their argument checks and head-size dispatch.
 *
 * What this checks: the kernels' indexing, the staging of vectors through shared memory and its
 * barriers, the register-line and generic paths, the 16-byte state loads, aliasing, the launch
 * configuration. What it cannot check: anything about the real GPU (the compiled SASS, timing,
 * memory model beyond barrier ordering).
 *
 * Build (C++20 for std::barrier):
 *   g++ -std=c++20 -O1 -shared -fPIC -isystem <cuda>/include -I plugins/wkvhead \
 *       plugins/tests/wkvhead_emulator.cpp -o librwkv_wkvhead_emulated.so -lpthread
 */
#define RWKV_WKVHEAD_EMULATION 1

#include <cuda_runtime_api.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <limits>
#include <thread>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define RWKV_EMU_POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define RWKV_EMU_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define RWKV_EMU_POISON(p, n) ((void)(p), (void)(n))
#define RWKV_EMU_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

// ---- the CUDA built-ins the kernels use ----------------------------------------------------------
#define __launch_bounds__(...)

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;

namespace
{
std::barrier<>* gBlockBarrier = nullptr;
constexpr size_t kSHARED_FLOATS = 48 * 1024 / sizeof(float); // the default 48 KiB of a CUDA block
} // namespace

inline void __syncthreads()
{
    gBlockBarrier->arrive_and_wait();
}

namespace rwkv
{
namespace head
{
// `extern __shared__ float shm[]` inside the kernels (namespace rwkv::head) names this buffer.
alignas(16) float shm[kSHARED_FLOATS];
} // namespace head
} // namespace rwkv

//! What `kernel<<<grid, block, shmBytes, stream>>>(args...)` does, one block after another.
template <typename... Params, typename... Args>
cudaError_t rwkvEmulateLaunch(void (*kernel)(Params...), unsigned int grid, unsigned int block, size_t shmBytes,
    cudaStream_t /*stream*/, Args... args)
{
    if (grid == 0 || block == 0 || block > 1024 || shmBytes > sizeof(rwkv::head::shm))
    {
        return cudaErrorInvalidConfiguration;
    }
    auto* shared = reinterpret_cast<char*>(rwkv::head::shm);
    RWKV_EMU_POISON(shared + shmBytes, sizeof(rwkv::head::shm) - shmBytes);
    for (unsigned int bx = 0; bx < grid; ++bx)
    {
        for (size_t i = 0; i < shmBytes / sizeof(float); ++i)
        {
            rwkv::head::shm[i] = std::numeric_limits<float>::quiet_NaN();
        }
        std::barrier<> bar(static_cast<std::ptrdiff_t>(block));
        gBlockBarrier = &bar;
        std::vector<std::thread> threads;
        threads.reserve(block);
        for (unsigned int tx = 0; tx < block; ++tx)
        {
            threads.emplace_back(
                [=]()
                {
                    threadIdx = make_uint3(tx, 0, 0);
                    blockIdx = make_uint3(bx, 0, 0);
                    blockDim = dim3(block, 1, 1);
                    kernel(args...);
                });
        }
        for (auto& t : threads)
        {
            t.join();
        }
        gBlockBarrier = nullptr;
    }
    RWKV_EMU_UNPOISON(shared + shmBytes, sizeof(rwkv::head::shm) - shmBytes);
    return cudaSuccess;
}

// ---- the kernels and launchers, exactly as nvcc compiles them --------------------------------------
#include "wkv5Kernel.cu"
#include "wkv6Kernel.cu"
#include "wkv7Kernel.cu"

extern "C" __attribute__((visibility("default"))) int32_t rwkvWkvHeadEmulated()
{
    return 1;
}
