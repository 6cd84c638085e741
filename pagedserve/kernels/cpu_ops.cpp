// Fused CPU kernels for the decode hot path (float32 activations only; every other dtype takes the
// torch path). The KV cache may also be float16 or bfloat16: the attention kernels widen it to
// float32 as they load it, so only the bytes read change, not the arithmetic.
//
// Each function replaces a chain of small ATen ops whose per-op overhead dominated a decode step
// on a 2-core CPU: paged attention reads K/V in place through the block table instead of
// gathering a padded copy; rotary, RMSNorm (+ residual add) and SiLU*up are one pass each.
// Built just-in-time by pagedserve/kernels/__init__.py with -O3 -march=native -ffp-contract=off:
// no silent FMA contraction, so rotary rounds exactly like the ATen ops it replaces.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "cpu_ops.h"
#include "quant_linear.h"
#include "vec16.h"

#include <sys/mman.h>
#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <limits>
#include <array>
#include <utility>
#include <bit>
#include <cstring>
#include <type_traits>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace ps {  // named: decoder_stack.cpp calls these kernels directly (cpu_ops.h)

constexpr int64_t kLanes = 16;  // independent partial sums: the compiler turns them into SIMD lanes

inline float sum_squares(const float* a, int64_t n) {
  float acc[kLanes] = {0.f};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += a[i + l] * a[i + l];
  float s = 0.f;
  for (int64_t l = 0; l < kLanes; ++l) s += acc[l];
  for (; i < n; ++i) s += a[i] * a[i];
  return s;
}

// vf16 (vec16.h): 16 floats as one value, one AVX-512 register or two AVX2 ones, so the hot loops
// below are SIMD by construction rather than at the auto-vectorizer's discretion.

inline vf16 load16(const float* p) { return vload(p); }
inline void store16(float* p, vf16 v) { vstore(p, v); }
inline float hsum16(vf16 v) {
  float s = 0.f;
  for (int l = 0; l < 16; ++l) s += lane(v, l);
  return s;
}

// Registers hold 32 vf16 with AVX-512 but 8 elsewhere (a vf16 is two AVX2 registers): the attention
// kernels size their sets of accumulators by this, so that they do not spill to the stack.
constexpr int64_t kVf16Registers =
#if defined(__AVX512F__)
    32;
#else
    8;
#endif

// Columns of 16 per pass over V in attention's weighted sums: all kVecs where the G x kVecs
// accumulators and one row of V fit in registers, else one (each sum still adds t = 0..len-1 in order).
constexpr int64_t v_sum_slice(int64_t group, int64_t vecs) {
  return group * vecs + vecs <= kVf16Registers ? vecs : 1;
}

// KV cache elements: float, at::Half or at::BFloat16. load16 widens 16 of them to a vf16 (exactly),
// store16 narrows with round-to-nearest-even, as torch's .to(dtype) does, so either path writes the
// same bits. The F16C / AVX-512 intrinsics do it 8 or 16 lanes at a time; elsewhere c10's scalar
// conversion does (GCC 12 scalarizes _Float16 vector conversions anyway).

inline float to_float(float x) { return x; }
inline float to_float(at::Half x) { return static_cast<float>(x); }
inline float to_float(at::BFloat16 x) { return std::bit_cast<float>(static_cast<uint32_t>(x.x) << 16); }

template <typename T>
inline T from_float(float x) {
  return T(x);  // c10's Half and BFloat16 constructors round to nearest even
}

inline vf16 load16(const at::Half* p) {
#if defined(__AVX512F__)
  return reinterpret_cast<vf16>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#elif defined(__F16C__)
  const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  return vf16{reinterpret_cast<vf8>(lo), reinterpret_cast<vf8>(hi)};
#else  // no portable 16-bit float vector type in C++ (GCC 12 has no _Float16 there, e.g. on ARM)
  float f[16];
  for (int l = 0; l < 16; ++l) f[l] = to_float(p[l]);
  return load16(f);
#endif
}

inline vf16 load16(const at::BFloat16* p) {  // bfloat16 is the top half of a float32
#if defined(__AVX512F__)  // GCC splits the generic widening below into 8-lane pieces
  const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return reinterpret_cast<vf16>(_mm512_slli_epi32(u, 16));
#else
  uint32_t u[16];
  for (int l = 0; l < 16; ++l) u[l] = static_cast<uint32_t>(p[l].x) << 16;
  return vload(reinterpret_cast<const float*>(u));
#endif
}

inline void store16(at::Half* p, vf16 v) {
#if defined(__AVX512F__)
  const __m256i h = _mm512_cvtps_ph(reinterpret_cast<__m512>(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
#elif defined(__F16C__)
  const __m256 lo = reinterpret_cast<__m256>(v.lo), hi = reinterpret_cast<__m256>(v.hi);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 8), _mm256_cvtps_ph(hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  for (int l = 0; l < 16; ++l) p[l] = from_float<at::Half>(lane(v, l));
#endif
}

inline void store16(at::BFloat16* p, vf16 v) {  // round to nearest even; NaN stays a (quiet) NaN
  const vu16 u = vbits<vu16>(v);
  const vu16 rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const vu16 nan = vbits<vu16>(v != v);
  uint32_t bits[16];
  vstore(reinterpret_cast<float*>(bits), vbits<vf16>((rounded & ~nan) | (0x7FC0u & nan)));
  for (int l = 0; l < 16; ++l) p[l].x = static_cast<uint16_t>(bits[l]);
}

// Calls fn(std::type_identity<T>{}) with T the element type of a KV cache of that dtype.
template <typename Fn>
void dispatch_cache_type(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: return fn(std::type_identity<float>{});
    case at::kHalf: return fn(std::type_identity<at::Half>{});
    case at::kBFloat16: return fn(std::type_identity<at::BFloat16>{});
    default: TORCH_CHECK(false, "KV caches must be float32, float16 or bfloat16, got ", dtype);
  }
}

// exp(x) as Cephes' expf (range reduction by ln 2, degree-5 polynomial; ~1 ulp), for a scalar or
// a vf16: glibc's scalar expf would otherwise be the slowest part of softmax and SiLU.
template <typename V>
inline V cephes_exp(V x) {
  const V lo = x - x - 87.3f, hi = x - x + 88.7f;  // (x - x) makes the constants the right shape
  x = vselect(x < lo, lo, x);
  x = vselect(x > hi, hi, x);
  const V n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  V r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  if constexpr (std::is_same_v<V, float>) {
    return p * std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  } else {
    return p * vbits<vf16>((vconvert<vi16>(n) + 127) << 23);
  }
}

// x[i] = exp(x[i] - shift) for i < n; returns the sum.
inline float exp_shifted_inplace(float* x, int64_t n, float shift) {
  vf16 total = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const vf16 e = cephes_exp(load16(x + i) - shift);
    store16(x + i, e);
    total += e;
  }
  float sum = hsum16(total);
  for (; i < n; ++i) {
    x[i] = cephes_exp(x[i] - shift);
    sum += x[i];
  }
  return sum;
}

// Blocks of one request sit anywhere in the cache, so the hardware prefetcher cannot guess the next
// one; the kernels ask for it a cache line at a time while they work on the current block. Into L2
// (locality 2, prefetcht1 on x86): prefetches into L1 hold its few line-fill buffers and stall the
// loop, measured 20-35% slower. Distances are in 64-byte lines, whatever the cache's element type.
constexpr int64_t kLine = 64;
inline void prefetch_line(const void* p) { __builtin_prefetch(p, 0, 2); }

// Every line of n elements from p.
template <typename T>
inline void prefetch_span(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(T)); b += kLine) prefetch_line(c + b);
}

// Back a large tensor with transparent huge pages (where the kernel allows it on request): the KV
// cache is read block by block from scattered places, and 4 KiB pages make that a TLB miss each.
void advise_huge_pages(at::Tensor t) {
  constexpr uintptr_t kHuge = 2 << 20;
  const auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (start + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (start + t.nbytes()) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
}

void check_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32");
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
}

// Both caches on the CPU, contiguous, of one dtype (float32, float16 or bfloat16).
void check_caches(const at::Tensor& k_cache, const at::Tensor& v_cache) {
  TORCH_CHECK(k_cache.device().is_cpu() && v_cache.device().is_cpu(), "caches must be on the CPU");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "k_cache and v_cache must have one dtype");
}

// n floats → n cache elements (16 at a time, then one by one).
template <typename T>
inline void convert_row(T* dst, const float* src, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::copy_n(src, n, dst);
  } else {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) store16(dst + i, load16(src + i));
    for (; i < n; ++i) dst[i] = from_float<T>(src[i]);
  }
}

template <typename T>
void write_kv_typed(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& slot_mapping) {
  const int64_t tokens = k.size(0), kvh = k.size(1), d = k.size(2);
  const int64_t num_blocks = k_cache.size(1), bs = k_cache.size(3);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  T* kc = static_cast<T*>(k_cache.data_ptr());
  T* vc = static_cast<T*>(v_cache.data_ptr());
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  // Every token of a step has its own slot, so tokens can be written in parallel.
  at::parallel_for(0, tokens, 8, [&](int64_t begin, int64_t end) {
    std::vector<T> row(std::is_same_v<T, float> ? 0 : d);  // one head's K, converted before its strided scatter
    for (int64_t t = begin; t < end; ++t) {
      const int64_t block = slots[t] / bs, offset = slots[t] % bs;
      for (int64_t h = 0; h < kvh; ++h) {
        const float* src = kp + t * k.stride(0) + h * k.stride(1);
        T* kdst = kc + (h * num_blocks + block) * d * bs + offset;
        if constexpr (std::is_same_v<T, float>) {
          for (int64_t i = 0; i < d; ++i) kdst[i * bs] = src[i];
        } else {
          convert_row(row.data(), src, d);
          for (int64_t i = 0; i < d; ++i) kdst[i * bs] = row[i];
        }
        convert_row(vc + ((h * num_blocks + block) * bs + offset) * d, vp + t * v.stride(0) + h * v.stride(1), d);
      }
    }
  });
}

// k_cache: [kv_heads, num_blocks, head_dim, block_size] (K transposed inside each block, so a
// block's scores are head_dim vector FMAs over block_size slots, with no horizontal sums);
// v_cache: [kv_heads, num_blocks, block_size, head_dim]. k, v: [T, kv_heads, head_dim] with a unit
// last stride; slot = block * block_size + offset. A 16-bit cache gets k and v rounded to nearest even.
void write_kv(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& slot_mapping) {
  check_caches(k_cache, v_cache);
  check_f32(k, "k");
  check_f32(v, "v");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1, "k and v need a unit last stride");
  dispatch_cache_type(k_cache.scalar_type(), [&](auto tag) {
    write_kv_typed<typename decltype(tag)::type>(k_cache, v_cache, k, v, slot_mapping);
  });
}

// Decode attention: one query token per request, its context read block by block from the cache.
// q: [B, heads, head_dim] (unit last stride); out: [B, heads, head_dim] contiguous;
// block_tables: [B, max_blocks] int64; context_lens: [B] int64.
// Query head j shares KV head j / group (HF's repeat_kv order). Softmax in two passes, as ATen's.
// One work item is (request, KV head): its `group` query heads share every K and V load.

// The common shapes: block_size 16, head_dim D (a multiple of 16) and group size G known at compile
// time, so the G score vectors and G x D/16 output accumulators live in registers.
//
// The item is memory-bound: its K blocks, then its V blocks, each D x 16 elements somewhere in the
// cache. They are read as one stream (K blocks, V blocks, then the next item's first K blocks,
// `next`); while one block is used, the block kAhead<T> places further on is prefetched line by line.
// A 16-bit block is half as many lines, so twice as many blocks ahead keep as many bytes in flight.
template <typename T>
constexpr int64_t kAhead = 12 / sizeof(T);

template <typename T, int64_t D, int64_t G>
void decode_item_fast(float* out, const float* qh, int64_t q_head_stride, const T* kc, const T* vc,
                      const int64_t* table, int64_t len, int64_t head_base, float scale, float* scores,
                      const T* const* next) {
  constexpr int64_t kBs = 16, kVecs = D / 16, kBlockElems = D * kBs;
  constexpr int64_t kRowsPerLine = kLine / (kBs * sizeof(T));  // K rows of 16 slots in one line: 1 or 2
  constexpr int64_t kLinesPerRow = D * sizeof(T) / kLine;  // lines in one V row (one slot's D values)
  constexpr int64_t kAheadT = kAhead<T>;
  const int64_t nblocks = (len + kBs - 1) / kBs, padded = nblocks * kBs;
  static const T kNothing[kBlockElems] = {};  // a harmless address when the stream has ended
  auto stream_block = [&](int64_t s) -> const T* {  // s-th block of the stream described above
    if (s < nblocks) return kc + (head_base + table[s]) * kBlockElems;
    if (s < 2 * nblocks) return vc + (head_base + table[s - nblocks]) * kBlockElems;
    if (s - 2 * nblocks < kAheadT && next[s - 2 * nblocks]) return next[s - 2 * nblocks];
    return kNothing;
  };
  float q[G][D];
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < D; ++i) q[g][i] = qh[g * q_head_stride + i] * scale;
  for (int64_t n = 0; n < nblocks; ++n) {
    const T* kb = kc + (head_base + table[n]) * kBlockElems;  // [D][16]: K transposed in the block
    const T* ahead = stream_block(n + kAheadT);
    vf16 sv[G] = {};
    for (int64_t i = 0; i < D; i += kRowsPerLine) {  // one 64-byte line of K per step
      prefetch_line(ahead + i * kBs);
      for (int64_t r = i; r < i + kRowsPerLine; ++r) {
        const vf16 k = load16(kb + r * kBs);
        for (int64_t g = 0; g < G; ++g) sv[g] += q[g][r] * k;
      }
    }
    for (int64_t g = 0; g < G; ++g) store16(scores + g * padded + n * kBs, sv[g]);
  }
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores + g * padded;
    const float mx = *std::max_element(sg, sg + len);
    const float inv = 1.f / exp_shifted_inplace(sg, len, mx);
    for (int64_t t = 0; t < len; ++t) sg[t] *= inv;
  }
  // The V sums, v_sum_slice columns of 16 per pass over the blocks.
  constexpr int64_t kSlice = v_sum_slice(G, kVecs);
  for (int64_t j0 = 0; j0 < kVecs; j0 += kSlice) {
    vf16 acc[G][kSlice] = {};
    for (int64_t n = 0; n < nblocks; ++n) {
      const T* vb = vc + (head_base + table[n]) * kBlockElems;  // [16][D]
      const T* ahead = stream_block(nblocks + n + kAheadT);
      const int64_t rows = std::min(kBs, len - n * kBs);
      for (int64_t r = 0; r < kBs; ++r) {
        if (j0 == 0)
          for (int64_t j = 0; j < kLinesPerRow; ++j)
            prefetch_line(reinterpret_cast<const char*>(ahead + r * D) + j * kLine);
        if (r >= rows) continue;
        const int64_t t = n * kBs + r;
        vf16 v[kSlice];
        for (int64_t j = 0; j < kSlice; ++j) v[j] = load16(vb + r * D + (j0 + j) * 16);
        for (int64_t g = 0; g < G; ++g) {
          const float p = scores[g * padded + t];
          for (int64_t j = 0; j < kSlice; ++j) acc[g][j] += p * v[j];
        }
      }
    }
    for (int64_t g = 0; g < G; ++g)
      for (int64_t j = 0; j < kSlice; ++j) store16(out + g * D + (j0 + j) * 16, acc[g][j]);
  }
}

// Any shape, plain loops.
template <typename T>
void decode_item_generic(float* out, const float* qh, int64_t q_head_stride, const T* kc, const T* vc,
                         const int64_t* table, int64_t len, int64_t head_base, float scale, float* scores,
                         int64_t d, int64_t bs, int64_t group) {
  for (int64_t g = 0; g < group; ++g) {
    float* sg = scores + g * len;
    for (int64_t t = 0; t < len; ++t) {
      const T* kb = kc + (head_base + table[t / bs]) * d * bs + t % bs;
      float dot = 0.f;
      for (int64_t i = 0; i < d; ++i) dot += qh[g * q_head_stride + i] * to_float(kb[i * bs]);
      sg[t] = dot * scale;
    }
    const float mx = *std::max_element(sg, sg + len);
    const float inv = 1.f / exp_shifted_inplace(sg, len, mx);
    float* o = out + g * d;
    std::fill(o, o + d, 0.f);
    for (int64_t t = 0; t < len; ++t) {
      const T* vt = vc + ((head_base + table[t / bs]) * bs + t % bs) * d;
      const float p = sg[t] * inv;
      for (int64_t i = 0; i < d; ++i) o[i] += p * to_float(vt[i]);
    }
  }
}

// Runs fn(begin, end) over [0, n) split into one contiguous run per thread of about equal total
// cost(i). Attention items cost in proportion to their context, which varies 20x within a batch:
// at::parallel_for's equal-count split left one core idle while the other read the long contexts.
template <typename Cost, typename Fn>
void parallel_by_cost(int64_t n, const Cost& cost, const Fn& fn) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  if (threads <= 1 || at::in_parallel_region()) {
    if (n > 0) fn(0, n);
    return;
  }
  std::vector<int64_t> prefix(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) prefix[i + 1] = prefix[i] + cost(i);
  std::vector<int64_t> bounds(threads + 1, n);
  bounds[0] = 0;
  for (int64_t t = 1; t < threads; ++t)  // first item whose run would pass t / threads of the total
    bounds[t] = std::lower_bound(prefix.begin(), prefix.end(), prefix[n] * t / threads) - prefix.begin();
  at::parallel_for(0, threads, 1, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t)
      if (bounds[t] < bounds[t + 1]) fn(bounds[t], bounds[t + 1]);
  });
}

// The attention kernels are compiled for block_size 16, head_dim 64 or 128 and 1–8 query heads per KV
// head; Kernel<D, G>::fn is that shape's function. Any other shape gets nullptr (the generic loops).
template <template <int64_t, int64_t> class Kernel, int64_t D, int64_t... G>
constexpr auto group_table(std::integer_sequence<int64_t, G...>) {
  return std::array{Kernel<D, G + 1>::fn...};
}

template <template <int64_t, int64_t> class Kernel>
auto pick_kernel(int64_t bs, int64_t d, int64_t group) -> decltype(Kernel<64, 1>::fn) {
  static constexpr auto d64 = group_table<Kernel, 64>(std::make_integer_sequence<int64_t, 8>{});
  static constexpr auto d128 = group_table<Kernel, 128>(std::make_integer_sequence<int64_t, 8>{});
  if (bs != 16 || group < 1 || group > 8) return nullptr;
  if (d == 64) return d64[group - 1];
  if (d == 128) return d128[group - 1];
  return nullptr;
}

// What both attention entry points read from their operands, checked once: q [T, heads, head_dim]
// (unit last stride) float32, out contiguous like q, and the caches in write_kv's layout, of element
// type T.
template <typename T>
struct AttentionOperands {
  int64_t heads, d, kvh, num_blocks, bs, group;
  const float* qp;
  const T *kc, *vc;
  float* op;

  AttentionOperands(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache) {
    check_f32(q, "q");
    check_f32(out, "out");
    TORCH_CHECK(out.is_contiguous() && q.stride(2) == 1, "out must be contiguous, q needs a unit last stride");
    heads = q.size(1), d = q.size(2);
    kvh = k_cache.size(0), num_blocks = k_cache.size(1), bs = k_cache.size(3);
    group = heads / kvh;
    qp = q.data_ptr<float>(), op = out.data_ptr<float>();
    kc = static_cast<const T*>(k_cache.data_ptr()), vc = static_cast<const T*>(v_cache.data_ptr());
  }
};

template <typename T>
struct DecodeKernels {
  template <int64_t D, int64_t G>
  struct Of {
    static constexpr auto fn = &decode_item_fast<T, D, G>;
  };
};

template <typename T>
void paged_decode_typed(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  const AttentionOperands<T> a(out, q, k_cache, v_cache);
  const int64_t heads = a.heads, d = a.d, kvh = a.kvh, num_blocks = a.num_blocks, bs = a.bs, group = a.group;
  const float* qp = a.qp;
  const T *kc = a.kc, *vc = a.vc;
  float* op = a.op;
  const int64_t B = q.size(0), max_blocks = block_tables.size(1);
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const float fscale = static_cast<float>(scale);
  const auto fast = pick_kernel<DecodeKernels<T>::template Of>(bs, d, group);
  const int64_t max_len = *std::max_element(lens, lens + B);
  const int64_t padded = (max_len + bs - 1) / bs * bs;
  constexpr int64_t kAheadT = kAhead<T>;

  parallel_by_cost(B * kvh, [&](int64_t w) { return lens[w / kvh] + bs; }, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(group * padded);
    auto first_k_blocks = [&](int64_t w, const T** blocks) {  // item w's first kAhead K blocks
      const int64_t b = w / kvh, h = w % kvh;
      for (int64_t n = 0; n < kAheadT; ++n)
        blocks[n] = w < end && n * bs < lens[b] ? kc + (h * num_blocks + tables[b * max_blocks + n]) * d * bs : nullptr;
    };
    const T* next[kAheadT];
    first_k_blocks(begin, next);
    for (const T* p : next)
      if (p) prefetch_span(p, d * bs);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = w / kvh, h = w % kvh;
      const float* qh = qp + b * q.stride(0) + h * group * q.stride(1);
      float* o = op + (b * heads + h * group) * d;
      first_k_blocks(w + 1, next);
      if (fast)
        fast(o, qh, q.stride(1), kc, vc, tables + b * max_blocks, lens[b], h * num_blocks, fscale, scores.data(),
             next);
      else
        decode_item_generic(o, qh, q.stride(1), kc, vc, tables + b * max_blocks, lens[b], h * num_blocks, fscale,
                            scores.data(), d, bs, group);
    }
  });
}

void paged_decode_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_tables,
                            const at::Tensor& context_lens, double scale) {
  check_caches(k_cache, v_cache);
  dispatch_cache_type(k_cache.scalar_type(), [&](auto tag) {
    paged_decode_typed<typename decltype(tag)::type>(out, q, k_cache, v_cache, block_tables, context_lens, scale);
  });
}

// Prefill attention: each query token of a segment (a prompt, or a chunk of one) attends to its
// request's context up to and including itself, read through the block table (this step's K/V are
// already written). q: [T, heads, head_dim] (unit last stride); out: [T, heads, head_dim]
// contiguous, only the segments' rows written. seg_info: [S, 3] int64 rows of (first row in q,
// query tokens, context length after this step); seg_tables: [S, max_blocks] int64.
// One work item is (segment, KV head, tile of up to QT consecutive query tokens): the tile's QT x G
// query vectors share every K load, so the scores are compute-bound multiply-adds instead of one
// latency-bound chain per token as in decode. Each token's softmax and V sum then run as in decode.
template <typename T, int64_t D, int64_t G, int64_t QT>
void prefill_tile_fast(float* out, int64_t out_row, const float* q, int64_t q_row, int64_t q_head,
                       const T* kc, const T* vc, const int64_t* table, int64_t first_len, int64_t nt,
                       int64_t head_base, float scale, float* scores) {
  constexpr int64_t kBs = 16, kVecs = D / 16, kBlockElems = D * kBs, kQ = QT * G;
  const int64_t max_len = first_len + nt - 1;
  const int64_t nblocks = (max_len + kBs - 1) / kBs, padded = nblocks * kBs;
  float qs[kQ][D];
  for (int64_t j = 0; j < QT; ++j)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t i = 0; i < D; ++i) qs[j * G + g][i] = j < nt ? q[j * q_row + g * q_head + i] * scale : 0.f;
  for (int64_t n = 0; n < nblocks; ++n) {
    const T* kb = kc + (head_base + table[n]) * kBlockElems;  // [D][16]
    vf16 sv[kQ] = {};
    for (int64_t i = 0; i < D; ++i) {
      const vf16 k = load16(kb + i * kBs);
      for (int64_t v = 0; v < kQ; ++v) sv[v] += qs[v][i] * k;
    }
    for (int64_t v = 0; v < kQ; ++v) store16(scores + v * padded + n * kBs, sv[v]);
  }
  for (int64_t j = 0; j < nt; ++j) {
    const int64_t len = first_len + j;
    for (int64_t g = 0; g < G; ++g) {
      float* sg = scores + (j * G + g) * padded;
      const float mx = *std::max_element(sg, sg + len);
      const float inv = 1.f / exp_shifted_inplace(sg, len, mx);
      for (int64_t t = 0; t < len; ++t) sg[t] *= inv;
    }
    constexpr int64_t kSlice = v_sum_slice(G, kVecs);
    for (int64_t c0 = 0; c0 < kVecs; c0 += kSlice) {
      vf16 acc[G][kSlice] = {};
      for (int64_t t = 0; t < len; ++t) {
        const T* vt = vc + ((head_base + table[t / kBs]) * kBs + t % kBs) * D;
        vf16 v[kSlice];
        for (int64_t c = 0; c < kSlice; ++c) v[c] = load16(vt + (c0 + c) * 16);
        for (int64_t g = 0; g < G; ++g) {
          const float p = scores[(j * G + g) * padded + t];
          for (int64_t c = 0; c < kSlice; ++c) acc[g][c] += p * v[c];
        }
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t c = 0; c < kSlice; ++c) store16(out + j * out_row + g * D + (c0 + c) * 16, acc[g][c]);
    }
  }
}

// Tokens per tile: query vectors whose score accumulators fit in registers (12 with AVX-512, 6 in
// two-register vf16s), at least one token.
constexpr int64_t prefill_tokens_per_tile(int64_t group) {
  constexpr int64_t kScores = kVf16Registers >= 32 ? 12 : 6;
  return group >= kScores ? 1 : kScores / group;
}

template <typename T>
struct PrefillKernels {
  template <int64_t D, int64_t G>
  struct Of {
    static constexpr auto fn = &prefill_tile_fast<T, D, G, prefill_tokens_per_tile(G)>;
  };
};

template <typename T>
void paged_prefill_typed(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& seg_info, const at::Tensor& seg_tables, double scale) {
  const AttentionOperands<T> a(out, q, k_cache, v_cache);
  const int64_t heads = a.heads, d = a.d, kvh = a.kvh, num_blocks = a.num_blocks, bs = a.bs, group = a.group;
  const float* qp = a.qp;
  const T *kc = a.kc, *vc = a.vc;
  float* op = a.op;
  TORCH_CHECK(seg_info.is_contiguous() && seg_tables.is_contiguous() && seg_info.size(1) == 3, "bad segment tensors");
  const int64_t max_blocks = seg_tables.size(1), S = seg_info.size(0);
  const int64_t* info = seg_info.data_ptr<int64_t>();
  const int64_t* tables = seg_tables.data_ptr<int64_t>();
  const float fscale = static_cast<float>(scale);
  const auto fast = pick_kernel<PrefillKernels<T>::template Of>(bs, d, group);
  const int64_t tile = fast ? prefill_tokens_per_tile(group) : 1;
  // A tile: query tokens [row, row + nt) of segment seg, the first of which sees first_len tokens
  // (the cached prefix, the tile's predecessors in the segment, and itself).
  struct Item { int64_t seg, head, row, nt, first_len; };
  std::vector<Item> items;
  int64_t max_len = 1;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t row0 = info[s * 3], n = info[s * 3 + 1], ctx = info[s * 3 + 2];
    TORCH_CHECK(n >= 1 && ctx >= n && (ctx + bs - 1) / bs <= max_blocks, "segment ", s, " does not fit its table");
    max_len = std::max(max_len, ctx);
    for (int64_t h = 0; h < kvh; ++h)
      for (int64_t j = 0; j < n; j += tile) items.push_back({s, h, row0 + j, std::min(tile, n - j), ctx - n + j + 1});
  }
  const int64_t padded = (max_len + bs - 1) / bs * bs;
  auto tile_cost = [&](int64_t w) { return items[w].nt * (items[w].first_len + items[w].nt); };  // tokens x context
  parallel_by_cost(static_cast<int64_t>(items.size()), tile_cost, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(tile * group * padded);
    for (int64_t w = begin; w < end; ++w) {
      const Item it = items[w];
      const float* qh = qp + it.row * q.stride(0) + it.head * group * q.stride(1);
      float* o = op + (it.row * heads + it.head * group) * d;
      const int64_t* table = tables + it.seg * max_blocks;
      if (fast) {
        fast(o, heads * d, qh, q.stride(0), q.stride(1), kc, vc, table, it.first_len, it.nt, it.head * num_blocks,
             fscale, scores.data());
      } else {
        decode_item_generic(o, qh, q.stride(1), kc, vc, table, it.first_len, it.head * num_blocks, fscale,
                            scores.data(), d, bs, group);
      }
    }
  });
}

void paged_prefill_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, const at::Tensor& seg_info, const at::Tensor& seg_tables,
                             double scale) {
  check_caches(k_cache, v_cache);
  dispatch_cache_type(k_cache.scalar_type(), [&](auto tag) {
    paged_prefill_typed<typename decltype(tag)::type>(out, q, k_cache, v_cache, seg_info, seg_tables, scale);
  });
}

// In place on the first `rotated_heads` heads of x: [T, >= rotated_heads * head_dim] (row stride
// free, unit last stride). cos/sin tables: [max_positions, head_dim]; HF's rotate-half layout:
// out = x * cos + rotate_half(x) * sin.
void rotary_inplace(at::Tensor x, const at::Tensor& positions, const at::Tensor& cos_table,
                    const at::Tensor& sin_table, int64_t rotated_heads, int64_t head_dim) {
  check_f32(x, "x");
  TORCH_CHECK(x.stride(1) == 1 && cos_table.is_contiguous() && sin_table.is_contiguous(), "bad layout");
  const int64_t T = x.size(0), half = head_dim / 2, row = x.stride(0);
  const int64_t* pos = positions.data_ptr<int64_t>();
  float* xp = x.data_ptr<float>();
  const float* ct = cos_table.data_ptr<float>();
  const float* st = sin_table.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = ct + pos[t] * head_dim;
      const float* s = st + pos[t] * head_dim;
      for (int64_t h = 0; h < rotated_heads; ++h) {
        float* v = xp + t * row + h * head_dim;
        int64_t i = 0;
        for (; i + 16 <= half; i += 16) {
          const vf16 x1 = load16(v + i), x2 = load16(v + i + half);
          store16(v + i, x1 * load16(c + i) + (-x2) * load16(s + i));
          store16(v + i + half, x2 * load16(c + i + half) + x1 * load16(s + i + half));
        }
        for (; i < half; ++i) {
          const float x1 = v[i], x2 = v[i + half];
          v[i] = x1 * c[i] + (-x2) * s[i];
          v[i + half] = x2 * c[i + half] + x1 * s[i + half];
        }
      }
    }
  });
}

// Llama RMSNorm of one row: out = weight * (x * rsqrt(mean(x^2) + eps)).
inline void rms_norm_row(float* out, const float* x, const float* w, int64_t n, float eps) {
  const float inv = 1.f / std::sqrt(sum_squares(x, n) / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * inv);
}

// out = rms_norm(x); x: [T, hidden] contiguous.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_f32(x, "x");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "x and weight must be contiguous");
  auto out = at::empty_like(x);
  const int64_t T = x.size(0), n = x.size(1);
  const float* xp = x.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, T, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) rms_norm_row(o + t * n, xp + t * n, w, n, static_cast<float>(eps));
  });
  return out;
}

// residual += x, then x = rms_norm(residual): the residual stream and the next layer's input
// in one pass (vLLM's fused_add_rms_norm). Both [T, hidden] contiguous, updated in place.
void fused_add_rms_norm(at::Tensor x, at::Tensor residual, const at::Tensor& weight, double eps) {
  check_f32(x, "x");
  TORCH_CHECK(x.is_contiguous() && residual.is_contiguous(), "x and residual must be contiguous");
  const int64_t T = x.size(0), n = x.size(1);
  float* xp = x.data_ptr<float>();
  float* rp = residual.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  at::parallel_for(0, T, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* r = rp + t * n;
      const float* xr = xp + t * n;
      for (int64_t i = 0; i < n; ++i) r[i] = r[i] + xr[i];
      rms_norm_row(xp + t * n, r, w, n, static_cast<float>(eps));
    }
  });
}

// gate_up: [T, 2 * inter] (gate then up) → silu(gate) * up: [T, inter].
at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  check_f32(gate_up, "gate_up");
  TORCH_CHECK(gate_up.is_contiguous(), "gate_up must be contiguous");
  const int64_t T = gate_up.size(0), inter = gate_up.size(1) / 2;
  auto out = at::empty({T, inter}, gate_up.options());
  const float* g = gate_up.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, T, 4, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* gr = g + t * 2 * inter;
      float* orow = o + t * inter;
      int64_t i = 0;
      for (; i + 16 <= inter; i += 16) {
        const vf16 x = load16(gr + i);
        store16(orow + i, x / (1.f + cephes_exp(-x)) * load16(gr + inter + i));
      }
      for (; i < inter; ++i) {
        const float x = gr[i];
        orow[i] = x / (1.f + cephes_exp(-x)) * gr[inter + i];
      }
    }
  });
  return out;
}

}  // namespace ps

using namespace ps;

// Greedy decoding's argmax over each row of the logits [B, V] (float32, contiguous), as
// torch.argmax: the first index of the maximum, and the first NaN wins if a row has one. One
// vectorised pass finds the maximum (and any NaN), a second the first index holding it. ATen's
// argmax is ~4x slower on a [64, 49152] batch (2 ms, ~2% of a decode step).
at::Tensor argmax_rows(const at::Tensor& logits) {
  check_f32(logits, "logits");
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.size(1) > 0, "logits must be [B, V>0] contiguous");
  const int64_t B = logits.size(0), V = logits.size(1);
  auto out = at::empty({B}, logits.options().dtype(at::kLong));
  const float* lp = logits.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const float* row = lp + b * V;
      float m = row[0];
      bool nan = row[0] != row[0];
      int64_t i = 0;
      if (V >= 16) {
        vf16 vmax = load16(row);
        vi16 vnan = vmax != vmax;
        for (i = 16; i + 16 <= V; i += 16) {
          const vf16 v = load16(row + i);
          vmax = vselect(v > vmax, v, vmax);
          vnan |= v != v;
        }
        for (int l = 0; l < 16; ++l) {
          m = lane(vmax, l) > m ? lane(vmax, l) : m;
          nan |= lane(vnan, l) != 0;
        }
      }
      for (; i < V; ++i) {
        m = row[i] > m ? row[i] : m;
        nan |= row[i] != row[i];
      }
      int64_t at = 0;
      if (nan)
        while (!(row[at] != row[at])) ++at;
      else
        while (row[at] != m) ++at;
      op[b] = at;
    }
  });
  return out;
}

// Structured outputs: logits[r, t] = -inf wherever bit t of bitmask[r] (xgrammar's layout: int32
// words, bit t % 32 of word t / 32) is 0, for the given rows. Whole words decide most tokens (a
// grammar usually allows few), so a row costs about one pass of stores; xgrammar's own CPU kernel
// tests bit by bit and took ~7 ms on [64, 49152].
void apply_token_bitmask_(at::Tensor& logits, const at::Tensor& bitmask, const at::Tensor& rows) {
  check_f32(logits, "logits");
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "logits must be [B, V] contiguous");
  TORCH_CHECK(bitmask.dim() == 2 && bitmask.is_contiguous() && bitmask.scalar_type() == at::kInt &&
                  bitmask.size(0) >= logits.size(0) && bitmask.size(1) * 32 >= logits.size(1),
              "bitmask must be [>=B, ceil(V/32)] int32 contiguous");
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong, "rows must be a 1-D int64 tensor");
  const int64_t V = logits.size(1), W = bitmask.size(1), n = rows.size(0);
  float* lp = logits.data_ptr<float>();
  const int32_t* mp = bitmask.data_ptr<int32_t>();
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(rp[i] >= 0 && rp[i] < logits.size(0), "row index out of range");
  const float neg = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* row = lp + rp[i] * V;
      const int32_t* mask = mp + rp[i] * W;
      for (int64_t w = 0; w < W && w * 32 < V; ++w) {
        const uint32_t word = static_cast<uint32_t>(mask[w]);
        if (word == 0xFFFFFFFFu) continue;
        float* at = row + w * 32;
        const int64_t width = std::min<int64_t>(32, V - w * 32);
        if (word == 0) {
          for (int64_t j = 0; j < width; ++j) at[j] = neg;
        } else {
          for (int64_t j = 0; j < width; ++j)
            if (!((word >> j) & 1u)) at[j] = neg;
        }
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_decoder_stack(m);
  m.def("advise_huge_pages", &advise_huge_pages);
  m.def("write_kv", &write_kv);
  m.def("paged_decode_attention", &paged_decode_attention);
  m.def("paged_prefill_attention", &paged_prefill_attention);
  m.def("rotary_inplace", &rotary_inplace);
  m.def("rms_norm", &rms_norm);
  m.def("fused_add_rms_norm", &fused_add_rms_norm);
  m.def("silu_and_mul", &silu_and_mul);
  m.def("argmax_rows", &argmax_rows);
  m.def("apply_token_bitmask_", &apply_token_bitmask_);
  register_quant_linear(m);
}
