#include "wkvHeadPlugin.h"

#include "wkvHeadKernel.h"

#include <climits>
#include <cstdio>
#include <cstring>

namespace rwkv
{
namespace trt
{
namespace
{

//! What an input is. Input 0 is always r, whose type is "the activation type" of the node.
enum class Role : int8_t
{
    kTOKEN, //!< per-token activation: r's shape, r's type
    kDECAY, //!< per-token decay w: r's shape, r's type or float32
    kPARAM, //!< [H, N] float32 (WKV5's w and u, WKV6's u)
    kSTATE, //!< [B, H, N, N] float32
};

struct OpTable
{
    char const* name;
    char const* seqName;
    int32_t nbInputs;
    char const* inputNames[kWKVHEAD_MAX_INPUTS];
    Role roles[kWKVHEAD_MAX_INPUTS];
};

// Input order = the ONNX nodes' (exporter/arch/headwise.py, WKV_OPS).
constexpr OpTable kWKV5_TABLE{"WKV5", "WKV5Seq", 6, {"r", "k", "v", "w", "u", "state"},
    {Role::kTOKEN, Role::kTOKEN, Role::kTOKEN, Role::kPARAM, Role::kPARAM, Role::kSTATE}};
constexpr OpTable kWKV6_TABLE{"WKV6", "WKV6Seq", 6, {"r", "k", "v", "w", "u", "state"},
    {Role::kTOKEN, Role::kTOKEN, Role::kTOKEN, Role::kDECAY, Role::kPARAM, Role::kSTATE}};
constexpr OpTable kWKV7_TABLE{"WKV7", "WKV7Seq", 7, {"r", "w", "k", "v", "a", "b", "state"},
    {Role::kTOKEN, Role::kDECAY, Role::kTOKEN, Role::kTOKEN, Role::kTOKEN, Role::kTOKEN, Role::kSTATE}};

OpTable const& table(WkvFamily family) noexcept
{
    switch (family)
    {
    case WkvFamily::kWKV5: return kWKV5_TABLE;
    case WkvFamily::kWKV6: return kWKV6_TABLE;
    case WkvFamily::kWKV7: break;
    }
    return kWKV7_TABLE;
}


char const* opName(WkvFamily family, bool seq) noexcept
{
    return seq ? table(family).seqName : table(family).name;
}

int32_t actRank(bool seq) noexcept
{
    return seq ? 4 : 3;
}


//! Whether an input of `role` may have type `t` when r has type `act`.
bool typeAllowed(Role role, DataType t, DataType act) noexcept
{
    switch (role)
    {
    case Role::kTOKEN: return t == act;
    case Role::kDECAY: return t == act || t == DataType::kFLOAT;
    case Role::kPARAM:
    case Role::kSTATE: break;
    }
    return t == DataType::kFLOAT;
}

char const* roleTypeText(Role role) noexcept
{
    switch (role)
    {
    case Role::kTOKEN: return "the type of 'r'";
    case Role::kDECAY: return "the type of 'r' or float32";
    case Role::kPARAM:
    case Role::kSTATE: break;
    }
    return "float32";
}


//! Checks the input shapes against the op contract; logs the first problem. With concrete=true
//! (runtime) also requires known sizes that fit the launchers' int32 arguments.
bool checkInputShapes(WkvFamily family, bool seq, Dims const* const* dims, bool concrete) noexcept
{
    OpTable const& op = table(family);
    char const* const name = opName(family, seq);
    char got[160];
    Dims const& r = *dims[0];
    int32_t const rank = actRank(seq);
    if (r.nbDims != rank)
    {
        formatDims(r, got, sizeof(got));
        log(Severity::kERROR, "%s: input 'r' must have rank %d (%s), got %s", name, rank,
            seq ? "[B, T, H, N]" : "[B, H, N]", got);
        return false;
    }
    int64_t const B = r.d[0];
    int64_t const H = r.d[rank - 2];
    int64_t const N = r.d[rank - 1];
    for (int32_t i = 1; i < op.nbInputs; ++i)
    {
        Dims const& d = *dims[i];
        bool ok = true;
        char const* expect = "";
        switch (op.roles[i])
        {
        case Role::kTOKEN:
        case Role::kDECAY:
            ok = d.nbDims == rank;
            for (int32_t j = 0; ok && j < rank; ++j)
            {
                ok = agree(d.d[j], r.d[j]);
            }
            expect = "the shape of 'r'";
            break;
        case Role::kPARAM:
            ok = d.nbDims == 2 && agree(d.d[0], H) && agree(d.d[1], N);
            expect = "[H, N]";
            break;
        case Role::kSTATE:
            ok = d.nbDims == 4 && agree(d.d[0], B) && agree(d.d[1], H) && agree(d.d[2], N) && agree(d.d[3], N);
            expect = "[B, H, N, N]";
            break;
        }
        if (!ok)
        {
            formatDims(d, got, sizeof(got));
            char rDims[160];
            formatDims(r, rDims, sizeof(rDims));
            log(Severity::kERROR, "%s: input '%s' has shape %s, expected %s with r %s", name, op.inputNames[i], got,
                expect, rDims);
            return false;
        }
    }
    if (N > 1024)
    {
        log(Severity::kERROR,
            "%s: head size N = %lld is not supported (at most 1024: one CUDA thread per value "
            "index)",
            name, static_cast<long long>(N));
        return false;
    }
    if (concrete)
    {
        bool sizesOk = B * H <= INT32_MAX;
        for (int32_t j = 0; j < rank; ++j)
        {
            sizesOk = sizesOk && r.d[j] >= 0 && r.d[j] <= INT32_MAX;
        }
        if (!sizesOk)
        {
            formatDims(r, got, sizeof(got));
            log(Severity::kERROR, "%s: unsupported size of 'r' %s (each dimension, and B*H, must be in [0, 2^31))",
                name, got);
            return false;
        }
    }
    return true;
}

bool checkCounts(WkvFamily family, bool seq, int32_t nbInputs, int32_t nbOutputs, char const* where) noexcept
{
    int32_t const expected = table(family).nbInputs;
    if (nbInputs != expected || nbOutputs != kWKVHEAD_NB_OUTPUTS)
    {
        log(Severity::kERROR, "%s::%s: expected %d inputs and %d outputs, got %d and %d", opName(family, seq), where,
            expected, kWKVHEAD_NB_OUTPUTS, nbInputs, nbOutputs);
        return false;
    }
    return true;
}

//! Checks the input types; logs the first problem.
bool checkInputTypes(WkvFamily family, bool seq, DataType const* types) noexcept
{
    OpTable const& op = table(family);
    DataType const act = types[0];
    if (!isFloatOrHalf(act))
    {
        log(Severity::kERROR, "%s: input 'r' must be float32 or float16 (got type %d); cast it in the ONNX model",
            opName(family, seq), static_cast<int32_t>(act));
        return false;
    }
    for (int32_t i = 1; i < op.nbInputs; ++i)
    {
        if (!typeAllowed(op.roles[i], types[i], act))
        {
            log(Severity::kERROR, "%s: input '%s' must be %s (got type %d, 'r' has type %d)", opName(family, seq),
                op.inputNames[i], roleTypeText(op.roles[i]), static_cast<int32_t>(types[i]), static_cast<int32_t>(act));
            return false;
        }
    }
    return true;
}

int32_t dtypeCode(DataType t) noexcept
{
    return t == DataType::kHALF ? RWKV_DTYPE_FLOAT16 : RWKV_DTYPE_FLOAT32;
}

} // namespace

// ---- WkvHeadPlugin ------------------------------------------------------------------------------

WkvHeadPlugin::WkvHeadPlugin(WkvFamily family, bool seq) noexcept
    : PluginV3Base(opName(family, seq), kWKVHEAD_VERSION, kWKVHEAD_NB_OUTPUTS)
    , mFamily(family)
    , mSeq(seq)
{
}

int32_t WkvHeadPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (!checkCounts(mFamily, mSeq, nbInputs, nbOutputs, "getOutputDataTypes") || outputTypes == nullptr
        || inputTypes == nullptr || !checkInputTypes(mFamily, mSeq, inputTypes))
    {
        return -1;
    }
    outputTypes[0] = inputTypes[0]; // y follows r
    outputTypes[1] = DataType::kFLOAT;
    return 0;
}

int32_t WkvHeadPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
    int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs, nvinfer1::IExprBuilder& /*exprBuilder*/) noexcept
{
    if (!checkCounts(mFamily, mSeq, nbInputs, nbOutputs, "getOutputShapes") || inputs == nullptr || outputs == nullptr)
    {
        return -1;
    }
    int32_t const rank = actRank(mSeq);
    if (inputs[0].nbDims != rank)
    {
        log(Severity::kERROR, "%s: input 'r' must have rank %d, got %d", getPluginName(), rank, inputs[0].nbDims);
        return -1;
    }
    // Symbolic: y has r's (possibly dynamic) shape; the state is [B, H, N, N] taken from r, so a
    // dynamic batch or T flows through without any expression arithmetic.
    outputs[0] = inputs[0];
    DimsExprs state{};
    state.nbDims = 4;
    state.d[0] = inputs[0].d[0];
    state.d[1] = inputs[0].d[rank - 2];
    state.d[2] = inputs[0].d[rank - 1];
    state.d[3] = inputs[0].d[rank - 1];
    outputs[1] = state;
    return 0;
}

bool WkvHeadPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    OpTable const& op = table(mFamily);
    if (inOut == nullptr || nbInputs != op.nbInputs || nbOutputs != kWKVHEAD_NB_OUTPUTS || pos < 0
        || pos >= nbInputs + nbOutputs)
    {
        return false;
    }
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    if (pos == 0)
    {
        return isFloatOrHalf(desc.type);
    }
    DataType const act = inOut[0].desc.type;
    if (pos < nbInputs)
    {
        return typeAllowed(op.roles[pos], desc.type, act);
    }
    return pos == nbInputs ? desc.type == act : desc.type == DataType::kFLOAT; // y: r's type; state_out
}

int32_t WkvHeadPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    if (!checkCounts(mFamily, mSeq, nbInputs, nbOutputs, "configurePlugin") || in == nullptr || out == nullptr)
    {
        return -1;
    }
    Dims const* dims[kWKVHEAD_MAX_INPUTS];
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        dims[i] = &in[i].desc.dims;
    }
    return checkInputShapes(mFamily, mSeq, dims, /*concrete=*/false) ? 0 : -1;
}

int32_t WkvHeadPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    if (!checkCounts(mFamily, mSeq, nbInputs, nbOutputs, "onShapeChange") || in == nullptr || out == nullptr)
    {
        return fail();
    }
    Dims const* dims[kWKVHEAD_MAX_INPUTS];
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        dims[i] = &in[i].dims;
    }
    return checkInputShapes(mFamily, mSeq, dims, /*concrete=*/true) ? 0 : fail(nvinfer1::ErrorCode::kINVALID_ARGUMENT);
}

int32_t WkvHeadPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
    void const* const* inputs, void* const* outputs, void* /*workspace*/, cudaStream_t stream) noexcept
{
    char const* const name = getPluginName();
    if (inputDesc == nullptr || outputDesc == nullptr || inputs == nullptr || outputs == nullptr)
    {
        log(Severity::kERROR, "%s::enqueue: null descriptor or buffer array", name);
        return fail();
    }
    // Re-checked here (a few comparisons) because a wrong size or type would mean out-of-bounds accesses.
    OpTable const& op = table(mFamily);
    Dims const* dims[kWKVHEAD_MAX_INPUTS];
    DataType types[kWKVHEAD_MAX_INPUTS];
    for (int32_t i = 0; i < op.nbInputs; ++i)
    {
        dims[i] = &inputDesc[i].dims;
        types[i] = inputDesc[i].type;
    }
    if (!checkInputShapes(mFamily, mSeq, dims, /*concrete=*/true) || !checkInputTypes(mFamily, mSeq, types))
    {
        return fail();
    }
    if (outputDesc[0].type != types[0] || outputDesc[1].type != DataType::kFLOAT)
    {
        log(Severity::kERROR, "%s::enqueue: y must have the type of r, and state_out must be float32", name);
        return fail();
    }
    Dims const& r = inputDesc[0].dims;
    int32_t const rank = actRank(mSeq);
    auto const B = static_cast<int32_t>(r.d[0]);
    auto const T = mSeq ? static_cast<int32_t>(r.d[1]) : 1;
    auto const H = static_cast<int32_t>(r.d[rank - 2]);
    auto const N = static_cast<int32_t>(r.d[rank - 1]);
    int32_t const dtype = dtypeCode(types[0]);
    auto const* state = static_cast<float const*>(inputs[op.nbInputs - 1]);
    auto* stateOut = static_cast<float*>(outputs[1]);

    cudaError_t status = cudaErrorInvalidValue;
    switch (mFamily)
    {
    case WkvFamily::kWKV5:
        status = rwkvWkv5Forward(stream, B, T, H, N, dtype, inputs[0], inputs[1], inputs[2],
            static_cast<float const*>(inputs[3]), static_cast<float const*>(inputs[4]), state, outputs[0], stateOut);
        break;
    case WkvFamily::kWKV6:
        status = rwkvWkv6Forward(stream, B, T, H, N, dtype, dtypeCode(types[3]), inputs[0], inputs[1], inputs[2],
            inputs[3], static_cast<float const*>(inputs[4]), state, outputs[0], stateOut);
        break;
    case WkvFamily::kWKV7:
        status = rwkvWkv7Forward(stream, B, T, H, N, dtype, dtypeCode(types[1]), inputs[0], inputs[1], inputs[2],
            inputs[3], inputs[4], inputs[5], state, outputs[0], stateOut);
        break;
    }
    if (status != cudaSuccess)
    {
        log(Severity::kERROR, "%s::enqueue: kernel launch failed (B=%d, T=%d, H=%d, N=%d): %s", name, B, T, H, N,
            cudaGetErrorString(status));
        fail();
        return static_cast<int32_t>(status);
    }
    return 0;
}

// ---- WkvHeadPluginCreator -----------------------------------------------------------------------

WkvHeadPluginCreator::WkvHeadPluginCreator(WkvFamily family, bool seq) noexcept
    : PluginCreatorBase(opName(family, seq), kWKVHEAD_VERSION)
    , mFamily(family)
    , mSeq(seq)
{
}

IPluginV3* WkvHeadPluginCreator::make() noexcept
{
    return new (std::nothrow) WkvHeadPlugin(mFamily, mSeq);
}

} // namespace trt
} // namespace rwkv
