// 16 floats as one value for the attention, norm and activation kernels (cpu_ops.cpp).
//
// With AVX-512 it is GCC's 64-byte vector type: one register. Without AVX-512 there is no machine
// mode for a 64-byte vector, and GCC keeps such values in memory (each add a store and a reload), so
// there vf16 is a pair of 32-byte vectors (two AVX2 registers, or what the target's compiler makes
// of them) with the same operators. Each lane does the same operation either way: the same bits.
//
// The few things operators cannot say are functions for both forms: vselect (a ? b : c per lane),
// vbits (reinterpret the bits), vconvert (convert each lane), lane (read one lane), vload / vstore.
#pragma once

#include <cstdint>
#include <cstring>

namespace ps {

#if defined(__AVX512F__)

typedef float vf16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));
typedef uint32_t vu16 __attribute__((vector_size(64)));

template <typename M, typename V>
inline V vselect(M mask, V a, V b) {
  return mask ? a : b;
}
template <typename To, typename From>
inline To vbits(From v) {
  return reinterpret_cast<To>(v);
}
template <typename To, typename From>
inline To vconvert(From v) {
  return __builtin_convertvector(v, To);
}
template <typename V>
inline auto lane(V v, int l) {
  return v[l];
}
inline vf16 vload(const float* p) {
  vf16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void vstore(float* p, vf16 v) { std::memcpy(p, &v, sizeof(v)); }

#else

template <typename H>
struct Wide {
  using Half = H;
  H lo, hi;
  Wide& operator+=(Wide b) { return lo += b.lo, hi += b.hi, *this; }
  Wide& operator|=(Wide b) { return lo |= b.lo, hi |= b.hi, *this; }
};

typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
typedef uint32_t vu8 __attribute__((vector_size(32)));
typedef Wide<vf8> vf16;
typedef Wide<vi8> vi16;
typedef Wide<vu8> vu16;

#define PS_WIDE_BINARY(op)                                                      \
  template <typename H>                                                         \
  inline auto operator op(Wide<H> a, Wide<H> b) {                               \
    return Wide<decltype(a.lo op b.lo)>{a.lo op b.lo, a.hi op b.hi};            \
  }                                                                             \
  template <typename H, typename S>                                             \
  inline auto operator op(Wide<H> a, S s) -> Wide<decltype(a.lo op s)> {        \
    return {a.lo op s, a.hi op s};                                              \
  }                                                                             \
  template <typename H, typename S>                                             \
  inline auto operator op(S s, Wide<H> a) -> Wide<decltype(s op a.lo)> {        \
    return {s op a.lo, s op a.hi};                                              \
  }
PS_WIDE_BINARY(+)
PS_WIDE_BINARY(-)
PS_WIDE_BINARY(*)
PS_WIDE_BINARY(/)
PS_WIDE_BINARY(&)
PS_WIDE_BINARY(|)
PS_WIDE_BINARY(<<)
PS_WIDE_BINARY(>>)
PS_WIDE_BINARY(<)
PS_WIDE_BINARY(>)
PS_WIDE_BINARY(!=)
#undef PS_WIDE_BINARY

template <typename H>
inline Wide<H> operator-(Wide<H> a) {
  return {-a.lo, -a.hi};
}
template <typename H>
inline Wide<H> operator~(Wide<H> a) {
  return {~a.lo, ~a.hi};
}

template <typename M, typename H>
inline Wide<H> vselect(Wide<M> mask, Wide<H> a, Wide<H> b) {
  return {mask.lo ? a.lo : b.lo, mask.hi ? a.hi : b.hi};
}
template <typename To, typename H>
inline To vbits(Wide<H> v) {
  return {reinterpret_cast<typename To::Half>(v.lo), reinterpret_cast<typename To::Half>(v.hi)};
}
template <typename To, typename H>
inline To vconvert(Wide<H> v) {
  return {__builtin_convertvector(v.lo, typename To::Half), __builtin_convertvector(v.hi, typename To::Half)};
}
template <typename H>
inline auto lane(Wide<H> v, int l) {
  return l < 8 ? v.lo[l] : v.hi[l - 8];
}
// Half by half: a copy into the pair as a whole goes through the stack.
inline vf16 vload(const float* p) {
  vf16 v;
  std::memcpy(&v.lo, p, sizeof(v.lo));
  std::memcpy(&v.hi, p + 8, sizeof(v.hi));
  return v;
}
inline void vstore(float* p, vf16 v) {
  std::memcpy(p, &v.lo, sizeof(v.lo));
  std::memcpy(p + 8, &v.hi, sizeof(v.hi));
}

#endif

// Scalars, so that templates over a scalar or a vf16 (cephes_exp) read the same.
template <typename V>
inline V vselect(bool mask, V a, V b) {
  return mask ? a : b;
}

static_assert(sizeof(vf16) == 64, "vf16 holds 16 floats, lo then hi");

}  // namespace ps
