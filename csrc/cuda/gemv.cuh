// gemv.cuh -- the decode GEMV kernel (M = 1 .. kGemvMaxM) for packed 1/2/4-bit weights.
//
// y[i, n] = sum_k x[i, k] * w[n, k] (+ bias[n]), fp32 accumulation.
//
// Work decomposition (memory-bound regime: stream every packed weight byte once, dequantize in registers):
//
//   grid  = (ceil(N / (4 * ROWS)), splits)         block = 4 warps (kGemvThreads = 128)
//   warp  w of block b owns rows n = (4b + w) * ROWS .. + ROWS - 1, and K-split blockIdx.y
//   lane  l reads words  wb + l*VEC + j*32*VEC  (j = 0, 1, ...) of each of its ROWS rows:
//
//       row n:  | l0 | l1 | l2 | ... | l31 | l0 | l1 | ...        (each cell = VEC words = 16 bytes for VEC = 4)
//               <------- 32 * VEC words: one fully coalesced 512-byte warp load per row ------->
//
//   Each lane keeps acc[ROWS][MT] in registers; the 8 activations of a sub-chunk are loaded once and used for
//   all ROWS rows (register reuse; L1 traffic / ROWS). After the K loop one warp_sum per (row, m) and lane 0
//   writes. The next VEC words of every row are loaded before the current ones are decoded (double-buffered
//   registers), so each lane has 2 * ROWS independent 16-byte loads in flight.
//
//   split-K (blockIdx.y): when N alone gives too few blocks, K is cut into `splits` ranges of words_per_split
//   words (a multiple of 32 * VEC); each split writes an fp32 partial and launch_splitk_reduce sums them.
//
// Template parameters:
//   T     activation / table / bias type: __half, __nv_bfloat16, float
//   BITS  1 or 2 (lut codebook) or 4 (affine scale/zero)
//   MT    compile-time bound on M (1, 2, 4, 8, 16); rows i >= m are skipped at run time (warp-uniform branch)
//   VEC   words per load: 4 (16-byte uint4 loads; needs K*BITS/32 % 4 == 0 and an aligned base) or 1
//   ROWS  (derived) output rows per warp: 4 for MT <= 2, else 2 -- bounded by the acc[ROWS][MT] registers
#pragma once

#include "common.cuh"

namespace bivlm {
namespace detail {

template <typename T>
struct GemvParams {
  const T* x;            // [m, k], row stride ldx
  int64_t ldx;
  int m;
  const int32_t* qweight;  // [n, kw]
  const T* t0;           // lut codebook [n, groups, 2^b] or affine scales [n, groups]
  const T* t1;           // affine zeros [n, groups] or nullptr
  int n;
  int kw;                // words per row = k * BITS / 32
  int groups;            // k / group_size
  int wpg_shift;         // log2(words per group) = log2(group_size * BITS / 32)
  int words_per_split;   // multiple of 32 * VEC
  const T* bias;         // [n] or nullptr
  T* out;                // [m, n] (when out_f32 == nullptr)
  float* out_f32;        // [splits, m, n] fp32 partials, or nullptr
};

constexpr int kGemvWarps = kGemvThreads / 32;

template <int MT>
struct GemvRows {
  static constexpr int value = MT <= 2 ? 4 : 2;
};

template <typename T, int BITS, int MT, int VEC>
__global__ void __launch_bounds__(kGemvThreads) gemv_kernel(const GemvParams<T> p) {
  using C = Codes<BITS>;
  constexpr int ROWS = GemvRows<MT>::value;
  constexpr int STEP = 32 * VEC;  // words a warp consumes per row per iteration

  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int row0 = (blockIdx.x * kGemvWarps + warp) * ROWS;
  const int wb = blockIdx.y * p.words_per_split;                 // this split's words: [wb, we)
  const int we = min(p.kw, wb + p.words_per_split);
  const int wpg_mask = (1 << p.wpg_shift) - 1;
  if (row0 >= p.n) return;  // whole warp past N (warps are independent: no block-level sync follows)

  // Rows past N read nothing and decode to zero (their code words and tables stay 0) and are never written.
  const int32_t* qrow[ROWS];
  bool valid[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    valid[r] = row0 + r < p.n;
    qrow[r] = p.qweight + static_cast<int64_t>(valid[r] ? row0 + r : 0) * p.kw;
  }

  float acc[ROWS][MT];
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int i = 0; i < MT; ++i) acc[r][i] = 0.0f;

  uint32_t cur[ROWS][VEC], nxt[ROWS][VEC];
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int j = 0; j < VEC; ++j) cur[r][j] = nxt[r][j] = 0u;

  int w0 = wb + lane * VEC;  // first word of this lane's current chunk (a multiple of VEC)
  if (w0 < we) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
      if (valid[r]) load_words<VEC>(qrow[r] + w0, cur[r]);
  }

  for (; w0 < we; w0 += STEP) {
    // Prefetch the next chunk of every row before decoding this one (2 * ROWS loads in flight per lane).
    const int wn = w0 + STEP;
    if (wn < we) {
#pragma unroll
      for (int r = 0; r < ROWS; ++r)
        if (valid[r]) load_words<VEC>(qrow[r] + wn, nxt[r]);
    }

    float e[ROWS][4];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) e[r][0] = e[r][1] = e[r][2] = e[r][3] = 0.0f;

#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int wi = w0 + j;  // word index within the row
      // A new group starts at this word (or it is the chunk's first word): reload the tables. Since w0 is a
      // multiple of VEC and words-per-group is a power of two, this branch is the same for all lanes.
      if (j == 0 || (wi & wpg_mask) == 0) {
        const int grp = wi >> p.wpg_shift;
#pragma unroll
        for (int r = 0; r < ROWS; ++r)
          if (valid[r]) {
            load_table<T, BITS>(p.t0, p.t1, static_cast<int64_t>(row0 + r) * p.groups + grp, e[r]);
            if constexpr (BITS == 4) e[r][2] = -e[r][1] * e[r][0];  // -zero * scale, for dequant8<4, true>
          }
      }
#pragma unroll
      for (int s = 0; s < C::kSubChunks; ++s) {
        const int k = wi * C::kPerWord + s * 8;  // first column of this sub-chunk
        float w[ROWS][8];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) dequant8<BITS, true>(cur[r][j], s, e[r], w[r]);
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          if (i < p.m) {
            float xv[8];
            load8(p.x + i * p.ldx + k, xv);
#pragma unroll
            for (int r = 0; r < ROWS; ++r)
#pragma unroll
              for (int t = 0; t < 8; ++t) acc[r][i] = fmaf(xv[t], w[r][t], acc[r][i]);
          }
        }
      }
    }

#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
      for (int j = 0; j < VEC; ++j) cur[r][j] = nxt[r][j];
  }

  // Epilogue: reduce over lanes; lane 0 writes. Bias is added once (by split 0).
  const bool add_bias = p.bias != nullptr && blockIdx.y == 0;
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      if (i < p.m) {
        float v = warp_sum(acc[r][i]);
        if (lane == 0 && valid[r])
          store_output(p.out, p.out_f32, p.bias, add_bias, blockIdx.y, p.m, p.n, i, row0 + r, v);
      }
    }
  }
}

// Per-bit-width entry points (one .cu file each, so the three compile in parallel).
cudaError_t launch_gemv_b1(const void* x, int64_t m, int64_t ldx, const PackedWeight& w, const void* bias,
                           int splits, int words_per_split, void* out, float* out_f32, cudaStream_t stream);
cudaError_t launch_gemv_b2(const void* x, int64_t m, int64_t ldx, const PackedWeight& w, const void* bias,
                           int splits, int words_per_split, void* out, float* out_f32, cudaStream_t stream);
cudaError_t launch_gemv_b4(const void* x, int64_t m, int64_t ldx, const PackedWeight& w, const void* bias,
                           int splits, int words_per_split, void* out, float* out_f32, cudaStream_t stream);

// Rows per warp for a given m (the MT bucket of gemv_mt, common.cuh).
inline int gemv_rows_per_block(int64_t m) { return kGemvWarps * (gemv_mt(m) <= 2 ? 4 : 2); }

// Launch one instantiation: fills the params and picks the grid.
template <typename T, int BITS, int MT, int VEC>
cudaError_t launch_gemv_config(const void* x, int64_t m, int64_t ldx, const PackedWeight& w, const void* bias,
                               int splits, int words_per_split, void* out, float* out_f32, cudaStream_t stream) {
  GemvParams<T> p;
  p.x = static_cast<const T*>(x);
  p.ldx = ldx;
  p.m = static_cast<int>(m);
  p.qweight = w.qweight;
  p.t0 = static_cast<const T*>(w.table0);
  p.t1 = static_cast<const T*>(w.table1);
  p.n = static_cast<int>(w.n);
  p.kw = static_cast<int>(w.k * BITS / 32);
  p.groups = static_cast<int>(w.k / w.group_size);
  p.wpg_shift = ilog2(w.group_size * BITS / 32);
  p.words_per_split = words_per_split;
  p.bias = static_cast<const T*>(bias);
  p.out = static_cast<T*>(out);
  p.out_f32 = out_f32;
  constexpr int rows_per_block = kGemvWarps * GemvRows<MT>::value;
  const dim3 grid(static_cast<unsigned>((w.n + rows_per_block - 1) / rows_per_block), static_cast<unsigned>(splits));
  BIVLM_LAUNCH(grid, kGemvThreads, 0, stream, gemv_kernel<T, BITS, MT, VEC>)(p);
  return cudaGetLastError();
}

// Picks the MT bucket from m and VEC from vec4 (see gemv_uses_vec4).
template <typename T, int BITS>
cudaError_t launch_gemv_dtype(const void* x, int64_t m, int64_t ldx, const PackedWeight& w, const void* bias,
                              int splits, int words_per_split, bool vec4, void* out, float* out_f32,
                              cudaStream_t stream) {
#define BIVLM_GEMV_CASE(MT_)                                                                                    \
  case MT_:                                                                                                     \
    return vec4 ? launch_gemv_config<T, BITS, MT_, 4>(x, m, ldx, w, bias, splits, words_per_split, out, out_f32, \
                                                      stream)                                                   \
                : launch_gemv_config<T, BITS, MT_, 1>(x, m, ldx, w, bias, splits, words_per_split, out, out_f32, \
                                                      stream);
  switch (gemv_mt(m)) {
    BIVLM_GEMV_CASE(1)
    BIVLM_GEMV_CASE(2)
    BIVLM_GEMV_CASE(4)
    BIVLM_GEMV_CASE(8)
    BIVLM_GEMV_CASE(16)
    default:
      return cudaErrorInvalidValue;
  }
#undef BIVLM_GEMV_CASE
}

// Instantiates every (dtype, MT, VEC) of one bit width; used by gemv_b{1,2,4}.cu.
template <int BITS>
cudaError_t launch_gemv_bits(const void* x, int64_t m, int64_t ldx, const PackedWeight& w, const void* bias,
                             int splits, int words_per_split, void* out, float* out_f32, cudaStream_t stream) {
  const bool vec4 = gemv_uses_vec4(w);
  switch (w.dtype) {
    case DType::kHalf:
      return launch_gemv_dtype<__half, BITS>(x, m, ldx, w, bias, splits, words_per_split, vec4, out, out_f32,
                                             stream);
    case DType::kBFloat16:
      return launch_gemv_dtype<__nv_bfloat16, BITS>(x, m, ldx, w, bias, splits, words_per_split, vec4, out,
                                                    out_f32, stream);
    case DType::kFloat:
      return launch_gemv_dtype<float, BITS>(x, m, ldx, w, bias, splits, words_per_split, vec4, out, out_f32,
                                            stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace detail
}  // namespace bivlm
