/*
 * How TensorRT meets librwkv_trt_plugins.so: the list of creators, the entry points, and the
 * lookup of the TensorRT in the process.
 *
 * >>> This file is the one piece to verify inside real TensorRT. <<<  Everything else in plugins/
 * is checked against numpy and onnxruntime or driven through the IPluginV3 interfaces by
 * plugins/tests/mock_trt_check.cpp; what this file assumes about TensorRT's loader and registry
 * (NvInferRuntimeCommon.h, IPluginRegistry) is only modelled by plugins/tests/mock_nvinfer.cpp.
 *
 * Two libraries, one per documented loading mechanism (plugins/README.md, "Loading"):
 *
 *  librwkv_trt_plugins.so -- for IPluginRegistry::loadLibrary: trtexec --dynamicPlugins, Python
 *      get_plugin_registry().load_library(), rwkv_runtime, engines with an embedded plugin
 *      library. TensorRT dlopens it, calls the exported setLoggerFinder() and getCreators() and
 *      registers the creators itself. The library registers nothing by itself: no static
 *      initializer, so loadLibrary never finds our creators already there.
 *  librwkv_trt_plugins_autoregister.so -- for loaders that only dlopen: ctypes.CDLL, Polygraphy
 *      --plugins, trtexec --staticPlugins. A one-function library (common/rwkvAutoRegister.cpp)
 *      that depends on the first and, when loaded, calls its rwkvTrtRegisterPlugins().
 *
 * Use one of the two per process: a loadLibrary of librwkv_trt_plugins.so after the autoregister
 * library fails as TensorRT's loadLibrary does for any library whose creators exist already.
 */
#include "common/rwkvPluginCommon.h"
#include "wkv4/wkv4Plugin.h"
#include "wkvhead/wkvHeadPlugin.h"

#include <cstdio>
#include <cstring>
#include <mutex>

#include <dlfcn.h>

#ifndef RWKV_TRT_PLUGINS_VERSION
#define RWKV_TRT_PLUGINS_VERSION "0.1.0"
#endif
#define RWKV_STR2(x) #x
#define RWKV_STR(x) RWKV_STR2(x)

using nvinfer1::IPluginCreatorInterface;
using nvinfer1::IPluginCreatorV3One;
using Severity = nvinfer1::ILogger::Severity;

namespace rwkv
{
namespace trt
{
namespace
{

// The ops of this library. Adding an op: one line here (and its plugin + kernel files).
constexpr int32_t kNB_CREATORS{8};

IPluginCreatorInterface* const* creators() noexcept
{
    // Function-local statics: constructed on first use, whatever the static initialization order.
    static Wkv4PluginCreator sWkv4{/*seq=*/false};
    static Wkv4PluginCreator sWkv4Seq{/*seq=*/true};
    static WkvHeadPluginCreator sWkv5{WkvFamily::kWKV5, /*seq=*/false};
    static WkvHeadPluginCreator sWkv5Seq{WkvFamily::kWKV5, /*seq=*/true};
    static WkvHeadPluginCreator sWkv6{WkvFamily::kWKV6, /*seq=*/false};
    static WkvHeadPluginCreator sWkv6Seq{WkvFamily::kWKV6, /*seq=*/true};
    static WkvHeadPluginCreator sWkv7{WkvFamily::kWKV7, /*seq=*/false};
    static WkvHeadPluginCreator sWkv7Seq{WkvFamily::kWKV7, /*seq=*/true};
    static IPluginCreatorInterface* const sList[kNB_CREATORS] = {
        &sWkv4, &sWkv4Seq, &sWkv5, &sWkv5Seq, &sWkv6, &sWkv6Seq, &sWkv7, &sWkv7Seq};
    return sList;
}

IPluginCreatorV3One* creatorV3(int32_t i) noexcept
{
    return static_cast<IPluginCreatorV3One*>(creators()[i]);
}

// Sonames of the TensorRT libraries that own a plugin registry, for the major version of the headers.
char const* const kNVINFER_SONAMES[] = {
    "libnvinfer.so." RWKV_STR(NV_TENSORRT_MAJOR),
    "libnvinfer_lean.so." RWKV_STR(NV_TENSORRT_MAJOR),
};

template <typename Fn>
Fn lookup(void* handle, char const* name) noexcept
{
    return reinterpret_cast<Fn>(dlsym(handle, name));
}

bool fill(void* handle, TensorRTEntryPoints& out) noexcept
{
    TensorRTEntryPoints ep;
    ep.getPluginRegistry = lookup<decltype(ep.getPluginRegistry)>(handle, "getPluginRegistry");
    ep.getLogger = lookup<decltype(ep.getLogger)>(handle, "getLogger");
    ep.getInferLibVersion = lookup<decltype(ep.getInferLibVersion)>(handle, "getInferLibVersion");
    if (ep.getPluginRegistry == nullptr)
    {
        return false;
    }
    out = ep;
    return true;
}

void reportWrongVersion(char const* loaded) noexcept
{
    std::fprintf(stderr,
        "[rwkv-trt-plugins] ERROR: built against TensorRT %d.%d headers, but TensorRT %s is loaded; rebuild the "
        "plugin library against the TensorRT in use (plugins not registered)\n",
        NV_TENSORRT_MAJOR, NV_TENSORRT_MINOR, loaded);
}

bool versionMatches(TensorRTEntryPoints const& ep) noexcept
{
    if (ep.getInferLibVersion == nullptr)
    {
        return true; // cannot tell; the lean runtime may not export it
    }
    int32_t const v = ep.getInferLibVersion();
    if (v / 10000 != NV_TENSORRT_MAJOR)
    {
        char loaded[32];
        std::snprintf(loaded, sizeof(loaded), "%d.%d.%d", v / 10000, (v / 100) % 100, v % 100);
        reportWrongVersion(loaded);
        return false;
    }
    return true;
}

//! Is a libnvinfer of another major version loaded? Its interfaces differ; never call into it.
bool otherMajorLoaded() noexcept
{
    for (int32_t major = 8; major <= 20; ++major)
    {
        if (major == NV_TENSORRT_MAJOR)
        {
            continue;
        }
        char soname[32];
        std::snprintf(soname, sizeof(soname), "libnvinfer.so.%d", major);
        if (void* h = dlopen(soname, RTLD_LAZY | RTLD_NOLOAD))
        {
            dlclose(h);
            std::snprintf(soname, sizeof(soname), "%d.x", major);
            reportWrongVersion(soname);
            return true;
        }
    }
    return false;
}

//! Whether the registry holds a creator with c's name, version and namespace. Walks
//! getAllCreators() instead of calling getCreator(), which logs "Cannot find plugin" as an error
//! for every miss (and that error later reads as the cause of unrelated failures).
bool registryHas(nvinfer1::IPluginRegistry& registry, IPluginCreatorV3One const& c) noexcept
{
    int32_t n = 0;
    IPluginCreatorInterface* const* all = registry.getAllCreators(&n);
    for (int32_t i = 0; all != nullptr && i < n; ++i)
    {
        if (all[i] == nullptr || std::strcmp(all[i]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") != 0)
        {
            continue;
        }
        auto const* r = static_cast<IPluginCreatorV3One const*>(all[i]);
        if (std::strcmp(r->getPluginName(), c.getPluginName()) == 0
            && std::strcmp(r->getPluginVersion(), c.getPluginVersion()) == 0
            && std::strcmp(r->getPluginNamespace(), c.getPluginNamespace()) == 0)
        {
            return true;
        }
    }
    return false;
}

std::mutex gRegisterMutex; // only our own calls; never held while TensorRT calls back into us

} // namespace

TensorRTLookup findTensorRT(TensorRTEntryPoints& out) noexcept
{
    bool found = fill(RTLD_DEFAULT, out); // linked into the executable, or loaded RTLD_GLOBAL
    for (char const* soname : kNVINFER_SONAMES)
    {
        if (found)
        {
            break;
        }
        // RTLD_NOLOAD: only a library that is already loaded (e.g. RTLD_LOCAL by Python's tensorrt
        // package, by full path) is returned; nothing new is ever loaded.
        if (void* h = dlopen(soname, RTLD_LAZY | RTLD_NOLOAD))
        {
            found = fill(h, out);
            dlclose(h); // drops only the reference NOLOAD added
        }
    }
    if (found)
    {
        return versionMatches(out) ? TensorRTLookup::kFOUND : TensorRTLookup::kWRONG_VERSION;
    }
    return otherMajorLoaded() ? TensorRTLookup::kWRONG_VERSION : TensorRTLookup::kNOT_LOADED;
}

} // namespace trt
} // namespace rwkv

//! IPluginRegistry::loadLibrary entry point: all creators, every time (the documented contract).
RWKV_EXPORT IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    nbCreators = rwkv::trt::kNB_CREATORS;
    return rwkv::trt::creators();
}

//! IPluginRegistry::loadLibrary entry point: where log messages go while TensorRT drives us.
RWKV_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    rwkv::trt::setLoggerFinder(finder);
}

//! The explicit registration for loaders that only dlopen (called by librwkv_trt_plugins_autoregister.so,
//! or by an application): registers, in the global registry of the TensorRT already loaded, each
//! creator it does not hold yet. Returns how many of the eight it holds afterwards; -1 if no
//! TensorRT is loaded, -2 if only one of another major version is. Safe to call repeatedly.
RWKV_EXPORT int32_t rwkvTrtRegisterPlugins()
{
    using namespace rwkv::trt;
    try
    {
        std::lock_guard<std::mutex> lock(gRegisterMutex);
        TensorRTEntryPoints ep;
        TensorRTLookup const lookup = findTensorRT(ep);
        if (lookup != TensorRTLookup::kFOUND)
        {
            return static_cast<int32_t>(lookup);
        }
        nvinfer1::IPluginRegistry* registry = ep.getPluginRegistry();
        if (registry == nullptr)
        {
            return static_cast<int32_t>(TensorRTLookup::kNOT_LOADED);
        }
        int32_t present = 0;
        for (int32_t i = 0; i < kNB_CREATORS; ++i)
        {
            IPluginCreatorV3One* c = creatorV3(i);
            if (registryHas(*registry, *c) || registry->registerCreator(*c, c->getPluginNamespace()))
            {
                ++present;
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
        return static_cast<int32_t>(TensorRTLookup::kNOT_LOADED);
    }
}

//! One line describing this build, for bug reports and tests.
RWKV_EXPORT char const* rwkvTrtPluginInfo()
{
    return "librwkv_trt_plugins " RWKV_TRT_PLUGINS_VERSION
           "; TensorRT headers " RWKV_STR(NV_TENSORRT_MAJOR) "." RWKV_STR(NV_TENSORRT_MINOR) "." RWKV_STR(
               NV_TENSORRT_PATCH) "; plugins rwkv::WKV4 v1, rwkv::WKV4Seq v1, "
                                  "rwkv::WKV5 v1, rwkv::WKV5Seq v1, rwkv::WKV6 v1, rwkv::WKV6Seq v1, rwkv::WKV7 v1, "
                                  "rwkv::WKV7Seq v1";
}
