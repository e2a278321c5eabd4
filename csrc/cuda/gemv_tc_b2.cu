// gemv_tc_b2.cu -- instantiations of the 2-bit tensor-core GEMV (gemv_tc2.cuh): dtype x M bucket x group size.
// The format checks and the split-K policy of the tensor-core kernels are in gemv_tc_dispatch.cu.
#include "gemv_tc2.cuh"

namespace bivlm {
namespace detail {

namespace {

struct Tc2Launch {
  template <typename T, int MT, int G, class... A>
  static cudaError_t run(A... a) {
    return launch_tc2_config<T, MT, G>(a...);
  }
};

}  // namespace

cudaError_t launch_tc2(const void* x, int64_t m, int64_t ldx, const TcWeight& w, const void* bias, int splits,
                       int cps, void* out, float* out_f32, cudaStream_t stream) {
  return dispatch_tc<Tc2Launch>(x, m, ldx, w, bias, splits, cps, out, out_f32, stream);
}

}  // namespace detail
}  // namespace bivlm
