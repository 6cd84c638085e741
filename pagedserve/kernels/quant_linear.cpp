// Linear layers that read GGUF Q4_1 / Q8_0 weights directly, as llama.cpp does, in float32 arithmetic.
//
// A decode step multiplies a few rows by every weight matrix once, so it is bound by reading the
// weights: 540 MB of float32 per step for SmolLM2-135M, ~115 MB as Q4_1 layers + a Q8_0 embedding.
// The kernel expands each block of weights exactly as gguf's dequantization does (Q4_1: d * q + m,
// multiply then add; Q8_0: d * q), so the weights are the very values transformers uses, then
// multiplies every row of the batch against them with AVX-512 FMAs. Activations and accumulation
// stay float32.
//
// Packed layout (q_pack): panels of 32 output features; per panel and per block of 32 inputs, the
// scale (and minimum) of each feature as float32, then for each input the 32 features' codes side by
// side (Q4_1: 16 bytes rows, low nibble = input kk, high nibble = input kk + 16).
#include "quant_linear.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <utility>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kPanel = 32;       // output features per panel: two AVX-512 registers
constexpr int64_t kBlock = 32;       // inputs per GGUF block (one scale per feature and block)
constexpr int64_t kRowsPerTile = 8;  // rows sharing one pass over an expanded panel: 16 accumulators
constexpr int64_t kDirectMaxRows = 16;
constexpr int64_t kPrefetchBlocks = 8;  // the direct path asks for codes 8 blocks ahead, into L2

enum class Format { kQ4_1, kQ8_0, kF32 };

constexpr int64_t code_rows(Format f) { return f == Format::kQ4_1 ? 16 : 32; }  // code bytes rows per block

// Where one panel's data lives in the packed tensors.
struct Panel {
  const uint8_t* codes;  // [nb][code_rows][32]
  const float* d;        // [nb][32]
  const float* m;        // [nb][32] (Q4_1 only)
};

#if defined(__AVX512F__)

// The 16 weights of features [half*16, half*16+16) at input j of block kb.
template <Format F>
struct Expander {
  Panel p;
  int64_t half;
  __m512 scale, min;
  const uint8_t* q;

  inline void block(int64_t kb) {
    scale = _mm512_loadu_ps(p.d + kb * kPanel + half * 16);
    if constexpr (F == Format::kQ4_1) min = _mm512_loadu_ps(p.m + kb * kPanel + half * 16);
    q = p.codes + kb * code_rows(F) * kPanel + half * 16;
  }
  inline __m512 weights(int64_t j) const {
    if constexpr (F == Format::kQ4_1) {
      __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + (j & 15) * kPanel)));
      b = j < 16 ? _mm512_and_si512(b, _mm512_set1_epi32(0xF)) : _mm512_srli_epi32(b, 4);
      return _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(b), scale), min);  // (d * q) + m
    } else {
      const __m512i b = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j * kPanel)));
      return _mm512_mul_ps(_mm512_cvtepi32_ps(b), scale);  // d * q
    }
  }
};

// Up to 16 rows: one pass per half panel (16 features), each weight expanded in registers once per
// call and never stored. acc[r] += x[r][k] * w[k] for k = 0..K-1, in that order.
template <Format F, int R>
void half_panel_direct(const float* x, int64_t K, Panel panel, int64_t nb, int64_t half, float* out,
                       int64_t ldo) {
  Expander<F> e{panel, half, {}, {}, nullptr};
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t kb = 0; kb < nb; ++kb) {
    e.block(kb);
    const uint8_t* ahead = panel.codes + (kb + kPrefetchBlocks) * code_rows(F) * kPanel;
    for (int64_t j = 0; j < kBlock; ++j) {
      if (j < code_rows(F) / 2 && kb + kPrefetchBlocks < nb)  // a 64-byte line of codes per j
        _mm_prefetch(reinterpret_cast<const char*>(ahead + j * 64), _MM_HINT_T1);
      const __m512 w = e.weights(j);
      const int64_t k = kb * kBlock + j;
      for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * K + k]), w, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * ldo + half * 16, acc[r]);
}

template <Format F>
using DirectFn = void (*)(const float*, int64_t, Panel, int64_t, int64_t, float*, int64_t);

template <Format F, int... Rs>
constexpr std::array<DirectFn<F>, sizeof...(Rs)> direct_table(std::integer_sequence<int, Rs...>) {
  return {&half_panel_direct<F, Rs + 1>...};
}

// More rows: expand the whole panel into a float32 buffer [K][32] once, then tiles of 8 rows.
template <Format F>
void expand_panel(Panel panel, int64_t nb, float* buf) {
  Expander<F> lo{panel, 0, {}, {}, nullptr}, hi{panel, 1, {}, {}, nullptr};
  for (int64_t kb = 0; kb < nb; ++kb) {
    lo.block(kb);
    hi.block(kb);
    for (int64_t j = 0; j < kBlock; ++j) {
      _mm512_storeu_ps(buf + (kb * kBlock + j) * kPanel, lo.weights(j));
      _mm512_storeu_ps(buf + (kb * kBlock + j) * kPanel + 16, hi.weights(j));
    }
  }
}

template <int R>
void panel_tile(const float* x, int64_t ldx, const float* w, int64_t K, float* out, int64_t ldo) {
  __m512 acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 w0 = _mm512_loadu_ps(w + k * kPanel), w1 = _mm512_loadu_ps(w + k * kPanel + 16);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * ldx + k]);
      acc0[r] = _mm512_fmadd_ps(xv, w0, acc0[r]);
      acc1[r] = _mm512_fmadd_ps(xv, w1, acc1[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(out + r * ldo, acc0[r]);
    _mm512_storeu_ps(out + r * ldo + 16, acc1[r]);
  }
}

template <int... Rs>
constexpr std::array<void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t), sizeof...(Rs)>
tile_table(std::integer_sequence<int, Rs...>) {
  return {&panel_tile<Rs + 1>...};
}
constexpr auto kTiles = tile_table(std::make_integer_sequence<int, kRowsPerTile>{});

template <Format F>
void quant_linear_impl(const float* x, int64_t M, int64_t K, const uint8_t* codes, const float* d, const float* m,
                       int64_t P, float* out) {
  const int64_t nb = K / kBlock, N = P * kPanel;
  auto panel = [&](int64_t p) {
    return Panel{codes + p * nb * code_rows(F) * kPanel, d + p * nb * kPanel, m ? m + p * nb * kPanel : nullptr};
  };
  if (M <= kDirectMaxRows) {
    static constexpr auto table = direct_table<F>(std::make_integer_sequence<int, kDirectMaxRows>{});
    const DirectFn<F> fn = table[M - 1];
    at::parallel_for(0, 2 * P, 1, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) fn(x, K, panel(u / 2), nb, u % 2, out + (u / 2) * kPanel, N);
    });
    return;
  }
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> buf;  // one expanded panel, reused across calls
    buf.resize(static_cast<size_t>(K * kPanel));
    for (int64_t p = begin; p < end; ++p) {
      expand_panel<F>(panel(p), nb, buf.data());
      for (int64_t r = 0; r < M; r += kRowsPerTile) {
        const int64_t rows = std::min(kRowsPerTile, M - r);
        kTiles[rows - 1](x + r * K, K, buf.data(), K, out + r * N + p * kPanel, N);
      }
    }
  });
}

// Float32 weights packed in the same panels ([P][K][32]): the same two paths without the expansion, so
// a float model's rows get the same one-order sums at every M (MKL's sgemm picks its kernel, and with
// it the order of the sums, by M: on some CPUs a row's bits then depend on the batch).
template <int R>
void f32_half_panel_direct(const float* x, int64_t K, const float* w, int64_t half, float* out, int64_t ldo) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 wv = _mm512_loadu_ps(w + k * kPanel + half * 16);
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * K + k]), wv, acc[r]);
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * ldo + half * 16, acc[r]);
}

template <int... Rs>
constexpr std::array<void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t), sizeof...(Rs)>
f32_direct_table(std::integer_sequence<int, Rs...>) {
  return {&f32_half_panel_direct<Rs + 1>...};
}

void f32_linear_impl(const float* x, int64_t M, int64_t K, const float* w, int64_t P, float* out) {
  const int64_t N = P * kPanel;
  if (M <= kDirectMaxRows) {
    static constexpr auto table = f32_direct_table(std::make_integer_sequence<int, kDirectMaxRows>{});
    const auto fn = table[M - 1];
    at::parallel_for(0, 2 * P, 1, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) fn(x, K, w + (u / 2) * K * kPanel, u % 2, out + (u / 2) * kPanel, N);
    });
    return;
  }
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      for (int64_t r = 0; r < M; r += kRowsPerTile) {
        const int64_t rows = std::min(kRowsPerTile, M - r);
        kTiles[rows - 1](x + r * K, K, w + p * K * kPanel, K, out + r * N + p * kPanel, N);
      }
  });
}

#endif

Format parse_format(const std::string& name) {
  if (name == "Q4_1") return Format::kQ4_1;
  if (name == "Q8_0") return Format::kQ8_0;
  if (name == "F32") return Format::kF32;
  TORCH_CHECK(false, "quantized linear: format must be Q4_1, Q8_0 or F32, got ", name);
}

}  // namespace

torch::Tensor f32_pack(torch::Tensor weight) {
  TORCH_CHECK(weight.scalar_type() == torch::kFloat32 && weight.dim() == 2, "weight must be float32 [N, K]");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(N % kPanel == 0, "float32 panels need out_features divisible by 32");
  return weight.contiguous().view({N / kPanel, kPanel, K}).transpose(1, 2).contiguous();
}

bool quant_linear_simd() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

std::vector<torch::Tensor> quant_pack(torch::Tensor raw, int64_t in_features, const std::string& format) {
  const Format f = parse_format(format);
  TORCH_CHECK(f != Format::kF32, "float32 weights are packed with f32_pack");
  const int64_t block_bytes = f == Format::kQ4_1 ? 20 : 34;
  TORCH_CHECK(raw.scalar_type() == torch::kUInt8 && raw.dim() == 2, "raw GGUF rows must be uint8 [N, bytes]");
  TORCH_CHECK(in_features % kBlock == 0, format, " needs in_features divisible by 32");
  const int64_t N = raw.size(0), nb = in_features / kBlock, P = N / kPanel;
  TORCH_CHECK(raw.size(1) == nb * block_bytes, format, " rows of ", in_features, " inputs are ", nb * block_bytes,
              " bytes");
  TORCH_CHECK(N % kPanel == 0, "quantized panels need out_features divisible by 32");
  auto blocks = raw.contiguous().view({N, nb, block_bytes});
  auto half = [&](int64_t at) {  // the fp16 field at byte `at` of every block -> float32 [P, nb, 32]
    auto h = blocks.slice(2, at, at + 2).contiguous().view(torch::kFloat16).view({P, kPanel, nb});
    return h.to(torch::kFloat32).permute({0, 2, 1}).contiguous();
  };
  const int64_t first_code = f == Format::kQ4_1 ? 4 : 2;
  auto codes = blocks.slice(2, first_code, block_bytes)
                   .reshape({P, kPanel, nb, code_rows(f)})
                   .permute({0, 2, 3, 1})
                   .contiguous();
  auto d = half(0);
  return {codes, d, f == Format::kQ4_1 ? half(2) : torch::empty({0}, d.options())};
}

torch::Tensor quant_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor d, torch::Tensor m,
                           const std::string& format) {
  const Format f = parse_format(format);
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2, "x must be float32 [M, K]");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), P = codes.size(0);
  if (f == Format::kF32) {
    TORCH_CHECK(codes.scalar_type() == torch::kFloat32 && codes.size(1) == K, "F32 panels must be [P, K, 32]");
  } else {
    TORCH_CHECK(codes.size(1) * kBlock == K, "x has ", K, " inputs, the weights ", codes.size(1) * kBlock);
  }
  auto out = torch::empty({M, P * kPanel}, x.options());
  if (M == 0) return out;
#if defined(__AVX512F__)
  if (f == Format::kF32) {
    f32_linear_impl(x.data_ptr<float>(), M, K, codes.data_ptr<float>(), P, out.data_ptr<float>());
    return out;
  }
  const float* mp = f == Format::kQ4_1 ? m.data_ptr<float>() : nullptr;
  if (f == Format::kQ4_1)
    quant_linear_impl<Format::kQ4_1>(x.data_ptr<float>(), M, K, codes.data_ptr<uint8_t>(), d.data_ptr<float>(), mp,
                                     P, out.data_ptr<float>());
  else
    quant_linear_impl<Format::kQ8_0>(x.data_ptr<float>(), M, K, codes.data_ptr<uint8_t>(), d.data_ptr<float>(), mp,
                                     P, out.data_ptr<float>());
#else
  TORCH_CHECK(false, "quant_linear needs AVX-512 (the engine checks quant_linear_simd() first)");
#endif
  return out;
}
