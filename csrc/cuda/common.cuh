// common.cuh -- device helpers shared by the bivlm kernels (no torch headers).
//
// Conventions: T is the activation/table type (__half, __nv_bfloat16 or float); all arithmetic is fp32.
// Codes are read from a 32-bit word q least significant bits first (bivlm-packed v1):
//
//     b = 1:  code j = (q >> j)       & 0x1     j in 0..31
//     b = 2:  code j = (q >> 2j)      & 0x3     j in 0..15
//     b = 4:  code j = (q >> 4j)      & 0xF     j in 0..7
//
// Kernels consume a word in "sub-chunks" of 8 consecutive codes (8 activations = one 16-byte load of half/bf16).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "bivlm_kernels.h"
#include "ptx.cuh"

namespace bivlm {
namespace detail {

// Codes per 32-bit word for a bit width.
template <int BITS>
struct Codes {
  static_assert(BITS == 1 || BITS == 2 || BITS == 4, "bits must be 1, 2 or 4");
  static constexpr int kPerWord = 32 / BITS;        // 32, 16, 8
  static constexpr int kSubChunks = kPerWord / 8;   // 4, 2, 1 sub-chunks of 8 codes
  static constexpr int kEntries = 1 << BITS;        // lut entries (2, 4); unused for affine
  static constexpr uint32_t kMask = (1u << BITS) - 1u;
};

// ---- scalar conversions: what the reference's .float() / .to(dtype) do (round to nearest even) ----------------

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(float v) { return v; }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }

// ---- activations: 8 consecutive elements as fp32 -------------------------------------------------------------
// What: one 16-byte load (two for fp32) of x[k .. k+8) through the read-only path, widened to fp32.
// Why: x is small and re-read by every warp of the grid, so it should stay in L1/L2 (plain cached loads), while
// weights stream past it (see load_words). p must be 16-byte aligned (the launcher checks ldx and the base).

__device__ __forceinline__ void load8(const __half* p, float (&f)[8]) {
  const uint4 v = ptx::ld_nc_v4(p);
  const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __half22float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

__device__ __forceinline__ void load8(const __nv_bfloat16* p, float (&f)[8]) {
  const uint4 v = ptx::ld_nc_v4(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __bfloat1622float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

__device__ __forceinline__ void load8(const float* p, float (&f)[8]) {
  const float4 a = ptx::ld_nc_f4(p);
  const float4 b = ptx::ld_nc_f4(p + 4);
  f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
  f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
}

// ---- outputs: store 8 consecutive fp32 values as T -----------------------------------------------------------
// What: one 16-byte store (two for fp32) of out[k .. k+8). Why: the dequantize kernel writes N*K elements, the
// largest stream of the large-M path, so its stores must be full 16-byte transactions. p must be 16-byte aligned.

__device__ __forceinline__ void store8(__half* p, const float (&f)[8]) {
  uint4 v;
  __half2* h = reinterpret_cast<__half2*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
  ptx::st_v4(p, v);
}

__device__ __forceinline__ void store8(__nv_bfloat16* p, const float (&f)[8]) {
  uint4 v;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
  ptx::st_v4(p, v);
}

__device__ __forceinline__ void store8(float* p, const float (&f)[8]) {
#pragma unroll
  for (int h = 0; h < 2; ++h)
    ptx::st_v4(p + 4 * h, make_uint4(__float_as_uint(f[4 * h]), __float_as_uint(f[4 * h + 1]),
                                     __float_as_uint(f[4 * h + 2]), __float_as_uint(f[4 * h + 3])));
}

// ---- packed weights ------------------------------------------------------------------------------------------
// What: VEC consecutive words of one row (VEC = 4: one 16-byte load; VEC = 1: one 4-byte load).
// Why: ld.global.cs, "streaming, likely accessed once": every weight word is read exactly once per call,
// so it is marked evict-first and does not push the activations out of L1/L2.
template <int VEC>
__device__ __forceinline__ void load_words(const int32_t* p, uint32_t (&q)[VEC]);

template <>
__device__ __forceinline__ void load_words<4>(const int32_t* p, uint32_t (&q)[4]) {
  const uint4 v = ptx::ld_cs_v4(p);
  q[0] = v.x; q[1] = v.y; q[2] = v.z; q[3] = v.w;
}

template <>
__device__ __forceinline__ void load_words<1>(const int32_t* p, uint32_t (&q)[1]) {
  q[0] = static_cast<uint32_t>(ptx::ld_cs_b32(p));
}

// What: exact fp32 value of a small unsigned code c (< 2^23) without an I2F instruction.
// Why: 0x4B000000 is 2^23 as fp32; OR-ing c into the mantissa gives 2^23 + c exactly, and subtracting 2^23 leaves
// c exactly (one LOP3 + one FADD, both full rate, where I2F runs at quarter rate).
__device__ __forceinline__ float code_to_float(uint32_t c) {
  return __uint_as_float(0x4B000000u | c) - 8388608.0f;
}

// ---- per-(row, group) table in registers ---------------------------------------------------------------------
// What: e[] holds the group's parameters as fp32: lut b=1: e[0..1] = codebook entries; lut b=2: e[0..3];
// affine b=4: e[0] = scale, e[1] = zero (the GEMV adds e[2] = -zero * scale). Why: a group covers >= 32 codes (a whole word or more), so the table
// is loaded once per word at most and every code is decoded from registers (no shared memory, no bank conflicts).
template <typename T, int BITS>
__device__ __forceinline__ void load_table(const T* __restrict__ t0, const T* __restrict__ t1, int64_t idx,
                                           float (&e)[4]) {
  if constexpr (BITS == 4) {
    e[0] = to_float(t0[idx]);  // scale
    e[1] = to_float(t1[idx]);  // zero
  } else {
    const T* cb = t0 + idx * Codes<BITS>::kEntries;
#pragma unroll
    for (int i = 0; i < Codes<BITS>::kEntries; ++i) e[i] = to_float(cb[i]);
  }
}

// What: decode codes 8*sub .. 8*sub+7 of word q into fp32 weights w[0..7], using the group table e.
// Why: sub is a compile-time constant after unrolling, so every shift/mask is an immediate; the lut lookup is a
// select tree on registers (b=1: one select, b=2: three). Affine, FMA = false: (c - zero) * scale in fp32 exactly
// as the reference computes it (two FP ops, no contraction: the dequantize kernel is bit-exact). Affine,
// FMA = true (GEMV): c * scale + e[2] with e[2] = -zero * scale precomputed per group (one FFMA; differs from the
// reference by fp32 rounding only, far below the fp16/bf16 output rounding).
template <int BITS, bool FMA = false>
__device__ __forceinline__ void dequant8(uint32_t q, int sub, const float (&e)[4], float (&w)[8]) {
#pragma unroll
  for (int t = 0; t < 8; ++t) {
    const uint32_t c = (q >> ((sub * 8 + t) * BITS)) & Codes<BITS>::kMask;
    if constexpr (BITS == 1) {
      w[t] = c ? e[1] : e[0];
    } else if constexpr (BITS == 2) {
      const float lo = (c & 1u) ? e[1] : e[0];   // codes 0, 1
      const float hi = (c & 1u) ? e[3] : e[2];   // codes 2, 3
      w[t] = (c & 2u) ? hi : lo;
    } else {
      if constexpr (FMA) {
        w[t] = fmaf(code_to_float(c), e[0], e[2]);                  // code * scale - zero * scale
      } else {
        w[t] = __fmul_rn(__fsub_rn(code_to_float(c), e[1]), e[0]);  // (code - zero) * scale, never contracted
      }
    }
  }
}

// What: sum of v over the 32 lanes of a warp (butterfly; every lane ends with the total).
// Why: each lane accumulates a strided slice of K; one reduction per output at the end of the K loop.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += ptx::shfl_xor(v, off);
  return v;
}

// The M bucket (MT = 1, 2, 4, 8, 16) a decode GEMV launcher instantiates for m rows of x.
inline int gemv_mt(int64_t m) { return m <= 1 ? 1 : m <= 2 ? 2 : m <= 4 ? 4 : m <= 8 ? 8 : 16; }

// What: one output of a decode GEMV, y[mi, row] = v (+ bias[row] when add_bias): the fp32 partial of split `split`
// ([splits, m, n]) when out_f32 is set, else the final value in T ([m, n]). Why: the output contract of
// launch_gemv / launch_gemv_tc (bivlm_kernels.h), shared by the CUDA-core and tensor-core kernels.
template <typename T>
__device__ __forceinline__ void store_output(T* out, float* out_f32, const T* bias, bool add_bias, int split, int m,
                                             int n, int mi, int row, float v) {
  if (add_bias) v += to_float(bias[row]);
  if (out_f32 != nullptr) {
    out_f32[(static_cast<int64_t>(split) * m + mi) * n + row] = v;
  } else {
    out[static_cast<int64_t>(mi) * n + row] = from_float<T>(v);
  }
}

// log2 of a power of two (host and device).
__host__ __device__ inline int ilog2(int v) {
  int r = 0;
  while ((1 << r) < v) ++r;
  return r;
}

}  // namespace detail
}  // namespace bivlm
