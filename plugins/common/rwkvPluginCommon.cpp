#include "rwkvPluginCommon.h"

#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstring>

#include <dlfcn.h>
#include <unwind.h>

namespace rwkv
{
namespace trt
{
namespace
{

std::atomic<nvinfer1::ILoggerFinder*> gLoggerFinder{nullptr};

char const* severityName(nvinfer1::ILogger::Severity s) noexcept
{
    switch (s)
    {
    case nvinfer1::ILogger::Severity::kINTERNAL_ERROR: return "INTERNAL_ERROR";
    case nvinfer1::ILogger::Severity::kERROR: return "ERROR";
    case nvinfer1::ILogger::Severity::kWARNING: return "WARNING";
    case nvinfer1::ILogger::Severity::kINFO: return "INFO";
    case nvinfer1::ILogger::Severity::kVERBOSE: return "VERBOSE";
    }
    return "LOG";
}

#define RWKV_STR2(x) #x
#define RWKV_STR(x) RWKV_STR2(x)
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

//! Is a libnvinfer of another major version loaded? Then loading ours would put two TensorRTs in
//! one process, and registering into the one nobody uses would help no one.
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

struct StackWalk
{
    static constexpr int kMAX{96};
    uintptr_t ips[kMAX];
    int n{0};
};

_Unwind_Reason_Code collectFrame(_Unwind_Context* ctx, void* arg)
{
    auto* walk = static_cast<StackWalk*>(arg);
    if (walk->n >= StackWalk::kMAX)
    {
        return _URC_END_OF_STACK;
    }
    uintptr_t const ip = _Unwind_GetIP(ctx);
    if (ip != 0)
    {
        walk->ips[walk->n++] = ip;
    }
    return _URC_NO_REASON;
}

bool isTensorRTLibrary(char const* path) noexcept
{
    char const* slash = std::strrchr(path, '/');
    char const* base = slash ? slash + 1 : path;
    // libnvinfer.so.N, libnvinfer_lean.so.N, libnvinfer_dispatch.so.N; not the standard plugin
    // library (it never loads plugin libraries) and never ourselves.
    return std::strncmp(base, "libnvinfer", 10) == 0 && std::strncmp(base, "libnvinfer_plugin", 17) != 0;
}

} // namespace

void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept
{
    gLoggerFinder.store(finder);
}

void log(nvinfer1::ILogger::Severity severity, char const* fmt, ...) noexcept
{
    char msg[1024];
    va_list args;
    va_start(args, fmt);
    std::vsnprintf(msg, sizeof(msg), fmt, args);
    va_end(args);

    nvinfer1::ILogger* logger{nullptr};
    if (nvinfer1::ILoggerFinder* finder = gLoggerFinder.load())
    {
        logger = finder->findLogger();
    }
    if (logger == nullptr)
    {
        TensorRTEntryPoints ep;
        if (findTensorRT(ep, /*allowLoad=*/false) == TensorRTLookup::kFOUND && ep.getLogger != nullptr)
        {
            logger = ep.getLogger();
        }
    }
    if (logger != nullptr)
    {
        logger->log(severity, msg);
        return;
    }
    if (severity <= nvinfer1::ILogger::Severity::kWARNING)
    {
        std::fprintf(stderr, "[rwkv-trt-plugins] %s: %s\n", severityName(severity), msg);
    }
}

TensorRTLookup findTensorRT(TensorRTEntryPoints& out, bool allowLoad) noexcept
{
    bool found = fill(RTLD_DEFAULT, out); // linked into the executable, or loaded RTLD_GLOBAL
    for (char const* soname : kNVINFER_SONAMES)
    {
        if (found)
        {
            break;
        }
        // RTLD_NOLOAD: only a library that is already loaded (e.g. RTLD_LOCAL by Python's tensorrt
        // package) is returned; matching by soname finds it whatever path it was loaded from.
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
    if (otherMajorLoaded())
    {
        return TensorRTLookup::kWRONG_VERSION;
    }
    if (allowLoad)
    {
        // Exactly what a DT_NEEDED entry would do; the handle is kept for the process lifetime.
        if (void* h = dlopen(kNVINFER_SONAMES[0], RTLD_LAZY | RTLD_LOCAL))
        {
            if (fill(h, out))
            {
                return versionMatches(out) ? TensorRTLookup::kFOUND : TensorRTLookup::kWRONG_VERSION;
            }
        }
    }
    return TensorRTLookup::kNOT_LOADED;
}

bool calledFromTensorRT() noexcept
{
    StackWalk walk;
    _Unwind_Backtrace(collectFrame, &walk);
    for (int i = 0; i < walk.n; ++i)
    {
        Dl_info info{};
        // ip - 1: the return address may already belong to the next function.
        if (dladdr(reinterpret_cast<void*>(walk.ips[i] - 1), &info) != 0 && info.dli_fname != nullptr
            && isTensorRTLibrary(info.dli_fname))
        {
            return true;
        }
    }
    return false;
}

bool engineFormatMatches(nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase,
    int32_t expected, char const* opName) noexcept
{
    if (phase != nvinfer1::TensorRTPhase::kRUNTIME || fc == nullptr)
    {
        return true;
    }
    for (int32_t i = 0; i < fc->nbFields; ++i)
    {
        nvinfer1::PluginField const& f = fc->fields[i];
        if (f.name == nullptr || std::strcmp(f.name, kFORMAT_VERSION_FIELD) != 0)
        {
            continue;
        }
        int32_t const version = (f.type == nvinfer1::PluginFieldType::kINT32 && f.length == 1 && f.data != nullptr)
            ? *static_cast<int32_t const*>(f.data)
            : -1;
        if (version != expected)
        {
            log(nvinfer1::ILogger::Severity::kERROR,
                "%s: the engine was built by an incompatible version of this plugin (format %d, expected %d); "
                "rebuild the engine",
                opName, version, expected);
            return false;
        }
    }
    return true;
}

} // namespace trt
} // namespace rwkv
