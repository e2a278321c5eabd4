// bivlm_kernels.h -- host-side launcher API of the bivlm CUDA kernels.
//
// This header is the only contract between the torch-facing translation unit (torch_ops.cpp, the one file that includes
// torch headers) and the plain-CUDA kernel files (*.cu, compiled by nvcc without torch). It uses raw device
// pointers, sizes and a cudaStream_t only, so CI can compile every kernel with plain nvcc.
//
// Packed format (bivlm-packed v1, see bivlm_kernels/formats/__init__.py): for a layer with N outputs, K inputs, b bits and
// group size g, qweight is int32 [N, K*b/32] with the code of column k in word k / (32/b) at bit (k % (32/b)) * b:
//
//     bit 31                                                    bit 0
//     b = 1:  | c31 | c30 | ..................... | c2 | c1 | c0 |     32 codes per word
//     b = 2:  |  c15  |  c14  | ............. |  c1  |  c0  |          16 codes per word (c0 = bits 1..0)
//     b = 4:  |   c7    |   c6    | ....... |   c1    |   c0    |      8 codes per word  (c0 = bits 3..0)
//
//   lut    (b = 1, 2): codebook [N, K/g, 2^b]      w[n, k] = codebook[n, k/g, code]
//   affine (b = 4):    scales, zeros [N, K/g]      w[n, k] = (code - zeros[n, k/g]) * scales[n, k/g]
//
// Since g >= 32 and g is a power of two, K is a multiple of 32, every word is full and lies inside one group.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace bivlm {

// Activation / table / output element type.
enum class DType : int { kHalf = 0, kBFloat16 = 1, kFloat = 2 };

// M (rows of x) up to this value use the decode GEMV kernel; larger M dequantizes the weight into a temporary
// [N, K] buffer and calls cuBLAS. NOT MEASURED: a starting value, to be set from an H100 sweep of both paths
// (benchmarks/); the CUDA-core GEMV costs O(M) FMAs per weight, so its advantage shrinks as M grows.
constexpr int kGemvMaxM = 16;

// Threads per GEMV block (4 warps; each warp owns a few output rows, its 32 lanes split that row's K range).
constexpr int kGemvThreads = 128;

// One segment's packed weight, as raw device pointers (all contiguous, row-major).
struct PackedWeight {
  const int32_t* qweight = nullptr;  // [n, k * bits / 32]
  const void* table0 = nullptr;      // lut: codebook [n, k / g, 2^bits]; affine: scales [n, k / g]
  const void* table1 = nullptr;      // affine: zeros [n, k / g]; lut: unused (nullptr)
  int64_t n = 0;                     // output features N
  int64_t k = 0;                     // input features K (multiple of group_size)
  int bits = 0;                      // 1, 2 (lut) or 4 (affine)
  int group_size = 0;                // 32, 64, 128 or 256
  DType dtype = DType::kHalf;        // dtype of the tables (and of x, bias)
};

// Number of K splits the GEMV launch will use for this problem (1 = no split-K; > 1 = the caller must pass an fp32
// workspace of splits * m * n floats as out_f32 and then call launch_splitk_reduce). sm_count: multiprocessors of
// the device. Deterministic in its arguments, so the caller can size the workspace before launching.
int gemv_num_splits(int64_t m, const PackedWeight& w, int sm_count);

// True when qweight can be read with 16-byte loads (row length a multiple of 4 words and a 16-byte aligned base);
// otherwise the GEMV kernel reads one word at a time. Exposed for tests/benchmarks.
bool gemv_uses_vec4(const PackedWeight& w);

// y[i, j] = sum_k x[i, k] * w[j, k] (+ bias[j] once), fp32 accumulation, for 1 <= m <= kGemvMaxM.
//   x:      [m, k] of w.dtype, row stride ldx >= k elements (last dim contiguous); rows must allow 16-byte loads:
//           a 16-byte aligned base and ldx * sizeof(element) % 16 == 0 (torch_ops.cpp copies x when they do not).
//   bias:   [n] of w.dtype or nullptr.
//   splits: from gemv_num_splits.
//   Output, exactly one of:
//     out     (w.dtype, [m, n] contiguous) when out_f32 == nullptr (requires splits == 1);
//     out_f32 (fp32, [splits, m, n] contiguous) otherwise: split s writes its partial sum to out_f32[s]; bias is
//             added by split 0 only, so sum_s out_f32[s] is the result.
cudaError_t launch_gemv(const void* x, int64_t m, int64_t ldx, const PackedWeight& w, const void* bias, int splits,
                        void* out, float* out_f32, cudaStream_t stream);

// out[i] = sum_{s < splits} ws[s * mn + i] for i < mn, converted to out_dtype (the split-K epilogue; with
// splits == 1 it is an fp32 -> out_dtype conversion).
cudaError_t launch_splitk_reduce(const float* ws, int splits, int64_t mn, void* out, DType out_dtype,
                                 cudaStream_t stream);

// out [n, k] (w.dtype, contiguous) = the dequantized weight, bit-for-bit what the reference computes in fp32 and
// rounds to w.dtype (lut: the codebook entry itself; affine: (code - zero) * scale in fp32, rounded once).
cudaError_t launch_dequantize(const PackedWeight& w, void* out, cudaStream_t stream);

// ---- tensor-core decode path (lut 1 / 2 bits, load-time "tc1" / "tc2" repacks; bivlm_kernels/backends/cuda/tc_repack.py draws
// the layouts) ----
//
//   1 bit:  qtc    uint4 [tc_tiles(n)][tc_chunks(k)][32 lanes]      16 rows x 256 k of codes per (tile, chunk)
//           table  dtype [tc_tiles(n) + 1][tc_table_groups(k, g)][8][2][tc1_table_entries]  a byte layout per tile:
//                  D = c1 - c0 fp32, then c0, c1 in mma fragment order (gemv_tc1.cuh)
//   2 bits: qtc    uint4 [tc_tiles(n)][tc2_chunks(k)][32 lanes]     16 rows x 128 k
//           table  dtype [tc_tiles(n) + 1][tc2_table_groups(k, g)][8][2][4]  the 4 entries of rows (g, g + 8)
//   4 bits: qtc    uint4 [tc_tiles(n)][tc4_chunks(k)][32 lanes]     16 rows x 64 k (affine)
//           table  dtype [tc_tiles(n) + 1][tc4_table_groups(k, g)][8][2][2]  (scale, zero) of rows (g, g + 8)
//   The last tile of a table is zeros (the kernels' zero source for B).
// Rows past n, k past K and groups past K / g are zero (codes and tables), so they contribute nothing.
struct TcWeight {
  const void* qtc = nullptr;
  const void* table = nullptr;
  int64_t n = 0;
  int64_t k = 0;
  int bits = 1;
  int group_size = 0;
  DType dtype = DType::kHalf;
};

// m16 tiles (a multiple of 4), 256-k chunks, and table groups (a multiple of 8) of the repacked layout.
inline int64_t tc_tiles(int64_t n) { return ((n + 15) / 16 + 3) / 4 * 4; }
inline int64_t tc_chunks(int64_t k) { return (k + 255) / 256; }
inline int64_t tc_table_groups(int64_t k, int g) { return (tc_chunks(k) * 256 / g + 7) / 8 * 8; }
// tc1: elements of the codebook dtype per (row, group) of the table (D fp32 + c0, c1 in mma fragment order), and
// the table-product steps (kGt groups each) a split of sgroups groups can overlap.
inline int64_t tc1_table_entries(DType) { return 4; }
inline int tc1_table_steps(int sgroups, int gt) { return (sgroups + 2 * gt - 2) / gt; }
inline int64_t tc2_chunks(int64_t k) { return (k + 127) / 128; }
inline int64_t tc2_table_groups(int64_t k, int g) { return (tc2_chunks(k) * 128 / g + 7) / 8 * 8; }
inline int64_t tc4_chunks(int64_t k) { return (k + 63) / 64; }
inline int64_t tc4_table_groups(int64_t k, int g) { return ((tc4_chunks(k) * 64 + g - 1) / g + 7) / 8 * 8; }

// True when a tensor-core kernel covers this format: lut bits 1 or 2, affine 4, g 64 or 128, fp16 or bf16.
bool gemv_tc_supported(int bits, int group_size, DType dtype);

// K splits for the tensor-core GEMV (1 = none; > 1: out_f32 workspace of splits * m * n, then
// launch_splitk_reduce), deterministic in its arguments as gemv_num_splits.
int gemv_tc_num_splits(int64_t m, const TcWeight& w, int sm_count);

// y = x W^T (+ bias) for 1 <= m <= kGemvMaxM with the repacked weight; x as for launch_gemv (16-byte aligned rows).
cudaError_t launch_gemv_tc(const void* x, int64_t m, int64_t ldx, const TcWeight& w, const void* bias, int splits,
                           void* out, float* out_f32, cudaStream_t stream);

// ---- the sub-2-bit layout in one decode launch (gemv_tc_seg.cu) ----
//
// y = x[:, perm] . [W2 | W1]^T (+ bias): a 2-bit lut segment over the first k2 permuted columns and a 1-bit lut
// segment over the next k1 (either may be absent, k = 0), each as its tc2 / tc1 repack; perm int32 [k2 + k1]
// (16-byte aligned) or nullptr (the identity). Each block gathers x through perm into shared memory for its split
// of both segments and runs both decodes, accumulating one fp32 partial per split.
struct TcSegWeight {
  TcWeight seg2;                     // bits 2 (k = 0: absent)
  TcWeight seg1;                     // bits 1 (k = 0: absent)
  const int32_t* perm = nullptr;
};

// Threads per block of the segmented kernel (8 warps: the gathered x serves 512 rows).
constexpr int kTcSegThreads = 256;

// K splits of the segmented kernel (>= 1; the caller passes an fp32 workspace of splits * m * n floats and then
// calls launch_splitk_reduce, with splits == 1 too); 0 when the segments are not a layout it covers (both
// tensor-core formats at the same n, g and dtype, g 64 / 128, k2 + k1 > 0).
int gemv_tc_seg_num_splits(int64_t m, const TcSegWeight& w, int sm_count);

// out_f32 [splits, m, n] = the partials (bias in split 0); x as for launch_gemv_tc, [m, k2 + k1].
cudaError_t launch_gemv_tc_seg(const void* x, int64_t m, int64_t ldx, const TcSegWeight& w, const void* bias,
                               int splits, float* out_f32, cudaStream_t stream);

}  // namespace bivlm
