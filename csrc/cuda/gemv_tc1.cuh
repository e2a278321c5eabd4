// gemv_tc1.cuh -- tensor-core decode GEMV for 1-bit lut weights, M = 1 .. 16, on the load-time "tc1" repack
// (bivlm_kernels/backends/cuda/tc_repack.py draws it bit by bit).
//
// y[i, n] = sum_k x[i, k] w[n, k] (+ bias[n]),  w = c0 + D b,  b in {0, 1},  D = c1 - c0,  (c0, c1) the codebook
// of (n, k / g). mma.sync.m16n8k16: A = 16 weight rows (decoded in registers), B = x (8 columns), fp32 accumulation.
//
// Decode: one LOP3 makes two weights, v = (word & bit pair) ^ C. A code bit at position p of a 16-bit half gives
// v = v0 + 2b exactly (the step is 2 at every position used), with v0 fixed by p:
//
//     fp16  p = 15: C = -1 -> {-1, +1}   p = 14: C = 0 -> {0, 2}   p = 10 (exponent bit 0): C = 2 -> {2, 4}
//           p = 9, 8 (mantissa bits 1, 2): C = 4 -> {4, 6},  C = 8 -> {8, 10}
//     bf16  p = 15, 14 as fp16;  p = 7 (exponent bit 0): C = 2 -> {2, 4};  p = 6 (mantissa bit 1): C = 4 -> {4, 6}
//
// A word (32 codes) is read through 4 versions -- the word and 3 shifts -- so that every bit sits at a used
// position of some version: 3 shifts + 16 LOP3 per 32 weights (Tc1Plan). So per group the tensor cores sum
// acc = sum v x = V + 2 P with P = sum b x and V = sum v0 x (x only), and
//
//     2 y = sum_g D_g acc_g  +  sum_g [ c0_g (2 S_g + V_g) - c1_g V_g ]          S_g = sum_(k in g) x
//
// * the first sum is the per-group epilogue: one FFMA per accumulator, D in fp32 from the table;
// * the second is a small product over groups, done once per split on the tensor cores in bf16: A = the table's
//   (c0, c1) in fragment order (an fp16 entry is split into two bf16 pieces here, exactly), B = 2S + V and -V as
//   three bf16 pieces each, so its error is that of fp32. B is built by the block into shared memory first: S_g
//   and V_g come from an mma of x with a constant A (row 0 all ones, row 1 the v0 pattern), then are split.
//
// Group slots (M <= 4): the 8 B columns are M rows of x x S = 8/M group slots, column n = m S + slot holding x only
// where the k step's group has that slot (others read the zero tile after the tables), so one epilogue serves S
// groups (M = 1: every 8). Work: grid = (tiles / (4 R), splits); a warp owns R m16 tiles and the split's k range;
// each lane loads 16 bytes of codes per tile per 256-k chunk (prefetched one chunk ahead) and one 16-byte load of
// x per row of x per 32 k, shared by the R tiles.
#pragma once

#include <type_traits>

#include "gemv_tc_common.cuh"

namespace bivlm {
namespace detail {

// The decode plan of a dtype: which version of the word (ver) and which bit position p (both halves: p, p + 16)
// make A register reg = 2 j + r (j: fragment columns 0-7 / 8-15, r: row gid / gid + 8) of step i of a word.
template <typename T>
struct Tc1Plan;
template <>
struct Tc1Plan<__half> {
  static constexpr int kGt = 8;   // groups per k16 step of the table product
  __host__ __device__ static constexpr int ver(int i, int reg) {
    return i == 0 ? (reg & 1 ? 3 : 1) : i == 1 ? (reg & 1) : i == 2 ? reg : 2 + (reg & 1);
  }
  __host__ __device__ static constexpr int pos(int i, int j) {
    return i == 0 ? 14 + j : i == 1 ? 8 + j : i == 2 ? (j ? 8 : 10) : 9 + j;
  }
  __device__ __forceinline__ static uint32_t version(uint32_t q, int v) {
    return v == 0 ? q : v == 1 ? q << 3 : v == 2 ? q << 8 : (q << 11) | (q >> 21);
  }
  // C of position p in both halves (= v0, the value of a 0 code)
  __host__ __device__ static constexpr uint32_t c(int p) {
    return p == 15 ? 0xBC00BC00u : p == 14 ? 0u : p == 10 ? 0x40004000u : p == 9 ? 0x44004400u : 0x48004800u;
  }
};
template <>
struct Tc1Plan<__nv_bfloat16> {
  static constexpr int kGt = 8;
  __host__ __device__ static constexpr int ver(int i, int reg) { return 2 * (i & 1) + (reg & 1); }
  __host__ __device__ static constexpr int pos(int i, int j) { return i < 2 ? 14 + j : 7 - j; }
  __device__ __forceinline__ static uint32_t version(uint32_t q, int v) { return q << (2 * v); }
  __host__ __device__ static constexpr uint32_t c(int p) {
    return p == 15 ? 0xBF80BF80u : p == 14 ? 0u : p == 7 ? 0x40004000u : 0x40804080u;
  }
};

template <int MT>
struct Tc1Shape {
  static constexpr int NT = MT > 8 ? 2 : 1;
  static constexpr int S = MT >= 8 ? 1 : 8 / MT;
  static constexpr int R = 4;
};

// Shared memory of a block: S, V as fp32 [mt][sgroups][2], then the B operand of the table product,
// uint32 [tsteps][NT][3 pieces][32 lanes][2].
inline size_t tc1_smem_bytes(int mt, int sgroups, int tsteps) {
  return static_cast<size_t>(mt) * sgroups * 2 * sizeof(float) +
         static_cast<size_t>(tsteps) * (mt > 8 ? 2 : 1) * 3 * 64 * sizeof(uint32_t);
}

// An A register of two fp16 values as two of bf16 pieces, hi + lo = the values exactly (11 = 8 + 3 bits).
__device__ __forceinline__ void bf16_split2(uint32_t h2, uint32_t& hi, uint32_t& lo) {
  const float2 f = tc_pair(h2, __half());
  const __nv_bfloat16 h0 = from_float<__nv_bfloat16>(f.x), h1 = from_float<__nv_bfloat16>(f.y);
  const __nv_bfloat16 l0 = from_float<__nv_bfloat16>(f.x - to_float(h0));
  const __nv_bfloat16 l1 = from_float<__nv_bfloat16>(f.y - to_float(h1));
  hi = *reinterpret_cast<const uint16_t*>(&h0) | (static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(&h1)) << 16);
  lo = *reinterpret_cast<const uint16_t*>(&l0) | (static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(&l1)) << 16);
}

// Three bf16 pieces (as raw bits) whose sum is v to about 2^-26 |v|.
__device__ __forceinline__ void bf16_pieces(float v, uint32_t (&h)[3]) {
#pragma unroll
  for (int l = 0; l < 3; ++l) {
    const __nv_bfloat16 b = from_float<__nv_bfloat16>(v);
    h[l] = *reinterpret_cast<const uint16_t*>(&b);
    v -= to_float(b);
  }
}

// Phases of tc1_body's main loop (fetch, decode, epilogue), each inlined into the body. The prologues and the table
// product stay written out in the body: as helpers they compiled to the same PTX instructions with renumbered
// virtual registers, and ptxas then scheduled gemv_tc_seg_kernel differently (other SASS instruction counts).

// Fetch: the code words of one chunk for the warp's R tiles (tile r at qp + r * 32). Why: streaming loads, issued a
// chunk ahead of their decode so that they are in flight while the current chunk runs.
template <int R>
__device__ __forceinline__ void tc1_fetch_codes(const uint4* qp, uint4 (&q)[R]) {
#pragma unroll
  for (int r = 0; r < R; ++r) q[r] = ptx::ld_cs_v4(qp + r * 32);
}

// Decode, step 1: the 4 versions of a code word (the word and 3 shifts, Tc1Plan). Why: every code bit then sits at a
// bit position where one LOP3 turns it into a weight, so a word costs 3 shifts + 16 LOP3.
template <typename Plan>
__device__ __forceinline__ void tc1_versions(uint32_t q, uint32_t (&v)[4]) {
#pragma unroll
  for (int u = 0; u < 4; ++u) v[u] = Plan::version(q, u);
}

// Decode, step 2: the A fragment of step type i (the step's index in its word) from the versions, one LOP3 per
// register: (version & bit pair) ^ C = v0 + 2b. Why: no per-weight table lookup; the codebook is applied per group.
template <typename Plan>
__device__ __forceinline__ void tc1_decode(const uint32_t (&v)[4], int i, uint32_t (&a)[4]) {
#pragma unroll
  for (int reg = 0; reg < 4; ++reg) {
    const int pos = Plan::pos(i, reg >> 1);
    a[reg] = ptx::lop3<0x6A>(v[Plan::ver(i, reg)], (1u << pos) | (1u << (pos + 16)), Plan::c(pos));
  }
}

// Epilogue: y2 += D acc for each accumulator of one tile (h[column e2][row half]: D of its column's group), reset acc.
// Why: acc = V + 2 P of the group just finished; D = c1 - c0 scales its code part, the rest is the table product's.
template <int NT>
__device__ __forceinline__ void tc1_fold(float (&y)[NT][4], float (&d)[NT][4], const float (&h)[2][2]) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      y[nt][e] = fmaf(h[e & 1][e >> 1], d[nt][e], y[nt][e]);
      d[nt][e] = 0.0f;
    }
}

// Epilogue, S = 1: fold group gi of the chunk (dc: the chunk's D pairs); D comes from the pair's float4, loaded at
// the pair's even group. Why: one 16-byte load serves two groups x two row halves.
template <int R, int NT>
__device__ __forceinline__ void tc1_fold_group(const float* dc, int gi, float4 (&dpair)[R], float (&y)[R][NT][4],
                                               float (&d)[R][NT][4]) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (gi % 2 == 0) {
      const uint4 u4 = ptx::ld_nc_v4(dc + (gi / 2) * 128 + r * 32);
      dpair[r] = make_float4(__uint_as_float(u4.x), __uint_as_float(u4.y), __uint_as_float(u4.z),
                             __uint_as_float(u4.w));
    }
    const float h0 = gi % 2 ? dpair[r].z : dpair[r].x, h1 = gi % 2 ? dpair[r].w : dpair[r].y;
    const float h[2][2] = {{h0, h1}, {h0, h1}};
    tc1_fold(y[r], d[r], h);
  }
}

// Epilogue, S > 1: fold the slot block that starts at group gf (the lane's two columns are groups g0, g0 + 1, a
// pair). Why: one epilogue per S groups (M <= 4), which the group slots of the B columns make possible.
template <int S, int R, int NT>
__device__ __forceinline__ void tc1_fold_slots(const float* dq, int gf, int t, float (&y)[R][NT][4],
                                               float (&d)[R][NT][4]) {
  const float* dp = dq + ((gf + (2 * t) % S) / 2) * 128;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const uint4 v = ptx::ld_nc_v4(dp + r * 32);
    const float h[2][2] = {{__uint_as_float(v.x), __uint_as_float(v.y)}, {__uint_as_float(v.z), __uint_as_float(v.w)}};
    tc1_fold(y[r], d[r], h);
  }
}

// The kernel's work for chunks [c_begin, c_end) of the rows of block blockIdx.x (WARPS warps), written as o says;
// smem: tc1_smem_bytes of it. STAGED: x (from column p.xoff on) and the zero source are in shared memory (the
// segmented kernel). Every thread of the block calls it (it has block barriers). Phases: prologue 1 (S, V), prologue 2
// (the table product's B), the main loop over chunks (fetch, decode, mma, epilogue per group or slot block), the
// table product, the store.
template <typename T, int MT, int G, int WARPS, bool STAGED>
__device__ __forceinline__ void tc1_body(const TcParams<T>& p, int c_begin, int c_end, const TcOut& o, float* smem) {
  using Plan = Tc1Plan<T>;
  constexpr int NT = Tc1Shape<MT>::NT, S = Tc1Shape<MT>::S, R = Tc1Shape<MT>::R, GT = Plan::kGt;
  constexpr int CK = 256;              // k of one chunk (16 bytes of codes per lane per m16 tile)
  constexpr int BK = S * G;            // k of one slot block (one epilogue)
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int gid = lane >> 2, t = lane & 3;
  const int tile0 = (blockIdx.x * WARPS + warp) * R;
  const int xoff = STAGED ? p.xoff : 0;   // x holds columns from xoff on
  const int g_begin = c_begin * CK / G;
  const int g_end = max(g_begin, min(p.k, c_end * CK) / G);
  const int ngs = g_end - g_begin;            // groups of this split (<= p.sgroups)
  const int ts0 = g_begin / GT;               // first table-product step (it may start before g_begin)
  const int nts = (g_end + GT - 1) / GT - ts0;
  // Table: D fp32 [tiles / 4][tgroups / 2][4 tiles][8 gid][2 groups][2 rows] (a warp's 4 tiles side by side),
  // then the A operand of the table product, (c0, c1) pairs [tiles][tgroups / 8][32 lanes][4], then one tile's
  // worth of zeros (the zero source of B).
  const int64_t tile_words = static_cast<int64_t>(p.tgroups) * (16 + 128 / GT);
  const uint32_t* tab = reinterpret_cast<const uint32_t*>(p.tab);
  const uint32_t* tab_a = tab + static_cast<int64_t>(p.tiles) * p.tgroups * 16;
  // B's zero source: the zero tile after the table, or the stage's 256 zeros (the body reads at most 128 past it)
  const T* zero_src = STAGED ? p.xzero : reinterpret_cast<const T*>(tab + p.tiles * tile_words);

  float* sv = smem;                                                          // [MT][sgroups][2]: S, V
  uint32_t* bt = reinterpret_cast<uint32_t*>(smem + MT * p.sgroups * 2);    // [nts][NT][3][32][2]

  // Prologue 1: S_g and V_g of every (row of x, group) of the split, on the tensor cores. A: row 0 = ones, row 1 =
  // the v0 of each column for step type i (the step's index in its word); B: x, column = row of x (plain layout).
  // Why: the weights are decoded as v0 + 2b, so the table product needs S_g = sum x and V_g = sum v0 x per group.
  {
    uint32_t ac[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      ac[i][1] = ac[i][3] = 0u;
      ac[i][0] = gid == 0 ? TcBits<T>::kOne2 : gid == 1 ? Plan::c(Plan::pos(i, 0)) : 0u;
      ac[i][2] = gid == 0 ? TcBits<T>::kOne2 : gid == 1 ? Plan::c(Plan::pos(i, 1)) : 0u;
    }
    const T* xr[NT];   // this lane's B column: row nt * 8 + gid of x (rows past m: the zero tile)
    int64_t xstride[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int mi = nt * 8 + gid;
      xr[nt] = mi < p.m ? p.x + static_cast<int64_t>(mi) * p.ldx + 8 * t : zero_src + 8 * t;
      xstride[nt] = mi < p.m ? 1 : 0;
    }
    for (int gl = warp; gl < ngs; gl += WARPS) {
      const int k0 = (g_begin + gl) * G;
      float c[NT][4];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) c[nt][e] = 0.0f;
#pragma unroll
      for (int pp = 0; pp < G / 32; ++pp) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const uint4 bx = tc_ld_x<STAGED>(xr[nt] + xstride[nt] * (k0 - xoff + 32 * pp));
          const uint32_t b0[2] = {bx.x, bx.y}, b1[2] = {bx.z, bx.w};
          tc_mma(c[nt], ac[2 * (pp & 1)], b0, T());       // step type i = 2 (pair % 2) + half
          tc_mma(c[nt], ac[2 * (pp & 1) + 1], b1, T());
        }
      }
      if (gid < 2) {   // lanes 0-3: row 0 (S), lanes 4-7: row 1 (V); columns 2t, 2t + 1 = rows of x
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int mi = nt * 8 + 2 * t + e;
            if (mi < MT) sv[(mi * p.sgroups + gl) * 2 + gid] = c[nt][e];
          }
      }
    }
  }
  __syncthreads();
  // Prologue 2: the table product's B fragments, [step][nt][piece][lane][b0, b1]. Virtual k row r of a step:
  // group r / 2, part r % 2: part 0 meets c0 (value 2 S + V), part 1 meets c1 (value -V). Column n: the slot
  // layout of the main loop's B. Why: three exact bf16 pieces per value, built once per block in shared memory.
  for (int e = threadIdx.x; e < nts * NT * 32; e += 32 * WARPS) {
    const int ln = e % 32, nt = (e / 32) % NT, ts = e / (32 * NT);
    const int n = ln >> 2, tt = ln & 3;
    const int mi = S > 1 ? n / S : nt * 8 + n, slot = S > 1 ? n % S : 0;
    uint32_t h[2][2][3];   // [b0 / b1][half][piece]
#pragma unroll
    for (int jb = 0; jb < 2; ++jb)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int r = 2 * tt + 8 * jb + hf;
        const int j = r / 2, part = r % 2;
        const int gg = (ts0 + ts) * GT + j;
        float v = 0.0f;
        if (gg >= g_begin && gg < g_end && mi < p.m && gg % S == slot) {
          const float* q = sv + (mi * p.sgroups + gg - g_begin) * 2;
          v = part == 0 ? 2.0f * q[0] + q[1] : -q[1];
        }
        bf16_pieces(v, h[jb][hf]);
      }
#pragma unroll
    for (int l = 0; l < 3; ++l)
#pragma unroll
      for (int jb = 0; jb < 2; ++jb)
        bt[((ts * NT + nt) * 3 + l) * 64 + ln * 2 + jb] = h[jb][0][l] | (h[jb][1][l] << 16);
  }
  __syncthreads();
  if (tile0 >= p.tiles) return;  // whole warp (tiles is a multiple of 4, R divides 4)

  // B column n = gid of each n8 tile: row of x (m) and group slot. x of chunk c: xbase + c * xstep (rows past m:
  // the zero tile, step 0).
  const T* xbase[NT];
  int xstep[NT];
  bool xok[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int mi = nt * 8 + (S > 1 ? gid / S : gid);
    xok[nt] = mi < p.m;
    xbase[nt] = (xok[nt] ? p.x + static_cast<int64_t>(mi) * p.ldx : zero_src) + 8 * t;
    xstep[nt] = xok[nt] ? CK : 0;
  }
  const int my_slot = gid % S;
  // D of this lane's rows: pair gp of tile r at dq + gp * 128 + r * 32 (float4: groups 2 gp, 2 gp + 1 x rows
  // gid, gid + 8).
  const float* dq = reinterpret_cast<const float*>(tab) + static_cast<int64_t>(tile0 / 4) * (p.tgroups / 2) * 128 +
                    gid * 4;

  float d[R][NT][4], y[R][NT][4];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) d[r][nt][e] = y[r][nt][e] = 0.0f;

  // Codes: [tiles / 4][chunks][4 tiles][32 lanes] x 16 bytes (a warp's 4 tiles side by side per chunk).
  const uint4* qp = p.q + (static_cast<int64_t>(tile0 / 4) * p.chunks + c_begin) * 128 + lane;
  uint4 qa[R], qb[R];  // code words of the current chunk / the next one (the roles swap every chunk)
#pragma unroll
  for (int r = 0; r < R; ++r) qa[r] = qb[r] = make_uint4(0u, 0u, 0u, 0u);
  if (c_begin < c_end) tc1_fetch_codes(qp, qa);
  // Running pointers of the chunk being decoded: x (per n8 tile), D (S = 1), the codes of the next chunk.
  constexpr int GPC = CK / G;
  const T* xp[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) xp[nt] = xbase[nt] + (xok[nt] ? static_cast<int64_t>(c_begin) * CK - xoff : 0);
  const float* dp = dq + static_cast<int64_t>(c_begin) * (GPC / 2) * 128;
  qp += 128;

  // One chunk (256 k) with codes cq; prefetches chunk c + 1 into nq. tail: the chunk reaches past K (its groups
  // past K read x from the zero tile; their codes are 0 and D = 0).
  auto chunk = [&](int c, const uint4 (&cq)[R], uint4 (&nq)[R], bool tail) {
    if (c + 1 < c_end) tc1_fetch_codes(qp, nq);
    // Group gi of the chunk feeds this lane's B column when its slot is the lane's (and k < K).
    const T* xg[NT][GPC];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int gi = 0; gi < GPC; ++gi) {
        bool use = S == 1 || (static_cast<unsigned>(c) * GPC + gi) % S == static_cast<unsigned>(my_slot);
        if (tail) use = use && c * CK + gi * G < p.k;   // a constant at every (inlined) call
        xg[nt][gi] = use ? xp[nt] + gi * G : zero_src + 8 * t;
      }
    }
    const float* dc = dp;   // S = 1: the D pairs of this chunk
    float4 dpair[R];
#pragma unroll
    for (int w = 0; w < 4; ++w) {      // word w of each tile: steps 4 w + i
      uint32_t v[R][4];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const uint32_t q = w == 0 ? cq[r].x : w == 1 ? cq[r].y : w == 2 ? cq[r].z : cq[r].w;
        tc1_versions<Plan>(q, v[r]);
      }
#pragma unroll
      for (int pp2 = 0; pp2 < 2; ++pp2) {   // the word's two 32-k pairs (steps 4 w + 2 pp2 + hs)
        const int pp = 2 * w + pp2;
        uint4 bx[NT];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) bx[nt] = tc_ld_x<STAGED>(xg[nt][pp * 32 / G] + (pp * 32) % G);
#pragma unroll
        for (int hs = 0; hs < 2; ++hs) {
          const int i = 2 * pp2 + hs, s = 4 * w + i;
          uint32_t b[NT][2];
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) tc_b_frag(bx[nt], hs, b[nt]);
#pragma unroll
          for (int r = 0; r < R; ++r) {
            uint32_t a[4];
            tc1_decode<Plan>(v[r], i, a);
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) tc_mma(d[r][nt], a, b[nt], T());
          }
          if constexpr (S == 1) {
            if (((s + 1) * 16) % G == 0) tc1_fold_group(dc, (s + 1) * 16 / G - 1, dpair, y, d);   // end of a group
          } else if constexpr (BK < CK) {
            if (((s + 1) * 16) % BK == 0) tc1_fold_slots<S>(dq, (c * CK + (s + 1) * 16 - BK) / G, t, y, d);
          }
        }
      }
    }
    if constexpr (S > 1 && BK >= CK) {
      if (((c + 1) * CK) % BK == 0) tc1_fold_slots<S>(dq, ((c + 1) * CK - BK) / G, t, y, d);
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) xp[nt] += xstep[nt];
    dp += (GPC / 2) * 128;
    qp += 128;
  };

  // Main loop: chunks wholly inside K two at a time (the code roles alternate), then at most one more and the tail
  // chunk.
  const int c_full = (p.k % CK == 0 || c_end < p.chunks) ? c_end : c_end - 1;
  int c = c_begin;
  for (; c + 1 < c_full; c += 2) {
    chunk(c, qa, qb, false);
    chunk(c + 1, qb, qa, false);
  }
  if (c < c_full) {
    chunk(c, qa, qb, false);
    if (c + 1 < c_end) chunk(c + 1, qb, qa, true);
  } else if (c < c_end) {
    chunk(c, qa, qb, true);
  }
  if constexpr (BK > CK) {  // a split that ends inside a slot block (the last one): fold the partial block
    if (c_begin < c_end && (c_end * CK) % BK != 0) tc1_fold_slots<S>(dq, (c_end * CK / BK) * BK / G, t, y, d);
  }

  // The table product: y2 += [c0 pieces, c1 pieces] x [2 S + V, -V] (three pieces), bf16 on the tensor cores.
  // Why: the codebook's part of every group, once per split instead of per weight, with fp32's error.
  for (int ts = 0; ts < nts; ++ts) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const uint4 av = ptx::ld_nc_v4(tab_a + ((static_cast<int64_t>(tile0 + r) * (p.tgroups / GT) + ts0 + ts) * 32 +
                                              lane) * 4);
      uint32_t a[2][4] = {{av.x, av.y, av.z, av.w}, {0u, 0u, 0u, 0u}};   // [piece]: bf16 tables have one
      constexpr int AP = std::is_same<T, __half>::value ? 2 : 1;
      if constexpr (AP == 2) {
#pragma unroll
        for (int j = 0; j < 4; ++j) bf16_split2(a[0][j], a[0][j], a[1][j]);
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int l = 0; l < 3; ++l) {
          const uint2 bv = *reinterpret_cast<const uint2*>(bt + ((ts * NT + nt) * 3 + l) * 64 + lane * 2);
          const uint32_t b[2] = {bv.x, bv.y};
#pragma unroll
          for (int ap = 0; ap < AP; ++ap) ptx::mma_m16n8k16_bf16(y[r][nt], a[ap], b, y[r][nt]);
        }
    }
  }

  tc_store<S>(p, o, tile0, gid, t, y, 0.5f);   // y holds 2 y (halving is exact)
}

template <typename T, int MT, int G>
__global__ void __launch_bounds__(kGemvThreads) gemv_tc_b1_kernel(const TcParams<T> p) {
  BIVLM_DYNAMIC_SMEM(float, smem);
  const int c_begin = blockIdx.y * p.chunks_per_split;
  tc1_body<T, MT, G, kTcWarps, false>(p, c_begin, min(p.chunks, c_begin + p.chunks_per_split), tc_out_plain(), smem);
}

// Launch one instantiation (grid from the repacked sizes). sgroups / tsteps: the largest split's groups and
// table-product steps (sizes shared memory).
template <typename T, int MT, int G>
cudaError_t launch_tc1_config(const void* x, int64_t m, int64_t ldx, const TcWeight& w, const void* bias, int splits,
                              int chunks_per_split, void* out, float* out_f32, cudaStream_t stream) {
  TcParams<T> p = tc_params<T>(x, m, ldx, w, bias, tc_chunks(w.k), tc_table_groups(w.k, w.group_size),
                                 chunks_per_split, out, out_f32);
  p.sgroups = chunks_per_split * 256 / G;
  constexpr int tiles_per_block = kTcWarps * Tc1Shape<MT>::R;
  const dim3 grid(static_cast<unsigned>((p.tiles + tiles_per_block - 1) / tiles_per_block),
                  static_cast<unsigned>(splits));
  const int tsteps = tc1_table_steps(p.sgroups, Tc1Plan<T>::kGt);
  BIVLM_LAUNCH(grid, kGemvThreads, tc1_smem_bytes(MT, p.sgroups, tsteps), stream, gemv_tc_b1_kernel<T, MT, G>)(p);
  return cudaGetLastError();
}

}  // namespace detail
}  // namespace bivlm
