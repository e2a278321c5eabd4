// test_runtime.cpp -- the emulated machine of csrc/cuda/host/: every (block, thread) runs once with the right indices,
// __syncthreads orders the block, warp collectives see every lane, dynamic shared memory has exactly the
// launch's size and is per block, launch configuration errors are reported like CUDA's and launch nothing.
#include <vector>

#include "harness.h"
#include "ptx.cuh"

namespace harness {

namespace {

// Records (block, thread) visits: out[linear block * threads + linear thread] += 1 + that thread's own index.
__global__ void index_kernel(int* visits, int* ids) {
  const unsigned b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
  visits[b * threads + t] += 1;
  ids[b * threads + t] = static_cast<int>(t);
}

// Thread t writes smem[t], the block syncs, thread t reads its neighbour's slot: correct only with a real barrier
// (threads run until they block, so without one thread 0 would read slot 1 before thread 1 wrote it).
__global__ void barrier_kernel(int* out, int rounds) {
  BIVLM_DYNAMIC_SMEM(int, smem);
  const int t = static_cast<int>(threadIdx.x), n = static_cast<int>(blockDim.x);
  int v = t + 1000 * static_cast<int>(blockIdx.x);
  for (int r = 0; r < rounds; ++r) {
    smem[t] = v;
    __syncthreads();
    v = smem[(t + 1) % n];
    __syncthreads();
  }
  out[blockIdx.x * n + t] = v;
}

// Shared-memory contents at block start (must be the 0xA5 fill for every block, not the previous block's data).
__global__ void smem_fill_kernel(int* out) {
  BIVLM_DYNAMIC_SMEM(unsigned char, smem);
  out[blockIdx.x] = smem[threadIdx.x];
  __syncthreads();
  smem[threadIdx.x] = 0;
}

// Threads exit early at different points; the rest still pass two barriers (exited threads do not hold them).
__global__ void early_exit_kernel(int* out) {
  const int t = static_cast<int>(threadIdx.x);
  if (t % 3 == 0) return;
  __syncthreads();
  if (t % 3 == 1) return;
  __syncthreads();
  out[t] = 1;
}

}  // namespace

int run_runtime_tests() {
  const long failures0 = g_count.failures;
  // Indices over a 3-D grid of 3-D blocks.
  {
    const dim3 grid(3, 2, 2), block(8, 4, 2);
    const int total = 12 * 64;
    Buffer visits(total * 4), ids(total * 4);
    std::memset(visits.data(), 0, visits.bytes());
    BIVLM_LAUNCH(grid, block, 0, nullptr, index_kernel)(static_cast<int*>(visits.data()), static_cast<int*>(ids.data()));
    HCHECK(cudaGetLastError() == cudaSuccess, "index_kernel launch");
    for (int i = 0; i < total; ++i) {
      HCHECK(static_cast<int*>(visits.data())[i] == 1, "slot %d visited %d times", i, static_cast<int*>(visits.data())[i]);
      HCHECK(static_cast<int*>(ids.data())[i] == i % 64, "slot %d has thread id %d", i, static_cast<int*>(ids.data())[i]);
    }
  }
  // Barriers: after r rounds thread t holds the value of thread (t + r) % n.
  for (int n : {1, 32, 96, 256}) {
    const int blocks = 2, rounds = 5;
    Buffer out(blocks * n * 4);
    BIVLM_LAUNCH(blocks, n, n * sizeof(int), nullptr, barrier_kernel)(static_cast<int*>(out.data()), rounds);
    for (int b = 0; b < blocks; ++b)
      for (int t = 0; t < n; ++t) {
        const int got = static_cast<int*>(out.data())[b * n + t];
        HCHECK(got == (t + rounds) % n + 1000 * b, "barrier n=%d block %d thread %d: %d", n, b, t, got);
      }
  }
  // Fresh shared memory per block.
  {
    Buffer out(4 * 4);
    BIVLM_LAUNCH(4, 32, 32, nullptr, smem_fill_kernel)(static_cast<int*>(out.data()));
    for (int b = 0; b < 4; ++b) HCHECK(static_cast<int*>(out.data())[b] == 0xA5, "block %d saw smem %d", b, static_cast<int*>(out.data())[b]);
  }
  // Early exits do not deadlock barriers.
  {
    Buffer out(96 * 4);
    std::memset(out.data(), 0, out.bytes());
    BIVLM_LAUNCH(1, 96, 0, nullptr, early_exit_kernel)(static_cast<int*>(out.data()));
    for (int t = 0; t < 96; ++t) HCHECK(static_cast<int*>(out.data())[t] == (t % 3 == 2), "early exit thread %d", t);
  }
  // Launch configuration errors: cudaErrorInvalidConfiguration from cudaGetLastError (then cleared), no launch.
  {
    Buffer out(4);
    const struct {
      dim3 grid, block;
      size_t smem;
    } bad[] = {{dim3(0), dim3(32), 0}, {dim3(1), dim3(1025), 0}, {dim3(1), dim3(32, 32, 2), 0},
               {dim3(1, 65536), dim3(32), 0}, {dim3(1), dim3(32), 228 * 1024}, {dim3(1), dim3(0), 0}};
    for (const auto& c : bad) {
      const long before = bivlm::host::launch_count();
      BIVLM_LAUNCH(c.grid, c.block, c.smem, nullptr, early_exit_kernel)(static_cast<int*>(out.data()));
      HCHECK(bivlm::host::launch_count() == before, "bad config (%u,%u,%u)x(%u,%u,%u) launched", c.grid.x, c.grid.y,
             c.grid.z, c.block.x, c.block.y, c.block.z);
      HCHECK(cudaGetLastError() == cudaErrorInvalidConfiguration, "bad config not reported");
      HCHECK(cudaGetLastError() == cudaSuccess, "cudaGetLastError did not clear");
    }
  }
  std::printf("emulated machine: ok so far (%ld checks)\n", g_count.checks);
  return g_count.failures != failures0;
}

}  // namespace harness
