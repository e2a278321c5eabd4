// gemv_b2.cu -- instantiates the decode GEMV kernel (gemv.cuh) for BITS = 2, one translation unit per bit width
// so the three compile in parallel. Instantiated configs (3 dtypes x 5 MT x 2 VEC = 30 kernels):
//   T    in {__half, __nv_bfloat16, float}
//   MT   in {1, 2, 4, 8, 16}   (m is rounded up to the next bucket; ROWS = 4 for MT <= 2, else 2)
//   VEC  in {4 (16-byte loads), 1 (4-byte loads, for rows whose word count is not a multiple of 4)}
#include "gemv.cuh"

namespace bivlm {
namespace detail {

cudaError_t launch_gemv_b2(const void* x, int64_t m, int64_t ldx, const PackedWeight& w, const void* bias,
                           int splits, int words_per_split, void* out, float* out_f32, cudaStream_t stream) {
  return launch_gemv_bits<2>(x, m, ldx, w, bias, splits, words_per_split, out, out_f32, stream);
}

}  // namespace detail
}  // namespace bivlm
