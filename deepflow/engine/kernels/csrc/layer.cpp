// One Llama decoder layer in one call (bf16, every projection through small_linear): the decode fast path.
//
// A batch-1 decode step of SmolLM2 spends ~6.5 ms in its weight reads and, through the layer-by-layer
// Python forward, ~3-4 ms more between them (benchmarks/step_overhead.py: 17 Python-level calls per layer,
// each paying the interpreter, nn.Module and the dispatcher's argument parsing). Here the same ops run in
// the same order from C++ through the dispatcher's typed handles (~1 us each), with the same tensors, so
// the result is the Python path's, bit for bit (tests/engine/kernels/test_decoder_layer.py):
//
//   h = rms_norm(x) and residual = x (first layer) | x, residual = fused_add_rms_norm(x, residual)
//   qkv = small_linear(h, qkv) -> rope_and_cache(q|k, v, ...) -> paged_attention(q) -> small_linear(o)
//   o, residual = fused_add_rms_norm(o, residual) -> small_linear(o, gate_up) -> silu_and_mul -> down
//
// x and residual are updated in place (as the Python path does); the MLP output is returned.
#include "common.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace deepflow {
namespace {

using c10::Dispatcher;

const auto& small_linear_op() {
  static const auto op = Dispatcher::singleton().findSchemaOrThrow("deepflow::small_linear", "").typed<
      at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t)>();
  return op;
}
const auto& rms_norm_op() {
  static const auto op = Dispatcher::singleton()
                             .findSchemaOrThrow("deepflow::rms_norm", "")
                             .typed<void(at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
  return op;
}
const auto& fused_add_rms_norm_op() {
  static const auto op = Dispatcher::singleton()
                             .findSchemaOrThrow("deepflow::fused_add_rms_norm", "")
                             .typed<void(at::Tensor&, at::Tensor&, const at::Tensor&, double)>();
  return op;
}
const auto& silu_and_mul_op() {
  static const auto op = Dispatcher::singleton()
                             .findSchemaOrThrow("deepflow::silu_and_mul", "")
                             .typed<void(at::Tensor&, const at::Tensor&)>();
  return op;
}
const auto& rope_and_cache_op() {
  static const auto op =
      Dispatcher::singleton()
          .findSchemaOrThrow("deepflow::rope_and_cache", "")
          .typed<void(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      at::Tensor&, at::Tensor&, const at::Tensor&, int64_t, int64_t)>();
  return op;
}
const auto& paged_attention_op() {
  static const auto op =
      Dispatcher::singleton()
          .findSchemaOrThrow("deepflow::paged_attention", "")
          .typed<void(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double, bool)>();
  return op;
}

at::Tensor decoder_layer(at::Tensor& x, at::Tensor& residual, bool first, const at::Tensor& input_norm,
                         const at::Tensor& post_norm, double eps, const at::Tensor& qkv_w,
                         const std::optional<at::Tensor>& qkv_bias, const at::Tensor& o_w, const at::Tensor& gate_up_w,
                         const at::Tensor& down_w, const at::Tensor& cos, const at::Tensor& sin,
                         const at::Tensor& positions, at::Tensor& k_cache, at::Tensor& v_cache,
                         const at::Tensor& slot_mapping, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                         const at::Tensor& query_start_loc, int64_t num_heads, int64_t num_kv_heads,
                         int64_t head_dim, int64_t intermediate, double scale) {
  DF_CHECK(x.dim() == 2 && x.dtype() == at::kBFloat16 && x.is_contiguous(),
           "decoder_layer: x must be a contiguous bf16 [T, hidden] tensor");
  DF_CHECK(residual.sizes() == x.sizes() && residual.dtype() == x.dtype() && residual.is_contiguous(),
           "decoder_layer: residual must be like x");
  const int64_t tokens = x.size(0), hidden = x.size(1);
  const int64_t q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
  at::Tensor h;
  if (first) {  // the embedding output starts the residual stream
    h = at::empty_like(x);
    rms_norm_op().call(h, x, input_norm, eps);
    residual.copy_(x);
  } else {
    fused_add_rms_norm_op().call(x, residual, input_norm, eps);
    h = x;
  }
  const at::Tensor qkv = small_linear_op().call(h, qkv_w, qkv_bias, q_size + 2 * kv_size);
  at::Tensor qk = qkv.narrow(1, 0, q_size + kv_size).view({tokens, num_heads + num_kv_heads, head_dim});
  const at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({tokens, num_kv_heads, head_dim});
  rope_and_cache_op().call(qk, v, cos, sin, positions, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads);
  const at::Tensor q = qk.narrow(1, 0, num_heads).contiguous();
  const at::Tensor attn = at::empty_like(q);
  paged_attention_op().call(attn, std::nullopt, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                            true);
  at::Tensor o = small_linear_op().call(attn.view({tokens, q_size}), o_w, std::nullopt, hidden);
  fused_add_rms_norm_op().call(o, residual, post_norm, eps);
  const at::Tensor gate_up = small_linear_op().call(o, gate_up_w, std::nullopt, 2 * intermediate);
  at::Tensor act = at::empty({tokens, intermediate}, x.options());
  silu_and_mul_op().call(act, gate_up);
  return small_linear_op().call(act, down_w, std::nullopt, hidden);
}

}  // namespace
}  // namespace deepflow

TORCH_LIBRARY_FRAGMENT(deepflow, m) {
  m.def(
      "decoder_layer(Tensor(a!) x, Tensor(b!) residual, bool first, Tensor input_norm, Tensor post_norm, "
      "float eps, Tensor qkv, Tensor? qkv_bias, Tensor o, Tensor gate_up, Tensor down, Tensor cos, Tensor sin, "
      "Tensor positions, Tensor(c!) k_cache, Tensor(d!) v_cache, Tensor slot_mapping, Tensor block_tables, "
      "Tensor seq_lens, Tensor query_start_loc, int num_heads, int num_kv_heads, int head_dim, int intermediate, "
      "float scale) -> Tensor",
      &deepflow::decoder_layer);
}
