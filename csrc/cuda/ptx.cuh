// ptx.cuh -- the one wrapper for every PTX instruction / CUDA intrinsic the kernels use, and the launch macro.
//
// Kernels never write `asm` or a raw intrinsic (__ldg, __shfl_*_sync, ...): they call bivlm::ptx::*. Each wrapper
// has two implementations, side by side:
//   device (nvcc): the instruction itself (inline PTX) or the CUDA intrinsic that emits it;
//   host   (BIVLM_HOST_BUILD, g++/clang++, see csrc/cuda/host/runtime.h): the PTX ISA semantics written out in C++.
//          Warp-wide instructions (shfl, vote, ldmatrix, mma) are warp collectives: every lane of the mask hands
//          in its operands, one function computes all lanes' results from them, then every lane resumes.
//          Vector loads check their alignment and abort, as a GPU faults (cudaErrorMisalignedAddress).
// Each host implementation has a unit test against a plain definition in tests/cuda_host/test_ptx.cpp.
//
// Launch: BIVLM_LAUNCH(grid, block, smem, stream, kernel<...>)(args...) is `kernel<...><<<grid, block, smem,
// stream>>>(args...)` under nvcc, and a launch on the emulated machine in the host build.
#pragma once

#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#if defined(BIVLM_HOST_BUILD)
#define BIVLM_LAUNCH(grid, block, smem, stream, ...) \
  ::bivlm::host::make_launcher(grid, block, smem, stream, __VA_ARGS__, #__VA_ARGS__, __FILE__, __LINE__)
#else
#define BIVLM_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif

namespace bivlm {
namespace ptx {

#define BIVLM_PTX __device__ __forceinline__

#if defined(BIVLM_HOST_BUILD)
// Host: a misaligned access is a fault on the GPU; here it is a fatal error naming the instruction.
inline void check_aligned(const void* p, unsigned bytes, const char* op) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0)
    host::fatal("misaligned address %p for %s (needs %u-byte alignment): cudaErrorMisalignedAddress", p, op, bytes);
}
#endif

// ---- global memory: vector and cache-hinted loads / stores ---------------------------------------------------

// What: 16 bytes through the read-only (non-coherent) path, ld.global.nc.v4.u32 (__ldg). Why: activations are
// re-read by every warp of the grid; the read-only path keeps them cached. p must be 16-byte aligned.
BIVLM_PTX uint4 ld_nc_v4(const void* p) {
#if defined(BIVLM_HOST_BUILD)
  check_aligned(p, 16, "ld.global.nc.v4.u32");
  uint4 v;
  std::memcpy(&v, p, 16);
  return v;
#else
  return __ldg(reinterpret_cast<const uint4*>(p));
#endif
}

// What: 8 bytes through the read-only path, ld.global.nc.v2.u32. Why: the tensor-core GEMV reads a row pair's
// (c0, c1) table entries with one load. p must be 8-byte aligned.
BIVLM_PTX uint2 ld_nc_v2(const void* p) {
#if defined(BIVLM_HOST_BUILD)
  check_aligned(p, 8, "ld.global.nc.v2.u32");
  uint2 v;
  std::memcpy(&v, p, 8);
  return v;
#else
  return __ldg(reinterpret_cast<const uint2*>(p));
#endif
}

// What: the same for four floats, ld.global.nc.v4.f32 (fp32 activations). p must be 16-byte aligned.
BIVLM_PTX float4 ld_nc_f4(const float* p) {
#if defined(BIVLM_HOST_BUILD)
  check_aligned(p, 16, "ld.global.nc.v4.f32");
  float4 v;
  std::memcpy(&v, p, 16);
  return v;
#else
  return __ldg(reinterpret_cast<const float4*>(p));
#endif
}

// What: 16 bytes with the streaming hint, ld.global.cs.v4.u32 (__ldcs). Why: each weight word is read once per
// call; evict-first keeps it from pushing the activations out of L1/L2. p must be 16-byte aligned.
BIVLM_PTX uint4 ld_cs_v4(const void* p) {
#if defined(BIVLM_HOST_BUILD)
  check_aligned(p, 16, "ld.global.cs.v4.u32");
  uint4 v;
  std::memcpy(&v, p, 16);
  return v;
#else
  return __ldcs(reinterpret_cast<const uint4*>(p));
#endif
}

// What: 16 bytes from shared memory, ld.shared.v4.u32 (LDS.128; p is a generic pointer into the block's dynamic
// shared memory, which nvcc resolves to the shared window). Why: the segmented GEMV stages x gathered through its
// permutation there. p must be 16-byte aligned.
BIVLM_PTX uint4 ld_shared_v4(const void* p) {
#if defined(BIVLM_HOST_BUILD)
  check_aligned(p, 16, "ld.shared.v4.u32");
  uint4 v;
  std::memcpy(&v, p, 16);
  return v;
#else
  return *reinterpret_cast<const uint4*>(p);
#endif
}

// What: one 32-bit word with the streaming hint, ld.global.cs.u32 (__ldcs). p must be 4-byte aligned.
BIVLM_PTX int32_t ld_cs_b32(const int32_t* p) {
#if defined(BIVLM_HOST_BUILD)
  check_aligned(p, 4, "ld.global.cs.u32");
  return *p;
#else
  return __ldcs(p);
#endif
}

// What: a 16-byte store, st.global.v4.u32. Why: the dequantize kernel's output is the largest stream of the large-M
// path; full 16-byte transactions. p must be 16-byte aligned.
BIVLM_PTX void st_v4(void* p, uint4 v) {
#if defined(BIVLM_HOST_BUILD)
  check_aligned(p, 16, "st.global.v4.u32");
  std::memcpy(p, &v, 16);
#else
  *reinterpret_cast<uint4*>(p) = v;
#endif
}

// ---- bit manipulation ----------------------------------------------------------------------------------------

// What: lop3.b32 -- any 3-input bitwise function, LUT = F(0xF0, 0xCC, 0xAA) (e.g. a & b | c is 0xEA).
// Why: one instruction for mask-and-insert (Marlin's magic-exponent dequantization).
template <uint8_t LUT>
BIVLM_PTX uint32_t lop3(uint32_t a, uint32_t b, uint32_t c) {
#if defined(BIVLM_HOST_BUILD)
  // Result bit = LUT bit number (a_bit << 2 | b_bit << 1 | c_bit): OR of the minterms LUT selects.
  uint32_t d = 0;
  for (int i = 0; i < 8; ++i)
    if (LUT >> i & 1) d |= ((i & 4) ? a : ~a) & ((i & 2) ? b : ~b) & ((i & 1) ? c : ~c);
  return d;
#else
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, %4;" : "=r"(d) : "r"(a), "r"(b), "r"(c), "n"(LUT));
  return d;
#endif
}

// What: v, unchanged, through an empty asm the optimizer cannot see into. Why: constant mma operands (the all-ones
// A fragment of the tensor-core GEMV) are otherwise re-materialized with four MOVs before every mma.
BIVLM_PTX uint32_t opaque(uint32_t v) {
#if !defined(BIVLM_HOST_BUILD)
  asm volatile("" : "+r"(v));
#endif
  return v;
}

// What: prmt.b32 (default mode) -- byte i of the result is byte s_i of the 8-byte value {b, a} (a = bytes 0..3,
// b = bytes 4..7), s_i = bits 4i+2..4i of sel; if bit 4i+3 is set, that byte's sign is replicated instead:
//
//        b: | B7 | B6 | B5 | B4 |   a: | B3 | B2 | B1 | B0 |       sel nibble i:  | sign | idx(3 bits) |
//     result byte i = sign ? (B[idx] >> 7 ? 0xFF : 0x00) : B[idx]
//
// Why: a byte-wise table lookup in one instruction (a 4-entry fp16 codebook is 8 bytes: two registers).
BIVLM_PTX uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
#if defined(BIVLM_HOST_BUILD)
  const uint64_t bytes = static_cast<uint64_t>(b) << 32 | a;
  uint32_t d = 0;
  for (int i = 0; i < 4; ++i) {
    const uint32_t nib = sel >> (4 * i) & 0xFu;
    uint32_t byte = static_cast<uint32_t>(bytes >> (8 * (nib & 7u))) & 0xFFu;
    if (nib & 8u) byte = (byte & 0x80u) ? 0xFFu : 0x00u;
    d |= byte << (8 * i);
  }
  return d;
#else
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
#endif
}

// ---- warp shuffles and votes (CUDA __shfl_*_sync / __ballot_sync semantics) ----------------------------------
// width (a power of two <= 32) splits the warp into segments; `mask` must name the calling lane and every lane
// read from. Out-of-segment sources give the lane's own value: up/down past the segment edge, xor into a *later*
// segment (earlier ones are allowed), idx wraps modulo width.

#if defined(BIVLM_HOST_BUILD)
namespace hostimpl {
enum class Shfl { kIdx, kUp, kDown, kXor };
struct ShflSlot {
  uint32_t v;
  int arg, width;
  uint32_t out;
};
template <Shfl KIND>
void shfl_combine(void* const* slots, unsigned mask) {
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    ShflSlot& s = *static_cast<ShflSlot*>(slots[l]);
    const int w = s.width;
    if (w < 1 || w > 32 || (w & (w - 1)) != 0) host::fatal("shfl: width %d is not a power of two <= 32", w);
    const int seg = l & ~(w - 1);
    int src = l;
    bool in_range = true;
    if (KIND == Shfl::kIdx) src = seg | (s.arg & (w - 1));
    if (KIND == Shfl::kUp) src = l - s.arg, in_range = src >= seg;
    if (KIND == Shfl::kDown) src = l + s.arg, in_range = src < seg + w;
    if (KIND == Shfl::kXor) src = l ^ (s.arg & 31), in_range = src < seg + w;
    if (!in_range) {
      s.out = s.v;
      continue;
    }
    if (!(mask >> src & 1u)) host::fatal("shfl: lane %d reads lane %d, which is not in the mask 0x%08x", l, src, mask);
    s.out = static_cast<ShflSlot*>(slots[src])->v;
  }
}
template <Shfl KIND, class T>
T shfl(const char* op, unsigned mask, T v, int arg, int width) {
  static_assert(sizeof(T) == 4, "shuffles move 4-byte values");
  ShflSlot s{0, arg, width, 0};
  std::memcpy(&s.v, &v, 4);
  host::warp_collective(mask, op, &s, &shfl_combine<KIND>);
  T r;
  std::memcpy(&r, &s.out, 4);
  return r;
}
struct VoteSlot {
  bool pred;
  uint32_t out;
};
inline void ballot_combine(void* const* slots, unsigned mask) {
  uint32_t b = 0;
  for (int l = 0; l < 32; ++l)
    if ((mask >> l & 1u) && static_cast<VoteSlot*>(slots[l])->pred) b |= 1u << l;
  for (int l = 0; l < 32; ++l)
    if (mask >> l & 1u) static_cast<VoteSlot*>(slots[l])->out = b;
}
inline void nop_combine(void* const*, unsigned) {}
}  // namespace hostimpl
#endif

template <class T>
BIVLM_PTX T shfl_xor(T v, int lane_mask, unsigned mask = 0xffffffffu, int width = 32) {
#if defined(BIVLM_HOST_BUILD)
  return hostimpl::shfl<hostimpl::Shfl::kXor>("shfl.sync.bfly", mask, v, lane_mask, width);
#else
  return __shfl_xor_sync(mask, v, lane_mask, width);
#endif
}
template <class T>
BIVLM_PTX T shfl_down(T v, unsigned delta, unsigned mask = 0xffffffffu, int width = 32) {
#if defined(BIVLM_HOST_BUILD)
  return hostimpl::shfl<hostimpl::Shfl::kDown>("shfl.sync.down", mask, v, static_cast<int>(delta), width);
#else
  return __shfl_down_sync(mask, v, delta, width);
#endif
}
template <class T>
BIVLM_PTX T shfl_up(T v, unsigned delta, unsigned mask = 0xffffffffu, int width = 32) {
#if defined(BIVLM_HOST_BUILD)
  return hostimpl::shfl<hostimpl::Shfl::kUp>("shfl.sync.up", mask, v, static_cast<int>(delta), width);
#else
  return __shfl_up_sync(mask, v, delta, width);
#endif
}
template <class T>
BIVLM_PTX T shfl_idx(T v, int src_lane, unsigned mask = 0xffffffffu, int width = 32) {
#if defined(BIVLM_HOST_BUILD)
  return hostimpl::shfl<hostimpl::Shfl::kIdx>("shfl.sync.idx", mask, v, src_lane, width);
#else
  return __shfl_sync(mask, v, src_lane, width);
#endif
}

// What: bit l set when lane l of `mask` has pred true (vote.sync.ballot).
BIVLM_PTX uint32_t ballot(bool pred, unsigned mask = 0xffffffffu) {
#if defined(BIVLM_HOST_BUILD)
  hostimpl::VoteSlot s{pred, 0};
  host::warp_collective(mask, "vote.sync.ballot", &s, &hostimpl::ballot_combine);
  return s.out;
#else
  return __ballot_sync(mask, pred);
#endif
}

// What: bar.warp.sync -- the lanes of mask wait for each other (and their memory effects become visible).
BIVLM_PTX void syncwarp(unsigned mask = 0xffffffffu) {
#if defined(BIVLM_HOST_BUILD)
  host::warp_collective(mask, "bar.warp.sync", nullptr, &hostimpl::nop_combine);
#else
  __syncwarp(mask);
#endif
}

// ---- tensor cores: ldmatrix and mma.sync.m16n8k16 are in ptx_mma.cuh (included at the end of this file) ---

// ---- cp.async: global -> shared copies that bypass registers (sm_80+) ----------------------------------------

// What: cp.async.cg.shared.global of 16 bytes; with pred false nothing is read and dst gets 16 zero bytes
// (src-size 0). Why: the load of the next tile overlaps the math on this one. The data may only be read after
// cp_async_wait<n>() has retired its group (the host build writes dst at the wait, so an early read is stale).
// Both addresses must be 16-byte aligned.
BIVLM_PTX void cp_async16(void* smem_dst, const void* gmem_src, bool pred = true) {
#if defined(BIVLM_HOST_BUILD)
  check_aligned(smem_dst, 16, "cp.async.cg (shared destination)");
  if (pred) check_aligned(gmem_src, 16, "cp.async.cg (global source)");
  host::cp_async_issue(smem_dst, gmem_src, 16, pred ? 16 : 0);
#else
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(pred ? 16 : 0));
#endif
}

// What: cp.async.commit_group -- closes the group of copies issued since the last commit.
BIVLM_PTX void cp_async_commit() {
#if defined(BIVLM_HOST_BUILD)
  host::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// What: cp.async.wait_group N -- waits until at most N committed groups are still in flight.
template <int N>
BIVLM_PTX void cp_async_wait() {
#if defined(BIVLM_HOST_BUILD)
  host::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// ---- shared memory -------------------------------------------------------------------------------------------
// BIVLM_DYNAMIC_SMEM(T, name): `extern __shared__ T name[]` on the device; the launch's dynamic shared memory of
// the running block on the host (exactly the launch's byte count, so ASan sees an overrun).
#if defined(BIVLM_HOST_BUILD)
#define BIVLM_DYNAMIC_SMEM(T, name) T* name = static_cast<T*>(::bivlm::host::dynamic_smem())
#else
#define BIVLM_DYNAMIC_SMEM(T, name) extern __shared__ __align__(16) T name[]
#endif

}  // namespace ptx
}  // namespace bivlm

#include "ptx_mma.cuh"
