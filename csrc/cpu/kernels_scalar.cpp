// kernels_scalar.cpp -- portable scalar kernels (the fallback on CPUs without AVX2/FMA/F16C) and the run-time
// choice between them and the AVX2 kernels (kernels_avx2.cpp). No torch headers.
//
// The scalar GEMV is written for clarity, not speed: per (row, group) it reads the table once, then for each
// word decodes 32/b codes and accumulates x * w in fp32 for every row of x. The same group-then-word walk as the
// AVX2 kernel, so both read the packed layout the same way.
#include <cstdint>

#include "kernels.h"

namespace bivlm_cpu {
namespace scalar {

namespace {

// Per-group decode table of one row: the 2^b codebook entries (lut), or {scale, zero} (affine), in fp32.
struct GroupTable {
  float v[16];
  void load(const Segment& s, int64_t row, int64_t group) {
    const int64_t groups = s.k / s.group_size;
    if (s.affine()) {
      const float sc = table_at(s.table0, s.dtype, row * groups + group);
      const float ze = table_at(s.table1, s.dtype, row * groups + group);
      for (int c = 0; c < 16; ++c) v[c] = (static_cast<float>(c) - ze) * sc;   // as formats.affine_values
    } else {
      const int entries = 1 << s.bits;
      for (int c = 0; c < entries; ++c) v[c] = table_at(s.table0, s.dtype, (row * groups + group) * entries + c);
    }
  }
};

}  // namespace

void gemv(const Segment& s, const Activations& a, float* y, int64_t ldy, const float* bias, bool accumulate,
          int64_t n0, int64_t n1) {
  const int per_word = 32 / s.bits;
  const uint32_t mask = (1u << s.bits) - 1u;
  const int64_t words_per_row = s.k * s.bits / 32, words_per_group = s.group_size * s.bits / 32;
  const int64_t groups = s.k / s.group_size;
  for (int64_t n = n0; n < n1; ++n) {
    const uint32_t* q = reinterpret_cast<const uint32_t*>(s.qweight) + n * words_per_row;
    for (int64_t i = 0; i < a.m; ++i) {
      const float* x = a.x + i * a.ldx + a.col;
      float acc = 0.f;
      GroupTable t;
      for (int64_t gi = 0; gi < groups; ++gi) {
        t.load(s, n, gi);
        for (int64_t w = gi * words_per_group; w < (gi + 1) * words_per_group; ++w) {
          const uint32_t word = q[w];
          const float* xw = x + w * per_word;
          for (int j = 0; j < per_word; ++j) acc += xw[j] * t.v[(word >> (j * s.bits)) & mask];
        }
      }
      float* out = y + i * ldy + n;
      const float r = acc + (bias ? bias[n] : 0.f);
      *out = accumulate ? *out + r : r;
    }
  }
}

void dequantize(const Segment& s, float* out, int64_t ldo, int64_t n0, int64_t n1) {
  const int per_word = 32 / s.bits;
  const uint32_t mask = (1u << s.bits) - 1u;
  const int64_t words_per_row = s.k * s.bits / 32, words_per_group = s.group_size * s.bits / 32;
  for (int64_t n = n0; n < n1; ++n) {
    const uint32_t* q = reinterpret_cast<const uint32_t*>(s.qweight) + n * words_per_row;
    float* o = out + (n - n0) * ldo;
    GroupTable t;
    for (int64_t w = 0; w < words_per_row; ++w) {
      if (w % words_per_group == 0) t.load(s, n, w / words_per_group);
      for (int j = 0; j < per_word; ++j) o[w * per_word + j] = t.v[(q[w] >> (j * s.bits)) & mask];
    }
  }
}

}  // namespace scalar

// ------------------------------------------------------------------------------------------------------------
// shared helpers and run-time dispatch
// ------------------------------------------------------------------------------------------------------------

void group_sums(const float* x, int64_t m, int64_t ldx, int64_t col, int64_t k, int group_size, float* xsum) {
  const int64_t groups = k / group_size;
  for (int64_t i = 0; i < m; ++i) {
    const float* xr = x + i * ldx + col;
    for (int64_t gi = 0; gi < groups; ++gi) {
      float s = 0.f;
      for (int j = 0; j < group_size; ++j) s += xr[gi * group_size + j];
      xsum[i * groups + gi] = s;
    }
  }
}

void transpose_words(const float* x, int64_t m, int64_t ldx, int64_t k, int per_word, float* xt) {
  const int64_t ch = 8 * per_word;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t c = 0; c < k; c += ch)
      for (int j = 0; j < per_word; ++j)
        for (int l = 0; l < 8; ++l) xt[i * ldx + c + 8 * j + l] = x[i * ldx + c + per_word * l + j];
}

namespace {
bool g_force_scalar = false;

// Asked on first use (never at import): the AVX2 file is compiled for AVX2 + FMA + F16C and must not run without.
bool has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return ok;
#else
  return false;
#endif
}
}  // namespace

bool use_avx2() { return !g_force_scalar && has_avx2(); }

const char* isa() { return use_avx2() ? "avx2" : "scalar"; }

bool force_scalar(bool on) {
  const bool old = g_force_scalar;
  g_force_scalar = on;
  return old;
}

void gemv(const Segment& s, const Activations& a, float* y, int64_t ldy, const float* bias, bool accumulate,
          int64_t n0, int64_t n1) {
  if (!g_force_scalar && has_avx2()) return avx2::gemv(s, a, y, ldy, bias, accumulate, n0, n1);
  scalar::gemv(s, a, y, ldy, bias, accumulate, n0, n1);
}

void dequantize(const Segment& s, float* out, int64_t ldo, int64_t n0, int64_t n1) {
  if (!g_force_scalar && has_avx2()) return avx2::dequantize(s, out, ldo, n0, n1);
  scalar::dequantize(s, out, ldo, n0, n1);
}

}  // namespace bivlm_cpu
