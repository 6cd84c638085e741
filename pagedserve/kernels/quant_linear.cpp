// Linear layers that read GGUF Q4_1 weights directly, as llama.cpp does, with float32 arithmetic.
//
// A decode step multiplies a few rows by every weight matrix once, so it is bound by reading the
// weights: 540 MB of float32 per step for SmolLM2-135M, 85 MB as Q4_1. Each panel of 32 output
// features is expanded into a float32 buffer that stays in cache (w = d * q + m, multiply then add,
// exactly gguf's dequantization, so the weights are the ones transformers uses), then every row of
// the batch is multiplied against it with AVX-512 FMAs. Activations and accumulation stay float32.
#include "quant_linear.h"

#include <ATen/Parallel.h>

#include <array>
#include <cmath>
#include <cstring>
#include <utility>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kPanel = 32;       // output features per panel: two AVX-512 registers
constexpr int64_t kBlock = 32;       // Q4_1 block: 32 inputs share one scale d and one minimum m
constexpr int64_t kRowsPerTile = 8;  // rows sharing one pass over the panel: 16 accumulators

#if defined(__AVX512F__)

// One panel, all K inputs -> buf[K][32] float32. qs holds, for each block and each kk < 16, the 32
// features' byte kk: low nibble = input kk of the block, high nibble = input kk + 16.
inline void dequant_panel(const uint8_t* qs, const float* d, const float* m, int64_t nb, float* buf) {
  const __m512i low_nibble = _mm512_set1_epi32(0xF);
  for (int64_t kb = 0; kb < nb; ++kb) {
    const __m512 d0 = _mm512_loadu_ps(d + kb * kPanel), d1 = _mm512_loadu_ps(d + kb * kPanel + 16);
    const __m512 m0 = _mm512_loadu_ps(m + kb * kPanel), m1 = _mm512_loadu_ps(m + kb * kPanel + 16);
    const uint8_t* q = qs + kb * 16 * kPanel;
    float* out = buf + kb * kBlock * kPanel;
    for (int64_t kk = 0; kk < 16; ++kk) {
      const __m512i b0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + kk * kPanel)));
      const __m512i b1 =
          _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + kk * kPanel + 16)));
      auto expand = [](__m512i nibbles, __m512 scale, __m512 min) {
        return _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(nibbles), scale), min);  // (d * q) + m
      };
      _mm512_storeu_ps(out + kk * kPanel, expand(_mm512_and_si512(b0, low_nibble), d0, m0));
      _mm512_storeu_ps(out + kk * kPanel + 16, expand(_mm512_and_si512(b1, low_nibble), d1, m1));
      _mm512_storeu_ps(out + (kk + 16) * kPanel, expand(_mm512_srli_epi32(b0, 4), d0, m0));
      _mm512_storeu_ps(out + (kk + 16) * kPanel + 16, expand(_mm512_srli_epi32(b1, 4), d1, m1));
    }
  }
}

// R rows x 32 features: acc[r] += x[r][k] * w[k] for k = 0..K-1, in that order.
template <int R>
inline void panel_tile(const float* x, int64_t ldx, const float* w, int64_t K, float* out, int64_t ldo) {
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

// Up to 16 rows: one pass per half panel (16 features), the weights expanded in registers as they
// are used, so each weight is expanded once per step and never stored.
template <int R>
void half_panel_direct(const float* x, int64_t K, const uint8_t* qs, const float* d, const float* m, int64_t nb,
                       int64_t half, float* out, int64_t ldo) {
  const __m512i low_nibble = _mm512_set1_epi32(0xF);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t kb = 0; kb < nb; ++kb) {
    const __m512 scale = _mm512_loadu_ps(d + kb * kPanel + half * 16);
    const __m512 min = _mm512_loadu_ps(m + kb * kPanel + half * 16);
    const uint8_t* q = qs + kb * 16 * kPanel + half * 16;
    for (int64_t nibble = 0; nibble < 2; ++nibble) {  // inputs kk of the block, then kk + 16
      for (int64_t kk = 0; kk < 16; ++kk) {
        __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + kk * kPanel)));
        b = nibble ? _mm512_srli_epi32(b, 4) : _mm512_and_si512(b, low_nibble);
        const __m512 w = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(b), scale), min);  // (d * q) + m
        const int64_t k = kb * kBlock + nibble * 16 + kk;
        for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * K + k]), w, acc[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * ldo + half * 16, acc[r]);
}

using DirectFn = void (*)(const float*, int64_t, const uint8_t*, const float*, const float*, int64_t, int64_t,
                          float*, int64_t);
template <int... Rs>
constexpr auto direct_table(std::integer_sequence<int, Rs...>) {
  return std::array<DirectFn, sizeof...(Rs)>{&half_panel_direct<Rs + 1>...};
}
constexpr int64_t kDirectMaxRows = 16;
constexpr auto kDirect = direct_table(std::make_integer_sequence<int, kDirectMaxRows>{});

void panel_rows(int64_t rows, const float* x, int64_t K, const float* w, float* out, int64_t N) {
  int64_t r = 0;
  for (; r + kRowsPerTile <= rows; r += kRowsPerTile)
    panel_tile<kRowsPerTile>(x + r * K, K, w, K, out + r * N, N);
  switch (rows - r) {  // the remainder, with a tile of exactly that height
    case 7: panel_tile<7>(x + r * K, K, w, K, out + r * N, N); break;
    case 6: panel_tile<6>(x + r * K, K, w, K, out + r * N, N); break;
    case 5: panel_tile<5>(x + r * K, K, w, K, out + r * N, N); break;
    case 4: panel_tile<4>(x + r * K, K, w, K, out + r * N, N); break;
    case 3: panel_tile<3>(x + r * K, K, w, K, out + r * N, N); break;
    case 2: panel_tile<2>(x + r * K, K, w, K, out + r * N, N); break;
    case 1: panel_tile<1>(x + r * K, K, w, K, out + r * N, N); break;
    default: break;
  }
}

#else  // portable: the same weights and the same per-output summation order, without SIMD

inline void dequant_panel(const uint8_t* qs, const float* d, const float* m, int64_t nb, float* buf) {
  for (int64_t kb = 0; kb < nb; ++kb)
    for (int64_t kk = 0; kk < 16; ++kk)
      for (int64_t f = 0; f < kPanel; ++f) {
        const uint8_t byte = qs[(kb * 16 + kk) * kPanel + f];
        const float scale = d[kb * kPanel + f], min = m[kb * kPanel + f];
        const float lo = static_cast<float>(byte & 0xF) * scale, hi = static_cast<float>(byte >> 4) * scale;
        buf[(kb * kBlock + kk) * kPanel + f] = lo + min;
        buf[(kb * kBlock + kk + 16) * kPanel + f] = hi + min;
      }
}

void panel_rows(int64_t rows, const float* x, int64_t K, const float* w, float* out, int64_t N) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t f = 0; f < kPanel; ++f) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc = std::fma(x[r * K + k], w[k * kPanel + f], acc);
      out[r * N + f] = acc;
    }
}

#endif

}  // namespace

bool q4_1_simd() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

std::vector<torch::Tensor> q4_1_pack(torch::Tensor raw, int64_t in_features) {
  TORCH_CHECK(raw.scalar_type() == torch::kUInt8 && raw.dim() == 2, "raw Q4_1 rows must be uint8 [N, bytes]");
  TORCH_CHECK(in_features % kBlock == 0, "Q4_1 needs in_features divisible by 32");
  const int64_t N = raw.size(0), nb = in_features / kBlock;
  TORCH_CHECK(raw.size(1) == nb * 20, "Q4_1 rows of ", in_features, " inputs are ", nb * 20, " bytes");
  TORCH_CHECK(N % kPanel == 0, "Q4_1 panels need out_features divisible by 32");
  const int64_t P = N / kPanel;
  auto blocks = raw.contiguous().view({N, nb, 20});
  auto half = [&](int64_t at) {  // the fp16 field at byte `at` of every block -> float32 [P, nb, 32]
    auto h = blocks.slice(2, at, at + 2).contiguous().view(torch::kFloat16).view({P, kPanel, nb});
    return h.to(torch::kFloat32).permute({0, 2, 1}).contiguous();
  };
  auto qs = blocks.slice(2, 4, 20).reshape({P, kPanel, nb, 16}).permute({0, 2, 3, 1}).contiguous();
  return {qs, half(0), half(2)};
}

torch::Tensor q4_1_linear(torch::Tensor x, torch::Tensor qs, torch::Tensor d, torch::Tensor m) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2, "x must be float32 [M, K]");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), P = qs.size(0), nb = qs.size(1), N = P * kPanel;
  TORCH_CHECK(nb * kBlock == K, "x has ", K, " inputs, the weights ", nb * kBlock);
  auto out = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* qp = qs.data_ptr<uint8_t>();
  const float* dp = d.data_ptr<float>();
  const float* mp = m.data_ptr<float>();
  float* op = out.data_ptr<float>();
#if defined(__AVX512F__)
  if (M <= kDirectMaxRows) {
    const DirectFn fn = kDirect[M - 1];
    at::parallel_for(0, 2 * P, 1, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        const int64_t p = u / 2;
        fn(xp, K, qp + p * nb * 16 * kPanel, dp + p * nb * kPanel, mp + p * nb * kPanel, nb, u % 2,
           op + p * kPanel, N);
      }
    });
    return out;
  }
#endif
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> buf;  // one panel of float32 weights, reused across calls
    buf.resize(static_cast<size_t>(K * kPanel));
    for (int64_t p = begin; p < end; ++p) {
      dequant_panel(qp + p * nb * 16 * kPanel, dp + p * nb * kPanel, mp + p * nb * kPanel, nb, buf.data());
      panel_rows(M, xp, K, buf.data(), op + p * kPanel, N);
    }
  });
  return out;
}
