// Linear layers on packed weights: GGUF blocks expanded in registers (float32 arithmetic), int8
// weights with float32 activations (W8A16), and int8 weights x int8 activations (W8A8).
//
// A decode step multiplies a few rows by every weight matrix once, so it is bound by reading the
// weights and by the instructions that turn them into products, not by the products themselves.
//
// Block layouts (pack_panels): panels of 32 output features; per panel and per block of inputs, each
// feature's scale (and minimum) as float32, then for each input the 32 features' codes side by side
// (4-bit codes: 16 byte rows per block of 32, low nibble = input kk, high nibble = input kk + 16).
// Expanding a code gives exactly the float32 value gguf's dequantization gives (scale * q, or
// scale * q + min: multiply, then add), so the products are transformers' on the same weights:
//   U4_32M  4-bit codes, scale + min per 32 inputs   (GGUF Q4_1, Q4_K)
//   U8_32M  8-bit unsigned codes, scale + min per 32  (Q5_1, Q5_K)
//   I8_32   int8 codes, scale per 32                   (Q8_0, Q4_0, Q5_0)
//   I8_16   int8 codes, scale per 16                   (Q6_K)
//   I8_ROW  int8 codes, one scale per output feature applied to the sums (quantization="int8")
//   F32     float32 weights in the same panels (one summation order at every row count)
// Each row's sums run over k = 0..K-1 in one order with fused multiply-adds whatever the batch, so a
// row's output never depends on how many rows the step carries; and on every SIMD level (simd.h).
//
// W8A8 (w8a8_linear): activations quantized per block of 32 inputs (symmetric, 127 / max|x|, as
// llama.cpp's Q8_0 activations), weights per output feature, integer dot products (VNNI vpdpbusd
// where the CPU has it) with exact int32 sums per block, scaled and summed in float32.
#include "quant_linear.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <utility>

#include "simd.h"

#ifndef PAGEDSERVE_W8A8_PREFETCH
#define PAGEDSERVE_W8A8_PREFETCH 2048
#endif

namespace {

using simd::kLanes;
using simd::VecF;

constexpr int64_t kPanel = 32;                    // output features per panel
constexpr int kSubs = kPanel / kLanes;            // vectors per panel row
constexpr int64_t kDirectMaxRows = kLanes == 16 ? 16 : 8;  // rows whose accumulators fit in registers
constexpr int64_t kRowsPerTile = kLanes == 16 ? 8 : 6;     // tiled path: rows x 2 vectors of features
constexpr int64_t kPrefetchBlocks = 8;            // the direct path asks for codes 8 blocks ahead, into L2

enum class Format { kU4_32M, kU8_32M, kI8_32, kI8_16, kI8_ROW, kF32 };

template <Format F>
struct Spec;
template <>
struct Spec<Format::kU4_32M> {
  static constexpr int64_t kBlock = 32, kCodeRows = 16;
  static constexpr bool kMin = true, kRowScale = false;
  static VecF expand(const uint8_t* q, int64_t j, VecF s, VecF m) {
    const VecF c = j < 16 ? simd::from_lo4(q + j * kPanel) : simd::from_hi4(q + (j - 16) * kPanel);
    return simd::add(simd::mul(c, s), m);
  }
};
template <>
struct Spec<Format::kU8_32M> {
  static constexpr int64_t kBlock = 32, kCodeRows = 32;
  static constexpr bool kMin = true, kRowScale = false;
  static VecF expand(const uint8_t* q, int64_t j, VecF s, VecF m) {
    return simd::add(simd::mul(simd::from_u8(q + j * kPanel), s), m);
  }
};
template <int64_t B>
struct SignedBlocks {
  static constexpr int64_t kBlock = B, kCodeRows = B;
  static constexpr bool kMin = false, kRowScale = false;
  static VecF expand(const uint8_t* q, int64_t j, VecF s, VecF) { return simd::mul(simd::from_i8(q + j * kPanel), s); }
};
template <>
struct Spec<Format::kI8_32> : SignedBlocks<32> {};
template <>
struct Spec<Format::kI8_16> : SignedBlocks<16> {};
template <>
struct Spec<Format::kI8_ROW> {
  static constexpr int64_t kBlock = 32, kCodeRows = 32;
  static constexpr bool kMin = false, kRowScale = true;
  static VecF expand(const uint8_t* q, int64_t j, VecF, VecF) { return simd::from_i8(q + j * kPanel); }
};

// Where one panel's data lives in the packed tensors.
struct Panel {
  const uint8_t* codes;  // [nb][code_rows][32]
  const float* d;        // [nb][32], or [32] per-feature scales (I8_ROW)
  const float* m;        // [nb][32] (formats with a minimum)
};

// Up to kDirectMaxRows rows: one pass per vector of features, each weight expanded in registers once
// per call and never stored. acc[r] += x[r][k] * w[k] for k = 0..K-1, in that order.
template <Format F, int R>
void sub_panel_direct(const float* x, int64_t K, Panel panel, int64_t nb, int64_t sub, float* out, int64_t ldo) {
  using S = Spec<F>;
  VecF acc[R];
  for (int r = 0; r < R; ++r) acc[r] = simd::zero();
  VecF scale = simd::zero(), min = simd::zero();
  for (int64_t kb = 0; kb < nb; ++kb) {
    if constexpr (!S::kRowScale) scale = simd::load(panel.d + kb * kPanel + sub * kLanes);
    if constexpr (S::kMin) min = simd::load(panel.m + kb * kPanel + sub * kLanes);
    const uint8_t* q = panel.codes + kb * S::kCodeRows * kPanel + sub * kLanes;
    const uint8_t* ahead = panel.codes + (kb + kPrefetchBlocks) * S::kCodeRows * kPanel;
    for (int64_t j = 0; j < S::kBlock; ++j) {
      if (j < S::kCodeRows / 2 && kb + kPrefetchBlocks < nb) simd::prefetch(ahead + j * 64);  // a line per j
      const VecF w = S::expand(q, j, scale, min);
      const int64_t k = kb * S::kBlock + j;
      for (int r = 0; r < R; ++r) acc[r] = simd::fmadd(simd::set1(x[r * K + k]), w, acc[r]);
    }
  }
  if constexpr (S::kRowScale) scale = simd::load(panel.d + sub * kLanes);
  for (int r = 0; r < R; ++r) simd::store(out + r * ldo + sub * kLanes, S::kRowScale ? simd::mul(acc[r], scale) : acc[r]);
}

// One or two rows on an 8-lane level: all of a panel's vectors of features in one pass, so that
// 4 or 8 accumulators are independent (a fused multiply-add waits 4 cycles for the previous one into
// the same register: one row's single chain left the FMA units idle). The same k order as above.
template <Format F, int R>
void panel_direct_wide(const float* x, int64_t K, Panel panel, int64_t nb, float* out, int64_t ldo) {
  using S = Spec<F>;
  VecF acc[R][kSubs];
  for (int r = 0; r < R; ++r)
    for (int s = 0; s < kSubs; ++s) acc[r][s] = simd::zero();
  for (int64_t kb = 0; kb < nb; ++kb) {
    const uint8_t* q = panel.codes + kb * S::kCodeRows * kPanel;
    const uint8_t* ahead = panel.codes + (kb + kPrefetchBlocks) * S::kCodeRows * kPanel;
    for (int64_t j = 0; j < S::kBlock; ++j) {
      if (j < S::kCodeRows / 2 && kb + kPrefetchBlocks < nb) simd::prefetch(ahead + j * 64);
      const int64_t k = kb * S::kBlock + j;
      for (int s = 0; s < kSubs; ++s) {
        const VecF scale = S::kRowScale ? simd::zero() : simd::load(panel.d + kb * kPanel + s * kLanes);
        const VecF min = S::kMin ? simd::load(panel.m + kb * kPanel + s * kLanes) : simd::zero();
        const VecF w = S::expand(q + s * kLanes, j, scale, min);
        for (int r = 0; r < R; ++r) acc[r][s] = simd::fmadd(simd::set1(x[r * K + k]), w, acc[r][s]);
      }
    }
  }
  for (int s = 0; s < kSubs; ++s) {
    const VecF scale = S::kRowScale ? simd::load(panel.d + s * kLanes) : simd::zero();
    for (int r = 0; r < R; ++r)
      simd::store(out + r * ldo + s * kLanes, S::kRowScale ? simd::mul(acc[r][s], scale) : acc[r][s]);
  }
}
constexpr int64_t kWideMaxRows = kLanes == 8 ? 2 : 0;

template <Format F>
using DirectFn = void (*)(const float*, int64_t, Panel, int64_t, int64_t, float*, int64_t);

template <Format F, int... Rs>
constexpr std::array<DirectFn<F>, sizeof...(Rs)> direct_table(std::integer_sequence<int, Rs...>) {
  return {&sub_panel_direct<F, Rs + 1>...};
}

// More rows: expand the whole panel into a float32 buffer [K][32] once, then tiles of rows.
template <Format F>
void expand_panel(Panel panel, int64_t nb, float* buf) {
  using S = Spec<F>;
  for (int sub = 0; sub < kSubs; ++sub) {
    VecF scale = simd::zero(), min = simd::zero();
    for (int64_t kb = 0; kb < nb; ++kb) {
      if constexpr (!S::kRowScale) scale = simd::load(panel.d + kb * kPanel + sub * kLanes);
      if constexpr (S::kMin) min = simd::load(panel.m + kb * kPanel + sub * kLanes);
      const uint8_t* q = panel.codes + kb * S::kCodeRows * kPanel + sub * kLanes;
      for (int64_t j = 0; j < S::kBlock; ++j)
        simd::store(buf + (kb * S::kBlock + j) * kPanel + sub * kLanes, S::expand(q, j, scale, min));
    }
  }
}

// rows x (2 vectors of features starting at `at`) over an expanded panel w [K][32]; a row scale
// (I8_ROW) multiplies the finished sums.
template <int R>
void panel_tile(const float* x, int64_t ldx, const float* w, int64_t K, const float* row_scale, float* out,
                int64_t ldo) {
  for (int64_t at = 0; at < kPanel; at += 2 * kLanes) {
    VecF acc0[R], acc1[R];
    for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = simd::zero();
    for (int64_t k = 0; k < K; ++k) {
      const VecF w0 = simd::load(w + k * kPanel + at), w1 = simd::load(w + k * kPanel + at + kLanes);
      for (int r = 0; r < R; ++r) {
        const VecF xv = simd::set1(x[r * ldx + k]);
        acc0[r] = simd::fmadd(xv, w0, acc0[r]);
        acc1[r] = simd::fmadd(xv, w1, acc1[r]);
      }
    }
    if (row_scale) {
      const VecF s0 = simd::load(row_scale + at), s1 = simd::load(row_scale + at + kLanes);
      for (int r = 0; r < R; ++r) acc0[r] = simd::mul(acc0[r], s0), acc1[r] = simd::mul(acc1[r], s1);
    }
    for (int r = 0; r < R; ++r) {
      simd::store(out + r * ldo + at, acc0[r]);
      simd::store(out + r * ldo + at + kLanes, acc1[r]);
    }
  }
}

using TileFn = void (*)(const float*, int64_t, const float*, int64_t, const float*, float*, int64_t);
template <int... Rs>
constexpr std::array<TileFn, sizeof...(Rs)> tile_table(std::integer_sequence<int, Rs...>) {
  return {&panel_tile<Rs + 1>...};
}
constexpr auto kTiles = tile_table(std::make_integer_sequence<int, kRowsPerTile>{});

template <Format F>
void block_linear(const float* x, int64_t M, int64_t K, const uint8_t* codes, const float* d, const float* m,
                  int64_t P, float* out) {
  using S = Spec<F>;
  const int64_t nb = K / S::kBlock, N = P * kPanel;
  auto panel = [&](int64_t p) {
    const float* dp = S::kRowScale ? d + p * kPanel : d + p * nb * kPanel;
    return Panel{codes + p * nb * S::kCodeRows * kPanel, dp, m ? m + p * nb * kPanel : nullptr};
  };
  if (M <= kWideMaxRows) {
    at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p)
        M == 1 ? panel_direct_wide<F, 1>(x, K, panel(p), nb, out + p * kPanel, N)
               : panel_direct_wide<F, 2>(x, K, panel(p), nb, out + p * kPanel, N);
    });
    return;
  }
  if (M <= kDirectMaxRows) {
    static constexpr auto table = direct_table<F>(std::make_integer_sequence<int, kDirectMaxRows>{});
    const DirectFn<F> fn = table[M - 1];
    at::parallel_for(0, kSubs * P, 1, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) fn(x, K, panel(u / kSubs), nb, u % kSubs, out + (u / kSubs) * kPanel, N);
    });
    return;
  }
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> buf;  // one expanded panel, reused across calls
    buf.resize(static_cast<size_t>(K * kPanel));
    for (int64_t p = begin; p < end; ++p) {
      const Panel pn = panel(p);
      expand_panel<F>(pn, nb, buf.data());
      for (int64_t r = 0; r < M; r += kRowsPerTile) {
        const int64_t rows = std::min(kRowsPerTile, M - r);
        kTiles[rows - 1](x + r * K, K, buf.data(), K, S::kRowScale ? pn.d : nullptr, out + r * N + p * kPanel, N);
      }
    }
  });
}

// Float32 weights packed in the same panels ([P][K][32]): the same two paths without the expansion.
template <int R>
void f32_sub_panel_direct(const float* x, int64_t K, const float* w, int64_t sub, float* out, int64_t ldo) {
  VecF acc[R];
  for (int r = 0; r < R; ++r) acc[r] = simd::zero();
  for (int64_t k = 0; k < K; ++k) {
    const VecF wv = simd::load(w + k * kPanel + sub * kLanes);
    for (int r = 0; r < R; ++r) acc[r] = simd::fmadd(simd::set1(x[r * K + k]), wv, acc[r]);
  }
  for (int r = 0; r < R; ++r) simd::store(out + r * ldo + sub * kLanes, acc[r]);
}

template <int... Rs>
constexpr std::array<void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t), sizeof...(Rs)>
f32_direct_table(std::integer_sequence<int, Rs...>) {
  return {&f32_sub_panel_direct<Rs + 1>...};
}

void f32_linear(const float* x, int64_t M, int64_t K, const float* w, int64_t P, float* out) {
  const int64_t N = P * kPanel;
  if (M <= kDirectMaxRows) {
    static constexpr auto table = f32_direct_table(std::make_integer_sequence<int, kDirectMaxRows>{});
    const auto fn = table[M - 1];
    at::parallel_for(0, kSubs * P, 1, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u)
        fn(x, K, w + (u / kSubs) * K * kPanel, u % kSubs, out + (u / kSubs) * kPanel, N);
    });
    return;
  }
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      for (int64_t r = 0; r < M; r += kRowsPerTile) {
        const int64_t rows = std::min(kRowsPerTile, M - r);
        kTiles[rows - 1](x + r * K, K, w + p * K * kPanel, K, nullptr, out + r * N + p * kPanel, N);
      }
  });
}

struct LayoutInfo {
  Format format;
  int64_t block;       // inputs per scale (0: one scale per output feature)
  bool four_bit, has_min;
};

LayoutInfo parse_layout(const std::string& name) {
  if (name == "U4_32M") return {Format::kU4_32M, 32, true, true};
  if (name == "U8_32M") return {Format::kU8_32M, 32, false, true};
  if (name == "I8_32") return {Format::kI8_32, 32, false, false};
  if (name == "I8_16") return {Format::kI8_16, 16, false, false};
  if (name == "I8_ROW") return {Format::kI8_ROW, 0, false, false};
  if (name == "F32") return {Format::kF32, 0, false, false};
  TORCH_CHECK(false, "packed linear: layout must be U4_32M, U8_32M, I8_32, I8_16, I8_ROW or F32, got ", name);
}

// --- W8A8 ---------------------------------------------------------------------------------------

constexpr int64_t kActBlock = 32;  // inputs per activation scale
constexpr int64_t kW8A8PrefetchBytes = PAGEDSERVE_W8A8_PREFETCH;

// Whether the weights are stored as w + 128 (w ^ 0x80): vpdpbusd multiplies unsigned by signed
// bytes, and the weights take the unsigned side; the 128 * sum(x) that adds is taken off per row and
// block (a scalar), so no per-feature correction has to be read beside the weights.
constexpr bool kBiasedWeights =
#if (defined(__AVX512VNNI__) && defined(__AVX512BW__)) || defined(__AVXVNNI__)
    true;
#else
    false;
#endif

// Per block of 32 inputs: scale = max|x| / 127, q = round-to-nearest-even(x * (127 / max|x|)); an
// all-zero block gets scale 0 and codes 0. The reference (pagedserve/model/quantization/w8a8.py) does
// the same float ops. Also the block's 128 * sum(q), the correction for biased weights.
void quantize_block(const float* x, int8_t* q, float* scale, int32_t* correction) {
  float amax = 0.f;
#if defined(__AVX512F__)
  const __m512 lo = _mm512_loadu_ps(x), hi = _mm512_loadu_ps(x + 16);
  amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
#else
  for (int64_t k = 0; k < kActBlock; ++k) amax = std::max(amax, std::fabs(x[k]));
#endif
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  *scale = amax / 127.f;
  int32_t sum = 0;
#if defined(__AVX512F__)
  const __m512 vinv = _mm512_set1_ps(inv);
  for (int h = 0; h < 2; ++h) {
    const __m512i c = _mm512_cvtps_epi32(_mm512_mul_ps(h ? hi : lo, vinv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + h * 16), _mm512_cvtsepi32_epi8(c));
    sum += _mm512_reduce_add_epi32(c);
  }
#else
  for (int64_t k = 0; k < kActBlock; ++k) {
    q[k] = static_cast<int8_t>(std::nearbyint(x[k] * inv));
    sum += q[k];
  }
#endif
  *correction = kBiasedWeights ? 128 * sum : 0;
}

// R rows x one panel (32 features); weights [K/4][32][4] bytes, x codes [R][K], their scales and
// corrections [R][nb]. Per block of 32 inputs the exact int32 dot products (less the correction)
// as float32 times the row's block scale are added in block order: acc = acc + float(sum_b) * sx_b
// (multiply, then add); out = acc (the caller multiplies by the weights' scales).
template <int R>
void w8a8_tile(const int8_t* xq, int64_t K, const float* sx, const int32_t* corr, const int8_t* w, float* out,
               int64_t ldo) {
  const int64_t nb = K / kActBlock;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512i isum[R][2];
    for (int r = 0; r < R; ++r) isum[r][0] = isum[r][1] = _mm512_setzero_si512();
    for (int64_t kq = b * 8; kq < b * 8 + 8; ++kq) {
      simd::prefetch(w + kq * 128 + kW8A8PrefetchBytes);  // the weights stream from memory: ask early
      simd::prefetch(w + kq * 128 + kW8A8PrefetchBytes + 64);
      const __m512i w0 = _mm512_loadu_si512(w + kq * 128), w1 = _mm512_loadu_si512(w + kq * 128 + 64);
      for (int r = 0; r < R; ++r) {
        int32_t four;
        std::memcpy(&four, xq + r * K + kq * 4, 4);
        const __m512i xb = _mm512_set1_epi32(four);
        isum[r][0] = _mm512_dpbusd_epi32(isum[r][0], w0, xb);  // biased weights: the unsigned side
        isum[r][1] = _mm512_dpbusd_epi32(isum[r][1], w1, xb);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512i c = _mm512_set1_epi32(corr[r * nb + b]);
      const __m512 s = _mm512_set1_ps(sx[r * nb + b]);
      for (int h = 0; h < 2; ++h)
        acc[r][h] = _mm512_add_ps(acc[r][h], _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(isum[r][h], c)), s));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2; ++h) _mm512_storeu_ps(out + r * ldo + h * 16, acc[r][h]);
#elif defined(__AVX2__)
  // Float sums live in memory (touched once per block); the int32 sums and each row's four bytes of
  // x stay in registers, each weight vector is loaded once for all R rows.
  __m256 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 4; ++v) acc[r][v] = _mm256_setzero_ps();
#if !defined(__AVXVNNI__)
  const __m256i ones = _mm256_set1_epi16(1);
#endif
  for (int64_t b = 0; b < nb; ++b) {
    __m256i isum[R][4];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < 4; ++v) isum[r][v] = _mm256_setzero_si256();
    for (int64_t kq = b * 8; kq < b * 8 + 8; ++kq) {
      simd::prefetch(w + kq * 128 + kW8A8PrefetchBytes);
      simd::prefetch(w + kq * 128 + kW8A8PrefetchBytes + 64);
      __m256i xb[R];
      for (int r = 0; r < R; ++r) {
        int32_t four;
        std::memcpy(&four, xq + r * K + kq * 4, 4);
        xb[r] = _mm256_set1_epi32(four);
      }
#if !defined(__AVXVNNI__)
      __m256i ax[R];  // |x| as the unsigned side, w with x's sign: pairs of products stay within int16
      for (int r = 0; r < R; ++r) ax[r] = _mm256_sign_epi8(xb[r], xb[r]);
#endif
      for (int v = 0; v < 4; ++v) {
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + kq * 128 + v * 32));
        for (int r = 0; r < R; ++r) {
#if defined(__AVXVNNI__)
          isum[r][v] = _mm256_dpbusd_avx_epi32(isum[r][v], wv, xb[r]);  // biased weights: the unsigned side
#else
          isum[r][v] = _mm256_add_epi32(
              isum[r][v], _mm256_madd_epi16(_mm256_maddubs_epi16(ax[r], _mm256_sign_epi8(wv, xb[r])), ones));
#endif
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256i c = _mm256_set1_epi32(corr[r * nb + b]);
      const __m256 s = _mm256_set1_ps(sx[r * nb + b]);
      for (int v = 0; v < 4; ++v)
        acc[r][v] = _mm256_add_ps(acc[r][v], _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(isum[r][v], c)), s));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 4; ++v) _mm256_storeu_ps(out + r * ldo + v * 8, acc[r][v]);
#else
  for (int r = 0; r < R; ++r) {
    float acc[kPanel] = {};
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t n = 0; n < kPanel; ++n) {
        int32_t isum = 0;
        for (int64_t k = b * kActBlock; k < (b + 1) * kActBlock; ++k)
          isum += static_cast<int32_t>(xq[r * K + k]) * w[(k / 4) * 128 + n * 4 + k % 4];
        acc[n] = acc[n] + static_cast<float>(isum - corr[r * nb + b]) * sx[r * nb + b];
      }
    std::memcpy(out + r * ldo, acc, sizeof(acc));
  }
#endif
}

constexpr int64_t kW8A8Rows =
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    6;  // 12 int32 and 12 float32 accumulators
#elif defined(__AVX2__)
    2;  // 4 int32 sums per row in registers
#else
    1;
#endif

template <int... Rs>
constexpr std::array<void (*)(const int8_t*, int64_t, const float*, const int32_t*, const int8_t*, float*, int64_t),
                     sizeof...(Rs)>
w8a8_table(std::integer_sequence<int, Rs...>) {
  return {&w8a8_tile<Rs + 1>...};
}

// {codes int8 [M, K], scales float32 [M, K/32], corrections int32 [M, K/32]}
std::vector<torch::Tensor> quantize_rows(torch::Tensor x) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2, "x must be float32 [M, K]");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), nb = K / kActBlock;
  TORCH_CHECK(K % kActBlock == 0, "int8 activations come in blocks of 32 inputs, got ", K);
  auto q = torch::empty({M, K}, x.options().dtype(torch::kInt8));
  auto s = torch::empty({M, nb}, x.options());
  auto c = torch::empty({M, nb}, x.options().dtype(torch::kInt32));
  const float* xp = x.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = s.data_ptr<float>();
  int32_t* cp = c.data_ptr<int32_t>();
  at::parallel_for(0, M * nb, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) quantize_block(xp + i * kActBlock, qp + i * kActBlock, sp + i, cp + i);
  });
  return {q, s, c};
}

}  // namespace

std::vector<torch::Tensor> pack_panels(torch::Tensor codes, torch::Tensor d, torch::Tensor m, const std::string& layout) {
  const LayoutInfo info = parse_layout(layout);
  TORCH_CHECK(info.format != Format::kF32, "float32 weights are packed with f32_pack");
  TORCH_CHECK(codes.dim() == 2 && (codes.scalar_type() == torch::kUInt8 || codes.scalar_type() == torch::kInt8),
              "codes must be uint8 or int8 [N, K]");
  const int64_t N = codes.size(0), K = codes.size(1), block = info.block ? info.block : 32;
  TORCH_CHECK(N % kPanel == 0, "packed panels need out_features divisible by 32, got ", N);
  TORCH_CHECK(K % block == 0, layout, " needs in_features divisible by ", block, ", got ", K);
  const int64_t P = N / kPanel, nb = K / block;
  auto c = codes.contiguous().view(torch::kUInt8).view({P, kPanel, nb, block});
  if (info.four_bit) {  // inputs kk and kk + 16 of a block share a byte
    auto lo = c.slice(3, 0, 16), hi = c.slice(3, 16, 32);
    c = lo.bitwise_or(hi.bitwise_left_shift(4));
  }
  auto packed = c.permute({0, 2, 3, 1}).contiguous();  // [P][nb][code_rows][32]
  auto panels = [&](const torch::Tensor& t) {  // [N, nb] float32 -> [P][nb][32]
    TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.numel() == N * nb, layout, " needs float32 [N, K/", block,
                "] scales");
    return t.contiguous().view({P, kPanel, nb}).permute({0, 2, 1}).contiguous();
  };
  if (info.format == Format::kI8_ROW) {
    TORCH_CHECK(d.scalar_type() == torch::kFloat32 && d.numel() == N, "I8_ROW needs float32 [N] scales");
    return {packed, d.contiguous().view({N}), torch::empty({0}, d.options())};
  }
  return {packed, panels(d), info.has_min ? panels(m) : torch::empty({0}, d.options())};
}

torch::Tensor f32_pack(torch::Tensor weight) {
  TORCH_CHECK(weight.scalar_type() == torch::kFloat32 && weight.dim() == 2, "weight must be float32 [N, K]");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(N % kPanel == 0, "float32 panels need out_features divisible by 32");
  return weight.contiguous().view({N / kPanel, kPanel, K}).transpose(1, 2).contiguous();
}

std::string simd_level() { return simd::kLevel; }
std::string int_dot_level() { return simd::kIntDot; }

torch::Tensor quant_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor d, torch::Tensor m,
                           const std::string& layout) {
  const LayoutInfo info = parse_layout(layout);
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2, "x must be float32 [M, K]");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), P = codes.size(0);
  if (info.format == Format::kF32) {
    TORCH_CHECK(codes.scalar_type() == torch::kFloat32 && codes.size(1) == K, "F32 panels must be [P, K, 32]");
  } else {
    const int64_t block = info.block ? info.block : 32;
    const int64_t rows = info.four_bit ? block / 2 : block;
    TORCH_CHECK(codes.dim() == 4 && codes.size(1) * block == K && codes.size(2) == rows, "x has ", K,
                " inputs, the ", layout, " weights ", codes.size(1) * block);
  }
  auto out = torch::empty({M, P * kPanel}, x.options());
  if (M == 0) return out;
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  if (info.format == Format::kF32) {
    f32_linear(xp, M, K, codes.data_ptr<float>(), P, op);
    return out;
  }
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* dp = d.data_ptr<float>();
  const float* mp = info.has_min ? m.data_ptr<float>() : nullptr;
  switch (info.format) {
    case Format::kU4_32M: block_linear<Format::kU4_32M>(xp, M, K, cp, dp, mp, P, op); break;
    case Format::kU8_32M: block_linear<Format::kU8_32M>(xp, M, K, cp, dp, mp, P, op); break;
    case Format::kI8_32: block_linear<Format::kI8_32>(xp, M, K, cp, dp, mp, P, op); break;
    case Format::kI8_16: block_linear<Format::kI8_16>(xp, M, K, cp, dp, mp, P, op); break;
    case Format::kI8_ROW: block_linear<Format::kI8_ROW>(xp, M, K, cp, dp, mp, P, op); break;
    default: TORCH_CHECK(false, "unreachable");
  }
  return out;
}

std::vector<torch::Tensor> w8a8_pack(torch::Tensor q, torch::Tensor scale) {
  TORCH_CHECK(q.scalar_type() == torch::kInt8 && q.dim() == 2, "W8A8 weights must be int8 [N, K]");
  const int64_t N = q.size(0), K = q.size(1);
  TORCH_CHECK(N % kPanel == 0 && K % kActBlock == 0,
              "W8A8 needs out_features and in_features divisible by 32, got ", N, " x ", K);
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.numel() == N, "W8A8 needs float32 [N] scales");
  auto packed = q.contiguous().view({N / kPanel, kPanel, K / 4, 4}).permute({0, 2, 1, 3}).contiguous();
  if (kBiasedWeights) packed.view(torch::kUInt8).bitwise_xor_(0x80);
  return {packed, scale.contiguous().view({N})};
}

std::vector<torch::Tensor> quantize_rows_int8(torch::Tensor x) {
  auto q = quantize_rows(x);
  return {q[0], q[1]};
}

torch::Tensor w8a8_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor scale) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2, "x must be float32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), P = packed.size(0), N = P * kPanel, nb = K / kActBlock;
  TORCH_CHECK(packed.dim() == 4 && packed.size(1) * 4 == K, "x has ", K, " inputs, the W8A8 weights ",
              packed.size(1) * 4);
  auto out = torch::empty({M, N}, x.options());
  if (M == 0) return out;
  auto quantized = quantize_rows(x);
  const int8_t* xq = quantized[0].data_ptr<int8_t>();
  const float* sx = quantized[1].data_ptr<float>();
  const int32_t* corr = quantized[2].data_ptr<int32_t>();
  const int8_t* wp = packed.data_ptr<int8_t>();
  const float* sw = scale.data_ptr<float>();
  float* op = out.data_ptr<float>();
  static constexpr auto table = w8a8_table(std::make_integer_sequence<int, kW8A8Rows>{});
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t r0 = 0; r0 < M; r0 += kW8A8Rows) {
        const int64_t rows = std::min(kW8A8Rows, M - r0);
        float* o = op + r0 * N + p * kPanel;
        table[rows - 1](xq + r0 * K, K, sx + r0 * nb, corr + r0 * nb, wp + p * K * kPanel, o, N);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t n = 0; n < kPanel; ++n) o[r * N + n] *= sw[p * kPanel + n];
      }
    }
  });
  return out;
}

void register_quant_linear(pybind11::module& m) {
  m.def("pack_panels", &pack_panels);
  m.def("f32_pack", &f32_pack);
  m.def("quant_linear", &quant_linear);
  m.def("w8a8_pack", &w8a8_pack);
  m.def("quantize_rows_int8", &quantize_rows_int8);
  m.def("w8a8_linear", &w8a8_linear);
  m.def("simd_level", &simd_level);
  m.def("int_dot_level", &int_dot_level);
}
