// tmac_scalar.cpp -- the table-lookup kernels (tmac.h) in portable scalar C++: the repack from the neutral layout,
// the per-call tables, the scalar GEMV over the repacked layout (the fallback, and the reference for reading it),
// and the run-time choice between these and the AVX2 kernels (tmac_avx2.cpp). No torch headers.
//
// The scalar GEMV walks the same tables as the AVX2 one (lane r of a code word, 2 bits at a time, looked up in
// the table of that pair), one output row at a time, so it checks the layout and the tables, not only the math.
#include <cstdint>

#include "kernels.h"
#include "tmac.h"

namespace bivlm_cpu {

// ------------------------------------------------------------------------------------------------------------
// repack (once per layer)
// ------------------------------------------------------------------------------------------------------------

void tmac_repack(const Segment& s, int32_t* codes, float* coefs, int64_t n0, int64_t n1) {
  const int bits = s.bits, pl = tmac_planes(bits), nc = tmac_coefs(bits), per_word = 32 / bits;
  const uint32_t mask = (1u << bits) - 1u;
  const int64_t w32 = tmac_words(s.k), groups = s.k / s.group_size, wpr = s.k * bits / 32;
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t b = n / 8, r = n % 8;
    const uint32_t* q = reinterpret_cast<const uint32_t*>(s.qweight) + n * wpr;
    for (int64_t w = 0; w < w32; ++w) {
      uint32_t plane[4] = {0, 0, 0, 0};
      for (int i = 0; i < 32 && 32 * w + i < s.k; ++i) {   // column 32w + i: its code, one bit per plane
        const int64_t col = 32 * w + i;
        const uint32_t code = (q[col / per_word] >> ((col % per_word) * bits)) & mask;
        for (int p = 0; p < pl; ++p) plane[p] |= ((code >> p) & 1u) << i;
      }
      for (int p = 0; p < pl; ++p) codes[((b * w32 + w) * pl + p) * 8 + r] = static_cast<int32_t>(plane[p]);
    }
    for (int64_t g = 0; g < groups; ++g) {
      float* c = coefs + (b * groups + g) * nc * 8 + r;
      const int64_t t = n * groups + g;
      if (s.affine()) {
        const float sc = table_at(s.table0, s.dtype, t), ze = table_at(s.table1, s.dtype, t);
        c[0] = sc, c[8] = sc * ze;
      } else if (bits == 1) {
        const float c0 = table_at(s.table0, s.dtype, 2 * t), c1 = table_at(s.table0, s.dtype, 2 * t + 1);
        c[0] = c1 - c0, c[8] = c0;
      } else {
        const float c0 = table_at(s.table0, s.dtype, 4 * t), c1 = table_at(s.table0, s.dtype, 4 * t + 1),
                    c2 = table_at(s.table0, s.dtype, 4 * t + 2), c3 = table_at(s.table0, s.dtype, 4 * t + 3);
        // w = c0 + b0 (c1 - c0) + b1 (c2 - c0) + b0 b1 (c3 - c2 - c1 + c0)
        c[0] = c1 - c0, c[8] = c2 - c0, c[16] = ((c3 - c2) - c1) + c0, c[24] = c0;
      }
    }
  }
}

namespace scalar {

// ------------------------------------------------------------------------------------------------------------
// tables: entry i of a pair (a, b) is (i&1 ? a : 0) + (i&2 ? b : 0), the order of the
// AVX2 builder, so both give bit-identical tables
// ------------------------------------------------------------------------------------------------------------

void tmac_tables(const float* x, int64_t mc, int64_t ldx, int64_t col, int64_t k, int group_size, float* out,
                 float* xsum) {
  const int64_t w32 = tmac_words(k);
  for (int64_t i = 0; i < mc; ++i) {
    const float* xr = x + i * ldx + col;
    float* o = out + i * w32 * kTmacTableFloats;
    for (int64_t j = 0; j < k / 2; ++j)
      for (int l = 0; l < 4; ++l) o[4 * j + l] = (l & 1 ? xr[2 * j] : 0.f) + (l & 2 ? xr[2 * j + 1] : 0.f);
    for (int64_t j = 2 * k; j < w32 * kTmacTableFloats; ++j) o[j] = 0.f;   // pairs past k (k % 32 = 16)
  }
  group_sums(x, mc, ldx, col, k, group_size, xsum);
}

// ------------------------------------------------------------------------------------------------------------
// GEMV over the repacked layout
// ------------------------------------------------------------------------------------------------------------

namespace {
// P of pairs [t0, t1) of one 32-column code word (all 16, or one half at g = 16).
inline float word_sum(const float* tab, uint32_t code, int t0 = 0, int t1 = 16) {
  float p = 0.f;
  for (int t = t0; t < t1; ++t) p += tab[4 * t + ((code >> (2 * t)) & 3u)];
  return p;
}
}  // namespace

void tmac_gemv(const TmacSegment& s, const float* tables, const float* xsum, int64_t mc, float* y, int64_t ldy,
               const float* bias, bool accumulate, int64_t b0, int64_t b1) {
  const int pl = tmac_planes(s.bits), nc = tmac_coefs(s.bits);
  const int64_t w32 = tmac_words(s.k), groups = s.k / s.group_size;
  const int64_t ppg = s.group_size / 2;   // pairs per group: 8 at g = 16 (half a word), else whole words
  for (int64_t n = 8 * b0; n < 8 * b1 && n < s.n; ++n) {
    const int64_t b = n / 8, r = n % 8;
    for (int64_t i = 0; i < mc; ++i) {
      const float* tab = tables + i * w32 * kTmacTableFloats;
      float acc = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        float p[4] = {0.f, 0.f, 0.f, 0.f};
        for (int64_t t = g * ppg; t < (g + 1) * ppg; t = (t / 16 + 1) * 16) {   // per word of the group
          const int64_t w = t / 16;
          const int t0 = static_cast<int>(t % 16), t1 = ppg < 16 ? t0 + static_cast<int>(ppg) : 16;
          const int32_t* c = s.codes + (b * w32 + w) * pl * 8 + r;
          const float* tw = tab + w * kTmacTableFloats;
          for (int q = 0; q < pl; ++q) p[q] += word_sum(tw, static_cast<uint32_t>(c[8 * q]), t0, t1);
          if (s.bits == 2) p[2] += word_sum(tw, static_cast<uint32_t>(c[0] & c[8]), t0, t1);   // plane b0 & b1
        }
        const float* cf = s.coefs + (b * groups + g) * nc * 8 + r;
        const float sg = xsum[i * groups + g];
        if (s.bits == 4) {
          const float a = ((p[0] + 2.f * p[1]) + 4.f * p[2]) + 8.f * p[3];     // sum_k code_k x_k
          acc += cf[0] * a - cf[8] * sg;
        } else if (s.bits == 1) {
          acc += cf[0] * p[0] + cf[8] * sg;
        } else {
          acc += ((cf[0] * p[0] + cf[8] * p[1]) + cf[16] * p[2]) + cf[24] * sg;
        }
      }
      float* o = y + i * ldy + n;
      const float v = acc + (bias ? bias[n] : 0.f);
      *o = accumulate ? *o + v : v;
    }
  }
}

}  // namespace scalar

// ------------------------------------------------------------------------------------------------------------
// run-time dispatch (kernels_scalar.cpp: use_avx2)
// ------------------------------------------------------------------------------------------------------------

void tmac_tables(const float* x, int64_t mc, int64_t ldx, int64_t col, int64_t k, int group_size, float* out,
                 float* xsum) {
  if (use_avx2()) return avx2::tmac_tables(x, mc, ldx, col, k, group_size, out, xsum);
  scalar::tmac_tables(x, mc, ldx, col, k, group_size, out, xsum);
}

void tmac_gemv(const TmacSegment& s, const float* tables, const float* xsum, int64_t mc, float* y, int64_t ldy,
               const float* bias, bool accumulate, int64_t b0, int64_t b1) {
  if (use_avx2()) return avx2::tmac_gemv(s, tables, xsum, mc, y, ldy, bias, accumulate, b0, b1);
  scalar::tmac_gemv(s, tables, xsum, mc, y, ldy, bias, accumulate, b0, b1);
}

}  // namespace bivlm_cpu
