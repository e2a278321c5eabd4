// gemv_tc2.cuh -- tensor-core decode GEMV for 2-bit lut weights with any 4-entry codebook, M = 1 .. 16, on the
// load-time "tc2" repack (bivlm_kernels/backends/cuda/tc_repack.py draws it).
//
// The weights are decoded to their exact fp16 / bf16 codebook entries, so the tensor cores accumulate sum w x
// directly (no per-group epilogue). A row's codebook of one group is 8 bytes -- two registers -- and one PRMT picks
// two entries (four bytes) out of them by a selector made from the codes:
//
//     t   = rotr(q, 2j) & 0x06060606            four 2-bit codes c0..c3 at bits 1-2, 9-10, 17-18, 25-26 (= 2c)
//     sel = t * 0x11 + 0x10101010               nibbles 2c0, 2c0 + 1, 2c1, 2c1 + 1 | 2c2, 2c2 + 1, 2c3, 2c3 + 1
//                                               (no carries: t * 0x11 has bits 1-2, 5-6, 9-10, 13-14 of each half)
//     sel'= prmt(sel, sel, 0x3232)              its high half moved down (PRMT reads the low 16 selector bits)
//     A register = prmt(entries 0-1, entries 2-3, sel)      = (codebook[c0], codebook[c1]); with sel': c2, c3
//
// 3 funnel shifts + 4 LOP3 + 4 IMAD + 12 PRMT per 32-bit word = 16 weights (1.44 instructions per weight), then one
// mma per 8 weights per n8 tile. B (x) and the work split are as in gemv_tc_common.cuh (k16 steps in pairs, one 16-byte
// load of x per row of x per 32 k); a chunk here is 128 k (16 bytes of codes per lane per m16 tile). The tables
// of the next chunk are loaded with its codes; x past K is read from the zero tile after the tables.
#pragma once

#include "gemv_tc_common.cuh"

namespace bivlm {
namespace detail {


// m16 tiles per warp (every M bucket: no per-group accumulators here, so M = 16 has the registers for 4).
constexpr int kTc2Tiles = 4;

__device__ __forceinline__ uint32_t rotr(uint32_t q, int s) { return s == 0 ? q : (q >> s) | (q << (32 - s)); }

// The kernel's work for chunks [c_begin, c_end) of the rows of block blockIdx.x (WARPS warps), written as o says.
// STAGED: x (from column p.xoff on) is in shared memory, zero past K up to the end of the last chunk (the segmented
// kernel).
template <typename T, int MT, int G, int WARPS, bool STAGED>
__device__ __forceinline__ void tc2_body(const TcParams<T>& p, int c_begin, int c_end, const TcOut& o) {
  constexpr int NT = TcShape<MT>::NT, R = kTc2Tiles;
  constexpr int GPC = 128 / G;  // groups per chunk (1 or 2)
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int gid = lane >> 2, t = lane & 3;
  const int tile0 = (blockIdx.x * WARPS + warp) * R;
  if (tile0 >= p.tiles) return;  // whole warp (tiles is a multiple of 4, R divides 4)
  const int xoff = STAGED ? p.xoff : 0;   // x holds columns from xoff on

  const T* xrow[NT];
  bool xok[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int mi = nt * 8 + gid;
    xok[nt] = mi < p.m;
    xrow[nt] = p.x + (xok[nt] ? static_cast<int64_t>(mi) * p.ldx : 0);
  }
  const T* zero_src = (STAGED ? p.xzero : p.tab + static_cast<int64_t>(p.tiles) * p.tgroups * 64) + 8 * t;
  // This lane's 8 activations of pair 0. Lanes of B columns past m read row 0 instead: column n of the mma's
  // result depends on column n of B only, and those columns are never written.
  const T* xb[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) xb[nt] = xrow[nt] + 8 * t;

  float y[R][NT][4];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) y[r][nt][e] = 0.0f;

  const uint4* qbase = p.q + static_cast<int64_t>(tile0) * p.chunks * 32 + lane;
  const T* tbase = p.tab + static_cast<int64_t>(tile0) * p.tgroups * 64 + gid * 8;
  // Codes and tables of chunk c for tile r -> (q, tb).
  auto load = [&](int c, uint4 (&q)[R], uint4 (&tb)[R][GPC]) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      q[r] = ptx::ld_cs_v4(qbase + (static_cast<int64_t>(r) * p.chunks + c) * 32);
#pragma unroll
      for (int gi = 0; gi < GPC; ++gi)
        tb[r][gi] = ptx::ld_nc_v4(tbase + (static_cast<int64_t>(r) * p.tgroups + c * GPC + gi) * 64);
    }
  };
  uint4 qa[R], qb[R], ta[R][GPC], tbb[R][GPC];
  if (c_begin < c_end) load(c_begin, qa, ta);

  // One 128-k chunk with codes cq and tables ct; prefetches chunk c + 1 into (nq, nt_).
  auto chunk = [&](int c, const uint4 (&cq)[R], const uint4 (&ct)[R][GPC], uint4 (&nq)[R], uint4 (&ntb)[R][GPC]) {
    if (c + 1 < c_end) load(c + 1, nq, ntb);
    const int krem = p.k - c * 128;  // K is a multiple of 64: only the last chunk of K can be cut
#pragma unroll
    for (int w = 0; w < 4; ++w) {  // word w: the 32-k pair w of the chunk, steps 2w and 2w + 1
      uint4 bx[NT];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
        bx[nt] = tc_ld_x<STAGED>(STAGED || w * 32 < krem ? xb[nt] + (c * 128 - xoff) + w * 32 : zero_src);
#pragma unroll
      for (int hs = 0; hs < 2; ++hs) {
        uint32_t b[NT][2];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) tc_b_frag(bx[nt], hs, b[nt]);
        const int gi = (w * 32 + hs * 16) / G;  // group of this step within the chunk (compile-time)
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const uint32_t q = w == 0 ? cq[r].x : w == 1 ? cq[r].y : w == 2 ? cq[r].z : cq[r].w;
          uint32_t a[4];
#pragma unroll
          for (int rr = 0; rr < 2; ++rr) {  // row gid (rr = 0: a0, a2) and gid + 8 (rr = 1: a1, a3)
            const uint32_t tq = rotr(q, 2 * (2 * hs + rr)) & 0x06060606u;
            const uint32_t sel = tq * 0x11u + 0x10101010u;       // low half: c0, c1; high half: c2, c3
            const uint32_t sel_lo = sel, sel_hi = ptx::prmt(sel, sel, 0x3232u);   // high half moved down
            const uint32_t e01 = rr ? ct[r][gi].z : ct[r][gi].x, e23 = rr ? ct[r][gi].w : ct[r][gi].y;
            a[rr] = ptx::prmt(e01, e23, sel_lo);
            a[2 + rr] = ptx::prmt(e01, e23, sel_hi);
          }
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) tc_mma(y[r][nt], a, b[nt], T());
        }
      }
    }
  };

  for (int c = c_begin; c < c_end; c += 2) {
    chunk(c, qa, ta, qb, tbb);
    if (c + 1 < c_end) chunk(c + 1, qb, tbb, qa, ta);
  }

  tc_store<1>(p, o, tile0, gid, t, y, 1.0f);
}

template <typename T, int MT, int G>
__global__ void __launch_bounds__(kGemvThreads) gemv_tc_b2_kernel(const TcParams<T> p) {
  const int c_begin = blockIdx.y * p.chunks_per_split;
  tc2_body<T, MT, G, kTcWarps, false>(p, c_begin, min(p.chunks, c_begin + p.chunks_per_split), tc_out_plain());
}

template <typename T, int MT, int G>
cudaError_t launch_tc2_config(const void* x, int64_t m, int64_t ldx, const TcWeight& w, const void* bias,
                              int splits, int chunks_per_split, void* out, float* out_f32, cudaStream_t stream) {
  // no S prologue at 2 bits (sgroups 0)
  const TcParams<T> p = tc_params<T>(x, m, ldx, w, bias, tc2_chunks(w.k), tc2_table_groups(w.k, w.group_size),
                                       chunks_per_split, out, out_f32);
  constexpr int tiles_per_block = kTcWarps * kTc2Tiles;
  const dim3 grid(static_cast<unsigned>((p.tiles + tiles_per_block - 1) / tiles_per_block),
                  static_cast<unsigned>(splits));
  BIVLM_LAUNCH(grid, kGemvThreads, 0, stream, gemv_tc_b2_kernel<T, MT, G>)(p);
  return cudaGetLastError();
}

}  // namespace detail
}  // namespace bivlm
