// tmac_avx2.cpp -- AVX2 + FMA table-lookup kernels over the repacked layout of tmac.h. No torch headers; compiled
// for AVX2 by a target pragma and called only after the CPUID check (use_avx2), like kernels_avx2.cpp (and for the
// same reason only <cstdint> and intrinsics: no std:: templates).
//
// Per pair of columns of one row of x: a 4-float table [0 a b a+b] (tmac_tables), broadcast to both 128-bit
// halves. Per 8 output rows and code plane:
//
//   c = codes[b, w, p, 0..8]                   one lane per row: its 32 plane bits of columns 32w .. 32w+31
//   P += vpermilps(T[16w + t], c >> 2t)        t = 0..15: vpermilps reads only bits 1..0 of each lane, so the
//                                              bits above need no mask
//
// i.e. 3 vector ops per 8 rows x 2 weights. A table load serves every code word of the block group (RB blocks x
// planes), a shifted index every row of x of the pass (MT). A group ends with one FMA per coefficient and 8 rows
// (tmac.h: coefs); the rows of x are walked inside a block group so its codes stay in L1.
#include <cstdint>

#include "kernels.h"
#include "tmac.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

namespace bivlm_cpu {
namespace avx2 {
namespace {

// The 4 subset sums of a pair, [0 a b a+b], in both 128-bit halves (vpermilps looks up within each half).
inline __m256 load_table(const float* t) { return _mm256_broadcast_ps(reinterpret_cast<const __m128*>(t)); }

// acc[t][q] += the lookups of pairs [S0, S1) of code word c[q] in the tables of row t of x (tab[t][0 .. 64)),
// for NW words and MT rows of x: each shifted index serves the MT rows, each table load the NW words. All 16
// pairs, or one half (g = 16: a group is 8 pairs). With few chains (MT = 1, NW < 4) even and odd pairs go to
// separate sums, so that the adds' latency does not bound the loop.
template <int NW, int MT, int S0 = 0, int S1 = 16>
inline void word_sums(const float* const* tab, const __m256i* c, __m256 (*acc)[NW]) {
  if (MT == 1 && NW < 4) {
    __m256 e[NW], o[NW];
    for (int q = 0; q < NW; ++q) e[q] = _mm256_setzero_ps(), o[q] = _mm256_setzero_ps();
#pragma GCC unroll 8
    for (int st = S0; st < S1; st += 2) {
      const __m256 t0 = load_table(tab[0] + 4 * st), t1 = load_table(tab[0] + 4 * st + 4);
      for (int q = 0; q < NW; ++q) {
        e[q] = _mm256_add_ps(e[q], _mm256_permutevar_ps(t0, _mm256_srli_epi32(c[q], 2 * st)));
        o[q] = _mm256_add_ps(o[q], _mm256_permutevar_ps(t1, _mm256_srli_epi32(c[q], 2 * st + 2)));
      }
    }
    for (int q = 0; q < NW; ++q) acc[0][q] = _mm256_add_ps(acc[0][q], _mm256_add_ps(e[q], o[q]));
    return;
  }
#pragma GCC unroll 16
  for (int st = S0; st < S1; ++st) {
    __m256i idx[NW];
    for (int q = 0; q < NW; ++q) idx[q] = _mm256_srli_epi32(c[q], 2 * st);
    for (int t = 0; t < MT; ++t) {
      const __m256 tv = load_table(tab[t] + 4 * st);
      for (int q = 0; q < NW; ++q) acc[t][q] = _mm256_add_ps(acc[t][q], _mm256_permutevar_ps(tv, idx[q]));
    }
  }
}

// Output rows of blocks [b, b + RB) for rows [i0, i0 + MT) of x: lookups of PL stored planes (+ b0 & b1 at 2 bits).
template <int BITS, int RB, int MT>
void blocks(const TmacSegment& s, const float* tables, const float* xsum, int64_t i0, float* y, int64_t ldy,
            const float* bias, bool accumulate, int64_t b) {
  constexpr int PL = BITS == 1 ? 1 : (BITS == 2 ? 2 : 4), NP = BITS == 2 ? 3 : PL, NC = BITS == 2 ? 4 : 2;
  constexpr int NW = RB * NP;
  const int64_t w32 = tmac_words(s.k), groups = s.k / s.group_size;
  const int64_t wpg = s.group_size < 32 ? 1 : s.group_size / 32;   // code words a group touches (g = 16: half)
  const float* tab[MT];
  for (int t = 0; t < MT; ++t) tab[t] = tables + (i0 + t) * w32 * kTmacTableFloats;
  __m256 yv[MT][RB];
  for (int t = 0; t < MT; ++t)
    for (int rb = 0; rb < RB; ++rb) yv[t][rb] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256 p[MT][NW];   // plane sums of the group: [row of x][block * NP + plane]
    for (int t = 0; t < MT; ++t)
      for (int q = 0; q < NW; ++q) p[t][q] = _mm256_setzero_ps();
    const int64_t w0 = s.group_size < 32 ? g / 2 : g * wpg;
    for (int64_t w = w0; w < w0 + wpg; ++w) {
      __m256i c[NW];
      for (int rb = 0; rb < RB; ++rb) {
        const __m256i* cw = reinterpret_cast<const __m256i*>(s.codes + ((b + rb) * w32 + w) * PL * 8);
        for (int q = 0; q < PL; ++q) c[rb * NP + q] = _mm256_loadu_si256(cw + q);
        if (BITS == 2) c[rb * NP + 2] = _mm256_and_si256(c[rb * NP], c[rb * NP + 1]);
        // the next RB blocks' codes, a word at a time: each block's codes are one short stream (4 KiB at
        // K = 4096, 1 bit) that the hardware prefetcher would pick up only after its start
        _mm_prefetch(reinterpret_cast<const char*>(cw + RB * w32 * PL), _MM_HINT_T0);
        if (PL > 1) _mm_prefetch(reinterpret_cast<const char*>(cw + RB * w32 * PL + 2), _MM_HINT_T0);
      }
      const float* tw[MT];
      for (int t = 0; t < MT; ++t) tw[t] = tab[t] + w * kTmacTableFloats;
      if (s.group_size >= 32) word_sums<NW, MT>(tw, c, p);
      else if (g % 2 == 0) word_sums<NW, MT, 0, 8>(tw, c, p);     // g = 16: pairs 0..7 of the word
      else word_sums<NW, MT, 8, 16>(tw, c, p);                     // pairs 8..15
    }
    for (int rb = 0; rb < RB; ++rb) {
      const float* cf = s.coefs + ((b + rb) * groups + g) * NC * 8;
      _mm_prefetch(reinterpret_cast<const char*>(cf + RB * groups * NC * 8), _MM_HINT_T0);
      if (NC > 2) _mm_prefetch(reinterpret_cast<const char*>(cf + RB * groups * NC * 8 + 16), _MM_HINT_T0);
      for (int t = 0; t < MT; ++t) {
        const __m256 sg = _mm256_set1_ps(xsum[(i0 + t) * groups + g]);
        const __m256* pp = p[t] + rb * NP;
        if (BITS == 4) {   // scale * sum_j 2^j P_j - scale * zero * S_g
          const __m256 a = _mm256_fmadd_ps(
              _mm256_set1_ps(8.f), pp[3],
              _mm256_fmadd_ps(_mm256_set1_ps(4.f), pp[2], _mm256_fmadd_ps(_mm256_set1_ps(2.f), pp[1], pp[0])));
          yv[t][rb] = _mm256_fmadd_ps(_mm256_loadu_ps(cf), a, yv[t][rb]);
          yv[t][rb] = _mm256_fnmadd_ps(_mm256_loadu_ps(cf + 8), sg, yv[t][rb]);
        } else {           // sum_j coef_j P_j + c0 S_g
          for (int q = 0; q < NP; ++q) yv[t][rb] = _mm256_fmadd_ps(_mm256_loadu_ps(cf + 8 * q), pp[q], yv[t][rb]);
          yv[t][rb] = _mm256_fmadd_ps(_mm256_loadu_ps(cf + 8 * NP), sg, yv[t][rb]);
        }
      }
    }
  }
  for (int t = 0; t < MT; ++t) {
    for (int rb = 0; rb < RB; ++rb) {
      alignas(32) float v[8];
      _mm256_store_ps(v, yv[t][rb]);
      const int64_t n0 = 8 * (b + rb);
      float* o = y + (i0 + t) * ldy;
      for (int r = 0; r < 8 && n0 + r < s.n; ++r) {
        const float u = v[r] + (bias ? bias[n0 + r] : 0.f);
        o[n0 + r] = accumulate ? o[n0 + r] + u : u;
      }
    }
  }
}

// Blocks [b, b + RB) for all mc rows of x, MT at a time (the blocks' codes stay in L1 meanwhile).
template <int BITS, int RB, int MT>
void rows_of_x(const TmacSegment& s, const float* tables, const float* xsum, int64_t mc, float* y, int64_t ldy,
               const float* bias, bool accumulate, int64_t b) {
  int64_t i = 0;
  for (; i + MT <= mc; i += MT) blocks<BITS, RB, MT>(s, tables, xsum, i, y, ldy, bias, accumulate, b);
  for (; i < mc; ++i) blocks<BITS, RB, 1>(s, tables, xsum, i, y, ldy, bias, accumulate, b);
}

// Instantiated configurations (blocks of 8 rows x rows of x per pass):
//   1 bit, M = 1: 4 x 1 (4 code words share each table load);  1 bit, M > 1: 2 x 4 (each shift serves 4 rows)
//   2 and 4 bit: 1 x 1 (3 / 4 plane words already share each table load)
template <int BITS>
void gemv_bits(const TmacSegment& s, const float* tables, const float* xsum, int64_t mc, float* y, int64_t ldy,
               const float* bias, bool accumulate, int64_t b0, int64_t b1) {
  int64_t b = b0;
  if (BITS == 1 && mc == 1) {
    for (; b + 4 <= b1; b += 4) blocks<1, 4, 1>(s, tables, xsum, 0, y, ldy, bias, accumulate, b);
  } else if (BITS == 1) {
    for (; b + 2 <= b1; b += 2) rows_of_x<1, 2, 4>(s, tables, xsum, mc, y, ldy, bias, accumulate, b);
  }
  for (; b < b1; ++b) rows_of_x<BITS, 1, 1>(s, tables, xsum, mc, y, ldy, bias, accumulate, b);
}

}  // namespace

void tmac_tables(const float* x, int64_t mc, int64_t ldx, int64_t col, int64_t k, int group_size, float* out,
                 float* xsum) {
  // lane i of m_j is all ones when bit j of i is set: (a & m0) + (b & m1) = [0 a b a+b], two pairs per store
  const __m256 m0 = _mm256_castsi256_ps(_mm256_setr_epi32(0, -1, 0, -1, 0, 0, 0, 0));
  const __m256 m1 = _mm256_castsi256_ps(_mm256_setr_epi32(0, 0, -1, -1, 0, 0, 0, 0));
  const __m256 m2 = _mm256_castsi256_ps(_mm256_setr_epi32(0, 0, 0, 0, 0, -1, 0, -1));
  const __m256 m3 = _mm256_castsi256_ps(_mm256_setr_epi32(0, 0, 0, 0, 0, 0, -1, -1));
  const int64_t w32 = tmac_words(k);
  for (int64_t i = 0; i < mc; ++i) {
    const float* xr = x + i * ldx + col;
    float* o = out + i * w32 * kTmacTableFloats;
    for (int64_t j = 0; j < k / 4; ++j) {   // columns 4j .. 4j+3: the tables of pairs 2j and 2j + 1
      const __m256 lo = _mm256_add_ps(_mm256_and_ps(_mm256_broadcast_ss(xr + 4 * j), m0),
                                      _mm256_and_ps(_mm256_broadcast_ss(xr + 4 * j + 1), m1));
      const __m256 hi = _mm256_add_ps(_mm256_and_ps(_mm256_broadcast_ss(xr + 4 * j + 2), m2),
                                      _mm256_and_ps(_mm256_broadcast_ss(xr + 4 * j + 3), m3));
      _mm256_storeu_ps(o + 8 * j, _mm256_or_ps(lo, hi));
    }
    for (int64_t j = 2 * k; j < w32 * kTmacTableFloats; ++j) o[j] = 0.f;   // pairs past k (k % 32 = 16)
  }
  group_sums(x, mc, ldx, col, k, group_size, xsum);
}

void tmac_gemv(const TmacSegment& s, const float* tables, const float* xsum, int64_t mc, float* y, int64_t ldy,
               const float* bias, bool accumulate, int64_t b0, int64_t b1) {
  switch (s.bits) {
    case 1: return gemv_bits<1>(s, tables, xsum, mc, y, ldy, bias, accumulate, b0, b1);
    case 2: return gemv_bits<2>(s, tables, xsum, mc, y, ldy, bias, accumulate, b0, b1);
    default: return gemv_bits<4>(s, tables, xsum, mc, y, ldy, bias, accumulate, b0, b1);
  }
}

}  // namespace avx2
}  // namespace bivlm_cpu

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86: never selected (use_avx2 is false); forward to the scalar kernels to link.

namespace bivlm_cpu {
namespace avx2 {
void tmac_tables(const float* x, int64_t mc, int64_t ldx, int64_t col, int64_t k, int group_size, float* out,
                 float* xsum) {
  scalar::tmac_tables(x, mc, ldx, col, k, group_size, out, xsum);
}
void tmac_gemv(const TmacSegment& s, const float* tables, const float* xsum, int64_t mc, float* y, int64_t ldy,
               const float* bias, bool accumulate, int64_t b0, int64_t b1) {
  scalar::tmac_gemv(s, tables, xsum, mc, y, ldy, bias, accumulate, b0, b1);
}
}  // namespace avx2
}  // namespace bivlm_cpu

#endif
