// gemv_dispatch.cu -- host side of the decode path: split-K policy, argument checks, per-bit dispatch, and the
// split-K reduction kernel (sum of fp32 partials + conversion to the output dtype).
#include <cstdint>

#include "gemv.cuh"

namespace bivlm {

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Words a warp consumes per row per iteration (32 lanes x VEC words).
int64_t warp_step(const PackedWeight& w) { return 32 * (gemv_uses_vec4(w) ? 4 : 1); }

// Words of one row per split for `splits` splits: at least ceil(kw / splits), rounded up to whole warp steps so
// every lane of a split has the same number of iterations (except in the last split).
int64_t words_per_split(const PackedWeight& w, int splits) {
  const int64_t kw = w.k * w.bits / 32;
  const int64_t step = warp_step(w);
  return ceil_div(ceil_div(kw, splits), step) * step;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

size_t dtype_size(DType t) { return t == DType::kFloat ? 4 : 2; }

}  // namespace

bool gemv_uses_vec4(const PackedWeight& w) {
  const int64_t kw = w.k * w.bits / 32;
  return kw % 4 == 0 && aligned16(w.qweight);
}

// Split-K policy (NOT MEASURED; to tune on an H100): aim for >= 4 blocks of 128 threads per SM, i.e. 16 resident
// warps per SM, each with 2 * ROWS 16-byte loads in flight, which is ~32-64 KB in flight per SM -- above the
// ~20 KB per SM that Little's law asks for at 3 TB/s and ~800 ns latency. Split only as far as each split keeps
// one full warp step per row, and at most 32 ways (the fp32 partials cost splits * m * n * 4 bytes of traffic).
int gemv_num_splits(int64_t m, const PackedWeight& w, int sm_count) {
  const int64_t kw = w.k * w.bits / 32;
  const int64_t row_blocks = ceil_div(w.n, detail::gemv_rows_per_block(m));
  const int64_t target_blocks = 4 * static_cast<int64_t>(sm_count > 0 ? sm_count : 1);
  int64_t splits = ceil_div(target_blocks, row_blocks);
  const int64_t max_splits = ceil_div(kw, warp_step(w));
  if (splits > max_splits) splits = max_splits;
  if (splits > 32) splits = 32;
  if (splits < 1) splits = 1;
  // Drop splits that would get no words after rounding words_per_split up to whole warp steps.
  splits = ceil_div(kw, words_per_split(w, static_cast<int>(splits)));
  return static_cast<int>(splits < 1 ? 1 : splits);
}

cudaError_t launch_gemv(const void* x, int64_t m, int64_t ldx, const PackedWeight& w, const void* bias, int splits,
                        void* out, float* out_f32, cudaStream_t stream) {
  // The op layer checks shapes and dtypes with readable messages; these guard the kernel's own assumptions.
  const bool bits_ok = w.bits == 1 || w.bits == 2 || w.bits == 4;
  const bool group_ok = w.group_size == 32 || w.group_size == 64 || w.group_size == 128 || w.group_size == 256;
  if (!bits_ok || !group_ok || m < 1 || m > kGemvMaxM || w.n < 1 || w.k < w.group_size ||
      w.k % w.group_size != 0 || splits < 1 || (splits > 1 && out_f32 == nullptr) ||
      (out == nullptr && out_f32 == nullptr) || w.n > INT32_MAX || w.k > INT32_MAX ||
      (w.bits == 4) != (w.table1 != nullptr)) {
    return cudaErrorInvalidValue;
  }
  // load8 reads 16 bytes of x at columns that are multiples of 8.
  if (!aligned16(x) || (ldx * static_cast<int64_t>(dtype_size(w.dtype))) % 16 != 0 || ldx < w.k) {
    return cudaErrorInvalidValue;
  }
  const int wps = static_cast<int>(words_per_split(w, splits));
  switch (w.bits) {
    case 1:
      return detail::launch_gemv_b1(x, m, ldx, w, bias, splits, wps, out, out_f32, stream);
    case 2:
      return detail::launch_gemv_b2(x, m, ldx, w, bias, splits, wps, out, out_f32, stream);
    default:
      return detail::launch_gemv_b4(x, m, ldx, w, bias, splits, wps, out, out_f32, stream);
  }
}

namespace detail {

// What: out[i] = sum over splits of ws[s * mn + i], rounded once to OutT. Why: a fixed summation order keeps the
// split-K result deterministic (no atomics), and the same kernel converts fp32 results to a narrower out dtype.
template <typename OutT>
__global__ void splitk_reduce_kernel(const float* __restrict__ ws, int splits, int64_t mn, OutT* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < mn;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = 0.0f;
    for (int s = 0; s < splits; ++s) v += ws[s * mn + i];
    out[i] = from_float<OutT>(v);
  }
}

template <typename OutT>
cudaError_t launch_reduce_typed(const float* ws, int splits, int64_t mn, void* out, cudaStream_t stream) {
  const int threads = 256;
  int64_t blocks = ceil_div(mn, threads);
  if (blocks > 65535) blocks = 65535;  // grid-stride loop covers the rest
  BIVLM_LAUNCH(static_cast<unsigned>(blocks), threads, 0, stream, splitk_reduce_kernel<OutT>)(ws, splits, mn,
                                                                                            static_cast<OutT*>(out));
  return cudaGetLastError();
}

}  // namespace detail

cudaError_t launch_splitk_reduce(const float* ws, int splits, int64_t mn, void* out, DType out_dtype,
                                 cudaStream_t stream) {
  if (splits < 1 || mn < 0 || ws == nullptr || out == nullptr) return cudaErrorInvalidValue;
  if (mn == 0) return cudaSuccess;
  switch (out_dtype) {
    case DType::kHalf:
      return detail::launch_reduce_typed<__half>(ws, splits, mn, out, stream);
    case DType::kBFloat16:
      return detail::launch_reduce_typed<__nv_bfloat16>(ws, splits, mn, out, stream);
    case DType::kFloat:
      return detail::launch_reduce_typed<float>(ws, splits, mn, out, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace bivlm
