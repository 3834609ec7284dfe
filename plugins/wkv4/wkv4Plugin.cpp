#include "wkv4Plugin.h"

#include "wkv4Kernel.h"

#include <climits>
#include <cstdio>
#include <cstring>

namespace rwkv
{
namespace trt
{
namespace
{

enum Input : int32_t
{
    kK = 0,
    kV,
    kW,
    kU,
    kAA,
    kBB,
    kPP
};

char const* const kINPUT_NAMES[kWKV4_NB_INPUTS] = {"k", "v", "w", "u", "aa", "bb", "pp"};

char const* opName(bool seq) noexcept
{
    return seq ? kWKV4_SEQ_NAME : kWKV4_NAME;
}

int32_t kvRank(bool seq) noexcept
{
    return seq ? 3 : 2;
}


//! Checks the seven input shapes against the op contract; logs the first problem. With
//! concrete=true (runtime) also requires known sizes that fit the launcher's int32 arguments.
bool checkInputShapes(bool seq, Dims const* const dims[kWKV4_NB_INPUTS], bool concrete) noexcept
{
    char got[160];
    Dims const& k = *dims[kK];
    int32_t const rank = kvRank(seq);
    if (k.nbDims != rank)
    {
        formatDims(k, got, sizeof(got));
        log(Severity::kERROR, "%s: input 'k' must have rank %d (%s), got %s", opName(seq), rank,
            seq ? "[B, T, C]" : "[B, C]", got);
        return false;
    }
    int64_t const B = k.d[0];
    int64_t const C = k.d[rank - 1];
    bool ok = true;
    int32_t bad = -1;
    char const* expect = "";
    for (int32_t i = 0; i < kWKV4_NB_INPUTS && ok; ++i)
    {
        Dims const& d = *dims[i];
        if (i == kV)
        {
            ok = d.nbDims == rank;
            for (int32_t j = 0; ok && j < rank; ++j)
            {
                ok = agree(d.d[j], k.d[j]);
            }
            expect = "the shape of 'k'";
        }
        else if (i == kW || i == kU)
        {
            ok = d.nbDims == 1 && agree(d.d[0], C);
            expect = "[C]";
        }
        else if (i >= kAA)
        {
            ok = d.nbDims == 2 && agree(d.d[0], B) && agree(d.d[1], C);
            expect = "[B, C]";
        }
        if (!ok)
        {
            bad = i;
        }
    }
    if (!ok)
    {
        formatDims(*dims[bad], got, sizeof(got));
        char kDims[160];
        formatDims(k, kDims, sizeof(kDims));
        log(Severity::kERROR, "%s: input '%s' has shape %s, expected %s with k %s", opName(seq), kINPUT_NAMES[bad], got,
            expect, kDims);
        return false;
    }
    if (concrete)
    {
        for (int32_t j = 0; j < rank; ++j)
        {
            if (k.d[j] < 0 || k.d[j] > INT32_MAX)
            {
                formatDims(k, got, sizeof(got));
                log(Severity::kERROR, "%s: unsupported size of 'k' %s (each dimension must be in [0, 2^31))",
                    opName(seq), got);
                return false;
            }
        }
    }
    return true;
}

bool checkCounts(bool seq, int32_t nbInputs, int32_t nbOutputs, char const* where) noexcept
{
    if (nbInputs != kWKV4_NB_INPUTS || nbOutputs != kWKV4_NB_OUTPUTS)
    {
        log(Severity::kERROR, "%s::%s: expected %d inputs and %d outputs, got %d and %d", opName(seq), where,
            kWKV4_NB_INPUTS, kWKV4_NB_OUTPUTS, nbInputs, nbOutputs);
        return false;
    }
    return true;
}

} // namespace

// ---- Wkv4Plugin ---------------------------------------------------------------------------------

Wkv4Plugin::Wkv4Plugin(bool seq) noexcept
    : PluginV3Base(opName(seq), kWKV4_VERSION, kWKV4_NB_OUTPUTS)
    , mSeq(seq)
{
}

int32_t Wkv4Plugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (!checkCounts(mSeq, nbInputs, nbOutputs, "getOutputDataTypes") || outputTypes == nullptr
        || inputTypes == nullptr)
    {
        return -1;
    }
    if (!isFloatOrHalf(inputTypes[kK]) || inputTypes[kV] != inputTypes[kK])
    {
        log(Severity::kERROR,
            "%s: k and v must both be float32 or both float16 (got types %d and %d); cast them in the ONNX model",
            getPluginName(), static_cast<int32_t>(inputTypes[kK]), static_cast<int32_t>(inputTypes[kV]));
        return -1;
    }
    for (int32_t i = kW; i < kWKV4_NB_INPUTS; ++i)
    {
        if (inputTypes[i] != DataType::kFLOAT)
        {
            log(Severity::kERROR, "%s: input '%s' must be float32 (got type %d)", getPluginName(), kINPUT_NAMES[i],
                static_cast<int32_t>(inputTypes[i]));
            return -1;
        }
    }
    outputTypes[0] = inputTypes[kK]; // y follows k
    outputTypes[1] = DataType::kFLOAT;
    outputTypes[2] = DataType::kFLOAT;
    outputTypes[3] = DataType::kFLOAT;
    return 0;
}

int32_t Wkv4Plugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
    int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs, nvinfer1::IExprBuilder& /*exprBuilder*/) noexcept
{
    if (!checkCounts(mSeq, nbInputs, nbOutputs, "getOutputShapes") || inputs == nullptr || outputs == nullptr)
    {
        return -1;
    }
    int32_t const rank = kvRank(mSeq);
    if (inputs[kK].nbDims != rank)
    {
        log(Severity::kERROR, "%s: input 'k' must have rank %d, got %d", getPluginName(), rank, inputs[kK].nbDims);
        return -1;
    }
    // Symbolic: y has k's (possibly dynamic) shape; the state is [B, C] taken from k, so a dynamic
    // batch or T flows through without any expression arithmetic.
    outputs[0] = inputs[kK];
    DimsExprs state{};
    state.nbDims = 2;
    state.d[0] = inputs[kK].d[0];
    state.d[1] = inputs[kK].d[rank - 1];
    outputs[1] = state;
    outputs[2] = state;
    outputs[3] = state;
    return 0;
}

bool Wkv4Plugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (inOut == nullptr || nbInputs != kWKV4_NB_INPUTS || nbOutputs != kWKV4_NB_OUTPUTS || pos < 0
        || pos >= nbInputs + nbOutputs)
    {
        return false;
    }
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    if (pos == kK)
    {
        return isFloatOrHalf(desc.type);
    }
    if (pos == kV || pos == nbInputs) // v and y: the type chosen for k
    {
        return desc.type == inOut[kK].desc.type;
    }
    return desc.type == DataType::kFLOAT; // w, u, states in and out
}

int32_t Wkv4Plugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    if (!checkCounts(mSeq, nbInputs, nbOutputs, "configurePlugin") || in == nullptr || out == nullptr)
    {
        return -1;
    }
    Dims const* dims[kWKV4_NB_INPUTS];
    for (int32_t i = 0; i < kWKV4_NB_INPUTS; ++i)
    {
        dims[i] = &in[i].desc.dims;
    }
    return checkInputShapes(mSeq, dims, /*concrete=*/false) ? 0 : -1;
}

int32_t Wkv4Plugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    if (!checkCounts(mSeq, nbInputs, nbOutputs, "onShapeChange") || in == nullptr || out == nullptr)
    {
        return fail();
    }
    Dims const* dims[kWKV4_NB_INPUTS];
    for (int32_t i = 0; i < kWKV4_NB_INPUTS; ++i)
    {
        dims[i] = &in[i].dims;
    }
    return checkInputShapes(mSeq, dims, /*concrete=*/true) ? 0 : fail(nvinfer1::ErrorCode::kINVALID_ARGUMENT);
}

int32_t Wkv4Plugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
    void const* const* inputs, void* const* outputs, void* /*workspace*/, cudaStream_t stream) noexcept
{
    if (inputDesc == nullptr || outputDesc == nullptr || inputs == nullptr || outputs == nullptr)
    {
        log(Severity::kERROR, "%s::enqueue: null descriptor or buffer array", getPluginName());
        return fail();
    }
    // Re-checked here (a few comparisons) because a wrong size would mean out-of-bounds accesses.
    Dims const* dims[kWKV4_NB_INPUTS];
    for (int32_t i = 0; i < kWKV4_NB_INPUTS; ++i)
    {
        dims[i] = &inputDesc[i].dims;
    }
    if (!checkInputShapes(mSeq, dims, /*concrete=*/true))
    {
        return fail();
    }
    DataType const type = inputDesc[kK].type;
    if (!isFloatOrHalf(type) || inputDesc[kV].type != type || outputDesc[0].type != type)
    {
        log(Severity::kERROR, "%s::enqueue: k, v and y must share one type, float32 or float16", getPluginName());
        return fail();
    }
    Dims const& k = inputDesc[kK].dims;
    int32_t const rank = kvRank(mSeq);
    auto const B = static_cast<int32_t>(k.d[0]);
    auto const T = mSeq ? static_cast<int32_t>(k.d[1]) : 1;
    auto const C = static_cast<int32_t>(k.d[rank - 1]);
    int32_t const dtype = type == DataType::kHALF ? RWKV_DTYPE_FLOAT16 : RWKV_DTYPE_FLOAT32;

    cudaError_t const status =
        rwkvWkv4Forward(stream, B, T, C, dtype, inputs[kK], inputs[kV], static_cast<float const*>(inputs[kW]),
            static_cast<float const*>(inputs[kU]), static_cast<float const*>(inputs[kAA]),
            static_cast<float const*>(inputs[kBB]), static_cast<float const*>(inputs[kPP]), outputs[0],
            static_cast<float*>(outputs[1]), static_cast<float*>(outputs[2]), static_cast<float*>(outputs[3]));
    if (status != cudaSuccess)
    {
        log(Severity::kERROR, "%s::enqueue: kernel launch failed (B=%d, T=%d, C=%d): %s", getPluginName(), B, T, C,
            cudaGetErrorString(status));
        fail();
        return static_cast<int32_t>(status);
    }
    return 0;
}

// ---- Wkv4PluginCreator --------------------------------------------------------------------------

Wkv4PluginCreator::Wkv4PluginCreator(bool seq) noexcept
    : PluginCreatorBase(opName(seq), kWKV4_VERSION)
    , mSeq(seq)
{
}

IPluginV3* Wkv4PluginCreator::make() noexcept
{
    return new (std::nothrow) Wkv4Plugin(mSeq);
}

} // namespace trt
} // namespace rwkv
