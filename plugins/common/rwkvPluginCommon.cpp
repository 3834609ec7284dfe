#include "rwkvPluginCommon.h"

#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstring>

namespace rwkv
{
namespace trt
{
namespace
{

std::atomic<nvinfer1::ILoggerFinder*> gLoggerFinder{nullptr};

// The last error logged on this thread, for recordLastError() (plugin calls are per-thread).
thread_local char tLastError[1024] = "";

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
    if (severity <= nvinfer1::ILogger::Severity::kERROR)
    {
        std::memcpy(tLastError, msg, sizeof(msg));
    }

    nvinfer1::ILogger* logger{nullptr};
    if (nvinfer1::ILoggerFinder* finder = gLoggerFinder.load())
    {
        logger = finder->findLogger();
    }
    if (logger == nullptr)
    {
        TensorRTEntryPoints ep;
        if (findTensorRT(ep) == TensorRTLookup::kFOUND && ep.getLogger != nullptr)
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

int32_t recordLastError(nvinfer1::IErrorRecorder* recorder, nvinfer1::ErrorCode code) noexcept
{
    if (recorder != nullptr)
    {
        recorder->reportError(code, tLastError[0] != '\0' ? tLastError : "rwkv plugin failure");
    }
    return -1;
}

void formatDims(nvinfer1::Dims const& d, char* buf, size_t size) noexcept
{
    size_t used = static_cast<size_t>(std::snprintf(buf, size, "["));
    for (int32_t i = 0; i < d.nbDims && used < size; ++i)
    {
        used += static_cast<size_t>(
            std::snprintf(buf + used, size - used, i ? ", %lld" : "%lld", static_cast<long long>(d.d[i])));
    }
    if (used < size)
    {
        std::snprintf(buf + used, size - used, "]");
    }
}

bool engineFormatMatches(nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase, int32_t expected,
    char const* opName) noexcept
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
