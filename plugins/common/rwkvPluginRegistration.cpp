/*
 * How TensorRT finds the creators in librwkv_trt_plugins.so. One library, three ways to load it:
 *
 *  1. IPluginRegistry::loadLibrary (trtexec --dynamicPlugins, Python registry.load_library, engines
 *     with an embedded plugin library): TensorRT dlopens the library, then calls the exported
 *     getCreators() and setLoggerFinder() and registers the creators itself. loadLibrary fails if
 *     any of them is already registered, so the load-time registration below must stay out of its
 *     way: it notices that the dlopen comes from inside a TensorRT library and does nothing.
 *  2. Plain dlopen (ctypes.CDLL, Polygraphy --plugins, trtexec --staticPlugins): nobody calls us
 *     after dlopen, so a static initializer registers the creators in the global registry of the
 *     TensorRT already in the process, skipping any creator that is already registered.
 *  3. Both, in either order, in one process:
 *     - loadLibrary first, dlopen later: the second dlopen of the same file runs no initializer;
 *       a second copy of the file finds the creators registered and skips them.
 *     - dlopen first, loadLibrary later: the creators are already registered by us, so
 *       getCreators() returns an empty list and loadLibrary has nothing to conflict with; the
 *       creators stay usable through the global registry (deregisterLibrary will not remove them).
 *  If TensorRT is not in the process yet at dlopen time, the library tries to dlopen
 *  libnvinfer.so.<major> by soname (what linking against it would do); if that fails too, it prints
 *  one warning and the creators can still be registered later with rwkvTrtRegisterPlugins().
 *
 * Environment switches (read at load time):
 *  RWKV_TRT_PLUGIN_NO_STATIC_REGISTRATION=1  never register from the static initializer
 *  RWKV_TRT_PLUGIN_NO_AUTOLOAD=1             never dlopen libnvinfer ourselves
 *  RWKV_TRT_PLUGIN_QUIET=1                   no warning when TensorRT cannot be found
 */
#include "common/rwkvPluginCommon.h"
#include "wkv4/wkv4Kernel.h"
#include "wkv4/wkv4Plugin.h"
#include "wkvhead/wkvHeadPlugin.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <mutex>

#ifndef RWKV_TRT_PLUGINS_VERSION
#define RWKV_TRT_PLUGINS_VERSION "0.1.0"
#endif

using nvinfer1::IPluginCreatorInterface;
using nvinfer1::IPluginCreatorV3One;
using Severity = nvinfer1::ILogger::Severity;

namespace rwkv
{
namespace trt
{
namespace
{

constexpr int32_t kNB_CREATORS{8};

// Function-local statics: constructed on first use, so the load-time registration below cannot
// run before them whatever the order of static initialization across files.
IPluginCreatorV3One* const* creators() noexcept
{
    static Wkv4PluginCreator sWkv4{/*seq=*/false};
    static Wkv4PluginCreator sWkv4Seq{/*seq=*/true};
    static WkvHeadPluginCreator sWkv5{WkvFamily::kWKV5, /*seq=*/false};
    static WkvHeadPluginCreator sWkv5Seq{WkvFamily::kWKV5, /*seq=*/true};
    static WkvHeadPluginCreator sWkv6{WkvFamily::kWKV6, /*seq=*/false};
    static WkvHeadPluginCreator sWkv6Seq{WkvFamily::kWKV6, /*seq=*/true};
    static WkvHeadPluginCreator sWkv7{WkvFamily::kWKV7, /*seq=*/false};
    static WkvHeadPluginCreator sWkv7Seq{WkvFamily::kWKV7, /*seq=*/true};
    static IPluginCreatorV3One* const sList[kNB_CREATORS]
        = {&sWkv4, &sWkv4Seq, &sWkv5, &sWkv5Seq, &sWkv6, &sWkv6Seq, &sWkv7, &sWkv7Seq};
    return sList;
}

IPluginCreatorInterface* const* creatorInterfaces() noexcept
{
    IPluginCreatorV3One* const* c = creators();
    static IPluginCreatorInterface* const sList[kNB_CREATORS] = {c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]};
    return sList;
}

//! True once this copy of the library has put at least one creator into a registry by itself.
std::atomic<bool> gRegisteredByUs{false};
std::mutex gRegisterMutex;

bool envFlag(char const* name) noexcept
{
    char const* v = std::getenv(name);
    return v != nullptr && v[0] != '\0' && !(v[0] == '0' && v[1] == '\0');
}

//! Registers each creator that the registry does not have yet. Returns how many of our creators
//! the registry holds afterwards, or a negative TensorRTLookup if there is no usable TensorRT.
int32_t registerWithTensorRT(bool allowLoad) noexcept
{
    try
    {
        std::lock_guard<std::mutex> lock(gRegisterMutex);
        TensorRTEntryPoints ep;
        TensorRTLookup const lookup = findTensorRT(ep, allowLoad);
        if (lookup != TensorRTLookup::kFOUND)
        {
            return static_cast<int32_t>(lookup);
        }
        nvinfer1::IPluginRegistry* registry = ep.getPluginRegistry();
        if (registry == nullptr)
        {
            return -1;
        }
        int32_t present = 0;
        for (int32_t i = 0; i < kNB_CREATORS; ++i)
        {
            IPluginCreatorV3One* c = creators()[i];
            if (registry->getCreator(c->getPluginName(), c->getPluginVersion(), c->getPluginNamespace()) != nullptr)
            {
                ++present; // loadLibrary or another copy of this library got there first
                continue;
            }
            if (registry->registerCreator(*c, c->getPluginNamespace()))
            {
                ++present;
                gRegisteredByUs.store(true);
            }
            else
            {
                log(Severity::kERROR, "could not register plugin creator %s::%s version %s", c->getPluginNamespace(),
                    c->getPluginName(), c->getPluginVersion());
            }
        }
        return present;
    }
    catch (...)
    {
        return -1;
    }
}

struct LoadTimeRegistration
{
    LoadTimeRegistration() noexcept
    {
        if (envFlag("RWKV_TRT_PLUGIN_NO_STATIC_REGISTRATION") || calledFromTensorRT())
        {
            return; // for loadLibrary, getCreators() is the way in
        }
        int32_t const status = registerWithTensorRT(/*allowLoad=*/!envFlag("RWKV_TRT_PLUGIN_NO_AUTOLOAD"));
        if (status == static_cast<int32_t>(TensorRTLookup::kNOT_LOADED) && !envFlag("RWKV_TRT_PLUGIN_QUIET"))
        {
            std::fprintf(stderr,
                "[rwkv-trt-plugins] WARNING: no TensorRT %d library is loaded in this process, so the rwkv::WKV4, "
                "WKV5, WKV6 and WKV7 plugins (and their Seq forms) were not registered. Load TensorRT first "
                "(import tensorrt), use IPluginRegistry::loadLibrary, or call rwkvTrtRegisterPlugins() afterwards. "
                "Without the plugins TensorRT's ONNX parser falls back to the nodes' function bodies.\n",
                NV_TENSORRT_MAJOR);
        }
    }
};

LoadTimeRegistration const gLoadTimeRegistration;

} // namespace
} // namespace trt
} // namespace rwkv

//! IPluginRegistry::loadLibrary entry point.
RWKV_EXPORT IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    if (rwkv::trt::gRegisteredByUs.load())
    {
        // Registered at dlopen time already; offering them again would make loadLibrary fail.
        rwkv::trt::log(Severity::kINFO,
            "the rwkv::WKV* plugins were registered when this library was first loaded; "
            "loadLibrary adds nothing");
        nbCreators = 0;
        return rwkv::trt::creatorInterfaces();
    }
    nbCreators = rwkv::trt::kNB_CREATORS;
    return rwkv::trt::creatorInterfaces();
}

//! IPluginRegistry::loadLibrary entry point: where log messages go while TensorRT drives us.
RWKV_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    rwkv::trt::setLoggerFinder(finder);
}

//! For processes that loaded this library before TensorRT: registers the creators in the global
//! registry of the TensorRT now loaded. Returns how many of the eight are registered; -1 if no
//! TensorRT is loaded, -2 if only one of another major version is. Safe to call repeatedly.
RWKV_EXPORT int32_t rwkvTrtRegisterPlugins()
{
    return rwkv::trt::registerWithTensorRT(/*allowLoad=*/false);
}

#define RWKV_STR2(x) #x
#define RWKV_STR(x) RWKV_STR2(x)

//! One line describing this build, for bug reports and tests.
RWKV_EXPORT char const* rwkvTrtPluginInfo()
{
    return "librwkv_trt_plugins " RWKV_TRT_PLUGINS_VERSION "; TensorRT headers " RWKV_STR(NV_TENSORRT_MAJOR) "."
        RWKV_STR(NV_TENSORRT_MINOR) "." RWKV_STR(NV_TENSORRT_PATCH) "; plugins rwkv::WKV4 v1, rwkv::WKV4Seq v1, "
        "rwkv::WKV5 v1, rwkv::WKV5Seq v1, rwkv::WKV6 v1, rwkv::WKV6Seq v1, rwkv::WKV7 v1, rwkv::WKV7Seq v1";
}
