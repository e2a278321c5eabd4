// ptx_mma.cuh -- the tensor-core part of the wrapper header ptx.cuh (include ptx.cuh; it includes this file):
// ldmatrix.m8n8.b16 and mma.sync.m16n8k16 with fp16 or bf16 inputs and fp32 accumulation, device and host.
//
// Notation of the PTX ISA ("Matrix fragments for mma.m16n8k16"): lane = 0..31, g = lane >> 2 (group),
// t = lane & 3 (thread in group). A 32-bit register holds two 16-bit elements, the lower-indexed one in bits
// 0..15. The layouts below are what the host implementations compute and what tests/cuda_host/test_ptx.cpp checks.
//
//   A (16 x 16, row-major operand), 4 registers a0..a3 per lane:      B (16 x 8, "col" operand), b0..b1:
//              cols 0..7          cols 8..15                                   col n = g
//   rows 0..7  a0 = (g,   2t..2t+1) a2 = (g,   2t+8..2t+9)           b0 = (k = 2t..2t+1,   g)
//   rows 8..15 a1 = (g+8, 2t..2t+1) a3 = (g+8, 2t+8..2t+9)           b1 = (k = 2t+8..2t+9, g)
//
//   C, D (16 x 8, fp32), 4 floats c0..c3:  c0, c1 = (g, 2t), (g, 2t+1);  c2, c3 = (g+8, 2t), (g+8, 2t+1)
//
//   ldmatrix .x1/.x2/.x4: matrices j = 0..N-1 are 8 x 8 b16; lane 8j + r gives the address of row r of matrix j
//   (16 contiguous bytes, 16-byte aligned). Register j of lane l receives row l >> 2, columns 2(l & 3) and
//   2(l & 3) + 1 of matrix j -- the A/B fragment order above; with .trans, of the transposed matrix.
#pragma once

#include <cmath>

#include "ptx.cuh"

namespace bivlm {
namespace ptx {

#if defined(BIVLM_HOST_BUILD)
namespace hostimpl {

struct LdmatrixSlot {
  const void* addr;
  uint32_t out[4];
};

template <int N, bool TRANS>
void ldmatrix_combine(void* const* slots, unsigned) {
  for (int j = 0; j < N; ++j) {
    const unsigned char* rows[8];
    for (int r = 0; r < 8; ++r) {
      rows[r] = static_cast<const unsigned char*>(static_cast<LdmatrixSlot*>(slots[8 * j + r])->addr);
      check_aligned(rows[r], 16, "ldmatrix (row address)");
    }
    auto elem = [&](int r, int c) {
      uint16_t e;
      std::memcpy(&e, rows[r] + 2 * c, 2);
      return static_cast<uint32_t>(e);
    };
    for (int l = 0; l < 32; ++l) {
      const int r = l >> 2, c = 2 * (l & 3);
      const uint32_t lo = TRANS ? elem(c, r) : elem(r, c);
      const uint32_t hi = TRANS ? elem(c + 1, r) : elem(r, c + 1);
      static_cast<LdmatrixSlot*>(slots[l])->out[j] = lo | hi << 16;
    }
  }
}

struct MmaSlot {
  uint32_t a[4], b[2];
  float c[4], d[4];
};

inline float lo16(uint32_t r, bool bf16) {
  const uint16_t h = static_cast<uint16_t>(r & 0xFFFFu);
  return bf16 ? host::bf16_bits_to_f32(h) : host::f16_bits_to_f32(h);
}
inline float hi16(uint32_t r, bool bf16) {
  const uint16_t h = static_cast<uint16_t>(r >> 16);
  return bf16 ? host::bf16_bits_to_f32(h) : host::f16_bits_to_f32(h);
}

// D = A B + C from the 32 lanes' fragments. The products of two fp16/bf16 values are exact in double, their sum
// with C is rounded once to fp32 (the hardware's internal accumulation order/rounding is not specified by the
// ISA; tests must allow one fp32 rounding per k-step of 16).
template <bool BF16>
void mma_combine(void* const* slots, unsigned) {
  float A[16][16], B[16][8], C[16][8];
  for (int l = 0; l < 32; ++l) {
    const MmaSlot& s = *static_cast<const MmaSlot*>(slots[l]);
    const int g = l >> 2, t = l & 3;
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i & 1), col = 2 * t + 8 * (i >> 1);
      A[row][col] = lo16(s.a[i], BF16);
      A[row][col + 1] = hi16(s.a[i], BF16);
    }
    for (int i = 0; i < 2; ++i) {
      B[2 * t + 8 * i][g] = lo16(s.b[i], BF16);
      B[2 * t + 8 * i + 1][g] = hi16(s.b[i], BF16);
    }
    for (int i = 0; i < 4; ++i) C[g + 8 * (i >> 1)][2 * t + (i & 1)] = s.c[i];
  }
  for (int l = 0; l < 32; ++l) {
    MmaSlot& s = *static_cast<MmaSlot*>(slots[l]);
    const int g = l >> 2, t = l & 3;
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
      double acc = C[row][col];
      for (int k = 0; k < 16; ++k) acc += static_cast<double>(A[row][k]) * static_cast<double>(B[k][col]);
      s.d[i] = static_cast<float>(acc);
    }
  }
}

template <bool BF16>
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  MmaSlot s;
  std::memcpy(s.a, a, sizeof(s.a));
  std::memcpy(s.b, b, sizeof(s.b));
  std::memcpy(s.c, c, sizeof(s.c));  // d may alias c: read everything before writing
  host::warp_collective(0xffffffffu, BF16 ? "mma.sync.m16n8k16.bf16" : "mma.sync.m16n8k16.f16", &s,
                        &mma_combine<BF16>);
  std::memcpy(d, s.d, sizeof(s.d));
}

}  // namespace hostimpl
#endif

// What: N (1, 2 or 4) 8x8 b16 matrices from shared memory into fragments, optionally transposed (ldmatrix.sync.
// aligned.m8n8.xN[.trans].shared.b16; layout above). Why: one instruction gives a warp an mma operand in the
// fragment order, whatever the smem layout of the rows. Every lane calls it; lanes >= 8N pass any address.
template <int N, bool TRANS = false>
BIVLM_PTX void ldmatrix(uint32_t (&r)[N], const void* smem_row) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
#if defined(BIVLM_HOST_BUILD)
  hostimpl::LdmatrixSlot s{smem_row, {0, 0, 0, 0}};
  static const char* const names[2][5] = {
      {"", "ldmatrix.x1", "ldmatrix.x2", "", "ldmatrix.x4"},
      {"", "ldmatrix.x1.trans", "ldmatrix.x2.trans", "", "ldmatrix.x4.trans"}};
  host::warp_collective(0xffffffffu, names[TRANS][N], &s, &hostimpl::ldmatrix_combine<N, TRANS>);
  for (int j = 0; j < N; ++j) r[j] = s.out[j];
#else
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  if constexpr (N == 1 && !TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(addr));
  } else if constexpr (N == 1) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(addr));
  } else if constexpr (N == 2 && !TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
  } else if constexpr (N == 2) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(addr));
  } else if constexpr (!TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  }
#endif
}

// What: d = a * b + c on two packed fp16 (fma.rn.f16x2) or bf16 (fma.rn.bf16x2) lanes. Why: the 4-bit
// tensor-core decode turns magic-exponent codes (1024 + c, 128 + c) into exact small integers with one HFMA2.
// Host: each lane as fp32 fma then rounded to 16 bits -- exact wherever the exact result is representable (the
// decode's case); in general it may differ from the hardware's single rounding by a double rounding.
template <bool BF16>
BIVLM_PTX uint32_t hfma2(uint32_t a, uint32_t b, uint32_t c) {
#if defined(BIVLM_HOST_BUILD)
  uint32_t d = 0;
  for (int h = 0; h < 2; ++h) {
    const float r = std::fma(h ? hostimpl::hi16(a, BF16) : hostimpl::lo16(a, BF16),
                             h ? hostimpl::hi16(b, BF16) : hostimpl::lo16(b, BF16),
                             h ? hostimpl::hi16(c, BF16) : hostimpl::lo16(c, BF16));
    const uint32_t bits = BF16 ? host::f32_to_bf16_bits(r) : host::f32_to_f16_bits(r);
    d |= bits << (16 * h);
  }
  return d;
#else
  uint32_t d;
  if constexpr (BF16) {
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  } else {
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  }
  return d;
#endif
}

// What: D = A B + C on the tensor cores, m16n8k16, A row-major / B column-major fp16, fp32 C and D
// (mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32; fragments above). d may be the same array as c.
BIVLM_PTX void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
#if defined(BIVLM_HOST_BUILD)
  hostimpl::mma_m16n8k16<false>(d, a, b, c);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
#endif
}

// The same with bf16 A and B (mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32).
BIVLM_PTX void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                 const float (&c)[4]) {
#if defined(BIVLM_HOST_BUILD)
  hostimpl::mma_m16n8k16<true>(d, a, b, c);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
#endif
}

}  // namespace ptx
}  // namespace bivlm
