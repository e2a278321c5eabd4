// ptx_device_check.cu -- uses every wrapper of csrc/cuda/ptx.cuh once in a device kernel, so that `nvcc -cubin` for
// sm_80 / sm_90 assembles the inline PTX even of wrappers no kernel uses yet (tests/test_cuda_host.py). Not a
// correctness test: the host implementations are tested in test_ptx.cpp.
#include "ptx.cuh"

namespace ptx = bivlm::ptx;

__global__ void ptx_device_check(const int32_t* __restrict__ g, uint32_t* __restrict__ out) {
  __shared__ __align__(16) uint16_t smem[2 * 16 * 16];
  const int lane = static_cast<int>(threadIdx.x % 32);
  ptx::cp_async16(smem + 8 * lane, g + 4 * lane, lane < 16);
  ptx::cp_async_commit();
  ptx::cp_async_wait<0>();
  __syncthreads();
  uint32_t a[4], b2[2], b1[1];
  ptx::ldmatrix<4>(a, smem + 8 * lane);
  ptx::ldmatrix<4, true>(a, smem + 8 * lane);
  ptx::ldmatrix<2>(b2, smem + 8 * (lane % 16));
  ptx::ldmatrix<2, true>(b2, smem + 8 * (lane % 16));
  ptx::ldmatrix<1>(b1, smem + 8 * (lane % 8));
  ptx::ldmatrix<1, true>(b1, smem + 8 * (lane % 8));
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  ptx::mma_m16n8k16_f16(d, a, b2, d);
  ptx::mma_m16n8k16_bf16(d, a, b2, d);
  const uint4 v = ptx::ld_nc_v4(g + 4 * lane);
  const uint4 w = ptx::ld_cs_v4(g + 4 * lane);
  d[2] += __uint_as_float(ptx::ld_shared_v4(smem + 8 * (lane % 16)).y);
  d[3] += ptx::ld_nc_f4(reinterpret_cast<const float*>(g) + 4 * lane).w;
  uint32_t x = ptx::lop3<0xEA>(v.x, w.y, b1[0]) + ptx::prmt(v.z, w.w, 0x5140u) +
               static_cast<uint32_t>(ptx::ld_cs_b32(g + lane));
  x += ptx::shfl_xor(x, 1) + ptx::shfl_down(x, 2u) + ptx::shfl_up(x, 3u) + ptx::shfl_idx(x, 4, 0xffffffffu, 16);
  x += ptx::ballot(x & 1u);
  ptx::syncwarp();
  ptx::st_v4(out + 4 * threadIdx.x, make_uint4(x, __float_as_uint(d[0]), __float_as_uint(d[1] + d[2] + d[3]), 0u));
}
