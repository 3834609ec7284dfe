/*
 * The IPluginV3 glue every rwkv op shares, written once. An op supplies its name, version, shape
 * and type rules and enqueue(); this file supplies the capability table, clone, namespace, the
 * timing-cache id, the per-context error recorder and the serialized fields. Creators likewise:
 * PluginCreatorBase does naming, fields and the engine format check; an op's creator only says
 * how to make its plugin.
 */
#ifndef RWKV_PLUGIN_BASE_H
#define RWKV_PLUGIN_BASE_H

#include "common/rwkvPluginCommon.h"

#include <new>

namespace rwkv
{
namespace trt
{

// The TensorRT names the op files use.
using nvinfer1::DataType;
using nvinfer1::Dims;
using nvinfer1::DimsExprs;
using nvinfer1::DynamicPluginTensorDesc;
using nvinfer1::IPluginCapability;
using nvinfer1::IPluginV3;
using nvinfer1::PluginCapabilityType;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldCollection;
using nvinfer1::PluginFieldType;
using nvinfer1::PluginTensorDesc;
using nvinfer1::TensorFormat;
using nvinfer1::TensorRTPhase;
using Severity = nvinfer1::ILogger::Severity;

//! The methods each op defines (its shape and type rules, enqueue); everything else of IPluginV3
//! comes from PluginV3Base. Put in the op class's public section.
#define RWKV_PLUGIN_OP_METHODS                                                                                         \
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,                                     \
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;                               \
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,                                       \
        nvinfer1::DimsExprs const* shapeInputs, int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs,                   \
        int32_t nbOutputs, nvinfer1::IExprBuilder& exprBuilder) noexcept override;                                     \
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,      \
        int32_t nbOutputs) noexcept override;                                                                          \
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,                             \
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;                            \
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,                                      \
        nvinfer1::PluginTensorDesc const* out, int32_t nbOutputs) noexcept override;                                   \
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,         \
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override

//! Name, version and namespace, for a plugin and its creator alike.
#define RWKV_PLUGIN_IDENTITY(NAME, VERSION)                                                                            \
    char const* getPluginName() const noexcept override                                                                \
    {                                                                                                                  \
        return NAME;                                                                                                   \
    }                                                                                                                  \
    char const* getPluginVersion() const noexcept override                                                             \
    {                                                                                                                  \
        return VERSION;                                                                                                \
    }                                                                                                                  \
    char const* getPluginNamespace() const noexcept override                                                           \
    {                                                                                                                  \
        return kPLUGIN_NAMESPACE;                                                                                      \
    }

//! Version of what getFieldsToSerialize writes; createPlugin(kRUNTIME) rejects engines with another.
constexpr int32_t kENGINE_FORMAT_VERSION{1};

template <typename Derived>
class PluginV3Base : public nvinfer1::IPluginV3,
                     public nvinfer1::IPluginV3OneCore,
                     public nvinfer1::IPluginV3OneBuild,
                     public nvinfer1::IPluginV3OneRuntime
{
public:
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override
    {
        switch (type)
        {
        case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
        case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
        case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
        }
        return nullptr;
    }

    nvinfer1::IPluginV3* clone() noexcept override
    {
        auto* copy = new (std::nothrow) Derived(static_cast<Derived const&>(*this));
        if (copy == nullptr)
        {
            log(nvinfer1::ILogger::Severity::kERROR, "%s: out of host memory in clone()", this->getPluginName());
        }
        return copy;
    }

    RWKV_PLUGIN_IDENTITY(mName, mVersion)
    int32_t getNbOutputs() const noexcept override
    {
        return mNbOutputs;
    }

    //! The ops have no attributes, so one timing entry per op and shape is right. (The default,
    //! nullptr, would keep the plugin's timings out of the timing cache.)
    char const* getTimingCacheID() noexcept override
    {
        return "";
    }

    //! No per-context resources; the clone keeps the context's error recorder for enqueue errors.
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override
    {
        auto* copy = static_cast<Derived*>(clone());
        if (copy != nullptr && context != nullptr)
        {
            static_cast<PluginV3Base*>(copy)->mRecorder = context->getErrorRecorder();
        }
        return copy;
    }

    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override
    {
        mSerialField =
            nvinfer1::PluginField(kFORMAT_VERSION_FIELD, &mFormatVersion, nvinfer1::PluginFieldType::kINT32, 1);
        mSerialFields.nbFields = 1;
        mSerialFields.fields = &mSerialField;
        return &mSerialFields;
    }

protected:
    //! name and version: static strings (the op's ONNX op_type and plugin_version).
    PluginV3Base(char const* name, char const* version, int32_t nbOutputs) noexcept
        : mName(name)
        , mVersion(version)
        , mNbOutputs(nbOutputs)
    {
    }
    // The serialization fields point into the object itself, so they are rebuilt, never copied.
    PluginV3Base(PluginV3Base const& other) noexcept
        : mName(other.mName)
        , mVersion(other.mVersion)
        , mNbOutputs(other.mNbOutputs)
        , mRecorder(other.mRecorder)
    {
    }
    PluginV3Base& operator=(PluginV3Base const&) = delete;

    //! For runtime failures: the last logged error also goes to the context's error recorder.
    int32_t fail(nvinfer1::ErrorCode code = nvinfer1::ErrorCode::kFAILED_EXECUTION) const noexcept
    {
        return recordLastError(mRecorder, code);
    }

private:
    char const* mName;
    char const* mVersion;
    int32_t mNbOutputs;
    nvinfer1::IErrorRecorder* mRecorder{nullptr};
    int32_t mFormatVersion{kENGINE_FORMAT_VERSION};
    nvinfer1::PluginField mSerialField;
    nvinfer1::PluginFieldCollection mSerialFields{};
};

class PluginCreatorBase : public nvinfer1::IPluginCreatorV3One
{
public:
    PluginCreatorBase(char const* name, char const* version) noexcept
        : mName(name)
        , mVersion(version)
    {
    }

    RWKV_PLUGIN_IDENTITY(mName, mVersion)
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override
    {
        return &mFieldNames; // none: plugin_version/plugin_namespace are the parser's
    }

    nvinfer1::IPluginV3* createPlugin(char const* /*name*/, nvinfer1::PluginFieldCollection const* fc,
        nvinfer1::TensorRTPhase phase) noexcept override
    {
        // Runtime phase: fc is what getFieldsToSerialize() wrote into the engine.
        if (!engineFormatMatches(fc, phase, kENGINE_FORMAT_VERSION, mName))
        {
            return nullptr;
        }
        nvinfer1::IPluginV3* plugin = make();
        if (plugin == nullptr)
        {
            log(nvinfer1::ILogger::Severity::kERROR, "%s: out of host memory in createPlugin()", mName);
        }
        return plugin;
    }

protected:
    //! A new plugin (nullptr when out of memory; use new (std::nothrow)).
    virtual nvinfer1::IPluginV3* make() noexcept = 0;

private:
    char const* mName;
    char const* mVersion;
    nvinfer1::PluginFieldCollection mFieldNames{};
};

} // namespace trt
} // namespace rwkv

#endif // RWKV_PLUGIN_BASE_H
