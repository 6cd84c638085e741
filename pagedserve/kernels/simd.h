// One float vector type for the linear kernels, over whatever the build's target has: AVX-512
// (16 lanes), AVX2 + FMA (8 lanes) or plain C++ (8 lanes, which the compiler maps to NEON or SSE).
//
// Every level computes each lane with the same operations in the same order (a fused multiply-add is
// a fused multiply-add everywhere, std::fma in plain C++), so a kernel's results are the same bits on
// every CPU: the AVX2 build is checked against the AVX-512 one bit for bit (tests/kernels).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace simd {

#if defined(__AVX512F__)

constexpr const char* kLevel = "avx512";
constexpr int kLanes = 16;
struct VecF {
  __m512 v;
};
inline VecF zero() { return {_mm512_setzero_ps()}; }
inline VecF load(const float* p) { return {_mm512_loadu_ps(p)}; }
inline void store(float* p, VecF a) { _mm512_storeu_ps(p, a.v); }
inline VecF set1(float x) { return {_mm512_set1_ps(x)}; }
inline VecF fmadd(VecF a, VecF b, VecF c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline VecF mul(VecF a, VecF b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline VecF add(VecF a, VecF b) { return {_mm512_add_ps(a.v, b.v)}; }
inline __m512i bytes(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline VecF from_u8(const uint8_t* p) { return {_mm512_cvtepi32_ps(bytes(p))}; }
inline VecF from_i8(const uint8_t* p) {
  return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
}
inline VecF from_lo4(const uint8_t* p) { return {_mm512_cvtepi32_ps(_mm512_and_si512(bytes(p), _mm512_set1_epi32(0xF)))}; }
inline VecF from_hi4(const uint8_t* p) { return {_mm512_cvtepi32_ps(_mm512_srli_epi32(bytes(p), 4))}; }
inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }

#elif defined(__AVX2__) && defined(__FMA__)

constexpr const char* kLevel = "avx2";
constexpr int kLanes = 8;
struct VecF {
  __m256 v;
};
inline VecF zero() { return {_mm256_setzero_ps()}; }
inline VecF load(const float* p) { return {_mm256_loadu_ps(p)}; }
inline void store(float* p, VecF a) { _mm256_storeu_ps(p, a.v); }
inline VecF set1(float x) { return {_mm256_set1_ps(x)}; }
inline VecF fmadd(VecF a, VecF b, VecF c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline VecF mul(VecF a, VecF b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline VecF add(VecF a, VecF b) { return {_mm256_add_ps(a.v, b.v)}; }
inline __m256i bytes(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
inline VecF from_u8(const uint8_t* p) { return {_mm256_cvtepi32_ps(bytes(p))}; }
inline VecF from_i8(const uint8_t* p) {
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))))};
}
inline VecF from_lo4(const uint8_t* p) { return {_mm256_cvtepi32_ps(_mm256_and_si256(bytes(p), _mm256_set1_epi32(0xF)))}; }
inline VecF from_hi4(const uint8_t* p) { return {_mm256_cvtepi32_ps(_mm256_srli_epi32(bytes(p), 4))}; }
inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }

#else

constexpr const char* kLevel = "generic";
constexpr int kLanes = 8;
struct VecF {
  float v[kLanes];
};
template <typename Fn>
inline VecF lanes(Fn fn) {
  VecF r;
  for (int i = 0; i < kLanes; ++i) r.v[i] = fn(i);
  return r;
}
inline VecF zero() { return lanes([](int) { return 0.f; }); }
inline VecF load(const float* p) { return lanes([p](int i) { return p[i]; }); }
inline void store(float* p, VecF a) { std::memcpy(p, a.v, sizeof(a.v)); }
inline VecF set1(float x) { return lanes([x](int) { return x; }); }
inline VecF fmadd(VecF a, VecF b, VecF c) { return lanes([&](int i) { return std::fma(a.v[i], b.v[i], c.v[i]); }); }
inline VecF mul(VecF a, VecF b) { return lanes([&](int i) { return a.v[i] * b.v[i]; }); }
inline VecF add(VecF a, VecF b) { return lanes([&](int i) { return a.v[i] + b.v[i]; }); }
inline VecF from_u8(const uint8_t* p) { return lanes([p](int i) { return static_cast<float>(p[i]); }); }
inline VecF from_i8(const uint8_t* p) {
  return lanes([p](int i) { return static_cast<float>(static_cast<int8_t>(p[i])); });
}
inline VecF from_lo4(const uint8_t* p) { return lanes([p](int i) { return static_cast<float>(p[i] & 0xF); }); }
inline VecF from_hi4(const uint8_t* p) { return lanes([p](int i) { return static_cast<float>(p[i] >> 4); }); }
inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 2); }

#endif

// Which integer dot product the W8A8 kernel uses (quant_linear.cpp).
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr const char* kIntDot = "avx512_vnni";
#elif defined(__AVXVNNI__)
constexpr const char* kIntDot = "avx_vnni";
#elif defined(__AVX2__)
constexpr const char* kIntDot = "avx2";
#else
constexpr const char* kIntDot = "generic";
#endif

}  // namespace simd
