// gemv_tc_b4.cu -- instantiations of the 4-bit (affine) tensor-core GEMV (gemv_tc.cuh, BITS = 4): dtype x M
// bucket x group size.
// The format checks and the split-K policy of both tensor-core kernels are in gemv_tc_b1.cu.
#include "gemv_tc.cuh"

namespace bivlm {
namespace detail {

namespace {

template <typename T, int G>
cudaError_t launch_tc4_g(const void* x, int64_t m, int64_t ldx, const TcWeight& w, const void* bias, int splits,
                         int cps, void* out, float* out_f32, cudaStream_t stream) {
  const int mt = m <= 1 ? 1 : m <= 2 ? 2 : m <= 4 ? 4 : m <= 8 ? 8 : 16;
  switch (mt) {
    case 1:
      return launch_tc_config<T, 4, 1, G>(x, m, ldx, w, bias, splits, cps, out, out_f32, stream);
    case 2:
      return launch_tc_config<T, 4, 2, G>(x, m, ldx, w, bias, splits, cps, out, out_f32, stream);
    case 4:
      return launch_tc_config<T, 4, 4, G>(x, m, ldx, w, bias, splits, cps, out, out_f32, stream);
    case 8:
      return launch_tc_config<T, 4, 8, G>(x, m, ldx, w, bias, splits, cps, out, out_f32, stream);
    default:
      return launch_tc_config<T, 4, 16, G>(x, m, ldx, w, bias, splits, cps, out, out_f32, stream);
  }
}

template <typename T>
cudaError_t launch_tc4_t(const void* x, int64_t m, int64_t ldx, const TcWeight& w, const void* bias, int splits,
                         int cps, void* out, float* out_f32, cudaStream_t stream) {
  return w.group_size == 64 ? launch_tc4_g<T, 64>(x, m, ldx, w, bias, splits, cps, out, out_f32, stream)
                            : launch_tc4_g<T, 128>(x, m, ldx, w, bias, splits, cps, out, out_f32, stream);
}

}  // namespace

cudaError_t launch_tc4(const void* x, int64_t m, int64_t ldx, const TcWeight& w, const void* bias, int splits,
                       int cps, void* out, float* out_f32, cudaStream_t stream) {
  return w.dtype == DType::kHalf ? launch_tc4_t<__half>(x, m, ldx, w, bias, splits, cps, out, out_f32, stream)
                                 : launch_tc4_t<__nv_bfloat16>(x, m, ldx, w, bias, splits, cps, out, out_f32, stream);
}

}  // namespace detail
}  // namespace bivlm
