/*
 * Shared pieces of librwkv_trt_plugins.so: logging, the run-time link to the TensorRT library that
 * is already in the process, and the registration entry points.
 *
 * The library is deliberately not linked against libnvinfer (it builds from headers alone and
 * never drags a second copy of TensorRT into a process); everything it needs from TensorRT at
 * load time is looked up with dlsym. See plugins/README.md, "How the library is loaded".
 */
#ifndef RWKV_PLUGIN_COMMON_H
#define RWKV_PLUGIN_COMMON_H

#include "NvInferRuntime.h"

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
//! the TensorRT library in the process (getLogger()), stderr. Never throws.
void log(nvinfer1::ILogger::Severity severity, char const* fmt, ...) noexcept __attribute__((format(printf, 2, 3)));

//! Called by the exported setLoggerFinder().
void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept;

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
    kNOT_LOADED = -1,    //!< no TensorRT library in the process (and none could be loaded)
    kWRONG_VERSION = -2, //!< only a TensorRT of another major version than the headers'
};

//! Finds getPluginRegistry & co. in the TensorRT already loaded in this process (a linked or
//! dlopen'ed libnvinfer.so.<major>, or libnvinfer_lean.so.<major>). With allowLoad, and only if
//! no TensorRT at all is loaded, dlopens libnvinfer.so.<major> by soname, which is what linking
//! against it would have done. A TensorRT of another major version is never called into (its
//! interfaces differ); that case is reported on stderr.
TensorRTLookup findTensorRT(TensorRTEntryPoints& out, bool allowLoad) noexcept;

//! True when the current call stack passes through a TensorRT library, i.e. this library is being
//! dlopen'ed by IPluginRegistry::loadLibrary (or by engine deserialization of an embedded plugin
//! library), which registers our creators itself through getCreators().
bool calledFromTensorRT() noexcept;

//! The single field every plugin of this library writes into an engine (getFieldsToSerialize).
constexpr char const* kFORMAT_VERSION_FIELD{"format_version"};

//! In createPlugin(): false (and logs why) when `fc` comes from an engine whose format_version
//! field differs from `expected`. Build-phase collections (phase != kRUNTIME) always pass: the
//! ONNX parser passes only fields named by getFieldNames(), i.e. none.
bool engineFormatMatches(nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase,
    int32_t expected, char const* opName) noexcept;

} // namespace trt
} // namespace rwkv

#endif // RWKV_PLUGIN_COMMON_H
