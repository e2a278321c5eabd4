// gemv_tc4.cuh -- tensor-core decode GEMV for 4-bit affine weights, M = 1 .. 16, on the load-time "tc4" repack
// (bivlm_kernels/backends/cuda/tc_repack.py draws it; what the tensor-core kernels share: gemv_tc_common.cuh).
//
// y[i, n] = sum_k x[i, k] w[n, k] (+ bias[n]),  w[n, k] = (c - z) s,  (s, z) the scale and zero of (n, k / g).
// The codes are decoded to exact small integers c (tc4_decode), so per group the tensor cores sum D = sum c x and
//
//     y += s D - s z S,     S_g = sum_(k in g) x
//
// S_g depends on x only: the block computes it for its k range into shared memory first (a prologue of ~3
// instructions per activation, shared by the block's 64 R rows). The epilogue (2 FFMA per accumulator) runs once
// per slot block (gemv_tc_common.cuh). Each lane loads one 16-byte word group per tile per 64-k chunk (prefetched
// one chunk ahead), and one 16-byte load of x per row of x per 32 k (shared by all tiles).
#pragma once

#include <type_traits>

#include "gemv_tc_common.cuh"

namespace bivlm {
namespace detail {

// 4-bit decode of one code word into an A fragment (codes 0..15 as exact fp16 / bf16 values). Word bits (the tc4
// repack): [0-3, 16-19] -> a0 (row g, columns kb, kb + 1), [4-7, 20-23] -> a1 (row g + 8), [8-11, 24-27] -> a2
// (row g, kb + 2, kb + 3), [12-15, 28-31] -> a3 (row g + 8).
template <bool BF16>
__device__ __forceinline__ void tc4_decode(uint32_t q, uint32_t (&a)[4]) {
  if constexpr (!BF16) {
    // (q & 0x000F000F) | 0x64006400 = (1024 + c, 1024 + c'); the high nibbles give 1024 + 16 c.
    const uint32_t q8 = q >> 8;
    a[0] = ptx::hfma2<false>(ptx::lop3<0xEA>(q, 0x000F000Fu, 0x64006400u), 0x3C003C00u, 0xE400E400u);   // x 1 - 1024
    a[1] = ptx::hfma2<false>(ptx::lop3<0xEA>(q, 0x00F000F0u, 0x64006400u), 0x2C002C00u, 0xD400D400u);   // / 16 - 64
    a[2] = ptx::hfma2<false>(ptx::lop3<0xEA>(q8, 0x000F000Fu, 0x64006400u), 0x3C003C00u, 0xE400E400u);
    a[3] = ptx::hfma2<false>(ptx::lop3<0xEA>(q8, 0x00F000F0u, 0x64006400u), 0x2C002C00u, 0xD400D400u);
  } else {
    // bf16 has 7 mantissa bits: every nibble is moved to bits 0-3 of its half, 128 + c, minus 128.
#pragma unroll
    for (int j = 0; j < 4; ++j)
      a[j] = ptx::hfma2<true>(ptx::lop3<0xEA>(q >> (4 * j), 0x000F000Fu, 0x43004300u), 0x3F803F80u, 0xC300C300u);
  }
}

// Phases of gemv_tc_kernel (prologue, fetch, epilogue; the decode is tc4_decode), each inlined into the kernel.

// Prologue: S of every (row of x, group) of this split -> sums[m][group - first group]. Why: y += s D - s z S needs
// sum x per group, which depends on x only: computed once per block for its k range, shared by its 64 R rows.
// Each thread sums 8 consecutive activations (one 16-byte load); the G/8 lanes of a group add up by shuffles.
template <typename T, int MT, int G, int CK>
__device__ __forceinline__ void tc4_prologue_sums(const TcParams<T>& p, int c_begin, int c_end, float* sums) {
  const int total = p.sgroups * (G / 8);            // 8-element pieces per row of x
  const int k_lim = min(p.k, c_end * CK);
  for (int mi = 0; mi < MT; ++mi) {
    for (int e0 = 0; e0 < total; e0 += kGemvThreads) {
      const int e8 = e0 + static_cast<int>(threadIdx.x);
      const int kx = c_begin * CK + e8 * 8;
      float sv = 0.0f;
      if (e8 < total && kx < k_lim && mi < p.m) {
        float f[8];
        load8(p.x + static_cast<int64_t>(mi) * p.ldx + kx, f);
        sv = ((f[0] + f[1]) + (f[4] + f[5])) + ((f[2] + f[3]) + (f[6] + f[7]));
      }
#pragma unroll
      for (int off = 1; off < G / 8; off <<= 1) sv += ptx::shfl_xor(sv, off);
      if (e8 < total && e8 % (G / 8) == 0) sums[mi * p.sgroups + e8 / (G / 8)] = sv;
    }
  }
}

// Fetch: the code words of chunk c + ahead for the warp's R tiles (tile r at qbase + (r chunks + c + ahead) 32). Why:
// streaming loads, issued a chunk ahead of their decode so that they are in flight while the current chunk runs.
// (c and ahead stay apart: passing c + 1 as one int gave other SASS.)
template <int R>
__device__ __forceinline__ void tc4_fetch_codes(const uint4* qbase, int chunks, int c, int ahead, uint4 (&q)[R]) {
#pragma unroll
  for (int r = 0; r < R; ++r) q[r] = ptx::ld_cs_v4(qbase + (static_cast<int64_t>(r) * chunks + c + ahead) * 32);
}

// Epilogue: fold the slot block that starts at group gf into y: y += s D - s z S; reset the block accumulators.
// Why: D = sum c x is exact per group, so the affine map costs 2 FFMA per accumulator per slot block, not per weight.
template <int S, typename T, int R, int NT>
__device__ __forceinline__ void tc4_epilogue(const TcParams<T>& p, const float* sums, int tile0, int gid, int t,
                                             int g_begin, int gf, float (&d)[R][NT][4], float (&y)[R][NT][4]) {
  float sv[NT][2];  // S of this lane's columns 2t, 2t + 1
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int e2 = 0; e2 < 2; ++e2) {
      const int col = 2 * t + e2;
      const int mi = S > 1 ? col / S : nt * 8 + col;
      const int gl = gf - g_begin + (S > 1 ? col % S : 0);
      sv[nt][e2] = sums[mi * p.sgroups + gl];
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const T* tb = p.tab + static_cast<int64_t>(tile0 + r) * p.tgroups * 32 + gid * 4;
    float c0[2][2], h[2][2];  // [column e2 of this lane][row half]: c0 and c1 - c0
#pragma unroll
    for (int e2 = 0; e2 < (S > 1 ? 2 : 1); ++e2) {
      const int grp = S > 1 ? gf + (2 * t + e2) % S : gf;
      const uint2 v = ptx::ld_nc_v2(tb + static_cast<int64_t>(grp) * 32);
      const float2 lo = tc_pair(v.x, T()), hi = tc_pair(v.y, T());   // rows gid, gid + 8: (c0, c1) / (s, z)
      // y += s D + (-s z) S: "c0" = -s z, "h" = s
      c0[e2][0] = -lo.x * lo.y, h[e2][0] = lo.x;
      c0[e2][1] = -hi.x * hi.y, h[e2][1] = hi.x;
    }
    if (S == 1) c0[1][0] = c0[0][0], c0[1][1] = c0[0][1], h[1][0] = h[0][0], h[1][1] = h[0][1];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int e2 = e & 1, rh = e >> 1;
        y[r][nt][e] = fmaf(h[e2][rh], d[r][nt][e], fmaf(c0[e2][rh], sv[nt][e2], y[r][nt][e]));
        d[r][nt][e] = 0.0f;
      }
    }
  }
}

// BITS = 4 (the template argument keeps the kernel's name): LOP3 puts a code into the mantissa of a magic fp16 /
// bf16 constant (1024 + c, or 1024 + 16 c for the high nibble; bf16: 128 + c) and one HFMA2 leaves c exactly.
template <typename T, int BITS, int MT, int G>
__global__ void __launch_bounds__(kGemvThreads) gemv_tc_kernel(const TcParams<T> p) {
  static_assert(BITS == 4, "this slot-block tensor-core kernel decodes 4-bit affine (1 bit: gemv_tc1.cuh)");
  constexpr int NT = TcShape<MT>::NT, S = TcShape<MT>::S, R = TcShape<MT>::R;
  constexpr int CK = 256 / BITS;       // k of one chunk (16 bytes of codes per lane per m16 tile)
  constexpr int STEPS = CK / 16;       // k16 steps per chunk (16 or 4)
  constexpr int BK = S * G;  // k covered by one slot block (one epilogue)
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int gid = lane >> 2, t = lane & 3;
  const int tile0 = (blockIdx.x * kTcWarps + warp) * R;
  const int c_begin = blockIdx.y * p.chunks_per_split;
  const int c_end = min(p.chunks, c_begin + p.chunks_per_split);

  BIVLM_DYNAMIC_SMEM(float, sums);
  tc4_prologue_sums<T, MT, G, CK>(p, c_begin, c_end, sums);
  __syncthreads();
  if (tile0 >= p.tiles) return;  // whole warp (tiles is a multiple of 4, R divides 4)

  // B column n = gid of each n8 tile: row of x (m) and group slot.
  const T* xrow[NT];
  bool xok[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int mi = nt * 8 + (S > 1 ? gid / S : gid);
    xok[nt] = mi < p.m;
    xrow[nt] = p.x + (xok[nt] ? static_cast<int64_t>(mi) * p.ldx : 0);
  }
  const int my_slot = gid % S;
  const T* zero_src = p.tab + static_cast<int64_t>(p.tiles) * p.tgroups * 32;  // >= 256 zero elements
  const int g_begin = c_begin * CK / G;

  float d[R][NT][4], y[R][NT][4];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) d[r][nt][e] = y[r][nt][e] = 0.0f;
  auto epilogue = [&](int gf) { tc4_epilogue<S>(p, sums, tile0, gid, t, g_begin, gf, d, y); };

  const uint4* qbase = p.q + static_cast<int64_t>(tile0) * p.chunks * 32 + lane;
  uint4 qa[R], qb[R];  // code words of the current chunk / the next one (the roles swap every chunk)
#pragma unroll
  for (int r = 0; r < R; ++r) qa[r] = qb[r] = make_uint4(0u, 0u, 0u, 0u);
  if (c_begin < c_end) tc4_fetch_codes(qbase, p.chunks, c_begin, 0, qa);

  // One chunk (64 k) with codes cq; prefetches chunk c + 1 into nq.
  auto chunk = [&](int c, const uint4 (&cq)[R], uint4 (&nq)[R]) {
    if (c + 1 < c_end) tc4_fetch_codes(qbase, p.chunks, c, 1, nq);
    // Group gi of the chunk feeds this lane's B column when k < K and its slot is the lane's:
    // (c 256 / G + gi) % S == my_slot. Otherwise the lane reads zeros: the zero tile after the tables.
    constexpr int GPC = CK >= G ? CK / G : 1;   // groups the chunk touches (a 4-bit chunk is inside one)
    const T* xg[NT][GPC];
#pragma unroll
    for (int gi = 0; gi < GPC; ++gi) {
      const int k0 = c * CK + gi * G;            // first k of group gi (or of the chunk)
      const bool in_k = k0 < p.k;
      const unsigned grp = CK >= G ? static_cast<unsigned>(c) * (CK / G) + gi : static_cast<unsigned>(c) / (G / CK);
      const bool slot_ok = S == 1 || grp % S == static_cast<unsigned>(my_slot);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
        xg[nt][gi] = (xok[nt] && slot_ok && in_k) ? xrow[nt] + k0 + 8 * t : zero_src + 8 * t;
    }
#pragma unroll
    for (int pp = 0; pp < STEPS / 2; ++pp) {
      uint4 bx[NT];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
        bx[nt] = ptx::ld_nc_v4(xg[nt][CK >= G ? pp * 32 / G : 0] + (CK >= G ? (pp * 32) % G : pp * 32));
#pragma unroll
      for (int hs = 0; hs < 2; ++hs) {
        const int s = pp * 2 + hs;
        uint32_t b[NT][2];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) tc_b_frag(bx[nt], hs, b[nt]);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          uint32_t a[4];
          const uint32_t q = s == 0 ? cq[r].x : s == 1 ? cq[r].y : s == 2 ? cq[r].z : cq[r].w;
          tc4_decode<!std::is_same<T, __half>::value>(q, a);
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) tc_mma(d[r][nt], a, b[nt], T());
        }
        if constexpr (BK < CK) {
          if (((s + 1) * 16) % BK == 0) epilogue((c * CK + (s + 1) * 16 - BK) / G);
        }
      }
    }
    if constexpr (BK >= CK) {
      if (((c + 1) * CK) % BK == 0) epilogue(((c + 1) * CK - BK) / G);
    }
  };

  // Main loop: two chunks per iteration (the code roles alternate).
  for (int c = c_begin; c < c_end; c += 2) {
    chunk(c, qa, qb);
    if (c + 1 < c_end) chunk(c + 1, qb, qa);
  }
  if constexpr (BK > CK) {  // a split that ends inside a slot block (the last one): fold the partial block
    if (c_begin < c_end && (c_end * CK) % BK != 0) epilogue((c_end * CK / BK) * BK / G);
  }

  tc_store<S>(p, tc_out_plain(), tile0, gid, t, y, 1.0f);
}

// Launch one instantiation (grid from the repacked sizes).
template <typename T, int BITS, int MT, int G>
cudaError_t launch_tc_config(const void* x, int64_t m, int64_t ldx, const TcWeight& w, const void* bias, int splits,
                             int chunks_per_split, void* out, float* out_f32, cudaStream_t stream) {
  TcParams<T> p = tc_params<T>(x, m, ldx, w, bias, tc4_chunks(w.k), tc4_table_groups(w.k, w.group_size),
                                 chunks_per_split, out, out_f32);
  constexpr int S = TcShape<MT>::S;
  p.sgroups = ((chunks_per_split * (256 / BITS) + G - 1) / G + S - 1) / S * S;
  constexpr int tiles_per_block = kTcWarps * TcShape<MT>::R;
  const dim3 grid(static_cast<unsigned>((p.tiles + tiles_per_block - 1) / tiles_per_block),
                  static_cast<unsigned>(splits));
  const size_t smem = static_cast<size_t>(MT) * p.sgroups * sizeof(float);
  BIVLM_LAUNCH(grid, kGemvThreads, smem, stream, gemv_tc_kernel<T, BITS, MT, G>)(p);
  return cudaGetLastError();
}

// The 4-bit kernel of this file as a Launch of dispatch_tc.
template <int BITS>
struct TcLaunch {
  template <typename T, int MT, int G, class... A>
  static cudaError_t run(A... a) {
    return launch_tc_config<T, BITS, MT, G>(a...);
  }
};

}  // namespace detail
}  // namespace bivlm
