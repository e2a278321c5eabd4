// gemv_tc_b4.cu -- instantiations of the 4-bit (affine) tensor-core GEMV (gemv_tc4.cuh, BITS = 4): dtype x M
// bucket x group size. The format checks and the split-K policy of the tensor-core kernels are in gemv_tc_dispatch.cu.
#include "gemv_tc4.cuh"

namespace bivlm {
namespace detail {

cudaError_t launch_tc4(const void* x, int64_t m, int64_t ldx, const TcWeight& w, const void* bias, int splits,
                       int cps, void* out, float* out_f32, cudaStream_t stream) {
  return dispatch_tc<TcLaunch<4>>(x, m, ldx, w, bias, splits, cps, out, out_f32, stream);
}

}  // namespace detail
}  // namespace bivlm
