// kernels.h -- plain C++ API of the CPU kernels of bivlm_kernels._C_cpu (no torch headers).
//
// Shared by the kernel files (kernels_scalar.cpp, kernels_avx2.cpp) and the one torch-facing file (torch_ops.cpp).
// Everything is raw pointers and sizes; threads are the caller's business: every entry point works on a range of
// output rows [n0, n1), so the caller splits N over at::parallel_for.
//
// Packed layout (bivlm-packed v1, bivlm_kernels/formats/__init__.py): qweight int32 [N, K*b/32], codes along K, least
// significant bits first; column k of a row is in word k / (32/b) at bit (k % (32/b)) * b (the word is drawn
// once, in bivlm_kernels/formats/__init__.py; its C form in csrc/cuda/bivlm_kernels.h):
//
//   lut    b = 1, 2:  w[n,k] = codebook[n, k/g, code]                        codebook [N, K/g, 2^b]
//   affine b = 4:     w[n,k] = (code - zeros[n,k/g]) * scales[n,k/g]         scales, zeros [N, K/g]
//
// g in {32, 64, 128, 256}, and g = 16 for b = 2 and 4 (never 1 bit: g * b >= 32), so every word is full and
// lies inside one group (g = 16: one word per group at 2 bits, two at 4 bits). K need not be a multiple of 32.
#pragma once

#include <cstdint>

namespace bivlm_cpu {

enum class DType : int { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

// One packed segment (a whole layer, or one column range of a mixed-bit layer).
struct Segment {
  const int32_t* qweight = nullptr;  // [n, k*bits/32], contiguous
  const void* table0 = nullptr;      // lut: codebook [n, k/g, 2^bits]; affine: scales [n, k/g] (contiguous)
  const void* table1 = nullptr;      // affine: zeros [n, k/g]; lut: nullptr
  int64_t n = 0;                     // output rows
  int64_t k = 0;                     // columns of this segment
  int bits = 1;                      // 1, 2 (lut) or 4 (affine)
  int group_size = 128;              // 16 (2, 4 bit), 32, 64, 128 or 256: group_size_ok
  DType dtype = DType::kFloat;       // dtype of the tables
  bool affine() const { return bits == 4; }
};

// The group sizes the kernels handle: {16, 32, 64, 128, 256} with g * bits >= 32 (a word inside one group).
inline bool group_size_ok(int64_t bits, int64_t g) {
  return (g == 16 || g == 32 || g == 64 || g == 128 || g == 256) && g * bits >= 32;
}

// Activations for the decode GEMV, already fp32: x[m, col .. col + seg.k) at x + m*ldx + col.
struct Activations {
  const float* x = nullptr;   // fp32 [m, ldx]
  int64_t m = 0;
  int64_t ldx = 0;
  int64_t col = 0;            // first column of the segment inside a row of x
  // group sums [m, seg.k/g] of this segment's columns (group_sums): needed by affine segments; for 1-bit lut
  // segments at m = 1 it selects the mask kernel (nullptr: the decode kernel).
  const float* xsum = nullptr;
  // optional, for 2-bit (g % 128 == 0) and 4-bit (g % 64 == 0) segments: x with every chunk of 8 words' columns
  // (CH = 8 * 32/b) stored transposed (transpose_words), same ldx and col: lets those kernels decode 8 words of a
  // row at once with immediate shifts instead of broadcasting one word (kernels_avx2.cpp: block_t)
  const float* xt = nullptr;
};

// y[m, n] (+)= sum_k x[m, col + k] * w[n, k] (+ bias[n]) for n in [n0, n1), fp32 accumulation.
// accumulate: add to y instead of overwriting it (later segments of a mixed layer). bias may be nullptr.
void gemv(const Segment& seg, const Activations& act, float* y, int64_t ldy, const float* bias, bool accumulate,
          int64_t n0, int64_t n1);

// Rows [n0, n1) of the dense fp32 weight into out (row n at out + (n - n0)*ldo, columns 0 .. seg.k).
// Bit-exact with formats.dequantize_*: lut writes the table entry, affine computes (code - zero) * scale in fp32.
void dequantize(const Segment& seg, float* out, int64_t ldo, int64_t n0, int64_t n1);

// xsum[i, j] = sum of x[i, col + j*g .. col + (j+1)*g) for i < m, j < k/g (needed by affine segments).
void group_sums(const float* x, int64_t m, int64_t ldx, int64_t col, int64_t k, int group_size, float* xsum);

// xt[i, CH c + 8j + l] = x[i, CH c + per_word l + j] (CH = 8 per_word; j < per_word, l < 8) for i < m and the
// k columns of each row (k % CH == 0); both with row stride ldx.
void transpose_words(const float* x, int64_t m, int64_t ldx, int64_t k, int per_word, float* xt);

// Which kernel set runs: "avx2" (AVX2 + FMA + F16C present at run time) or "scalar". Asked once, then cached.
const char* isa();
// Force the scalar kernels (tests of the fallback); returns the previous setting.
bool force_scalar(bool on);
// Whether the AVX2 kernels run now (CPU has AVX2 + FMA + F16C and the scalar kernels are not forced).
bool use_avx2();

// Scalar fallback and AVX2 implementations, selected by gemv/dequantize above.
namespace scalar {
void gemv(const Segment& seg, const Activations& act, float* y, int64_t ldy, const float* bias, bool accumulate,
          int64_t n0, int64_t n1);
void dequantize(const Segment& seg, float* out, int64_t ldo, int64_t n0, int64_t n1);
}  // namespace scalar
namespace avx2 {
void gemv(const Segment& seg, const Activations& act, float* y, int64_t ldy, const float* bias, bool accumulate,
          int64_t n0, int64_t n1);
void dequantize(const Segment& seg, float* out, int64_t ldo, int64_t n0, int64_t n1);
}  // namespace avx2

// fp16 / bf16 bit patterns -> fp32 (exact; used for the per-group tables and by the scalar kernels).
inline float bf16_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);                  // inf / nan
  } else if (exp != 0) {
    u = sign | ((exp + 112u) << 23) | (man << 13);         // normal: rebias 15 -> 127
  } else if (man == 0) {
    u = sign;                                              // +-0
  } else {                                                 // subnormal: normalize
    int e = -1;
    do { man <<= 1; ++e; } while ((man & 0x400u) == 0);
    u = sign | ((112u - e) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

// Element i of a table of dtype dt, as fp32.
inline float table_at(const void* t, DType dt, int64_t i) {
  switch (dt) {
    case DType::kHalf:
      return half_to_float(static_cast<const uint16_t*>(t)[i]);
    case DType::kBFloat16:
      return bf16_to_float(static_cast<const uint16_t*>(t)[i]);
    default:
      return static_cast<const float*>(t)[i];
  }
}

}  // namespace bivlm_cpu
