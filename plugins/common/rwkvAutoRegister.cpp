/*
 * librwkv_trt_plugins_autoregister.so: for loaders that only dlopen a plugin library and call
 * nothing in it (ctypes.CDLL, Polygraphy --plugins, trtexec --staticPlugins). It depends on
 * librwkv_trt_plugins.so (found beside it through RUNPATH $ORIGIN) and, when loaded, asks it to
 * register its creators in the TensorRT already in the process. TensorRT must be loaded first
 * (import tensorrt, or a program linked against libnvinfer); otherwise one warning says so and
 * rwkvTrtRegisterPlugins() can be called later.
 *
 * For IPluginRegistry::loadLibrary / trtexec --dynamicPlugins, pass librwkv_trt_plugins.so instead.
 * RWKV_TRT_PLUGIN_QUIET=1 silences the warning.
 */
#include "NvInferVersion.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>

extern "C" int32_t rwkvTrtRegisterPlugins();

namespace
{

struct RegisterOnLoad
{
    RegisterOnLoad() noexcept
    {
        int32_t const status = rwkvTrtRegisterPlugins();
        char const* quiet = std::getenv("RWKV_TRT_PLUGIN_QUIET");
        if (status == -1 && (quiet == nullptr || quiet[0] == '\0' || quiet[0] == '0'))
        {
            std::fprintf(stderr,
                "[rwkv-trt-plugins] WARNING: no TensorRT %d library is loaded in this process, so the rwkv::WKV4, "
                "WKV5, WKV6 and WKV7 plugins (and their Seq forms) were not registered. Load TensorRT first "
                "(import tensorrt) or call rwkvTrtRegisterPlugins() afterwards.\n",
                NV_TENSORRT_MAJOR);
        }
    }
};

RegisterOnLoad const gRegisterOnLoad;

} // namespace
