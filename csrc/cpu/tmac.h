// tmac.h -- plain C++ API of the table-lookup decode kernels (T-MAC style, exact fp32; no torch headers).
//
// Idea (T-MAC, Wei et al. 2024, without its int8 activation quantization): a weight whose code has p bit planes
// is sum_j coef_j(row, group) * bit_j, so sum_k w_k x_k splits per group into plane sums
// P_j = sum of x_k over the columns whose plane-j bit is 1. P_j of two consecutive columns is one of the 4
// subset sums of their activations, [0, a, b, a+b]: built once per call (per row of x), broadcast to both 128-bit
// halves of a ymm and read by `vpermilps`, whose index is the 2 plane bits of 8 different output rows -- so one
// shift + one vpermilps + one add covers 8 rows x 2 weights. The codes are repacked once per layer
// (row-interleaved, below) so that one 32-bit lane holds one row's bits.
//
// (Triples with 8-entry tables and the cross-lane `vpermps`, 8 rows x 3 weights per lookup, were the first plan:
// on the Zen 3 this was written on vpermps sustains one lookup per ~0.73 ns and vpermilps one per ~0.35 ns, so
// pairs are ~1.4x faster; they also fill every 32-column word exactly, so no group needs padding.)
//
// Repacked layout ("tmac v1", built by tmac_repack from the neutral bivlm-packed v1 layout; never saved):
//
//   codes  int32 [NB, W, PL, 8]      NB = ceil(N/8) blocks of 8 output rows (rows past N: code 0),
//                                    W = ceil(K/32) (tmac_words; K % 32 = 16 at g = 16: columns past K code 0),
//                                    lane r of [b, w, p] = plane p of row 8b + r, columns 32w .. 32w+31,
//                                    bit i = column 32w + i (the 1-bit neutral word order):
//
//          bit 31 30 | 29 28 | ...... | 3 2 | 1 0
//              pair 15 | p 14 | ...... | p 1 | p 0      pair t = columns 2t (bit 0 of its index), 2t + 1
//
//   coefs  fp32 [NB, K/g, NC, 8]     lane r = row 8b + r (rows past N: 0), per group:
//          1 bit  lut (c0, c1):           {c1 - c0, c0}                              PL = 1, NC = 2
//          2 bit  lut (c0, c1, c2, c3):   {c1 - c0, c2 - c0, c3 - c2 - c1 + c0, c0}  PL = 2, NC = 4
//                 (planes b0, b1 stored; the third plane b0 & b1 is one AND per word in the kernel)
//          4 bit  affine (scale, zero):   {scale, scale * zero}                      PL = 4, NC = 2
//                 (sum_k code_k x_k = sum_j 2^j P_j; y = scale * that - scale * zero * S_g)
//
//   With S_g the group sum of x:  lut y = sum_g [ c0 S_g + sum_j coef_j P_j ],  affine as above.
//   g = 16 (2 and 4 bit only): a group is half a code word, pairs 0..7 (even group) or 8..15 (odd group) of
//   word g/2; a word never spans two groups otherwise (g >= 32).
//
// Tables of one row of x (tmac_tables): fp32 [16 W, 4]; entry [t, i] = sum of x[2t + j] over the bits j of i
// (i.e. 16 bytes per column of x); the pairs past K (K % 32 = 16) are zero and never looked up.
#pragma once

#include <cstdint>

#include "kernels.h"

namespace bivlm_cpu {

inline int tmac_planes(int bits) { return bits == 1 ? 1 : (bits == 2 ? 2 : 4); }
inline int tmac_coefs(int bits) { return bits == 2 ? 4 : 2; }
constexpr int kTmacSteps = 16;                       // lookups per 32 columns (16 pairs)
constexpr int64_t kTmacTableFloats = kTmacSteps * 4;  // floats of table per 32 columns (4 per pair)
inline int64_t tmac_words(int64_t k) { return (k + 31) / 32; }   // 32-column code words (and tables) per row

// One repacked segment (a whole layer, or one column range of a mixed-bit layer).
struct TmacSegment {
  const int32_t* codes = nullptr;  // [NB, tmac_words(K), PL, 8]
  const float* coefs = nullptr;    // [NB, K/g, NC, 8]
  int64_t n = 0, k = 0;            // output rows, columns of this segment
  int bits = 1;                    // 1, 2 (lut) or 4 (affine)
  int group_size = 128;
};

// The tables of mc rows of x, for a segment's columns: x row i at x + i*ldx + col, k columns (k % 16 == 0);
// out [mc, tmac_words(k) * kTmacTableFloats] and xsum [mc, k/g] (group sums S_g).
void tmac_tables(const float* x, int64_t mc, int64_t ldx, int64_t col, int64_t k, int group_size, float* out,
                 float* xsum);

// y[i, n] (+)= sum_k x[i, k] w[n, k] (+ bias[n]) for the mc rows of x whose tables / group sums are given and the
// output rows of blocks [b0, b1) (rows 8*b0 .. min(8*b1, n)); accumulate: add to y (later segments).
void tmac_gemv(const TmacSegment& s, const float* tables, const float* xsum, int64_t mc, float* y, int64_t ldy,
               const float* bias, bool accumulate, int64_t b0, int64_t b1);

// Repack rows [n0, n1) of a neutral segment (kernels.h: Segment) into the layout above; n0, n1 multiples of 8
// or n1 = n. codes / coefs point at the start of the whole repacked buffers.
void tmac_repack(const Segment& s, int32_t* codes, float* coefs, int64_t n0, int64_t n1);

namespace scalar {
void tmac_tables(const float* x, int64_t mc, int64_t ldx, int64_t col, int64_t k, int group_size, float* out,
                 float* xsum);
void tmac_gemv(const TmacSegment& s, const float* tables, const float* xsum, int64_t mc, float* y, int64_t ldy,
               const float* bias, bool accumulate, int64_t b0, int64_t b1);
}  // namespace scalar
namespace avx2 {
void tmac_tables(const float* x, int64_t mc, int64_t ldx, int64_t col, int64_t k, int group_size, float* out,
                 float* xsum);
void tmac_gemv(const TmacSegment& s, const float* tables, const float* xsum, int64_t mc, float* y, int64_t ldy,
               const float* bias, bool accumulate, int64_t b0, int64_t b1);
}  // namespace avx2

}  // namespace bivlm_cpu
