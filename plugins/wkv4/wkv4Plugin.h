/*
 * TensorRT IPluginV3 for the RWKV-4 WKV operator: ONNX ops rwkv::WKV4 (one token, k/v [B, C]) and
 * rwkv::WKV4Seq (k/v [B, T, C]). One plugin class and one creator class; the creator instance
 * decides which of the two ops it makes. Thin glue: validate, pick the type, call the launcher in
 * wkv4Kernel.h.
 */
#ifndef RWKV_WKV4_PLUGIN_H
#define RWKV_WKV4_PLUGIN_H

#include "common/rwkvPluginBase.h"

#include <cstdint>

namespace rwkv
{
namespace trt
{

constexpr char const* kWKV4_NAME{"WKV4"};
constexpr char const* kWKV4_SEQ_NAME{"WKV4Seq"};
constexpr char const* kWKV4_VERSION{"1"};

//! Inputs: k, v, w, u, aa, bb, pp. Outputs: y, aa_out, bb_out, pp_out.
constexpr int32_t kWKV4_NB_INPUTS{7};
constexpr int32_t kWKV4_NB_OUTPUTS{4};

class Wkv4Plugin final : public PluginV3Base<Wkv4Plugin>
{
public:
    explicit Wkv4Plugin(bool seq) noexcept;

    RWKV_PLUGIN_OP_METHODS;

private:
    bool mSeq;
};

class Wkv4PluginCreator final : public PluginCreatorBase
{
public:
    explicit Wkv4PluginCreator(bool seq) noexcept;

private:
    nvinfer1::IPluginV3* make() noexcept override;
    bool mSeq;
};

} // namespace trt
} // namespace rwkv

#endif // RWKV_WKV4_PLUGIN_H
