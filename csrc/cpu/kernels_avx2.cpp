// kernels_avx2.cpp -- AVX2 + FMA + F16C kernels: the decode GEMV (small M) and the tile dequantizer (large M).
// No torch headers. Compiled for AVX2 through a target pragma (the rest of the extension is built for the baseline
// ISA), and called only after a run-time CPUID check (kernels_scalar.cpp: has_avx2), so the same wheel runs on
// CPUs without AVX2. Only <cstdint>/<cstring> and intrinsics are used here: no std:: templates, whose inline
// copies compiled for AVX2 could be picked by the linker for baseline code.
//
// Decode (8 weights per step, from one int32 word broadcast to 8 lanes):
//
//   word = | c7 | c6 | c5 | c4 | c3 | c2 | c1 | c0 |      (b = 4 shown; b = 2: 16 codes, b = 1: 32 codes)
//   srlv(word, [0, 4, 8, ..., 28])  ->  lane j holds c_j in its low bits (plus the codes above it)
//
//   lut (b = 1, 2): vpermilps (in-lane variable permute) reads only the low 2 bits of each lane and picks from
//                   the 4 entries of its 128-bit half, so the 2^b codebook is repeated to fill them --
//                   [c0 c1 c0 c1 | c0 c1 c0 c1] or [c0 c1 c2 c3 | c0 c1 c2 c3] -- and the bits above the code do
//                   not matter: one shift + one vpermilps gives 8 fp32 weights. (vpermilps, not the cross-lane
//                   vpermps: 1.6x faster for 2 bits on the Zen 3 this was measured on.)
//   affine (b = 4): (lane & 15) -> fp32 code; the group's code-weighted sum sum_k c_k x_k is accumulated and the
//                   group is finished with scale * (sum c x - zero * sum x), so scale and zero cost nothing per
//                   weight (sum x per group comes precomputed, Activations::xsum).
//
// 1 bit, M = 1 (mask kernel): with codebook (c0, c1), sum_k w_k x_k = c0 * S_g + (c1 - c0) * P_g, S_g the group
// sum of x (precomputed), P_g the sum of x over the columns whose code is 1. A byte of codes is 8 columns, so
// P_g accumulates  x[8 columns] AND mask[byte]  (mask: a 256 x 8 table of all-ones/all-zero lanes, 8 KiB, in L1):
// one byte load, one AND with a table load, one add per 8 weights -- no shift, no permute, no multiply.
//
// Otherwise one FMA per weight vector and row of x. A block holds R output rows x MT rows of x in 8-lane fp32
// accumulators; the activation vector is loaded once per step and reused by the R rows, the decoded weights are
// reused by the MT rows of x. Horizontal sums happen once per output.
#include <cstdint>
#include <cstring>

#include "kernels.h"

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

inline uint32_t load_u32(const void* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// The 2^b codebook entries of (row, group), repeated to 8 fp32 lanes (see the top of the file).
template <int BITS>
inline __m256 load_codebook(const Segment& s, int64_t idx) {  // idx = row * groups + group
  constexpr int E = 1 << BITS;
  __m128 t;
  if (s.dtype == DType::kFloat) {
    const float* p = static_cast<const float*>(s.table0) + idx * E;
    t = BITS == 1 ? _mm_castpd_ps(_mm_loaddup_pd(reinterpret_cast<const double*>(p))) : _mm_loadu_ps(p);
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(s.table0) + idx * E;
    __m128i h;
    if (BITS == 1) {
      h = _mm_set1_epi32(static_cast<int>(load_u32(p)));                           // h0 h1 h0 h1 ...
    } else {
      h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));                    // h0 h1 h2 h3
    }
    t = s.dtype == DType::kHalf ? _mm_cvtph_ps(h)
                                : _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), h));  // bf16 << 16
  }
  return _mm256_set_m128(t, t);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Shift of lane j for the sub-vector `sub` of a word: brings code 8*sub + j to bit 0.
template <int BITS>
inline __m256i lane_shifts(int sub) {
  const int b = 8 * sub * BITS;
  return _mm256_setr_epi32(b, b + BITS, b + 2 * BITS, b + 3 * BITS, b + 4 * BITS, b + 5 * BITS, b + 6 * BITS,
                           b + 7 * BITS);
}

// 8 weights (or, affine, 8 fp32 codes) of sub-vector `sub` of a broadcast word.
template <int BITS>
inline __m256 decode8(__m256i word, __m256i shift, __m256 codebook) {
  const __m256i idx = _mm256_srlv_epi32(word, shift);
  if (BITS == 4) return _mm256_cvtepi32_ps(_mm256_and_si256(idx, _mm256_set1_epi32(15)));
  return _mm256_permutevar_ps(codebook, idx);
}

// Lane i of mask[b] is all ones when bit i of b is set (the code of column 8j + i in byte j is 1).
struct MaskTable {
  alignas(32) int32_t lane[256][8];
  MaskTable() {
    for (int b = 0; b < 256; ++b)
      for (int i = 0; i < 8; ++i) lane[b][i] = ((b >> i) & 1) ? -1 : 0;
  }
};

// codebook[idx] = (c0, c1) of a 1-bit group as fp32.
inline void load_pair(const Segment& s, int64_t idx, float* c0, float* c1) {
  if (s.dtype == DType::kFloat) {
    const float* p = static_cast<const float*>(s.table0) + 2 * idx;
    *c0 = p[0], *c1 = p[1];
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(s.table0) + 2 * idx;
    if (s.dtype == DType::kHalf) {
      *c0 = _cvtsh_ss(p[0]), *c1 = _cvtsh_ss(p[1]);
    } else {
      *c0 = bf16_to_float(p[0]), *c1 = bf16_to_float(p[1]);
    }
  }
}

// y[0, n .. n+R] for 1 bit and one row of x by the mask kernel (see the top of the file).
template <int R>
void block_mask1(const Segment& s, const Activations& a, int64_t n, float* y, const float* bias, bool accumulate) {
  static const MaskTable masks;
  const int64_t groups = s.k / s.group_size, bpg = s.group_size / 8, row_bytes = s.k / 8;
  const uint8_t* c[R];
  for (int r = 0; r < R; ++r) c[r] = reinterpret_cast<const uint8_t*>(s.qweight) + (n + r) * row_bytes;
  const float* x = a.x + a.col;
  __m256 yl[R];
  float ys[R];
  for (int r = 0; r < R; ++r) yl[r] = _mm256_setzero_ps(), ys[r] = 0.f;
  for (int64_t gi = 0; gi < groups; ++gi) {
    __m256 p[R];
    for (int r = 0; r < R; ++r) p[r] = _mm256_setzero_ps();
    for (int64_t j = gi * bpg; j < (gi + 1) * bpg; ++j) {
      const __m256 xv = _mm256_loadu_ps(x + 8 * j);
      for (int r = 0; r < R; ++r)
        p[r] = _mm256_add_ps(p[r], _mm256_and_ps(xv, _mm256_load_ps(reinterpret_cast<const float*>(
                                                         masks.lane[c[r][j]]))));
    }
    const float sg = a.xsum[gi];
    for (int r = 0; r < R; ++r) {
      float c0, c1;
      load_pair(s, (n + r) * groups + gi, &c0, &c1);
      yl[r] = _mm256_fmadd_ps(_mm256_set1_ps(c1 - c0), p[r], yl[r]);
      ys[r] += c0 * sg;
    }
  }
  for (int r = 0; r < R; ++r) {
    const float v = hsum(yl[r]) + ys[r] + (bias ? bias[n + r] : 0.f);
    y[n + r] = accumulate ? y[n + r] + v : v;
  }
}

// y[i0 .. i0+MT, n .. n+R] for one block: R output rows, MT rows of x.
template <int BITS, int R, int MT>
void block(const Segment& s, const Activations& a, int64_t n, int64_t i0, float* y, int64_t ldy,
           const float* bias, bool accumulate) {
  constexpr int SUBS = 32 / BITS / 8;       // 8-lane vectors per word: 4, 2, 1
  constexpr int PER_WORD = 32 / BITS;
  constexpr bool AFF = BITS == 4;
  const int64_t wpr = s.k * BITS / 32, wpg = s.group_size * BITS / 32, groups = s.k / s.group_size;

  __m256i shifts[SUBS];
  for (int sub = 0; sub < SUBS; ++sub) shifts[sub] = lane_shifts<BITS>(sub);
  const uint32_t* q[R];
  for (int r = 0; r < R; ++r) q[r] = reinterpret_cast<const uint32_t*>(s.qweight) + (n + r) * wpr;
  const float* xr[MT];
  for (int t = 0; t < MT; ++t) xr[t] = a.x + (i0 + t) * a.ldx + a.col;

  __m256 acc[R][MT], gacc[R][MT];
  float zacc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < MT; ++t) acc[r][t] = _mm256_setzero_ps(), zacc[r][t] = 0.f;

  for (int64_t gi = 0; gi < groups; ++gi) {
    __m256 cb[R];
    for (int r = 0; r < R; ++r) {
      if (AFF) {
        cb[r] = _mm256_setzero_ps();
        for (int t = 0; t < MT; ++t) gacc[r][t] = _mm256_setzero_ps();
      } else {
        cb[r] = load_codebook<BITS>(s, (n + r) * groups + gi);
      }
    }
    for (int64_t w = gi * wpg; w < (gi + 1) * wpg; ++w) {
      __m256i word[R];
      for (int r = 0; r < R; ++r) word[r] = _mm256_set1_epi32(static_cast<int>(q[r][w]));
      for (int sub = 0; sub < SUBS; ++sub) {
        __m256 xv[MT];
        for (int t = 0; t < MT; ++t) xv[t] = _mm256_loadu_ps(xr[t] + w * PER_WORD + 8 * sub);
        for (int r = 0; r < R; ++r) {
          const __m256 wv = decode8<BITS>(word[r], shifts[sub], cb[r]);
          for (int t = 0; t < MT; ++t) {
            if (AFF) gacc[r][t] = _mm256_fmadd_ps(wv, xv[t], gacc[r][t]);
            else acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
          }
        }
      }
    }
    if (AFF) {  // finish the group: scale * (sum c x - zero * sum x)
      for (int r = 0; r < R; ++r) {
        const int64_t ti = (n + r) * groups + gi;
        const float sc = table_at(s.table0, s.dtype, ti), ze = table_at(s.table1, s.dtype, ti);
        const __m256 scv = _mm256_set1_ps(sc);
        for (int t = 0; t < MT; ++t) {
          acc[r][t] = _mm256_fmadd_ps(scv, gacc[r][t], acc[r][t]);
          zacc[r][t] += sc * ze * a.xsum[(i0 + t) * groups + gi];
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int t = 0; t < MT; ++t) {
      const float v = hsum(acc[r][t]) - zacc[r][t] + (bias ? bias[n + r] : 0.f);
      float* o = y + (i0 + t) * ldy + n + r;
      *o = accumulate ? *o + v : v;
    }
  }
}

// 2 and 4 bit with the transposed activations (Activations::xt; g a multiple of the chunk): per chunk of 8 words
// (CH = 8 * 32/b columns: 128 at 2 bits, 64 at 4 bits), one load of 8 consecutive words of a row; the shift by
// b*j puts the code of column (32/b) l + j in lane l, which meets xt[8j .. 8j + 8) of the chunk. Per 8 weights:
// an immediate shift + vpermilps (2 bit) or shift + AND + convert (4 bit), then the FMAs -- no word broadcast and
// no variable shift as in block().
template <int BITS, int R, int MT>
void block_t(const Segment& s, const Activations& a, int64_t n, int64_t i0, float* y, int64_t ldy,
             const float* bias, bool accumulate) {
  constexpr int PER_WORD = 32 / BITS, CH = 8 * PER_WORD;
  constexpr bool AFF = BITS == 4;
  const int64_t wpr = s.k * BITS / 32, groups = s.k / s.group_size, cpg = s.group_size / CH;
  const uint32_t* q[R];
  for (int r = 0; r < R; ++r) q[r] = reinterpret_cast<const uint32_t*>(s.qweight) + (n + r) * wpr;
  const float* xr[MT];
  for (int t = 0; t < MT; ++t) xr[t] = a.xt + (i0 + t) * a.ldx + a.col;
  const __m256i m15 = _mm256_set1_epi32(15);
  // Software prefetch of the next block's rows (n + R ..), at the place this block reads: at K = 4096 a row of
  // 2-bit codes is 1 KiB (16 lines), too short a stream for the hardware prefetcher to ramp up before it ends, and
  // a call streams every row once from DRAM. Rows past N are not prefetched.
  const int64_t tab_group = (AFF ? 1 : (1 << BITS)) * (s.dtype == DType::kFloat ? 4 : 2);   // table bytes/group
  const char* const t0 = static_cast<const char*>(s.table0);
  const char* const t1 = static_cast<const char*>(s.table1);   // affine zeros (same layout), else unused
  const char* pq[R];
  int64_t pt[R];                                               // byte offset of the next row's tables
  int npf = 0;
  for (int r = 0; r < R; ++r) {
    if (n + R + r < s.n) {
      pq[npf] = reinterpret_cast<const char*>(q[r] + R * wpr);
      pt[npf++] = (n + R + r) * groups * tab_group;
    }
  }
  __m256 acc[R][MT], gacc[R][MT];
  float zacc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < MT; ++t) acc[r][t] = _mm256_setzero_ps(), zacc[r][t] = 0.f;
  for (int64_t gi = 0; gi < groups; ++gi) {
    __m256 cb[R];
    for (int r = 0; r < R; ++r) {
      cb[r] = AFF ? _mm256_setzero_ps() : load_codebook<BITS == 4 ? 2 : BITS>(s, (n + r) * groups + gi);
      for (int t = 0; t < MT; ++t) gacc[r][t] = _mm256_setzero_ps();
    }
    for (int i = 0; i < npf; ++i) {          // the group's table bytes of the next rows (64 B covers >= 1 group)
      _mm_prefetch(t0 + pt[i] + gi * tab_group, _MM_HINT_T0);
      if (AFF) _mm_prefetch(t1 + pt[i] + gi * tab_group, _MM_HINT_T0);
    }
    for (int64_t c = gi * cpg; c < (gi + 1) * cpg; ++c) {
      if ((c & 1) == 0)                       // 2 chunks of 8 words = one 64-byte line per row
        for (int i = 0; i < npf; ++i) _mm_prefetch(pq[i] + 32 * c, _MM_HINT_T0);
      __m256i v[R];
      for (int r = 0; r < R; ++r) v[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[r] + 8 * c));
#pragma GCC unroll 16
      for (int j = 0; j < PER_WORD; ++j) {
        __m256 xv[MT];
        for (int t = 0; t < MT; ++t) xv[t] = _mm256_loadu_ps(xr[t] + CH * c + 8 * j);
        for (int r = 0; r < R; ++r) {
          const __m256i sh = _mm256_srli_epi32(v[r], BITS * j);
          const __m256 wv = AFF ? _mm256_cvtepi32_ps(j == PER_WORD - 1 ? sh : _mm256_and_si256(sh, m15))
                                : _mm256_permutevar_ps(cb[r], sh);
          for (int t = 0; t < MT; ++t) gacc[r][t] = _mm256_fmadd_ps(wv, xv[t], gacc[r][t]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      if (AFF) {   // finish the group: scale * (sum c x - zero * sum x)
        const int64_t ti = (n + r) * groups + gi;
        const float sc = table_at(s.table0, s.dtype, ti), ze = table_at(s.table1, s.dtype, ti);
        const __m256 scv = _mm256_set1_ps(sc);
        for (int t = 0; t < MT; ++t) {
          acc[r][t] = _mm256_fmadd_ps(scv, gacc[r][t], acc[r][t]);
          zacc[r][t] += sc * ze * a.xsum[(i0 + t) * groups + gi];
        }
      } else {
        for (int t = 0; t < MT; ++t) acc[r][t] = _mm256_add_ps(acc[r][t], gacc[r][t]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int t = 0; t < MT; ++t) {
      const float v = hsum(acc[r][t]) - zacc[r][t] + (bias ? bias[n + r] : 0.f);
      float* o = y + (i0 + t) * ldy + n + r;
      *o = accumulate ? *o + v : v;
    }
  }
}

// All rows of x for output rows [n, n + R), x taken MT_MAX rows at a time (the weights stay in L1 meanwhile).
template <int BITS, int R>
void rows(const Segment& s, const Activations& a, int64_t n, float* y, int64_t ldy, const float* bias,
          bool accumulate) {
  constexpr int MT_MAX = R >= 4 ? 1 : 4;   // R = 4 is the M = 1 block
  int64_t i = 0;
  if (BITS >= 2 && a.xt != nullptr && s.group_size % (256 / BITS) == 0) {
    for (; i + MT_MAX <= a.m; i += MT_MAX) block_t<BITS, R, MT_MAX>(s, a, n, i, y, ldy, bias, accumulate);
    switch (a.m - i) {
      case 3: block_t<BITS, R, 3>(s, a, n, i, y, ldy, bias, accumulate); break;
      case 2: block_t<BITS, R, 2>(s, a, n, i, y, ldy, bias, accumulate); break;
      case 1: block_t<BITS, R, 1>(s, a, n, i, y, ldy, bias, accumulate); break;
      default: break;
    }
    return;
  }
  for (; i + MT_MAX <= a.m; i += MT_MAX) block<BITS, R, MT_MAX>(s, a, n, i, y, ldy, bias, accumulate);
  switch (a.m - i) {
    case 3: block<BITS, R, 3>(s, a, n, i, y, ldy, bias, accumulate); break;
    case 2: block<BITS, R, 2>(s, a, n, i, y, ldy, bias, accumulate); break;
    case 1: block<BITS, R, 1>(s, a, n, i, y, ldy, bias, accumulate); break;
    default: break;
  }
}

template <int BITS>
void gemv_bits(const Segment& s, const Activations& a, float* y, int64_t ldy, const float* bias, bool accumulate,
               int64_t n0, int64_t n1) {
  int64_t n = n0;
  if (BITS == 1 && a.m == 1 && a.xsum != nullptr) {
    for (; n + 4 <= n1; n += 4) block_mask1<4>(s, a, n, y, bias, accumulate);
    for (; n < n1; ++n) block_mask1<1>(s, a, n, y, bias, accumulate);
    return;
  }
  if (a.m == 1) {
    for (; n + 4 <= n1; n += 4) rows<BITS, 4>(s, a, n, y, ldy, bias, accumulate);
  } else {
    for (; n + 2 <= n1; n += 2) rows<BITS, 2>(s, a, n, y, ldy, bias, accumulate);
  }
  for (; n < n1; ++n) rows<BITS, 1>(s, a, n, y, ldy, bias, accumulate);
}

template <int BITS>
void dequantize_bits(const Segment& s, float* out, int64_t ldo, int64_t n0, int64_t n1) {
  constexpr int SUBS = 32 / BITS / 8, PER_WORD = 32 / BITS;
  const int64_t wpr = s.k * BITS / 32, wpg = s.group_size * BITS / 32, groups = s.k / s.group_size;
  __m256i shifts[SUBS];
  for (int sub = 0; sub < SUBS; ++sub) shifts[sub] = lane_shifts<BITS>(sub);
  for (int64_t n = n0; n < n1; ++n) {
    const uint32_t* q = reinterpret_cast<const uint32_t*>(s.qweight) + n * wpr;
    float* o = out + (n - n0) * ldo;
    for (int64_t gi = 0; gi < groups; ++gi) {
      __m256 cb = _mm256_setzero_ps(), sc = cb, ze = cb;
      if (BITS == 4) {
        sc = _mm256_set1_ps(table_at(s.table0, s.dtype, n * groups + gi));
        ze = _mm256_set1_ps(table_at(s.table1, s.dtype, n * groups + gi));
      } else {
        cb = load_codebook<BITS>(s, n * groups + gi);
      }
      for (int64_t w = gi * wpg; w < (gi + 1) * wpg; ++w) {
        const __m256i word = _mm256_set1_epi32(static_cast<int>(q[w]));
        for (int sub = 0; sub < SUBS; ++sub) {
          __m256 v = decode8<BITS>(word, shifts[sub], cb);
          if (BITS == 4) v = _mm256_mul_ps(_mm256_sub_ps(v, ze), sc);   // (code - zero) * scale, no FMA
          _mm256_storeu_ps(o + w * PER_WORD + 8 * sub, v);
        }
      }
    }
  }
}

}  // namespace

void gemv(const Segment& s, const Activations& a, float* y, int64_t ldy, const float* bias, bool accumulate,
          int64_t n0, int64_t n1) {
  switch (s.bits) {
    case 1: return gemv_bits<1>(s, a, y, ldy, bias, accumulate, n0, n1);
    case 2: return gemv_bits<2>(s, a, y, ldy, bias, accumulate, n0, n1);
    default: return gemv_bits<4>(s, a, y, ldy, bias, accumulate, n0, n1);
  }
}

void dequantize(const Segment& s, float* out, int64_t ldo, int64_t n0, int64_t n1) {
  switch (s.bits) {
    case 1: return dequantize_bits<1>(s, out, ldo, n0, n1);
    case 2: return dequantize_bits<2>(s, out, ldo, n0, n1);
    default: return dequantize_bits<4>(s, out, ldo, n0, n1);
  }
}

}  // namespace avx2
}  // namespace bivlm_cpu

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86: the AVX2 kernels are never selected (has_avx2 is false); forward to the scalar ones to link.

namespace bivlm_cpu {
namespace avx2 {
void gemv(const Segment& s, const Activations& a, float* y, int64_t ldy, const float* bias, bool accumulate,
          int64_t n0, int64_t n1) {
  scalar::gemv(s, a, y, ldy, bias, accumulate, n0, n1);
}
void dequantize(const Segment& s, float* out, int64_t ldo, int64_t n0, int64_t n1) {
  scalar::dequantize(s, out, ldo, n0, n1);
}
}  // namespace avx2
}  // namespace bivlm_cpu

#endif
