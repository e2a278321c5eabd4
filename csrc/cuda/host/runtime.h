// host/runtime.h -- the CUDA runtime as the host build of csrc/cuda/ sees it: keywords, vector types, the runtime API
// subset the launchers call, thread/block indices, __syncthreads, and the launcher behind BIVLM_LAUNCH.
//
// How kernels run on the CPU (implemented in runtime.cpp):
//   * A launch runs its blocks one after another, in blockIdx order (x fastest). Blocks of a grid never
//     communicate inside one launch, so running them in turn is a legal GPU schedule.
//   * Inside a block, every GPU thread is a fiber (its own stack; runtime.cpp switches between them) on the
//     calling OS thread. A fiber runs until it reaches a synchronization point -- __syncthreads, or a warp-collective wrapper of ptx.cuh
//     (shuffle, vote, ldmatrix, mma.sync, ...) -- and then yields to the block scheduler. A warp collective
//     completes when every lane named in its mask has arrived at the same primitive with the same mask: the
//     last lane to arrive computes every lane's result from all lanes' inputs at once (so lanes really exchange
//     values, with the PTX semantics), then all of them resume. __syncthreads completes when every live thread
//     of the block has arrived.
//   * Misuse that is undefined on a GPU is a fatal error with the kernel, block and thread named: a lane missing
//     from a collective (exited, or never arriving: deadlock), lanes of one mask in different primitives, a
//     shuffle reading a lane outside the mask, a misaligned vector load, a bad launch configuration is
//     cudaErrorInvalidConfiguration as on a GPU.
// Why fibers and not OS threads: deterministic (the same schedule every run, so a failure reproduces), cheap
// (a switch is a function call, not a futex), and AddressSanitizer follows them (the switches are annotated).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <tuple>
#include <utility>

#if !defined(BIVLM_HOST_BUILD)
#error "csrc/cuda/host/ is the host build of the kernels: compile with -DBIVLM_HOST_BUILD -Icsrc/cuda/host/include"
#endif

// ---- CUDA keywords: plain C++ on the host --------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// Static shared memory: one instance per kernel instantiation; blocks run in turn, so that is per-block storage.
// (Unlike a GPU it keeps the previous block's contents: reading it before writing is not caught.)
#define __shared__ static

// ---- vector types (layout and alignment as in CUDA's vector_types.h) -----------------------------------------
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(8) uint2 {
  unsigned int x, y;
};
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }

// ---- runtime API subset (values of the real enum, so messages and tests read the same) -----------------------
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719,
};
typedef cudaError_t cudaError;
struct CUstream_st;
typedef CUstream_st* cudaStream_t;
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t e);
cudaError_t cudaDeviceSynchronize();

// ---- device math intrinsics the kernels use (exact IEEE fp32, no contraction: built with -ffp-contract=off) ---
inline float __uint_as_float(unsigned int u) {
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
inline unsigned int __float_as_uint(float f) {
  unsigned int u;
  __builtin_memcpy(&u, &f, 4);
  return u;
}
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }

namespace bivlm {
namespace host {

// ---- the emulated machine (runtime.cpp) ----------------------------------------------------------------------

struct ThreadState;  // one fiber = one GPU thread

// Indices of the running thread/block; valid inside a kernel only (a fatal error outside one).
const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
// Linear thread index in the block, lane (= linear % 32) and warp of the running thread.
int linear_tid();

// Prints "bivlm host build: <msg> [kernel K, block (x,y,z), thread (x,y,z)]" to stderr and aborts.
[[noreturn]] void fatal(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// Block-wide barrier (__syncthreads).
void syncthreads();

// Warp collective: blocks the calling lane until every lane in `mask` has called warp_collective with the same
// `op` and `mask`; then combine(slots, mask) runs once, with slots[l] = lane l's `data` (nullptr outside mask),
// and every lane of the mask resumes. The caller's lane must be in mask. `op` names the primitive in errors.
using CombineFn = void (*)(void* const* slots, unsigned mask);
void warp_collective(unsigned mask, const char* op, void* data, CombineFn combine);

// cp.async (ptx.cuh): issue reads `size` bytes of src now (src_size < size: the rest is zero-filled) and keeps
// them in the thread's open group; commit closes the group; wait(n) writes every group but the newest n to
// their shared-memory destinations. So data read before its wait is stale, as it may be on a GPU.
void cp_async_issue(void* dst, const void* src, int size, int src_size);
void cp_async_commit();
void cp_async_wait(int pending_groups);

// Dynamic shared memory of the running block (exactly the launch's byte count, filled with 0xA5 per block).
void* dynamic_smem();

// Number of grid launches that ran (tests check that refused arguments launch nothing).
long launch_count();
// Demangled names of every kernel instantiation launched so far with its launch count, one "count name" per line
// (tests check that every instantiated configuration ran; needs the binary linked with -rdynamic).
std::string launched_kernels();

// ---- launches -------------------------------------------------------------------------------------------------

struct LaunchConfig {
  dim3 grid, block;
  size_t smem;
  const char* name;  // the kernel expression as written, for errors
  const char* file;
  int line;
  const void* kernel;  // the instantiation (its symbol names it in launched_kernels)
};

// Validates the configuration (sets cudaErrorInvalidConfiguration and runs nothing when it is not launchable),
// then runs body(ctx) once per thread of every block as described at the top of this file.
void run_grid(const LaunchConfig& cfg, void (*body)(void*), void* ctx);

template <class... P>
struct Launcher {
  LaunchConfig cfg;
  void (*kernel)(P...);
  template <class... A>
  void operator()(A&&... a) const {
    // Arguments are converted to the parameter types and copied once, as a CUDA launch does.
    std::tuple<P...> args(std::forward<A>(a)...);
    struct Ctx {
      void (*kernel)(P...);
      std::tuple<P...>* args;
    } ctx{kernel, &args};
    run_grid(cfg, [](void* c) {
      Ctx* x = static_cast<Ctx*>(c);
      std::apply(x->kernel, *x->args);
    }, &ctx);
  }
};

template <class... P>
Launcher<P...> make_launcher(dim3 grid, dim3 block, size_t smem, cudaStream_t, void (*kernel)(P...),
                             const char* name, const char* file, int line) {
  return Launcher<P...>{LaunchConfig{grid, block, smem, name, file, line, reinterpret_cast<const void*>(kernel)},
                        kernel};
}

}  // namespace host
}  // namespace bivlm

#define threadIdx (::bivlm::host::thread_idx())
#define blockIdx (::bivlm::host::block_idx())
#define blockDim (::bivlm::host::block_dim())
#define gridDim (::bivlm::host::grid_dim())
inline void __syncthreads() { ::bivlm::host::syncthreads(); }
