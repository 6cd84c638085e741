// The whole decoder stack of a Llama-family model in one C++ call per engine step.
//
// The Python forward calls ~10 kernels per layer through pybind11 and nn.Module, and on a 2-core CPU
// that glue was 3.5–6 ms of a 17–40 ms decode step (benchmarks/profile_step.py). This runs the same
// kernels in the same order on the same tensors, so its output is bit-identical to the Python path
// (tests/test_decoder_stack.py checks that); only the interpreter between them is gone.
//
// FusedLinear is the linear layers' dispatch for float32 on the CPU, used by the Python Linear too,
// so the rule exists once: the panel kernel (quant_linear.cpp) for packed weights (GGUF blocks, int8,
// or float32 weights in the same panels: any row count, its per-row sums run in one order whatever M
// is), the W8A8 kernel for int8 x int8; else at::linear with fewer than 12 rows padded to a multiple of 4, which on
// some CPUs' MKL gives a row the same bits at every M (not on all: docs/machine.md). A row's output
// then does not depend on how many rows the step carries (batch invariance: prefix-cache hits,
// chunking and batch composition cannot change the logits).
#include "cpu_ops.h"
#include "quant_linear.h"

#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kInvariantMinRows = 12;  // see the top of this file

}  // namespace

at::Tensor row_invariant_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const int64_t rows = x.dim() == 2 ? x.size(0) : 0;
  if (rows == 0 || rows >= kInvariantMinRows || rows % 4 == 0) return at::linear(x, weight, bias);
  const int64_t padded = (rows + 3) / 4 * 4;
  at::Tensor xp = at::zeros({padded, x.size(1)}, x.options());
  xp.slice(0, 0, rows).copy_(x);
  return at::linear(xp, weight, bias).slice(0, 0, rows).contiguous();
}

namespace {

class FusedLinear {
 public:
  using Quant = std::tuple<at::Tensor, at::Tensor, at::Tensor, std::string>;  // codes, d, m, format

  FusedLinear(at::Tensor weight, std::optional<at::Tensor> bias, std::optional<Quant> quant)
      : weight_(std::move(weight)), bias_(std::move(bias)) {
    if (quant) std::tie(codes_, d_, m_, format_) = *quant;
    w8a8_ = format_ == "W8A8";
  }

  at::Tensor forward(const at::Tensor& x) const {
    if (x.dim() == 2 && codes_.defined()) {
      at::Tensor out = w8a8_ ? w8a8_linear(x, codes_, d_) : quant_linear(x, codes_, d_, m_, format_);
      return bias_ ? out.add_(*bias_) : out;
    }
    return row_invariant_linear(x, weight_, bias_);
  }

 private:
  at::Tensor weight_;
  std::optional<at::Tensor> bias_;
  at::Tensor codes_, d_, m_;
  std::string format_;
  bool w8a8_ = false;  // codes_ = w8a8_pack's weights, d_ their scales
};

struct FusedLayer {
  at::Tensor input_norm, post_norm;  // RMSNorm weights
  FusedLinear qkv, o, gate_up, down;
};

class DecoderStack {
 public:
  DecoderStack(std::vector<FusedLayer> layers, at::Tensor final_norm, int64_t heads, int64_t kv_heads,
               int64_t head_dim, double eps, double scale)
      : layers_(std::move(layers)),
        final_norm_(std::move(final_norm)),
        heads_(heads),
        kv_heads_(kv_heads),
        head_dim_(head_dim),
        eps_(eps),
        scale_(scale) {}

  // x: the step's embeddings [T, hidden] (its storage becomes the residual stream). Returns the final
  // norm's output [T, hidden]. Mirrors LlamaForCausalLM.forward with the fused CPU kernels, line by line.
  at::Tensor forward(at::Tensor x, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
                     const std::vector<std::tuple<at::Tensor, at::Tensor>>& kv_caches, const at::Tensor& slot_mapping,
                     int64_t num_decode, const std::optional<at::Tensor>& decode_tables,
                     const std::optional<at::Tensor>& decode_lens, const std::optional<at::Tensor>& prefill_info,
                     const std::optional<at::Tensor>& prefill_tables) const {
    TORCH_CHECK(kv_caches.size() == layers_.size(), "one (k, v) cache per layer");
    auto [out, residual] = run(x, at::Tensor(), 0, static_cast<int64_t>(layers_.size()), positions, cos, sin,
                               kv_caches, slot_mapping, num_decode, decode_tables, decode_lens, prefill_info,
                               prefill_tables);
    ps::fused_add_rms_norm(out, residual, final_norm_, eps_);
    return out;
  }

  // Layers [start, end) only, on the stream between layers: (x, residual) in, (x, residual) out, no final
  // norm (residual undefined: x is the embeddings, start must be 0). Speculative decoding's layer-skip
  // draft runs the first layers, and verification continues the draft's states through the rest.
  std::tuple<at::Tensor, at::Tensor> forward_layers(
      at::Tensor x, std::optional<at::Tensor> residual, int64_t start, int64_t end, const at::Tensor& positions,
      const at::Tensor& cos, const at::Tensor& sin, const std::vector<std::tuple<at::Tensor, at::Tensor>>& kv_caches,
      const at::Tensor& slot_mapping, int64_t num_decode, const std::optional<at::Tensor>& decode_tables,
      const std::optional<at::Tensor>& decode_lens, const std::optional<at::Tensor>& prefill_info,
      const std::optional<at::Tensor>& prefill_tables) const {
    TORCH_CHECK(kv_caches.size() == layers_.size(), "one (k, v) cache per layer");
    TORCH_CHECK(0 <= start && start < end && end <= static_cast<int64_t>(layers_.size()), "layer range");
    TORCH_CHECK(residual.has_value() || start == 0, "layers after the first need the residual stream");
    return run(x, residual ? *residual : at::Tensor(), start, end, positions, cos, sin, kv_caches, slot_mapping,
               num_decode, decode_tables, decode_lens, prefill_info, prefill_tables);
  }

  // The stream after the final norm's add: norm(x + residual), leaving both inputs untouched.
  at::Tensor final_norm(const at::Tensor& x, const at::Tensor& residual) const {
    at::Tensor out = x.clone(), res = residual.clone();
    ps::fused_add_rms_norm(out, res, final_norm_, eps_);
    return out;
  }

 private:
  std::tuple<at::Tensor, at::Tensor> run(at::Tensor x, at::Tensor residual, int64_t start, int64_t end,
                                         const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
                                         const std::vector<std::tuple<at::Tensor, at::Tensor>>& kv_caches,
                                         const at::Tensor& slot_mapping, int64_t num_decode,
                                         const std::optional<at::Tensor>& decode_tables,
                                         const std::optional<at::Tensor>& decode_lens,
                                         const std::optional<at::Tensor>& prefill_info,
                                         const std::optional<at::Tensor>& prefill_tables) const {
    TORCH_CHECK(num_decode == 0 || (decode_tables && decode_lens), "decode tokens need block tables and lengths");
    const int64_t q_size = heads_ * head_dim_, kv_size = kv_heads_ * head_dim_;
    const bool has_prefill = prefill_info.has_value() && prefill_info->size(0) > 0;
    TORCH_CHECK(!has_prefill || prefill_tables, "prefill segments need their block tables");
    for (int64_t i = start; i < end; ++i) {
      const FusedLayer& layer = layers_[i];
      const auto& [k_cache, v_cache] = kv_caches[i];
      if (!residual.defined()) {
        residual = x;
        x = ps::rms_norm(x, layer.input_norm, eps_);
      } else {
        ps::fused_add_rms_norm(x, residual, layer.input_norm, eps_);
      }
      at::Tensor qkv = layer.qkv.forward(x);
      ps::rotary_inplace(qkv, positions, cos, sin, heads_ + kv_heads_, head_dim_);
      const at::Tensor q = qkv.narrow(1, 0, q_size).view({-1, heads_, head_dim_});
      const at::Tensor k = qkv.narrow(1, q_size, kv_size).view({-1, kv_heads_, head_dim_});
      const at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({-1, kv_heads_, head_dim_});
      ps::write_kv(k_cache, v_cache, k, v, slot_mapping);
      at::Tensor out = at::empty(q.sizes(), q.options());
      if (num_decode > 0)
        ps::paged_decode_attention(out, q.narrow(0, 0, num_decode), k_cache, v_cache, *decode_tables, *decode_lens,
                                   scale_);
      if (has_prefill)
        ps::paged_prefill_attention(out, q, k_cache, v_cache, *prefill_info, *prefill_tables, scale_);
      x = layer.o.forward(out.view({-1, q_size}));
      ps::fused_add_rms_norm(x, residual, layer.post_norm, eps_);
      x = layer.down.forward(ps::silu_and_mul(layer.gate_up.forward(x)));
    }
    return {x, residual};
  }

  std::vector<FusedLayer> layers_;
  at::Tensor final_norm_;
  int64_t heads_, kv_heads_, head_dim_;
  double eps_, scale_;
};

}  // namespace

void register_decoder_stack(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<FusedLinear>(m, "FusedLinear")
      .def(py::init<at::Tensor, std::optional<at::Tensor>, std::optional<FusedLinear::Quant>>(),
           py::arg("weight"), py::arg("bias"), py::arg("quant"))
      .def("__call__", &FusedLinear::forward, py::call_guard<py::gil_scoped_release>());
  py::class_<FusedLayer>(m, "FusedLayer")
      .def(py::init<at::Tensor, at::Tensor, FusedLinear, FusedLinear, FusedLinear, FusedLinear>(),
           py::arg("input_norm"), py::arg("post_norm"), py::arg("qkv"), py::arg("o"), py::arg("gate_up"),
           py::arg("down"));
  py::class_<DecoderStack>(m, "DecoderStack")
      .def(py::init<std::vector<FusedLayer>, at::Tensor, int64_t, int64_t, int64_t, double, double>(),
           py::arg("layers"), py::arg("final_norm"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"),
           py::arg("eps"), py::arg("scale"))
      // Without the GIL: the server's event loop keeps answering while a step runs.
      .def("forward", &DecoderStack::forward, py::call_guard<py::gil_scoped_release>())
      .def("forward_layers", &DecoderStack::forward_layers, py::call_guard<py::gil_scoped_release>())
      .def("final_norm", &DecoderStack::final_norm, py::call_guard<py::gil_scoped_release>());
}
