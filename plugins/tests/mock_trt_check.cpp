/*
 * Drives librwkv_trt_plugins.so the way TensorRT would, against mock_nvinfer.cpp (linked in as
 * libnvinfer.so.<major>, like trtexec links the real one). Usage:
 *   mock_trt_check <scenario> <plugin.so> [<autoregister.so | copy of plugin.so>]
 * Scenarios: loadlibrary | dlopen-registers-nothing | autoregister | autoregister-then-loadlibrary |
 *            loadlibrary-then-autoregister | loadlibrary-then-copy | exercise | enqueue-without-gpu |
 *            enqueue-gpu
 * Prints one line per check; exits non-zero if any failed.
 * exercise drives every creator (WKV4, WKV5, WKV6, WKV7 and their Seq forms) through the TensorRT
 * interfaces: types, symbolic shapes, formats, validation, serialization, clone.
 * enqueue-gpu runs IPluginV3OneRuntime::enqueue on a CUDA device and compares with the same math on
 * the CPU (wkv4Math.cuh, wkvHeadMath.cuh): it checks the plugin's plumbing (which buffer is which)
 * end to end.
 * Link with the CUDA runtime (e.g. libcudart_static.a -lpthread -lrt), -I plugins/wkv4 -I plugins/wkvhead.
 */
#include "NvInferRuntime.h"
#include "wkv4Math.cuh"
#include "wkvHeadMath.cuh"

#include <cmath>
#include <cuda_runtime_api.h>
#include <vector>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dlfcn.h>
#include <string>

using namespace nvinfer1;

extern "C" int32_t mockCreatorCount();
extern "C" int32_t mockErrorCount();
extern "C" int32_t mockCreatorCountFromLibraries();
extern "C" char const* mockLastError();

namespace
{

int gFailures = 0;

void check(bool ok, char const* what)
{
    std::printf("%s: %s\n", ok ? "ok  " : "FAIL", what);
    if (!ok)
    {
        ++gFailures;
    }
}

void* plainDlopen(char const* path)
{
    void* h = dlopen(path, RTLD_LAZY | RTLD_LOCAL);
    if (h == nullptr)
    {
        std::printf("dlopen failed: %s\n", dlerror());
    }
    return h;
}

bool loadLibrary(char const* path)
{
    return getPluginRegistry()->loadLibrary(path) != nullptr;
}

//! An application's error recorder, as an execution context hands it to attachToContext().
class CountingRecorder : public IErrorRecorder
{
public:
    int32_t getNbErrors() const noexcept override
    {
        return static_cast<int32_t>(mDescs.size());
    }
    ErrorCode getErrorCode(int32_t i) const noexcept override
    {
        return mCodes[static_cast<size_t>(i)];
    }
    ErrorDesc getErrorDesc(int32_t i) const noexcept override
    {
        return mDescs[static_cast<size_t>(i)].c_str();
    }
    bool hasOverflowed() const noexcept override
    {
        return false;
    }
    void clear() noexcept override
    {
        mDescs.clear();
        mCodes.clear();
    }
    bool reportError(ErrorCode code, ErrorDesc desc) noexcept override
    {
        mCodes.push_back(code);
        mDescs.emplace_back(desc ? desc : "");
        return true;
    }
    RefCount incRefCount() noexcept override
    {
        return 1;
    }
    RefCount decRefCount() noexcept override
    {
        return 1;
    }

private:
    std::vector<ErrorCode> mCodes;
    std::vector<std::string> mDescs;
};

class ResourceContext : public IPluginResourceContext
{
public:
    explicit ResourceContext(IErrorRecorder* r)
        : mRecorder(r)
    {
    }
    IGpuAllocator* getGpuAllocator() const noexcept override
    {
        return nullptr;
    }
    IErrorRecorder* getErrorRecorder() const noexcept override
    {
        return mRecorder;
    }

private:
    IErrorRecorder* mRecorder;
};

IPluginCreatorV3One* creator(char const* name)
{
    IPluginCreatorInterface* c = getPluginRegistry()->getCreator(name, "1", "rwkv");
    if (c == nullptr || std::strcmp(c->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") != 0)
    {
        return nullptr;
    }
    return static_cast<IPluginCreatorV3One*>(c);
}

class NullExprBuilder : public IExprBuilder
{
public:
    NullExprBuilder()
    {
        mImpl = nullptr; // the plugin must not need to build expressions
    }
    ~NullExprBuilder() noexcept override = default;
};

Dims makeDims(std::initializer_list<int64_t> d)
{
    Dims out{};
    out.nbDims = static_cast<int32_t>(d.size());
    int32_t i = 0;
    for (int64_t v : d)
    {
        out.d[i++] = v;
    }
    return out;
}

// Shapes of the 7 inputs for batch B, tokens T (ignored by WKV4), channels C.
void inputDims(bool seq, int64_t B, int64_t T, int64_t C, Dims* dims)
{
    dims[0] = seq ? makeDims({B, T, C}) : makeDims({B, C});
    dims[1] = dims[0];
    dims[2] = makeDims({C});
    dims[3] = makeDims({C});
    dims[4] = dims[5] = dims[6] = makeDims({B, C});
}

//! Tensor i as TensorRT describes it: linear, fixed shape (min = opt = max), into dyn and/or desc.
void putDesc(int i, Dims const& d, DataType t, DynamicPluginTensorDesc* dyn, PluginTensorDesc* desc)
{
    PluginTensorDesc p{};
    p.dims = d;
    p.type = t;
    p.format = TensorFormat::kLINEAR;
    p.scale = -1.F;
    if (desc)
    {
        desc[i] = p;
    }
    if (dyn)
    {
        dyn[i].desc = p;
        dyn[i].min = dyn[i].opt = dyn[i].max = d;
    }
}

void fillDescs(Dims const* in, DataType elem, DynamicPluginTensorDesc* dyn, PluginTensorDesc* desc)
{
    for (int i = 0; i < 11; ++i)
    {
        Dims const d = i < 7 ? in[i] : (i == 7 ? in[0] : in[4]);
        putDesc(i, d, (i == 0 || i == 1 || i == 7) ? elem : DataType::kFLOAT, dyn, desc);
    }
}

//! A plugin of the op `name` and its runtime capability (nullptr if the creator is missing).
IPluginV3* runtimePlugin(char const* name, IPluginV3OneRuntime*& rt)
{
    IPluginCreatorV3One* c = creator(name);
    PluginFieldCollection empty{};
    IPluginV3* p = c ? c->createPlugin("node", &empty, TensorRTPhase::kBUILD) : nullptr;
    rt = p ? static_cast<IPluginV3OneRuntime*>(p->getCapabilityInterface(PluginCapabilityType::kRUNTIME)) : nullptr;
    return p;
}

//! A build-phase plugin of the op `name` with its three capabilities.
struct Made
{
    IPluginCreatorV3One* creator{nullptr};
    IPluginV3* plugin{nullptr};
    IPluginV3OneBuild* build{nullptr};
    IPluginV3OneRuntime* runtime{nullptr};
};

//! What every op's exercise starts with: the creator is registered and declares no fields; the
//! build-phase plugin has the three capabilities of the right kinds, its name/version/namespace,
//! and the timing-cache id "" (no attributes; nullptr would keep its timings out of the cache).
bool makeBuildPlugin(char const* name, Made& m)
{
    std::string const tag = std::string(name) + ": ";
    auto msg = [&](char const* s) { return (tag + s); };
    IPluginCreatorV3One* c = creator(name);
    check(c != nullptr, msg("creator registered as rwkv::<name> version 1").c_str());
    if (c == nullptr)
    {
        return false;
    }
    PluginFieldCollection const* names = c->getFieldNames();
    check(names != nullptr && names->nbFields == 0, msg("creator declares no fields").c_str());
    PluginFieldCollection empty{};
    IPluginV3* p = c->createPlugin("node", &empty, TensorRTPhase::kBUILD);
    check(p != nullptr, msg("createPlugin(kBUILD)").c_str());
    if (p == nullptr)
    {
        return false;
    }
    auto* core = static_cast<IPluginV3OneCore*>(p->getCapabilityInterface(PluginCapabilityType::kCORE));
    auto* build = static_cast<IPluginV3OneBuild*>(p->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* rt = static_cast<IPluginV3OneRuntime*>(p->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    check(core && build && rt, msg("all three capabilities").c_str());
    if (!(core && build && rt))
    {
        delete p;
        return false;
    }
    check(std::strcmp(core->getPluginName(), name) == 0 && std::strcmp(core->getPluginVersion(), "1") == 0
            && std::strcmp(core->getPluginNamespace(), "rwkv") == 0,
        msg("name/version/namespace").c_str());
    check(std::strcmp(core->getInterfaceInfo().kind, "PLUGIN_V3ONE_CORE") == 0
            && std::strcmp(build->getInterfaceInfo().kind, "PLUGIN_V3ONE_BUILD") == 0
            && std::strcmp(rt->getInterfaceInfo().kind, "PLUGIN_V3ONE_RUNTIME") == 0,
        msg("capability interface kinds").c_str());
    check(build->getTimingCacheID() != nullptr && build->getTimingCacheID()[0] == '\0',
        msg("timing cache id \"\"").c_str());
    m.creator = c;
    m.plugin = p;
    m.build = build;
    m.runtime = rt;
    return true;
}

//! What every op's exercise ends with, then deletes the plugin: the serialized fields, the runtime
//! plugin made from them, an unknown engine format rejected, clone (owning its fields), attachToContext.
void finishChecks(char const* name, Made& m)
{
    std::string const tag = std::string(name) + ": ";
    auto msg = [&](char const* s) { return (tag + s); };
    auto nameOf = [](IPluginV3* q)
    { return static_cast<IPluginV3OneCore*>(q->getCapabilityInterface(PluginCapabilityType::kCORE))->getPluginName(); };
    PluginFieldCollection const* fields = m.runtime->getFieldsToSerialize();
    bool fieldsOk = fields != nullptr && fields->nbFields == 1
        && std::strcmp(fields->fields[0].name, "format_version") == 0
        && fields->fields[0].type == PluginFieldType::kINT32 && fields->fields[0].length == 1
        && *static_cast<int32_t const*>(fields->fields[0].data) == 1;
    check(fieldsOk, msg("getFieldsToSerialize: format_version = 1").c_str());
    IPluginV3* restored = m.creator->createPlugin("node", fields, TensorRTPhase::kRUNTIME);
    check(restored != nullptr && std::strcmp(nameOf(restored), name) == 0,
        msg("createPlugin(kRUNTIME) from serialized fields: same op").c_str());
    delete restored;
    int32_t future = 2;
    PluginField ff("format_version", &future, PluginFieldType::kINT32, 1);
    PluginFieldCollection fc{1, &ff};
    IPluginV3* bad = m.creator->createPlugin("node", &fc, TensorRTPhase::kRUNTIME);
    check(bad == nullptr, msg("createPlugin(kRUNTIME): unknown format_version rejected").c_str());
    delete bad;

    IPluginV3* cl = m.plugin->clone();
    check(cl != nullptr && std::strcmp(nameOf(cl), name) == 0, msg("clone").c_str());
    if (cl)
    {
        // The clone's serialization fields must point into the clone, not the original.
        PluginFieldCollection const* cf =
            static_cast<IPluginV3OneRuntime*>(cl->getCapabilityInterface(PluginCapabilityType::kRUNTIME))
                ->getFieldsToSerialize();
        check(cf != fields && cf->fields[0].data != fields->fields[0].data, msg("clone owns its fields").c_str());
    }
    delete cl;
    IPluginV3* attached = m.runtime->attachToContext(nullptr);
    check(attached != nullptr, msg("attachToContext").c_str());
    delete attached;
    delete m.plugin;
    m.plugin = nullptr;
}

void exercise(char const* name, bool seq)
{
    std::string const tag = std::string(name) + ": ";
    auto msg = [&](char const* s) { return (tag + s); };
    Made m;
    if (!makeBuildPlugin(name, m))
    {
        return;
    }
    IPluginV3OneBuild* build = m.build;
    IPluginV3OneRuntime* rt = m.runtime;
    check(build->getNbOutputs() == 4, msg("4 outputs").c_str());

    // Output types.
    DataType f = DataType::kFLOAT, h = DataType::kHALF;
    DataType inH[7] = {h, h, f, f, f, f, f};
    DataType inF[7] = {f, f, f, f, f, f, f};
    DataType out[4]{};
    check(build->getOutputDataTypes(out, 4, inH, 7) == 0 && out[0] == h && out[1] == f && out[2] == f && out[3] == f,
        msg("types: f16 k/v -> f16 y, f32 state").c_str());
    check(build->getOutputDataTypes(out, 4, inF, 7) == 0 && out[0] == f, msg("types: f32 k/v -> f32 y").c_str());
    DataType inBad[7] = {DataType::kBF16, DataType::kBF16, f, f, f, f, f};
    check(build->getOutputDataTypes(out, 4, inBad, 7) != 0, msg("types: bf16 rejected").c_str());
    DataType inMixed[7] = {h, f, f, f, f, f, f};
    check(build->getOutputDataTypes(out, 4, inMixed, 7) != 0, msg("types: mixed k/v rejected").c_str());
    DataType inHalfState[7] = {h, h, f, f, h, f, f};
    check(build->getOutputDataTypes(out, 4, inHalfState, 7) != 0, msg("types: f16 state rejected").c_str());

    // Symbolic shapes: outputs reuse k's expressions.
    static char tokens[3];
    auto const* eB = reinterpret_cast<IDimensionExpr const*>(&tokens[0]);
    auto const* eT = reinterpret_cast<IDimensionExpr const*>(&tokens[1]);
    auto const* eC = reinterpret_cast<IDimensionExpr const*>(&tokens[2]);
    DimsExprs ins[7]{};
    ins[0].nbDims = seq ? 3 : 2;
    ins[0].d[0] = eB;
    if (seq)
    {
        ins[0].d[1] = eT;
    }
    ins[0].d[ins[0].nbDims - 1] = eC;
    ins[1] = ins[0];
    ins[2].nbDims = ins[3].nbDims = 1;
    ins[2].d[0] = ins[3].d[0] = eC;
    for (int i = 4; i < 7; ++i)
    {
        ins[i].nbDims = 2;
        ins[i].d[0] = eB;
        ins[i].d[1] = eC;
    }
    DimsExprs outs[4]{};
    NullExprBuilder eb;
    int32_t rc = build->getOutputShapes(ins, 7, nullptr, 0, outs, 4, eb);
    bool shapesOk = rc == 0 && outs[0].nbDims == ins[0].nbDims && outs[0].d[0] == eB
        && outs[0].d[outs[0].nbDims - 1] == eC && (!seq || outs[0].d[1] == eT);
    for (int i = 1; i < 4; ++i)
    {
        shapesOk = shapesOk && outs[i].nbDims == 2 && outs[i].d[0] == eB && outs[i].d[1] == eC;
    }
    check(shapesOk, msg("getOutputShapes: y = k's shape, states [B, C]").c_str());
    DimsExprs wrongRank[7];
    for (int i = 0; i < 7; ++i)
    {
        wrongRank[i] = ins[i];
    }
    wrongRank[0].nbDims = seq ? 2 : 3;
    check(build->getOutputShapes(wrongRank, 7, nullptr, 0, outs, 4, eb) != 0,
        msg("getOutputShapes: wrong rank of k rejected").c_str());

    // Format/type combinations, queried in order as TensorRT does.
    Dims dims[7];
    inputDims(seq, -1, -1, 64, dims); // dynamic batch and T at build time
    DynamicPluginTensorDesc dyn[11];
    fillDescs(dims, h, dyn, nullptr);
    bool sfc = true;
    for (int pos = 0; pos < 11; ++pos)
    {
        sfc = sfc && build->supportsFormatCombination(pos, dyn, 7, 4);
    }
    check(sfc, msg("supportsFormatCombination: f16 k/v/y + f32 rest, linear").c_str());
    fillDescs(dims, f, dyn, nullptr);
    sfc = true;
    for (int pos = 0; pos < 11; ++pos)
    {
        sfc = sfc && build->supportsFormatCombination(pos, dyn, 7, 4);
    }
    check(sfc, msg("supportsFormatCombination: all f32, linear").c_str());
    dyn[1].desc.type = h; // v differs from k
    check(!build->supportsFormatCombination(1, dyn, 7, 4),
        msg("supportsFormatCombination: v type != k rejected").c_str());
    dyn[1].desc.type = f;
    dyn[7].desc.type = h; // y differs from k
    check(!build->supportsFormatCombination(7, dyn, 7, 4),
        msg("supportsFormatCombination: y type != k rejected").c_str());
    dyn[7].desc.type = f;
    dyn[4].desc.type = h;
    check(
        !build->supportsFormatCombination(4, dyn, 7, 4), msg("supportsFormatCombination: f16 state rejected").c_str());
    dyn[4].desc.type = f;
    dyn[0].desc.type = DataType::kINT8;
    check(!build->supportsFormatCombination(0, dyn, 7, 4), msg("supportsFormatCombination: int8 k rejected").c_str());
    dyn[0].desc.type = f;
    dyn[2].desc.format = TensorFormat::kCHW32;
    check(
        !build->supportsFormatCombination(2, dyn, 7, 4), msg("supportsFormatCombination: non-linear rejected").c_str());
    dyn[2].desc.format = TensorFormat::kLINEAR;

    check(build->configurePlugin(dyn, 7, dyn + 7, 4) == 0, msg("configurePlugin: dynamic B/T accepted").c_str());
    dyn[5].desc.dims = makeDims({-1, 32});
    check(build->configurePlugin(dyn, 7, dyn + 7, 4) != 0, msg("configurePlugin: bb with wrong C rejected").c_str());
    dyn[5].desc.dims = dims[5];
    dyn[2].desc.dims = makeDims({1, 64});
    check(build->configurePlugin(dyn, 7, dyn + 7, 4) != 0, msg("configurePlugin: w of rank 2 rejected").c_str());

    // Runtime side.
    Dims run[7];
    inputDims(seq, 3, 5, 64, run);
    PluginTensorDesc desc[11];
    fillDescs(run, h, nullptr, desc);
    check(rt->onShapeChange(desc, 7, desc + 7, 4) == 0, msg("onShapeChange: concrete shapes accepted").c_str());
    desc[4].dims = makeDims({2, 64});
    check(rt->onShapeChange(desc, 7, desc + 7, 4) != 0, msg("onShapeChange: aa batch != k batch rejected").c_str());

    // enqueue: validation before any CUDA call; an empty batch returns before launching.
    void const* inPtrs[7] = {};
    void* outPtrs[4] = {};
    check(rt->enqueue(desc, desc + 7, inPtrs, outPtrs, nullptr, nullptr) != 0,
        msg("enqueue: bad shapes rejected").c_str());
    Dims empty0[7];
    inputDims(seq, 0, 5, 64, empty0);
    fillDescs(empty0, h, nullptr, desc);
    check(
        rt->enqueue(desc, desc + 7, inPtrs, outPtrs, nullptr, nullptr) == 0, msg("enqueue: B = 0 is a no-op").c_str());
    desc[7].type = f;
    check(rt->enqueue(desc, desc + 7, inPtrs, outPtrs, nullptr, nullptr) != 0,
        msg("enqueue: y type != k rejected").c_str());

    finishChecks(name, m);
}

// Deterministic pseudo-random numbers in [lo, hi).
struct Lcg
{
    uint64_t s;
    float next(float lo, float hi)
    {
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        return lo + (hi - lo) * static_cast<float>((s >> 40) & 0xFFFFFF) / 16777216.0F;
    }
};

template <typename Elem>
Elem toElem(float x)
{
    Elem e;
    rwkv::store(x, &e);
    return e;
}

template <typename Elem>
void enqueueCase(char const* name, bool seq, int32_t B, int32_t T, int32_t C, DataType type)
{
    char what[160];
    std::snprintf(what, sizeof(what), "%s %s B=%d T=%d C=%d: enqueue on the GPU matches the CPU build", name,
        type == DataType::kHALF ? "f16" : "f32", B, T, C);
    Lcg rng{static_cast<uint64_t>(B * 131 + T * 17 + C)};
    size_t const nSeq = static_cast<size_t>(B) * T * C;
    size_t const nState = static_cast<size_t>(B) * C;
    std::vector<Elem> k(nSeq), v(nSeq), yRef(nSeq), yGot(nSeq);
    std::vector<float> w(C), u(C), aa(nState), bb(nState), pp(nState);
    for (int32_t c = 0; c < C; ++c)
    {
        w[c] = -std::exp(rng.next(-6.F, 2.F));
        u[c] = rng.next(-1.F, 1.5F);
    }
    for (size_t i = 0; i < nState; ++i)
    {
        // a state from a few tokens of rollout, starting at pp = -1e30
        float a = 0.F, b = 0.F, p = -1e30F;
        int32_t const c = static_cast<int32_t>(i % C);
        for (int32_t t = 0; t < 4; ++t)
        {
            rwkv::wkv4Step(rng.next(-4.F, 4.F), rng.next(-1.F, 1.F), w[c], u[c], a, b, p);
        }
        aa[i] = a;
        bb[i] = b;
        pp[i] = p;
    }
    for (size_t i = 0; i < nSeq; ++i)
    {
        k[i] = toElem<Elem>(rng.next(-4.F, 4.F));
        v[i] = toElem<Elem>(rng.next(-1.F, 1.F));
    }
    std::vector<float> aaRef(nState), bbRef(nState), ppRef(nState);
    for (int64_t b = 0; b < B; ++b)
    {
        for (int64_t c = 0; c < C; ++c)
        {
            rwkv::wkv4Channel<Elem>(b, c, T, C, k.data(), v.data(), w.data(), u.data(), aa.data(), bb.data(), pp.data(),
                yRef.data(), aaRef.data(), bbRef.data(), ppRef.data());
        }
    }

    // Device buffers in the plugin's input/output order.
    size_t const bytes[11] = {nSeq * sizeof(Elem), nSeq * sizeof(Elem), C * 4UL, C * 4UL, nState * 4, nState * 4,
        nState * 4, nSeq * sizeof(Elem), nState * 4, nState * 4, nState * 4};
    void const* host[7] = {k.data(), v.data(), w.data(), u.data(), aa.data(), bb.data(), pp.data()};
    void* dev[11] = {};
    bool ok = true;
    for (int i = 0; i < 11 && ok; ++i)
    {
        ok = cudaMalloc(&dev[i], bytes[i] ? bytes[i] : 1) == cudaSuccess;
        if (ok && i < 7)
        {
            ok = cudaMemcpy(dev[i], host[i], bytes[i], cudaMemcpyHostToDevice) == cudaSuccess;
        }
    }
    IPluginV3OneRuntime* rt = nullptr;
    IPluginV3* p = ok ? runtimePlugin(name, rt) : nullptr;
    ok = ok && p != nullptr;
    if (ok)
    {
        Dims dims[7];
        inputDims(seq, B, T, C, dims);
        PluginTensorDesc desc[11];
        fillDescs(dims, type, nullptr, desc);
        void const* in[7] = {dev[0], dev[1], dev[2], dev[3], dev[4], dev[5], dev[6]};
        void* out[4] = {dev[7], dev[8], dev[9], dev[10]};
        ok = rt->onShapeChange(desc, 7, desc + 7, 4) == 0 && rt->enqueue(desc, desc + 7, in, out, nullptr, nullptr) == 0
            && cudaDeviceSynchronize() == cudaSuccess;
    }
    std::vector<float> aaGot(nState), bbGot(nState), ppGot(nState);
    ok = ok && cudaMemcpy(yGot.data(), dev[7], bytes[7], cudaMemcpyDeviceToHost) == cudaSuccess
        && cudaMemcpy(aaGot.data(), dev[8], bytes[8], cudaMemcpyDeviceToHost) == cudaSuccess
        && cudaMemcpy(bbGot.data(), dev[9], bytes[9], cudaMemcpyDeviceToHost) == cudaSuccess
        && cudaMemcpy(ppGot.data(), dev[10], bytes[10], cudaMemcpyDeviceToHost) == cudaSuccess;
    // GPU and CPU run the same code; only expf/FMA rounding differs.
    double worstY = 0, worstState = 0;
    auto rel = [](double got, double want) { return std::fabs(got - want) / std::fmax(1.0, std::fabs(want)); };
    for (size_t i = 0; ok && i < nSeq; ++i)
    {
        worstY = std::fmax(worstY, rel(rwkv::load(yGot[i]), rwkv::load(yRef[i])));
    }
    for (size_t i = 0; ok && i < nState; ++i)
    {
        worstState = std::fmax(worstState,
            std::fmax(rel(aaGot[i], aaRef[i]), std::fmax(rel(bbGot[i], bbRef[i]), rel(ppGot[i], ppRef[i]))));
    }
    double const tolY = type == DataType::kHALF ? 2e-3 : 1e-5; // float16: <= 2 ulps
    std::printf("     max rel error: y %.2e, state %.2e\n", worstY, worstState);
    check(ok && worstY <= tolY && worstState <= 1e-5, what);
    delete p;
    for (void* d : dev)
    {
        cudaFree(d);
    }
}

// ---- RWKV-5/6/7 (WKV5, WKV6, WKV7 and their Seq forms) ------------------------------------------

//! Input roles, as in wkvHeadPlugin.cpp: per-token activation (r's type), per-token decay (r's type
//! or float32), [H, N] float32 parameter, [B, H, N, N] float32 state.
enum class Role
{
    kTOKEN,
    kDECAY,
    kPARAM,
    kSTATE
};

struct HeadOp
{
    char const* name;
    int family; // 5, 6, 7
    bool seq;
    int nbIn;
    Role roles[7];
};

HeadOp headOp(int family, bool seq)
{
    using R = Role;
    if (family == 5)
    {
        return {
            seq ? "WKV5Seq" : "WKV5", 5, seq, 6, {R::kTOKEN, R::kTOKEN, R::kTOKEN, R::kPARAM, R::kPARAM, R::kSTATE}};
    }
    if (family == 6)
    {
        return {
            seq ? "WKV6Seq" : "WKV6", 6, seq, 6, {R::kTOKEN, R::kTOKEN, R::kTOKEN, R::kDECAY, R::kPARAM, R::kSTATE}};
    }
    return {seq ? "WKV7Seq" : "WKV7", 7, seq, 7,
        {R::kTOKEN, R::kDECAY, R::kTOKEN, R::kTOKEN, R::kTOKEN, R::kTOKEN, R::kSTATE}};
}

//! Index of the per-token decay input, or -1 (WKV5).
int decayIndex(HeadOp const& op)
{
    for (int i = 0; i < op.nbIn; ++i)
    {
        if (op.roles[i] == Role::kDECAY)
        {
            return i;
        }
    }
    return -1;
}

//! Shapes of the inputs then the two outputs for batch B, tokens T (ignored by step ops), H heads of N.
void headDims(HeadOp const& op, int64_t B, int64_t T, int64_t H, int64_t N, Dims* dims)
{
    Dims const act = op.seq ? makeDims({B, T, H, N}) : makeDims({B, H, N});
    for (int i = 0; i < op.nbIn; ++i)
    {
        dims[i] = op.roles[i] == Role::kPARAM ? makeDims({H, N})
            : op.roles[i] == Role::kSTATE     ? makeDims({B, H, N, N})
                                              : act;
    }
    dims[op.nbIn] = act;
    dims[op.nbIn + 1] = makeDims({B, H, N, N});
}

//! Descriptors: activations (and y) of `act`, the decay of `decay`, everything else float32.
void headDescs(HeadOp const& op, Dims const* dims, DataType act, DataType decay, DynamicPluginTensorDesc* dyn,
    PluginTensorDesc* desc)
{
    for (int i = 0; i < op.nbIn + 2; ++i)
    {
        DataType const t = i == op.nbIn   ? act
            : i > op.nbIn                 ? DataType::kFLOAT
            : op.roles[i] == Role::kTOKEN ? act
            : op.roles[i] == Role::kDECAY ? decay
                                          : DataType::kFLOAT;
        putDesc(i, dims[i], t, dyn, desc);
    }
}

bool allFormats(IPluginV3OneBuild* build, DynamicPluginTensorDesc const* dyn, int nbIn)
{
    bool ok = true;
    for (int pos = 0; pos < nbIn + 2; ++pos)
    {
        ok = ok && build->supportsFormatCombination(pos, dyn, nbIn, 2);
    }
    return ok;
}

void exerciseHead(int family, bool seq)
{
    HeadOp const op = headOp(family, seq);
    int const nb = op.nbIn;
    int const wIdx = decayIndex(op);
    std::string const tag = std::string(op.name) + ": ";
    auto msg = [&](char const* s) { return (tag + s); };
    Made m;
    if (!makeBuildPlugin(op.name, m))
    {
        return;
    }
    IPluginV3OneBuild* build = m.build;
    IPluginV3OneRuntime* rt = m.runtime;
    check(build->getNbOutputs() == 2, msg("2 outputs").c_str());

    // Output types.
    DataType const f = DataType::kFLOAT, h = DataType::kHALF;
    auto types = [&](DataType act, DataType decay, DataType* t)
    {
        for (int i = 0; i < nb; ++i)
        {
            t[i] = op.roles[i] == Role::kTOKEN ? act : op.roles[i] == Role::kDECAY ? decay : f;
        }
    };
    DataType in[7];
    DataType out[2]{};
    types(h, h, in);
    check(build->getOutputDataTypes(out, 2, in, nb) == 0 && out[0] == h && out[1] == f,
        msg("types: f16 activations -> f16 y, f32 state").c_str());
    types(f, f, in);
    check(build->getOutputDataTypes(out, 2, in, nb) == 0 && out[0] == f && out[1] == f,
        msg("types: f32 activations -> f32 y").c_str());
    if (wIdx >= 0)
    {
        types(h, f, in);
        check(build->getOutputDataTypes(out, 2, in, nb) == 0 && out[0] == h,
            msg("types: f16 activations with f32 decay w accepted").c_str());
        types(f, h, in);
        check(
            build->getOutputDataTypes(out, 2, in, nb) != 0, msg("types: f16 w with f32 activations rejected").c_str());
    }
    types(DataType::kBF16, DataType::kBF16, in);
    check(build->getOutputDataTypes(out, 2, in, nb) != 0, msg("types: bf16 rejected").c_str());
    types(h, h, in);
    in[2] = f; // a token input (k or w/k) of another type than r
    check(build->getOutputDataTypes(out, 2, in, nb) != 0, msg("types: mixed activation types rejected").c_str());
    types(h, h, in);
    in[nb - 1] = h;
    check(build->getOutputDataTypes(out, 2, in, nb) != 0, msg("types: f16 state rejected").c_str());
    if (family != 7)
    {
        types(h, h, in);
        in[4] = h; // u
        check(build->getOutputDataTypes(out, 2, in, nb) != 0, msg("types: f16 u rejected").c_str());
    }
    check(build->getOutputDataTypes(out, 2, in, nb - 1) != 0, msg("types: wrong input count rejected").c_str());

    // Symbolic shapes: outputs reuse r's expressions.
    static char tokens[4];
    auto const* eB = reinterpret_cast<IDimensionExpr const*>(&tokens[0]);
    auto const* eT = reinterpret_cast<IDimensionExpr const*>(&tokens[1]);
    auto const* eH = reinterpret_cast<IDimensionExpr const*>(&tokens[2]);
    auto const* eN = reinterpret_cast<IDimensionExpr const*>(&tokens[3]);
    DimsExprs ins[7]{};
    for (int i = 0; i < nb; ++i)
    {
        DimsExprs& e = ins[i];
        if (op.roles[i] == Role::kPARAM)
        {
            e.nbDims = 2;
            e.d[0] = eH;
            e.d[1] = eN;
        }
        else if (op.roles[i] == Role::kSTATE)
        {
            e.nbDims = 4;
            e.d[0] = eB;
            e.d[1] = eH;
            e.d[2] = e.d[3] = eN;
        }
        else
        {
            e.nbDims = seq ? 4 : 3;
            e.d[0] = eB;
            if (seq)
            {
                e.d[1] = eT;
            }
            e.d[e.nbDims - 2] = eH;
            e.d[e.nbDims - 1] = eN;
        }
    }
    DimsExprs outs[2]{};
    NullExprBuilder eb;
    int32_t rc = build->getOutputShapes(ins, nb, nullptr, 0, outs, 2, eb);
    bool shapesOk = rc == 0 && outs[0].nbDims == ins[0].nbDims;
    for (int j = 0; shapesOk && j < outs[0].nbDims; ++j)
    {
        shapesOk = outs[0].d[j] == ins[0].d[j];
    }
    shapesOk = shapesOk && outs[1].nbDims == 4 && outs[1].d[0] == eB && outs[1].d[1] == eH && outs[1].d[2] == eN
        && outs[1].d[3] == eN;
    check(shapesOk, msg("getOutputShapes: y = r's shape, state_out [B, H, N, N] from r").c_str());
    ins[0].nbDims = seq ? 3 : 4;
    check(build->getOutputShapes(ins, nb, nullptr, 0, outs, 2, eb) != 0,
        msg("getOutputShapes: wrong rank of r rejected").c_str());

    // Format/type combinations, queried in order as TensorRT does.
    Dims dims[9];
    headDims(op, -1, -1, 4, 64, dims); // dynamic batch and T at build time
    DynamicPluginTensorDesc dyn[9];
    headDescs(op, dims, h, h, dyn, nullptr);
    check(allFormats(build, dyn, nb), msg("supportsFormatCombination: f16 activations + f32 rest, linear").c_str());
    headDescs(op, dims, f, f, dyn, nullptr);
    check(allFormats(build, dyn, nb), msg("supportsFormatCombination: all f32, linear").c_str());
    if (wIdx >= 0)
    {
        headDescs(op, dims, h, f, dyn, nullptr);
        check(allFormats(build, dyn, nb), msg("supportsFormatCombination: f16 activations, f32 w").c_str());
        headDescs(op, dims, f, h, dyn, nullptr);
        check(!build->supportsFormatCombination(wIdx, dyn, nb, 2),
            msg("supportsFormatCombination: f16 w with f32 r rejected").c_str());
    }
    headDescs(op, dims, h, h, dyn, nullptr);
    dyn[2].desc.type = f; // k (WKV5/6) or k (WKV7): a token input
    check(!build->supportsFormatCombination(2, dyn, nb, 2),
        msg("supportsFormatCombination: token input type != r rejected").c_str());
    dyn[2].desc.type = h;
    dyn[nb].desc.type = f;
    check(!build->supportsFormatCombination(nb, dyn, nb, 2),
        msg("supportsFormatCombination: y type != r rejected").c_str());
    dyn[nb].desc.type = h;
    dyn[nb + 1].desc.type = h;
    check(!build->supportsFormatCombination(nb + 1, dyn, nb, 2),
        msg("supportsFormatCombination: f16 state_out rejected").c_str());
    dyn[nb + 1].desc.type = f;
    dyn[nb - 1].desc.type = h;
    check(!build->supportsFormatCombination(nb - 1, dyn, nb, 2),
        msg("supportsFormatCombination: f16 state rejected").c_str());
    dyn[nb - 1].desc.type = f;
    dyn[0].desc.type = DataType::kINT8;
    check(!build->supportsFormatCombination(0, dyn, nb, 2), msg("supportsFormatCombination: int8 r rejected").c_str());
    dyn[0].desc.type = h;
    dyn[1].desc.format = TensorFormat::kCHW32;
    check(!build->supportsFormatCombination(1, dyn, nb, 2),
        msg("supportsFormatCombination: non-linear rejected").c_str());
    dyn[1].desc.format = TensorFormat::kLINEAR;
    check(!build->supportsFormatCombination(nb + 2, dyn, nb, 2),
        msg("supportsFormatCombination: bad pos rejected").c_str());

    check(build->configurePlugin(dyn, nb, dyn + nb, 2) == 0, msg("configurePlugin: dynamic B/T accepted").c_str());
    dyn[nb - 1].desc.dims = makeDims({-1, 4, 32, 32});
    check(
        build->configurePlugin(dyn, nb, dyn + nb, 2) != 0, msg("configurePlugin: state with wrong N rejected").c_str());
    dyn[nb - 1].desc.dims = dims[nb - 1];
    dyn[2].desc.dims = seq ? makeDims({-1, -1, 2, 64}) : makeDims({-1, 2, 64});
    check(build->configurePlugin(dyn, nb, dyn + nb, 2) != 0, msg("configurePlugin: k with wrong H rejected").c_str());
    dyn[2].desc.dims = dims[2];
    if (family != 7)
    {
        dyn[4].desc.dims = makeDims({4 * 64});
        check(build->configurePlugin(dyn, nb, dyn + nb, 2) != 0, msg("configurePlugin: u of rank 1 rejected").c_str());
        dyn[4].desc.dims = dims[4];
    }
    Dims big[9];
    headDims(op, -1, -1, 1, 2048, big);
    DynamicPluginTensorDesc dynBig[9];
    headDescs(op, big, h, h, dynBig, nullptr);
    check(build->configurePlugin(dynBig, nb, dynBig + nb, 2) != 0, msg("configurePlugin: N = 2048 rejected").c_str());

    // Runtime side.
    Dims run[9];
    headDims(op, 3, 5, 2, 64, run);
    PluginTensorDesc desc[9];
    headDescs(op, run, h, h, nullptr, desc);
    check(rt->onShapeChange(desc, nb, desc + nb, 2) == 0, msg("onShapeChange: concrete shapes accepted").c_str());
    desc[nb - 1].dims = makeDims({2, 2, 64, 64});
    check(
        rt->onShapeChange(desc, nb, desc + nb, 2) != 0, msg("onShapeChange: state batch != r batch rejected").c_str());

    // enqueue: validation before any CUDA call; an empty batch returns before launching.
    void const* inPtrs[7] = {};
    void* outPtrs[2] = {};
    check(rt->enqueue(desc, desc + nb, inPtrs, outPtrs, nullptr, nullptr) != 0,
        msg("enqueue: bad shapes rejected").c_str());
    Dims empty0[9];
    headDims(op, 0, 5, 2, 64, empty0);
    headDescs(op, empty0, h, h, nullptr, desc);
    check(
        rt->enqueue(desc, desc + nb, inPtrs, outPtrs, nullptr, nullptr) == 0, msg("enqueue: B = 0 is a no-op").c_str());
    desc[nb].type = f;
    check(rt->enqueue(desc, desc + nb, inPtrs, outPtrs, nullptr, nullptr) != 0,
        msg("enqueue: y type != r rejected").c_str());
    desc[nb].type = h;
    desc[nb - 1].type = h;
    check(rt->enqueue(desc, desc + nb, inPtrs, outPtrs, nullptr, nullptr) != 0,
        msg("enqueue: f16 state rejected").c_str());

    finishChecks(op.name, m);
}

//! The op on the CPU with the lane functions of wkvHeadMath.cuh (generic path: in place, with the
//! kernels' strides). Activations [B, T, H, N] as float (already rounded to their types).
void headReference(HeadOp const& op, int64_t B, int64_t T, int64_t H, int64_t N, std::vector<float> const* in,
    std::vector<float>& y, std::vector<float>& state)
{
    // in[] in the op's input order; the state is in[nbIn - 1], copied into `state` and updated.
    state = in[op.nbIn - 1];
    y.assign(static_cast<size_t>(B * T * H * N), 0.F);
    for (int64_t b = 0; b < B; ++b)
    {
        for (int64_t hh = 0; hh < H; ++hh)
        {
            float* s = state.data() + (b * H + hh) * N * N;
            for (int64_t t = 0; t < T; ++t)
            {
                int64_t const base = rwkv::head::actIndex(b, t, hh, 0, T, H, N);
                auto tok = [&](int i) { return in[i].data() + base; };
                auto par = [&](int i) { return in[i].data() + hh * N; };
                std::vector<float> yt(N);
                for (int64_t l = 0; l < N; ++l)
                {
                    if (op.family == 7)
                    {
                        yt[l] = rwkv::head::wkv7Lane<0>(
                            static_cast<int32_t>(N), s + l * N, 1, tok(0), tok(1), tok(2), tok(4), tok(5), tok(3)[l]);
                    }
                    else
                    {
                        float const* w = op.family == 5 ? par(3) : tok(3);
                        yt[l] = rwkv::head::wkv5Lane<0>(
                            static_cast<int32_t>(N), s + l, N, tok(0), tok(1), w, par(4), tok(2)[l]);
                    }
                }
                for (int64_t l = 0; l < N; ++l)
                {
                    y[base + l] = yt[l];
                }
            }
        }
    }
}

template <typename Act, typename WT>
void enqueueHeadCase(int family, bool seq, int32_t B, int32_t T, int32_t H, int32_t N)
{
    HeadOp const op = headOp(family, seq);
    int const nb = op.nbIn;
    if (!seq)
    {
        T = 1;
    }
    DataType const act = sizeof(Act) == 2 ? DataType::kHALF : DataType::kFLOAT;
    DataType const wType = sizeof(WT) == 2 ? DataType::kHALF : DataType::kFLOAT;
    char what[200];
    std::snprintf(what, sizeof(what), "%s %s%s B=%d T=%d H=%d N=%d: enqueue on the GPU matches the CPU build", op.name,
        act == DataType::kHALF ? "f16" : "f32", (act == DataType::kHALF && wType == DataType::kFLOAT) ? " (f32 w)" : "",
        B, T, H, N);
    Lcg rng{static_cast<uint64_t>(family * 7919 + B * 131 + T * 17 + H * 5 + N)};
    size_t const nAct = static_cast<size_t>(B) * T * H * N;
    size_t const nState = static_cast<size_t>(B) * H * N * N;
    size_t const nParam = static_cast<size_t>(H) * N;
    // Host values, rounded to the element type each input has on the device.
    std::vector<float> host[7];
    for (int i = 0; i < nb; ++i)
    {
        Role const role = op.roles[i];
        size_t const n = role == Role::kSTATE ? nState : role == Role::kPARAM ? nParam : nAct;
        host[i].resize(n);
        bool const isW = (family != 7 && i == 3) || (family == 7 && i == 1);
        for (size_t e = 0; e < n; ++e)
        {
            float x = role == Role::kSTATE ? rng.next(-1.F, 1.F) : rng.next(-2.F, 2.F);
            if (isW)
            {
                x = std::exp(-std::exp(rng.next(-6.F, 1.F)));
            }
            else if (family != 7 && i == 4)
            {
                x = rng.next(-1.F, 1.F); // u
            }
            if (role == Role::kTOKEN)
            {
                x = rwkv::head::load(toElem<Act>(x));
            }
            else if (role == Role::kDECAY)
            {
                x = rwkv::head::load(toElem<WT>(x));
            }
            host[i][e] = x;
        }
    }
    if (family == 7) // a = -kk, b = kk * g with kk of unit norm per head: a stable state update
    {
        for (size_t base = 0; base < nAct; base += N)
        {
            float norm = 0.F;
            for (int32_t n = 0; n < N; ++n)
            {
                norm += host[4][base + n] * host[4][base + n];
            }
            norm = std::sqrt(norm) + 1e-6F;
            for (int32_t n = 0; n < N; ++n)
            {
                float const kk = host[4][base + n] / norm;
                host[4][base + n] = rwkv::head::load(toElem<Act>(-kk));
                host[5][base + n] = rwkv::head::load(toElem<Act>(kk * rng.next(0.F, 1.F)));
            }
        }
    }
    std::vector<float> yRef, sRef;
    headReference(op, B, T, H, N, host, yRef, sRef);

    // Device buffers in the plugin's input/output order.
    void* dev[9] = {};
    size_t bytes[9];
    bool ok = true;
    for (int i = 0; i < nb + 2 && ok; ++i)
    {
        Role const role = i < nb ? op.roles[i] : (i == nb ? Role::kTOKEN : Role::kSTATE);
        size_t const elem = role == Role::kTOKEN ? sizeof(Act) : role == Role::kDECAY ? sizeof(WT) : 4;
        size_t const n = role == Role::kSTATE ? nState : role == Role::kPARAM ? nParam : nAct;
        bytes[i] = n * elem;
        ok = cudaMalloc(&dev[i], bytes[i] ? bytes[i] : 1) == cudaSuccess;
        if (ok && i < nb)
        {
            std::vector<unsigned char> raw(bytes[i]);
            for (size_t e = 0; e < n; ++e)
            {
                if (elem == 2)
                {
                    reinterpret_cast<__half*>(raw.data())[e] = toElem<__half>(host[i][e]);
                }
                else
                {
                    reinterpret_cast<float*>(raw.data())[e] = host[i][e];
                }
            }
            ok = cudaMemcpy(dev[i], raw.data(), bytes[i], cudaMemcpyHostToDevice) == cudaSuccess;
        }
    }
    IPluginV3OneRuntime* rt = nullptr;
    IPluginV3* p = ok ? runtimePlugin(op.name, rt) : nullptr;
    ok = ok && p != nullptr;
    if (ok)
    {
        Dims dims[9];
        headDims(op, B, T, H, N, dims);
        PluginTensorDesc desc[9];
        headDescs(op, dims, act, wType, nullptr, desc);
        void const* in[7] = {};
        for (int i = 0; i < nb; ++i)
        {
            in[i] = dev[i];
        }
        void* out[2] = {dev[nb], dev[nb + 1]};
        ok = rt->onShapeChange(desc, nb, desc + nb, 2) == 0
            && rt->enqueue(desc, desc + nb, in, out, nullptr, nullptr) == 0 && cudaDeviceSynchronize() == cudaSuccess;
    }
    std::vector<Act> yGot(nAct);
    std::vector<float> sGot(nState);
    ok = ok && cudaMemcpy(yGot.data(), dev[nb], bytes[nb], cudaMemcpyDeviceToHost) == cudaSuccess
        && cudaMemcpy(sGot.data(), dev[nb + 1], bytes[nb + 1], cudaMemcpyDeviceToHost) == cudaSuccess;
    // Errors relative to each tensor's largest magnitude (sums of large terms may cancel).
    double worstY = 0, worstS = 0, maxY = 1, maxS = 1;
    for (size_t i = 0; i < nAct; ++i)
    {
        maxY = std::fmax(maxY, std::fabs(yRef[i]));
    }
    for (size_t i = 0; i < nState; ++i)
    {
        maxS = std::fmax(maxS, std::fabs(sRef[i]));
    }
    for (size_t i = 0; ok && i < nAct; ++i)
    {
        double const want = rwkv::head::load(toElem<Act>(yRef[i]));
        worstY = std::fmax(worstY, std::fabs(rwkv::head::load(yGot[i]) - want) / maxY);
    }
    for (size_t i = 0; ok && i < nState; ++i)
    {
        worstS = std::fmax(worstS, std::fabs(sGot[i] - sRef[i]) / maxS);
    }
    double const tolY = act == DataType::kHALF ? 2e-3 : 2e-5;
    std::printf("     max scaled error: y %.2e, state %.2e\n", worstY, worstS);
    check(ok && worstY <= tolY && worstS <= 2e-5, what);
    delete p;
    for (void* d : dev)
    {
        cudaFree(d);
    }
}

void enqueueHeadCases()
{
    // N = 64 (register path, the usual head size), 8 and 48 (generic path), 128 (largest register path).
    for (int family : {5, 6, 7})
    {
        enqueueHeadCase<float, float>(family, false, 3, 1, 4, 64);
        enqueueHeadCase<__half, __half>(family, false, 2, 1, 8, 8);
        enqueueHeadCase<float, float>(family, true, 2, 7, 2, 48);
        enqueueHeadCase<__half, __half>(family, true, 2, 33, 2, 64);
        enqueueHeadCase<float, float>(family, true, 1, 5, 1, 128);
        if (family != 5)
        {
            enqueueHeadCase<__half, float>(family, true, 3, 16, 2, 64);
        }
    }
}

} // namespace

int main(int argc, char** argv)
{
    int32_t const kNB = 8; // WKV4, WKV5, WKV6, WKV7 and their Seq forms
    if (argc < 3)
    {
        std::fprintf(stderr, "usage: %s <scenario> <plugin.so> [<copy.so>]\n", argv[0]);
        return 2;
    }
    std::string const scenario = argv[1];
    char const* lib = argv[2];
    char const* copy = argc > 3 ? argv[3] : nullptr;

    if (scenario == "loadlibrary")
    {
        check(loadLibrary(lib), "loadLibrary succeeds");
        check(mockCreatorCount() == kNB && mockCreatorCountFromLibraries() == kNB, "8 creators, from getCreators()");
        check(plainDlopen(lib) != nullptr && mockCreatorCount() == kNB, "a later dlopen of the same file adds nothing");
    }
    else if (scenario == "dlopen-registers-nothing")
    {
        check(plainDlopen(lib) != nullptr && mockCreatorCount() == 0,
            "a plain dlopen registers nothing (no static "
            "registration in the loadLibrary library)");
        check(loadLibrary(lib) && mockCreatorCountFromLibraries() == kNB, "a later loadLibrary registers all 8");
    }
    else if (scenario == "autoregister" && copy)
    {
        check(plainDlopen(copy) != nullptr && mockCreatorCount() == kNB,
            "dlopen of the autoregister library "
            "registers 8 creators");
        check(mockCreatorCountFromLibraries() == 0, "... by registerCreator, not loadLibrary");
    }
    else if (scenario == "autoregister-then-loadlibrary" && copy)
    {
        // Documented as unsupported (one loading path per process); it must fail the way TensorRT does.
        check(plainDlopen(copy) != nullptr && mockCreatorCount() == kNB, "autoregister library registers 8");
        check(!loadLibrary(lib), "a later loadLibrary fails, as in TensorRT");
        check(std::strstr(mockLastError(), "Cannot register the library as plugin creator of") != nullptr,
            "... with TensorRT's error");
        check(mockCreatorCount() == kNB, "the registered creators stay usable");
        return gFailures == 0 ? 0 : 1;
    }
    else if (scenario == "loadlibrary-then-autoregister" && copy)
    {
        check(loadLibrary(lib) && mockCreatorCount() == kNB, "loadLibrary registers 8 creators");
        check(plainDlopen(copy) != nullptr && mockCreatorCount() == kNB,
            "the autoregister library finds them "
            "registered and adds nothing");
    }
    else if (scenario == "loadlibrary-then-copy" && copy)
    {
        check(loadLibrary(lib) && mockCreatorCount() == kNB, "loadLibrary registers 8 creators");
        check(plainDlopen(copy) != nullptr && mockCreatorCount() == kNB, "dlopen of a second copy adds nothing");
    }
    else if (scenario == "enqueue-without-gpu")
    {
        // Only meaningful where no CUDA device exists: the launch itself must fail cleanly.
        check(loadLibrary(lib) && mockCreatorCount() == kNB, "loadLibrary registers 8 creators");
        IPluginCreatorV3One* c = creator("WKV4");
        PluginFieldCollection empty{};
        IPluginV3* p = c ? c->createPlugin("node", &empty, TensorRTPhase::kBUILD) : nullptr;
        check(p != nullptr, "createPlugin");
        if (p)
        {
            auto* rt = static_cast<IPluginV3OneRuntime*>(p->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
            Dims run[7];
            inputDims(false, 1, 1, 4, run);
            PluginTensorDesc desc[11];
            fillDescs(run, DataType::kFLOAT, nullptr, desc);
            static float buf[11][4];
            void const* in[7];
            void* out[4];
            for (int i = 0; i < 7; ++i)
            {
                in[i] = buf[i];
            }
            for (int i = 0; i < 4; ++i)
            {
                out[i] = buf[7 + i];
            }
            check(rt->enqueue(desc, desc + 7, in, out, nullptr, nullptr) != 0, "enqueue reports the failed launch");
            check(mockErrorCount() == 1, "... through the TensorRT logger");
            // As inside an execution context: the clone from attachToContext reports to its error recorder too.
            CountingRecorder recorder;
            ResourceContext context(&recorder);
            IPluginV3* attached = rt->attachToContext(&context);
            auto* art = attached
                ? static_cast<IPluginV3OneRuntime*>(attached->getCapabilityInterface(PluginCapabilityType::kRUNTIME))
                : nullptr;
            check(art != nullptr && art->enqueue(desc, desc + 7, in, out, nullptr, nullptr) != 0,
                "attached clone: enqueue fails");
            check(recorder.getNbErrors() == 1 && recorder.getErrorCode(0) == ErrorCode::kFAILED_EXECUTION
                    && std::strstr(recorder.getErrorDesc(0), "kernel launch failed") != nullptr,
                "... and the context's error recorder got the message");
            check(mockErrorCount() == 2, "... and the logger too");
            delete attached;
            delete p;
        }
        // The same for an RWKV-7 sequence op (the launchers of wkvHeadKernel.h).
        IPluginCreatorV3One* c7 = creator("WKV7Seq");
        IPluginV3* p7 = c7 ? c7->createPlugin("node", &empty, TensorRTPhase::kBUILD) : nullptr;
        check(p7 != nullptr, "createPlugin WKV7Seq");
        if (p7)
        {
            auto* rt = static_cast<IPluginV3OneRuntime*>(p7->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
            HeadOp const op = headOp(7, true);
            Dims run[9];
            headDims(op, 1, 2, 1, 4, run);
            PluginTensorDesc desc[9];
            headDescs(op, run, DataType::kFLOAT, DataType::kFLOAT, nullptr, desc);
            static float buf[9][32];
            void const* in[7];
            for (int i = 0; i < 7; ++i)
            {
                in[i] = buf[i];
            }
            void* out[2] = {buf[7], buf[8]};
            check(rt->enqueue(desc, desc + 7, in, out, nullptr, nullptr) != 0,
                "WKV7Seq enqueue reports the failed launch");
            check(mockErrorCount() == 3, "... through the TensorRT logger");
            delete p7;
        }
        return gFailures == 0 ? 0 : 1;
    }
    else if (scenario == "enqueue-gpu")
    {
        int32_t devices = 0;
        if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0)
        {
            std::printf("skip: no CUDA device\n");
            return 0;
        }
        check(loadLibrary(lib) && mockCreatorCount() == kNB, "loadLibrary registers 8 creators");
        enqueueCase<float>("WKV4", false, 3, 1, 768, DataType::kFLOAT);
        enqueueCase<__half>("WKV4", false, 3, 1, 768, DataType::kHALF);
        enqueueCase<float>("WKV4Seq", true, 2, 7, 100, DataType::kFLOAT);
        enqueueCase<__half>("WKV4Seq", true, 8, 64, 64, DataType::kHALF);
        enqueueHeadCases();
        return gFailures == 0 ? 0 : 1;
    }
    else if (scenario == "exercise")
    {
        check(loadLibrary(lib) && mockCreatorCount() == kNB, "loadLibrary registers 8 creators");
        int32_t const errorsBefore = mockErrorCount();
        exercise("WKV4", false);
        exercise("WKV4Seq", true);
        for (int family : {5, 6, 7})
        {
            exerciseHead(family, false);
            exerciseHead(family, true);
        }
        check(mockErrorCount() > errorsBefore, "rejections were reported through the TensorRT logger");
        std::printf(
            "errors logged while exercising (expected, one per rejection): %d\n", mockErrorCount() - errorsBefore);
        return gFailures == 0 ? 0 : 1;
    }
    else
    {
        std::fprintf(stderr, "unknown scenario %s\n", scenario.c_str());
        return 2;
    }
    check(mockErrorCount() == 0, "no errors logged");
    return gFailures == 0 ? 0 : 1;
}
