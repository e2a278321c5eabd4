// gemv_tc_common.cuh -- what the tensor-core decode GEMVs share (gemv_tc1.cuh, gemv_tc2.cuh, gemv_tc4.cuh and the
// segmented gemv_tc_seg.cuh): TcParams (the contract with the launchers), tc_mma / tc_pair, the shape and fragments of
// the B operand (TcShape, tc_b_frag, tc_ld_x), the output store (tc_store), and the dispatch over dtype x M x g.
//
// y[i, n] = sum_k x[i, k] w[n, k] (+ bias[n]), fp32 accumulation on the tensor cores (mma.sync.m16n8k16, fp16 or
// bf16 operands). Roles: A (16 x 16) = weights of 16 output rows (an "m16 tile"), decoded in registers; B (16 x 8) =
// activations.
//
// Group slots (the 1- and 4-bit kernels, which fold a per-group epilogue into y): the epilogue runs once per "slot
// block": for M <= 4 the 8 columns of B are M rows of x x S = 8/M group slots, column n = m * S + slot holding x only
// where the group of the k step has that slot, so S groups accumulate side by side and one epilogue serves them all
// (M = 1: every 8 groups).
//
//   B columns (M = 1):   n = 0      1      2    ...   7            slot = group % 8
//                       x(g0)  x(g1)  x(g2)  ...  x(g7)   then the epilogue, then g8 .. g15 ...
//
// Work: grid = (tiles / (4 R), splits); a warp owns R m16 tiles (16 R rows) and the k range of its split, and loads
// x 16 bytes per row of x per 32 k (shared by its R tiles).
#pragma once

#include "common.cuh"

namespace bivlm {
namespace detail {

constexpr int kTcWarps = kGemvThreads / 32;

template <typename T>
struct TcBits;
template <>
struct TcBits<__half> {
  static constexpr uint32_t kOne2 = 0x3C003C00u;   // (1, 1)
};
template <>
struct TcBits<__nv_bfloat16> {
  static constexpr uint32_t kOne2 = 0x3F803F80u;
};

__device__ __forceinline__ void tc_mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], __half) {
  ptx::mma_m16n8k16_f16(d, a, b, d);
}
__device__ __forceinline__ void tc_mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                       __nv_bfloat16) {
  ptx::mma_m16n8k16_bf16(d, a, b, d);
}

// (lo, hi) of a 32-bit pair of T as fp32.
__device__ __forceinline__ float2 tc_pair(uint32_t v, __half) {
  return __half22float2(*reinterpret_cast<const __half2*>(&v));
}
__device__ __forceinline__ float2 tc_pair(uint32_t v, __nv_bfloat16) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
}

template <typename T>
struct TcParams {
  const T* x;              // [m, k], row stride ldx (16-byte aligned rows)
  int64_t ldx;
  int m;
  const uint4* q;          // repacked codes [tiles][chunks][32 lanes] x 16 bytes
  const T* tab;            // repacked tables [tiles + 1][tgroups][8][2 rows: g, g + 8][entries]; tile `tiles`
                           // is zeros (the zero source of the B operand); entries: 4 (2 bits), (s, z) (4 bits);
                           // 1 bit: a byte layout of D and bf16 table pieces (gemv_tc1.cuh)
  int n, k;
  int tiles, chunks, tgroups;
  int chunks_per_split;    // a multiple of the slot block's chunks
  int sgroups;             // 1 / 4 bits: groups of one split in shared memory (4 bits: rounded up to S); 2: 0
  const T* bias;           // [n] or nullptr
  T* out;                  // [m, n] when out_f32 == nullptr
  float* out_f32;          // [splits, m, n] partials, or nullptr
  int xoff;                // column of K that x points at (0; the segmented kernel: its stage's first column)
  const T* xzero;          // staged bodies: >= 256 zero elements in shared memory (B past K / past m)
};

// Where a body writes its result: the out_f32 slot (split), whether it adds the bias, and whether it adds to what
// an earlier body of the same block wrote there (the second segment of the segmented kernel).
struct TcOut {
  int split;
  bool bias;
  bool accumulate;
};

// A plain kernel's output: split blockIdx.y, the bias in split 0.
__device__ __forceinline__ TcOut tc_out_plain() {
  return TcOut{static_cast<int>(blockIdx.y), blockIdx.y == 0, false};
}

// 16 bytes of x (8 activations): from global memory (read-only path) or from a block's stage in shared memory.
template <bool STAGED>
__device__ __forceinline__ uint4 tc_ld_x(const void* p) {
  if constexpr (STAGED) {
    return ptx::ld_shared_v4(p);
  } else {
    return ptx::ld_nc_v4(p);
  }
}

// Shape of the B operand for a bucket MT of M: n8 tiles, group slots, m16 tiles per warp.
template <int MT>
struct TcShape {
  static constexpr int NT = MT > 8 ? 2 : 1;
  static constexpr int S = MT >= 8 ? 1 : 8 / MT;
  static constexpr int R = MT > 8 ? 2 : 4;
};

// The B fragment of k16 step hs (0 / 1) of a 32-k pair, from the lane's one 16-byte load of x for the pair.
__device__ __forceinline__ void tc_b_frag(const uint4& bx, int hs, uint32_t (&b)[2]) {
  b[0] = hs ? bx.z : bx.x;
  b[1] = hs ? bx.w : bx.y;
}

// The parameters every tensor-core launcher fills the same way (chunks and tgroups: the repack's counts).
template <typename T>
TcParams<T> tc_params(const void* x, int64_t m, int64_t ldx, const TcWeight& w, const void* bias, int64_t chunks,
                      int64_t tgroups, int chunks_per_split, void* out, float* out_f32) {
  TcParams<T> p;
  p.x = static_cast<const T*>(x);
  p.ldx = ldx;
  p.m = static_cast<int>(m);
  p.q = static_cast<const uint4*>(w.qtc);
  p.tab = static_cast<const T*>(w.table);
  p.n = static_cast<int>(w.n);
  p.k = static_cast<int>(w.k);
  p.tiles = static_cast<int>(tc_tiles(w.n));
  p.chunks = static_cast<int>(chunks);
  p.tgroups = static_cast<int>(tgroups);
  p.chunks_per_split = chunks_per_split;
  p.sgroups = 0;
  p.bias = static_cast<const T*>(bias);
  p.out = static_cast<T*>(out);
  p.out_f32 = out_f32;
  p.xoff = 0;
  p.xzero = nullptr;
  return p;
}

// Write a warp's accumulators y[R][NT][4] (times scale) as o says: with S > 1 group slots the slots of each row of x are
// summed first (columns 2t, 2t + 1 of this lane, then lanes xor 1, 2).
template <int S, typename T, int R, int NT>
__device__ __forceinline__ void tc_store(const TcParams<T>& p, const TcOut& o, int tile0, int gid, int t,
                                         float (&y)[R][NT][4], float scale) {
  const bool add_bias = p.bias != nullptr && o.bias;
  auto write = [&](int mi, int row, float v) {
    if (o.accumulate) {   // out_f32 only, no bias (the first body of the block added it)
      p.out_f32[(static_cast<int64_t>(o.split) * p.m + mi) * p.n + row] += scale * v;
    } else {
      store_output(p.out, p.out_f32, p.bias, add_bias, o.split, p.m, p.n, mi, row, scale * v);
    }
  };
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int row0 = (tile0 + r) * 16 + gid;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      if constexpr (S > 1) {
        float v[2] = {y[r][nt][0] + y[r][nt][1], y[r][nt][2] + y[r][nt][3]};
#pragma unroll
        for (int rh = 0; rh < 2; ++rh) {
#pragma unroll
          for (int off = 1; off < S / 2; off <<= 1) v[rh] += ptx::shfl_xor(v[rh], off);
        }
        const int mi = (2 * t) / S;
        if (t % (S / 2) == 0 && mi < p.m) {
#pragma unroll
          for (int rh = 0; rh < 2; ++rh)
            if (row0 + 8 * rh < p.n) write(mi, row0 + 8 * rh, v[rh]);
        }
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int mi = nt * 8 + 2 * t + (e & 1), row = row0 + 8 * (e >> 1);
          if (mi < p.m && row < p.n) write(mi, row, y[r][nt][e]);
        }
      }
    }
  }
}

// Dispatch over the M bucket: Launch::template run<T, MT, G>(args...) with MT = gemv_mt(m).
template <class Launch, typename T, int G, class... A>
cudaError_t dispatch_tc_mt(int64_t m, const A&... a) {
  switch (gemv_mt(m)) {
    case 1:
      return Launch::template run<T, 1, G>(a...);
    case 2:
      return Launch::template run<T, 2, G>(a...);
    case 4:
      return Launch::template run<T, 4, G>(a...);
    case 8:
      return Launch::template run<T, 8, G>(a...);
    default:
      return Launch::template run<T, 16, G>(a...);
  }
}

// Dispatch over dtype x M bucket x g (64 / 128) of a tensor-core kernel: Launch::template run<T, MT, G>(args...).
template <class Launch, class... A>
cudaError_t dispatch_tc_config(DType dtype, int group_size, int64_t m, const A&... a) {
  const bool g64 = group_size == 64;
  if (dtype == DType::kHalf) {
    return g64 ? dispatch_tc_mt<Launch, __half, 64>(m, a...) : dispatch_tc_mt<Launch, __half, 128>(m, a...);
  }
  return g64 ? dispatch_tc_mt<Launch, __nv_bfloat16, 64>(m, a...)
             : dispatch_tc_mt<Launch, __nv_bfloat16, 128>(m, a...);
}

// One bit width's tensor-core GEMV: Launch::template run<T, MT, G>(x, m, ldx, w, bias, splits, chunks_per_split,
// out, out_f32, stream).
template <class Launch>
cudaError_t dispatch_tc(const void* x, int64_t m, int64_t ldx, const TcWeight& w, const void* bias, int splits,
                        int cps, void* out, float* out_f32, cudaStream_t stream) {
  return dispatch_tc_config<Launch>(w.dtype, w.group_size, m, x, m, ldx, w, bias, splits, cps, out, out_f32, stream);
}

// The 1-bit tensor-core GEMV's dispatch over dtype x M bucket x g (gemv_tc_b1.cu; kernel in gemv_tc1.cuh).
cudaError_t launch_tc1(const void* x, int64_t m, int64_t ldx, const TcWeight& w, const void* bias, int splits,
                       int chunks_per_split, void* out, float* out_f32, cudaStream_t stream);

// The 4-bit tensor-core GEMV's dispatch over dtype x M bucket x g (gemv_tc_b4.cu; kernel in gemv_tc4.cuh).
cudaError_t launch_tc4(const void* x, int64_t m, int64_t ldx, const TcWeight& w, const void* bias, int splits,
                       int chunks_per_split, void* out, float* out_f32, cudaStream_t stream);

// The 2-bit tensor-core GEMV's dispatch over dtype x M bucket x g (gemv_tc_b2.cu; kernel in gemv_tc2.cuh).
cudaError_t launch_tc2(const void* x, int64_t m, int64_t ldx, const TcWeight& w, const void* bias, int splits,
                       int chunks_per_split, void* out, float* out_f32, cudaStream_t stream);

}  // namespace detail
}  // namespace bivlm
