// gemv_tc_seg.cuh -- the sub-2-bit layout (what BiLLM and Bi-VLM emit at bits=1) in one decode launch:
//
//     y = x[:, perm] . [W2 | W1]^T (+ bias)      W2: 2-bit lut over permuted columns [0, k2) (tc2 repack)
//                                                W1: 1-bit lut over permuted columns [k2, k2 + k1) (tc1 repack)
//
// Split s of the grid owns chunks [s c2, (s + 1) c2) of W2 and [s c1, (s + 1) c1) of W1 (c2, c1: chunks per split;
// every split gets a slice of both, so the work per block is even). A block of 8 warps (512 rows) first gathers
// x through perm for both slices into shared memory, then runs the 2-bit body (gemv_tc2.cuh) and the 1-bit body
// (gemv_tc1.cuh) on that stage, in that order; the second adds its result to the first's fp32 partial of the
// split (one lane owns each output, and the 1-bit body's block barriers order the two). So the forward is this
// kernel and the split-K reduce -- no index_select, no second decode launch, no per-segment fp32 output.
//
// Shared memory (dynamic): the 1-bit body's S / V / table-product B (tc1_smem_bytes), then the stage, T:
//
//     row mi < MT, stride LD:  col 0          n2         w2             w2 + n1        LD
//                              | x[mi, perm[k2 slice]] |gap | x[mi, perm[k2 + k1 slice]] |pad |
//     (zeros from n2 to the end of the 2-bit slice's last chunk), then 256 zeros (the zero source of B)
//
// LD = 32 (mod 64) elements, so the two rows of x that lanes 0-7 read with one LDS.128 fall in different banks.
// The gather: a thread takes four adjacent stage columns, loads their perm entries once (one 16-byte load,
// clamped to K so that no perm can read outside x) and, for every row of x, the four activations (2-byte loads: a
// warp reads 128 consecutive permuted columns of one row), stored as one 8-byte word: per element an IMAD (row
// offset + column), an IMAD.WIDE (the address), the load, half a PRMT and a quarter of a store.
#pragma once

#include "gemv_tc1.cuh"
#include "gemv_tc2.cuh"

namespace bivlm {
namespace detail {

constexpr int kTcSegWarps = kTcSegThreads / 32;
static_assert(kTc2Tiles == Tc1Shape<1>::R && kTc2Tiles == Tc1Shape<16>::R, "both bodies tile rows alike");

// Stage row stride of bucket MT (elements, = 32 mod 64): a compile-time constant, so every stage store takes its
// row from the instruction's immediate offset. The stage is MT x ld x 2 bytes (~33-41 KiB); the split plan gives
// each split at most ld - 32 columns.
__host__ __device__ constexpr int tc_seg_ld(int mt) { return (mt >= 8 ? 20480 : 16384) / mt + 32; }

template <typename T>
struct TcSegParams {
  TcParams<T> s2, s1;      // the segments (x, ldx: the caller's x; k == 0: absent); chunks_per_split = c2, c1
  const int32_t* perm;     // [s2.k + s1.k] or nullptr (the identity)
  int w2;                  // stage columns reserved for the 2-bit slice (c2 * 128)
  int stage_off;           // the stage's offset in dynamic shared memory, in floats
};

template <typename T, int MT, int G>
__global__ void __launch_bounds__(kTcSegThreads) gemv_tc_seg_kernel(const TcSegParams<T> q) {
  constexpr int LD = tc_seg_ld(MT);
  BIVLM_DYNAMIC_SMEM(float, smem);
  T* stage = reinterpret_cast<T*>(smem + q.stage_off);
  const int split = blockIdx.y, m = q.s2.m;
  const int a2 = split * q.s2.chunks_per_split, a1 = split * q.s1.chunks_per_split;
  const int b2 = q.s2.k > 0 ? min(q.s2.chunks, a2 + q.s2.chunks_per_split) : 0;
  const int b1 = q.s1.k > 0 ? min(q.s1.chunks, a1 + q.s1.chunks_per_split) : 0;
  const int n2 = a2 < b2 ? min(q.s2.k, b2 * 128) - a2 * 128 : 0;   // columns of each slice
  const int n1 = a1 < b1 ? min(q.s1.k, b1 * 256) - a1 * 256 : 0;

  // Gather x[:, perm[src0 ..]] into stage columns [col0, col0 + n) of every row (rows past m repeat row m - 1:
  // no branch per row; the bodies never read them).
  {
    const unsigned k_last = static_cast<unsigned>(q.s2.k + q.s1.k - 1);
    const uint16_t* x = reinterpret_cast<const uint16_t*>(q.s2.x);
    unsigned xr[MT];   // element offset of each row (x has < 2^31 elements: torch_ops.cpp checks)
#pragma unroll
    for (int mi = 0; mi < MT; ++mi) xr[mi] = static_cast<unsigned>(min(mi, m - 1) * q.s2.ldx);
    auto gather = [&](int col0, int src0, int n) {
      for (int j = 4 * static_cast<int>(threadIdx.x); j < n; j += 4 * kTcSegThreads) {
        unsigned c[4] = {static_cast<unsigned>(src0 + j), 0u, 0u, 0u};
        if (q.perm != nullptr) {
          const uint4 pv = ptx::ld_nc_v4(q.perm + src0 + j);
          c[0] = min(pv.x, k_last), c[1] = min(pv.y, k_last), c[2] = min(pv.z, k_last), c[3] = min(pv.w, k_last);
        } else {
          c[1] = c[0] + 1, c[2] = c[0] + 2, c[3] = c[0] + 3;
        }
        uint2* dst = reinterpret_cast<uint2*>(stage + col0 + j);
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) {
          const unsigned r = xr[mi];
          dst[mi * (LD / 4)] = make_uint2(x[r + c[0]] | (static_cast<uint32_t>(x[r + c[1]]) << 16),
                                          x[r + c[2]] | (static_cast<uint32_t>(x[r + c[3]]) << 16));
        }
      }
    };
    gather(0, a2 * 128, n2);
    gather(q.w2, q.s2.k + a1 * 256, n1);
    // Zeros past the end of K in the 2-bit slice's last chunk: the staged 2-bit body reads whole chunks (the 1-bit
    // body reads its zero source there).
    const int pad2 = (n2 + 127) / 128 * 128 - n2;
    for (int e = threadIdx.x; e < MT * pad2 / 2; e += kTcSegThreads)
      *reinterpret_cast<uint32_t*>(stage + (e % MT) * LD + n2 + 2 * (e / MT)) = 0u;
    if (threadIdx.x < 32) *reinterpret_cast<uint4*>(stage + MT * LD + 8 * threadIdx.x) = make_uint4(0u, 0u, 0u, 0u);
  }
  __syncthreads();

  const T* zeros = stage + MT * LD;
  bool first = true;
  if (n2 > 0) {
    TcParams<T> p = q.s2;
    p.x = stage, p.ldx = LD, p.xoff = a2 * 128, p.xzero = zeros;
    tc2_body<T, MT, G, kTcSegWarps, true>(p, a2, b2, TcOut{split, split == 0, false});
    first = false;
  }
  if (n1 > 0) {
    TcParams<T> p = q.s1;
    p.x = stage + q.w2, p.ldx = LD, p.xoff = a1 * 256, p.xzero = zeros;
    tc1_body<T, MT, G, kTcSegWarps, true>(p, a1, b1, TcOut{split, first && split == 0, !first}, smem);
  }
}

}  // namespace detail
}  // namespace bivlm
