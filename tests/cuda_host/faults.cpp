// faults.cpp -- misuse that a GPU turns into a fault, a hang or garbage, and the host build into an abort with a
// message. tests/test_cuda_host.py runs each as a child process and checks the exit status and the message.
#include <climits>
#include <string>

#include "harness.h"
#include "ptx.cuh"

namespace harness {

namespace {

__global__ void misaligned_load(const int* p, int* out) { out[0] = static_cast<int>(bivlm::ptx::ld_nc_v4(p + 1).x); }
__global__ void misaligned_store(int* p) { bivlm::ptx::st_v4(p + 2, make_uint4(1, 2, 3, 4)); }
__global__ void overread(const int* p, int n, int* out) { out[threadIdx.x] = p[n + static_cast<int>(threadIdx.x) - 1]; }
__global__ void overflow(int base, int* out) { out[threadIdx.x] = base + static_cast<int>(threadIdx.x); }
__global__ void exited_lane(float* out) {
  if (threadIdx.x < 16) return;
  out[threadIdx.x] = bivlm::ptx::shfl_xor(1.0f, 1);
}
__global__ void outside_mask(float* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = bivlm::ptx::shfl_xor(1.0f, 16, 0x0000ffffu);
}
__global__ void not_in_mask(float* out) { out[threadIdx.x] = bivlm::ptx::shfl_xor(1.0f, 1, 0xfffffffeu); }
__global__ void mixed_collectives(float* out) {
  out[threadIdx.x] = threadIdx.x % 2 ? bivlm::ptx::shfl_xor(1.0f, 1) : static_cast<float>(bivlm::ptx::ballot(true));
}
__global__ void deadlock(float* out) {
  if (threadIdx.x < 32 && threadIdx.x % 2) out[threadIdx.x] = bivlm::ptx::shfl_xor(1.0f, 1);
  __syncthreads();
}

}  // namespace

int run_fault(const char* name) {
  const std::string n = name;
  Buffer buf(64), out(64 * 4);
  int* p = static_cast<int*>(buf.data());
  int* o = static_cast<int*>(out.data());
  float* of = static_cast<float*>(out.data());
  if (n == "misaligned_load") BIVLM_LAUNCH(1, 1, 0, nullptr, misaligned_load)(p, o);
  else if (n == "misaligned_store") BIVLM_LAUNCH(1, 1, 0, nullptr, misaligned_store)(p);
  else if (n == "heap_overread") BIVLM_LAUNCH(1, 2, 0, nullptr, overread)(p, 16, o);
  else if (n == "int_overflow") BIVLM_LAUNCH(1, 2, 0, nullptr, overflow)(INT_MAX, o);
  else if (n == "exited_lane") BIVLM_LAUNCH(1, 32, 0, nullptr, exited_lane)(of);
  else if (n == "outside_mask") BIVLM_LAUNCH(1, 32, 0, nullptr, outside_mask)(of);
  else if (n == "not_in_mask") BIVLM_LAUNCH(1, 32, 0, nullptr, not_in_mask)(of);
  else if (n == "mixed_collectives") BIVLM_LAUNCH(1, 32, 0, nullptr, mixed_collectives)(of);
  else if (n == "deadlock") BIVLM_LAUNCH(1, 64, 0, nullptr, deadlock)(of);
  else {
    std::fprintf(stderr, "unknown fault %s\n", name);
    return 2;
  }
  std::printf("fault %s did not abort\n", name);
  return 0;
}

}  // namespace harness
