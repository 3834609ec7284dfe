/*
 * TensorRT IPluginV3 for the matrix-state WKV operators of RWKV-5, 6 and 7: ONNX ops rwkv::WKV5,
 * WKV5Seq, WKV6, WKV6Seq, WKV7 and WKV7Seq. One plugin class and one creator class; the creator
 * instance (op family + step/sequence) decides which op it makes. Thin glue, built like
 * wkv4/wkv4Plugin.h: validate, pick the types, call the launchers in wkvHeadKernel.h.
 */
#ifndef RWKV_WKVHEAD_PLUGIN_H
#define RWKV_WKVHEAD_PLUGIN_H

#include "common/rwkvPluginBase.h"

#include <cstdint>

namespace rwkv
{
namespace trt
{

constexpr char const* kWKVHEAD_VERSION{"1"};

//! The op family; each has a single-token op ([B, H, N] activations) and a Seq op ([B, T, H, N]).
enum class WkvFamily : int32_t
{
    kWKV5 = 5, //!< inputs r, k, v, w [H, N], u [H, N], state; outputs y, state_out
    kWKV6 = 6, //!< inputs r, k, v, w (per token), u [H, N], state; outputs y, state_out
    kWKV7 = 7, //!< inputs r, w, k, v, a, b (all per token), state; outputs y, state_out
};

constexpr int32_t kWKVHEAD_MAX_INPUTS{7};
constexpr int32_t kWKVHEAD_NB_OUTPUTS{2};

class WkvHeadPlugin final : public PluginV3Base<WkvHeadPlugin>
{
public:
    WkvHeadPlugin(WkvFamily family, bool seq) noexcept;

    RWKV_PLUGIN_OP_METHODS;

private:
    WkvFamily mFamily;
    bool mSeq;
};

class WkvHeadPluginCreator final : public PluginCreatorBase
{
public:
    WkvHeadPluginCreator(WkvFamily family, bool seq) noexcept;

private:
    nvinfer1::IPluginV3* make() noexcept override;
    WkvFamily mFamily;
    bool mSeq;
};

} // namespace trt
} // namespace rwkv

#endif // RWKV_WKVHEAD_PLUGIN_H
