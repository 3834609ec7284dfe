/*
 * Shared pieces of librwkv_trt_plugins.so: logging and error reporting, shape/type helpers, the
 * engine format check. The IPluginV3 boilerplate every op shares is in rwkvPluginBase.h; how the
 * library meets TensorRT (entry points, registration) is in rwkvPluginRegistration.cpp only.
 *
 * The library is not linked against libnvinfer: it builds from headers alone and uses only the
 * TensorRT already in the process. See plugins/README.md, "Loading".
 */
#ifndef RWKV_PLUGIN_COMMON_H
#define RWKV_PLUGIN_COMMON_H

#include "NvInferRuntime.h"

#include <cstddef>
#include <cstdint>

#define RWKV_EXPORT extern "C" __attribute__((visibility("default")))

namespace rwkv
{
namespace trt
{

//! Namespace of every creator in this library; equals the ONNX domain and the nodes'
//! plugin_namespace attribute.
constexpr char const* kPLUGIN_NAMESPACE{"rwkv"};

//! Logs through, in order: the ILoggerFinder given by IPluginRegistry::loadLibrary, the logger of
//! the TensorRT library in the process (getLogger()), stderr. Never throws. Errors (kERROR and
//! worse) are also remembered per thread for recordLastError().
void log(nvinfer1::ILogger::Severity severity, char const* fmt, ...) noexcept __attribute__((format(printf, 2, 3)));

//! Called by the exported setLoggerFinder().
void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept;

//! Hands the last error this thread logged to `recorder` (the execution context's error recorder,
//! from attachToContext) so that applications with an IErrorRecorder see plugin failures too.
//! Does nothing without a recorder. Always returns -1 (the plugin API's failure value).
int32_t recordLastError(nvinfer1::IErrorRecorder* recorder, nvinfer1::ErrorCode code) noexcept;

//! Entry points of the TensorRT library found in this process.
struct TensorRTEntryPoints
{
    nvinfer1::IPluginRegistry* (*getPluginRegistry)() noexcept {nullptr};
    nvinfer1::ILogger* (*getLogger)() noexcept {nullptr};
    int32_t (*getInferLibVersion)() noexcept {nullptr};
};

enum class TensorRTLookup : int32_t
{
    kFOUND = 0,
    kNOT_LOADED = -1,    //!< no TensorRT library in the process
    kWRONG_VERSION = -2, //!< only a TensorRT of another major version than the headers'
};

//! Finds getPluginRegistry & co. in a TensorRT that is ALREADY loaded in this process (linked, or
//! dlopen'ed by Python's tensorrt package, by any path). Never loads one: a dlopen by soname could
//! bring a second, different TensorRT into the process. Defined in rwkvPluginRegistration.cpp.
TensorRTLookup findTensorRT(TensorRTEntryPoints& out) noexcept;

//! The single field every plugin of this library writes into an engine (getFieldsToSerialize).
constexpr char const* kFORMAT_VERSION_FIELD{"format_version"};

//! In createPlugin(): false (and logs why) when `fc` comes from an engine whose format_version
//! field differs from `expected`. Build-phase collections (phase != kRUNTIME) always pass: the
//! ONNX parser passes only fields named by getFieldNames(), i.e. none.
bool engineFormatMatches(nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase, int32_t expected,
    char const* opName) noexcept;

//! "[2, -1, 64]" into buf (for messages).
void formatDims(nvinfer1::Dims const& d, char* buf, size_t size) noexcept;

//! -1 is a dimension unknown at build time; it agrees with anything.
inline bool agree(int64_t a, int64_t b) noexcept
{
    return a < 0 || b < 0 || a == b;
}

//! The activation types the kernels have: float32 and float16.
inline bool isFloatOrHalf(nvinfer1::DataType t) noexcept
{
    return t == nvinfer1::DataType::kFLOAT || t == nvinfer1::DataType::kHALF;
}

} // namespace trt
} // namespace rwkv

#endif // RWKV_PLUGIN_COMMON_H
