/*
 * A stand-in for libnvinfer.so.<major>, for testing librwkv_trt_plugins.so on machines without
 * TensorRT. It implements only what the plugin library touches when it is loaded -- the global
 * plugin registry, the global logger, the library version -- following the documented contract
 * (NvInferRuntimeCommon.h) and the messages real TensorRT logs: registerCreator() fails for a
 * creator that is already registered; loadLibrary() dlopens the file, calls setLoggerFinder() and
 * getCreators(), and fails with TensorRT's "Cannot register the library as plugin creator of ...
 * exists already." if any returned creator is already registered; getCreator() logs "Cannot find
 * plugin" as an error on a miss. The registry lock is a plain (non-recursive) mutex like
 * TensorRT's: a plugin library that calls back into the registry while loadLibrary holds it (e.g.
 * registering from a static initializer) is caught and the process aborts with a FAIL line,
 * where real TensorRT would deadlock or fail. It is a model of that contract, not of TensorRT's
 * internals (parent registries and error recorders are not modelled).
 *
 * Build (the soname must be the real one, the plugin looks TensorRT up by it):
 *   g++ -std=c++17 -shared -fPIC -DTENSORRT_BUILD_LIB -I<trt>/include -I<cuda>/include \
 *       -Wl,-soname,libnvinfer.so.<major> mock_nvinfer.cpp -o <dir>/libnvinfer.so.<major> -ldl
 */
#include "NvInferRuntime.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dlfcn.h>
#include <mutex>
#include <string>
#include <vector>

using namespace nvinfer1;

#define MOCK_API extern "C" __attribute__((visibility("default")))

namespace
{

int gErrors = 0;
std::string gLastError;

class MockLogger : public ILogger
{
public:
    void log(Severity severity, AsciiChar const* msg) noexcept override
    {
        std::fprintf(stderr, "[mock-trt] [%d] %s\n", static_cast<int>(severity), msg);
        if (severity <= Severity::kERROR)
        {
            ++gErrors;
            gLastError = msg;
        }
    }
};

MockLogger gLogger;

class MockLoggerFinder : public ILoggerFinder
{
public:
    ILogger* findLogger() override
    {
        return &gLogger;
    }
};

MockLoggerFinder gLoggerFinder;

// One registry call at a time per thread; a nested call is the re-entrance real TensorRT does not allow.
thread_local bool tInRegistry = false;

class RegistryCall
{
public:
    RegistryCall(std::mutex& m, char const* what)
    {
        if (tInRegistry)
        {
            std::printf("FAIL: IPluginRegistry::%s called from inside another registry call (real TensorRT would "
                        "deadlock on its registry lock)\n",
                what);
            std::fflush(stdout);
            std::abort();
        }
        tInRegistry = true;
        mLock = std::unique_lock<std::mutex>(m);
    }
    ~RegistryCall()
    {
        tInRegistry = false;
    }

private:
    std::unique_lock<std::mutex> mLock;
};

bool creatorKey(IPluginCreatorInterface& c, std::string& key)
{
    // Only V3 creators are modelled.
    if (std::strcmp(c.getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") != 0)
    {
        return false;
    }
    auto& v3 = static_cast<IPluginCreatorV3One&>(c);
    key = std::string(v3.getPluginNamespace()) + "::" + v3.getPluginName() + " version " + v3.getPluginVersion();
    return true;
}

class MockRegistry : public IPluginRegistry
{
public:
    bool registerCreator(IPluginCreatorInterface& creator, AsciiChar const* const /*ns*/) noexcept override
    {
        RegistryCall call(mMutex, "registerCreator");
        std::string key;
        if (!creatorKey(creator, key) || find(key) >= 0)
        {
            gLogger.log(ILogger::Severity::kERROR,
                ("IPluginRegistry::registerCreator: Error Code 4: API Usage Error (Plugin creator " + key
                    + " exists already.)")
                    .c_str());
            return false;
        }
        add(key, &creator, nullptr);
        return true;
    }

    IPluginCreatorInterface* getCreator(
        AsciiChar const* const name, AsciiChar const* const version, AsciiChar const* const ns) noexcept override
    {
        RegistryCall call(mMutex, "getCreator");
        IPluginCreatorInterface* c = peek(name, version, ns);
        if (c == nullptr)
        {
            gLogger.log(ILogger::Severity::kERROR,
                (std::string("IPluginRegistry::getCreator: Error Code 4: API Usage Error (Cannot find plugin: ") + name
                    + ", version: " + version + ", namespace:" + (ns ? ns : "") + ".)")
                    .c_str());
        }
        return c;
    }

    //! getCreator without the error log (test helper).
    IPluginCreatorInterface* peek(AsciiChar const* name, AsciiChar const* version, AsciiChar const* ns) const
    {
        int i = find(std::string(ns ? ns : "") + "::" + name + " version " + version);
        return i < 0 ? nullptr : mEntries[i].creator;
    }

    PluginLibraryHandle loadLibrary(AsciiChar const* path) noexcept override
    {
        RegistryCall call(mMutex, "loadLibrary");
        void* h = dlopen(path, RTLD_LAZY | RTLD_LOCAL);
        if (h == nullptr)
        {
            gLogger.log(ILogger::Severity::kERROR, dlerror());
            return nullptr;
        }
        using GetCreators = IPluginCreatorInterface* const* (*)(int32_t&);
        using SetLoggerFinder = void (*)(ILoggerFinder*);
        auto getCreators = reinterpret_cast<GetCreators>(dlsym(h, "getCreators"));
        if (getCreators == nullptr)
        {
            gLogger.log(ILogger::Severity::kERROR, "loadLibrary: SymbolAddress for getCreators could not be loaded");
            return nullptr;
        }
        if (auto setLoggerFinder = reinterpret_cast<SetLoggerFinder>(dlsym(h, "setLoggerFinder")))
        {
            setLoggerFinder(&gLoggerFinder);
        }
        int32_t n = 0;
        IPluginCreatorInterface* const* list = getCreators(n);
        std::vector<std::string> keys;
        for (int32_t i = 0; i < n; ++i)
        {
            std::string key;
            if (!creatorKey(*list[i], key) || find(key) >= 0)
            {
                std::string const name = std::strcmp(list[i]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0
                    ? static_cast<IPluginCreatorV3One*>(list[i])->getPluginName()
                    : key;
                gLogger.log(ILogger::Severity::kERROR,
                    ("IPluginRegistry::loadLibrary: Error Code 4: API Usage Error (Cannot register the library as "
                     "plugin creator of "
                        + name + " exists already.)")
                        .c_str());
                return nullptr;
            }
            keys.push_back(key);
        }
        for (int32_t i = 0; i < n; ++i)
        {
            add(keys[i], list[i], h);
        }
        return h;
    }

    void deregisterLibrary(PluginLibraryHandle handle) noexcept override
    {
        RegistryCall call(mMutex, "deregisterLibrary");
        for (size_t i = mEntries.size(); i-- > 0;)
        {
            if (mEntries[i].library == handle)
            {
                mEntries.erase(mEntries.begin() + static_cast<long>(i));
            }
        }
        rebuild();
    }

    IPluginCreatorInterface* const* getAllCreators(int32_t* const n) const noexcept override
    {
        if (tInRegistry)
        {
            std::printf("FAIL: IPluginRegistry::getAllCreators called from inside another registry call\n");
            std::fflush(stdout);
            std::abort();
        }
        *n = static_cast<int32_t>(mFlat.size());
        return mFlat.empty() ? nullptr : mFlat.data();
    }

    bool deregisterCreator(IPluginCreatorInterface const& creator) noexcept override
    {
        RegistryCall call(mMutex, "deregisterCreator");
        for (size_t i = 0; i < mEntries.size(); ++i)
        {
            if (mEntries[i].creator == &creator)
            {
                mEntries.erase(mEntries.begin() + static_cast<long>(i));
                rebuild();
                return true;
            }
        }
        return false;
    }

    void setErrorRecorder(IErrorRecorder* const recorder) noexcept override
    {
        mRecorder = recorder;
    }
    IErrorRecorder* getErrorRecorder() const noexcept override
    {
        return mRecorder;
    }
    bool isParentSearchEnabled() const override
    {
        return true;
    }
    void setParentSearchEnabled(bool const) override
    {
    }
    IPluginResource* acquirePluginResource(AsciiChar const*, IPluginResource*) noexcept override
    {
        return nullptr;
    }
    int32_t releasePluginResource(AsciiChar const*) noexcept override
    {
        return 0;
    }
#if NV_TENSORRT_MAJOR > 10 || (NV_TENSORRT_MAJOR == 10 && NV_TENSORRT_MINOR >= 10)
    IPluginCreatorInterface* const* getAllCreatorsRecursive(int32_t* const n) noexcept override
    {
        return getAllCreators(n);
    }
#endif
#if NV_TENSORRT_MAJOR < 11
    // IPluginV2-era overloads, removed in TensorRT 11; never used by the rwkv plugins.
    bool registerCreator(IPluginCreator&, AsciiChar const* const) noexcept override
    {
        return false;
    }
    IPluginCreator* const* getPluginCreatorList(int32_t* const n) const noexcept override
    {
        *n = 0;
        return nullptr;
    }
    IPluginCreator* getPluginCreator(
        AsciiChar const* const, AsciiChar const* const, AsciiChar const* const) noexcept override
    {
        return nullptr;
    }
    bool deregisterCreator(IPluginCreator const&) noexcept override
    {
        return false;
    }
#endif

    int32_t count() const
    {
        return static_cast<int32_t>(mEntries.size());
    }

    int32_t countFromLibraries() const
    {
        int32_t n = 0;
        for (auto const& e : mEntries)
        {
            n += e.library != nullptr;
        }
        return n;
    }

private:
    struct Entry
    {
        std::string key;
        IPluginCreatorInterface* creator;
        void* library;
    };

    int find(std::string const& key) const
    {
        for (size_t i = 0; i < mEntries.size(); ++i)
        {
            if (mEntries[i].key == key)
            {
                return static_cast<int>(i);
            }
        }
        return -1;
    }
    void add(std::string const& key, IPluginCreatorInterface* c, void* lib)
    {
        mEntries.push_back({key, c, lib});
        rebuild();
    }
    void rebuild()
    {
        mFlat.clear();
        for (auto const& e : mEntries)
        {
            mFlat.push_back(e.creator);
        }
    }

    std::mutex mMutex;
    std::vector<Entry> mEntries;
    std::vector<IPluginCreatorInterface*> mFlat;
    IErrorRecorder* mRecorder{nullptr};
};

MockRegistry gRegistry;

} // namespace

// ---- what the real libnvinfer exports and the plugin library looks up ---------------------------
extern "C" TENSORRTAPI IPluginRegistry* getPluginRegistry() noexcept
{
    return &gRegistry;
}

extern "C" TENSORRTAPI ILogger* getLogger() noexcept
{
    return &gLogger;
}

extern "C" TENSORRTAPI int32_t getInferLibVersion() noexcept
{
    // MOCK_TRT_VERSION lets a test pretend to be another TensorRT (e.g. 100800 for 10.8.0).
    if (char const* v = std::getenv("MOCK_TRT_VERSION"))
    {
        return std::atoi(v);
    }
    return static_cast<int32_t>(NV_TENSORRT_VERSION);
}

// ---- test helpers ----------------------------------------------------------------------------
MOCK_API int32_t mockCreatorCount()
{
    return gRegistry.count();
}

//! How many creators were registered by loadLibrary (rather than by registerCreator).
MOCK_API int32_t mockCreatorCountFromLibraries()
{
    return gRegistry.countFromLibraries();
}

MOCK_API int32_t mockHasCreator(char const* name, char const* version, char const* ns)
{
    return gRegistry.peek(name, version, ns) != nullptr;
}

MOCK_API void* mockLoadLibrary(char const* path)
{
    return gRegistry.loadLibrary(path);
}

MOCK_API int32_t mockErrorCount()
{
    return gErrors;
}

MOCK_API char const* mockLastError()
{
    return gLastError.c_str();
}
