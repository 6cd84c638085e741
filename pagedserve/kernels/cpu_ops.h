// The fused CPU kernels of cpu_ops.cpp that other translation units call directly (decoder_stack.cpp
// runs a whole forward in C++ through them). Each is documented at its definition.
#pragma once
#include <torch/extension.h>

namespace ps {

void write_kv(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& slot_mapping);
void paged_decode_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_tables,
                            const at::Tensor& context_lens, double scale);
void paged_prefill_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, const at::Tensor& seg_info, const at::Tensor& seg_tables,
                             double scale);
void rotary_inplace(at::Tensor x, const at::Tensor& positions, const at::Tensor& cos_table,
                    const at::Tensor& sin_table, int64_t rotated_heads, int64_t head_dim);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
void fused_add_rms_norm(at::Tensor x, at::Tensor residual, const at::Tensor& weight, double eps);
at::Tensor silu_and_mul(const at::Tensor& gate_up);

}  // namespace ps

// Adds the DecoderStack and FusedLinear classes to the extension module (decoder_stack.cpp).
void register_decoder_stack(pybind11::module& m);
