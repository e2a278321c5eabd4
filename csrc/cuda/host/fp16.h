// host/fp16.h -- __half and __nv_bfloat16 for the host build of csrc/cuda/ (replaces cuda_fp16.h / cuda_bf16.h).
//
// Why our own types and not the toolkit's headers: CI machines may have no CUDA toolkit at all, and the host
// build must not depend on one. Only what the kernels use is here; a kernel that needs more fails to compile in
// the host build, which is the signal to add it here (with a test in tests/cuda_host/).
//
// Storage: one uint16_t of IEEE binary16 / bfloat16 bits (same size and alignment as on the GPU, so the
// reinterpret_casts of 16-byte loads into __half2 arrays see the same layout: element 0 in the low half).
// Conversions float -> 16 bit round to nearest, ties to even, as __float2half_rn / __float2bfloat16_rn do;
// NaN stays NaN (quiet), overflow goes to infinity. Widening to float is exact.
#pragma once

#include <cstdint>
#include <cstring>

#include "runtime.h"

struct __half {
  uint16_t x;
};
struct __nv_bfloat16 {
  uint16_t x;
};
struct alignas(4) __half2 {
  __half x, y;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

namespace bivlm {
namespace host {

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// float -> binary16, round to nearest even (handles subnormal results, overflow to inf, NaN).
inline uint16_t f32_to_f16_bits(float f) {
  const uint32_t u = f32_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) return static_cast<uint16_t>(sign | (a > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520: rounds to inf
  const int e = static_cast<int>(a >> 23) - 127;                      // unbiased exponent of f
  if (e >= -14) {
    // Normal half: keep 10 mantissa bits of 23, round the 13 dropped ones.
    const uint32_t m = a & 0x7fffffu;
    uint32_t h = (static_cast<uint32_t>(e + 15) << 10) | (m >> 13);
    const uint32_t rest = m & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is still right
    return static_cast<uint16_t>(sign | h);
  }
  if (e < -25) return static_cast<uint16_t>(sign);  // below half the smallest subnormal (2^-25): to zero
  // Subnormal half: value = m24 * 2^(e-23) with the implicit bit; half subnormal unit is 2^-24.
  const uint32_t m24 = (a & 0x7fffffu) | 0x800000u;
  const int shift = -e - 1;  // 14 .. 24: bits of m24 below the 2^-24 unit
  uint32_t h = m24 >> shift;
  const uint32_t rest = m24 & ((1u << shift) - 1u);
  const uint32_t halfway = 1u << (shift - 1);
  if (rest > halfway || (rest == halfway && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

inline float f16_bits_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu;
  const uint32_t m = h & 0x3ffu;
  if (e == 0x1fu) return bits_f32(sign | 0x7f800000u | (m << 13) | (m ? 0x400000u : 0u));
  if (e == 0) {
    const float v = static_cast<float>(m) * 5.9604644775390625e-8f;  // m * 2^-24, exact
    return sign ? -v : v;
  }
  return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}

// float -> bfloat16, round to nearest even (the top 16 bits of the float, rounded).
inline uint16_t f32_to_bf16_bits(float f) {
  const uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  const uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);  // ties to even; overflow carries into inf
  return static_cast<uint16_t>(rounded >> 16);
}

inline float bf16_bits_to_f32(uint16_t b) { return bits_f32(static_cast<uint32_t>(b) << 16); }

}  // namespace host
}  // namespace bivlm

// ---- the CUDA conversion intrinsics the kernels use (names and semantics of cuda_fp16.h / cuda_bf16.h) --------

inline float __half2float(__half h) { return bivlm::host::f16_bits_to_f32(h.x); }
inline __half __float2half_rn(float f) { return __half{bivlm::host::f32_to_f16_bits(f)}; }
inline float __bfloat162float(__nv_bfloat16 b) { return bivlm::host::bf16_bits_to_f32(b.x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{bivlm::host::f32_to_bf16_bits(f)}; }

inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half_rn(a), __float2half_rn(b)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return float2{__bfloat162float(h.x), __bfloat162float(h.y)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return __nv_bfloat162{__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}
