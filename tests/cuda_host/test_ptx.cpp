// test_ptx.cpp -- each host implementation of a ptx.cuh primitive against a plain definition written here from the
// PTX ISA / CUDA programming guide text (not from the implementation): lop3 (all 256 functions), prmt, the four
// shuffles at every width, ballot, vector loads/stores, cp.async groups, ldmatrix (x1/x2/x4, .trans), and
// mma.m16n8k16 (fp16, bf16) both from fragments built with the ISA's per-element formulas and end to end
// (ldmatrix-loaded operands against a plain matrix product).
#include <utility>
#include <vector>

#include "harness.h"
#include "ptx.cuh"

namespace harness {

namespace ptx = bivlm::ptx;

namespace {

// ---- lop3 / prmt ------------------------------------------------------------------------------------------------

template <int LUT>
void check_lop3(Rng& rng) {
  for (int it = 0; it < 16; ++it) {
    const uint32_t a = rng.next(), b = rng.next(), c = rng.next();
    uint32_t want = 0;
    for (int j = 0; j < 32; ++j) {
      const int idx = static_cast<int>((a >> j & 1) << 2 | (b >> j & 1) << 1 | (c >> j & 1));
      want |= static_cast<uint32_t>(LUT >> idx & 1) << j;
    }
    HCHECK(ptx::lop3<LUT>(a, b, c) == want, "lop3<0x%02x>(%08x, %08x, %08x)", LUT, a, b, c);
  }
}
template <int... L>
void check_all_lop3(std::integer_sequence<int, L...>, Rng& rng) {
  (check_lop3<L>(rng), ...);
}

void test_bits() {
  Rng rng(1);
  check_all_lop3(std::make_integer_sequence<int, 256>{}, rng);
  const uint32_t a = 0x12345678u, b = 0x9abcdef0u, c = 0x0f0f0f0fu;
  HCHECK(ptx::lop3<0xEA>(a, b, c) == ((a & b) | c), "lop3 (a & b) | c");
  HCHECK(ptx::lop3<0x96>(a, b, c) == (a ^ b ^ c), "lop3 a ^ b ^ c");
  // prmt: the byte-selection examples of the ISA, then random selectors against the byte-array definition.
  HCHECK(ptx::prmt(a, b, 0x3210) == a, "prmt identity");
  HCHECK(ptx::prmt(a, b, 0x7654) == b, "prmt selects b");
  HCHECK(ptx::prmt(a, b, 0x0123) == 0x78563412u, "prmt byte reverse");
  HCHECK(ptx::prmt(0x0080FF7Fu, 0, 0xBA98) == 0x00FFFF00u, "prmt sign replication");
  for (int it = 0; it < 20000; ++it) {
    const uint32_t x = rng.next(), y = rng.next(), sel = rng.next() & 0xFFFFu;
    const uint8_t bytes[8] = {static_cast<uint8_t>(x), static_cast<uint8_t>(x >> 8), static_cast<uint8_t>(x >> 16),
                              static_cast<uint8_t>(x >> 24), static_cast<uint8_t>(y), static_cast<uint8_t>(y >> 8),
                              static_cast<uint8_t>(y >> 16), static_cast<uint8_t>(y >> 24)};
    uint32_t want = 0;
    for (int i = 0; i < 4; ++i) {
      const int nib = static_cast<int>(sel >> (4 * i) & 0xF);
      const uint8_t byte = (nib & 8) ? ((bytes[nib & 7] & 0x80) ? 0xFF : 0x00) : bytes[nib & 7];
      want |= static_cast<uint32_t>(byte) << (8 * i);
    }
    HCHECK(ptx::prmt(x, y, sel) == want, "prmt(%08x, %08x, %04x)", x, y, sel);
  }
}

// ---- shuffles and votes -------------------------------------------------------------------------------------

constexpr int kWidths[6] = {32, 16, 8, 4, 2, 1};
constexpr int kArgs[5] = {0, 1, 3, 8, 17};
int lane_value(int tid) { return 1000 * (tid / 32) + 7 * (tid % 32) + 3; }

// out[((kind * 6 + w) * 5 + a) * 64 + tid]; kind 0 idx, 1 up, 2 down, 3 xor. Every lane runs the same loop.
__global__ void shfl_kernel(int* out) {
  const int tid = static_cast<int>(threadIdx.x);
  const int v = lane_value(tid);
  for (int w = 0; w < 6; ++w)
    for (int a = 0; a < 5; ++a) {
      const int base = (w * 5 + a) * 64 + tid, width = kWidths[w], arg = kArgs[a];
      out[0 * 30 * 64 + base] = ptx::shfl_idx(v, arg, 0xffffffffu, width);
      out[1 * 30 * 64 + base] = ptx::shfl_up(v, static_cast<unsigned>(arg), 0xffffffffu, width);
      out[2 * 30 * 64 + base] = ptx::shfl_down(v, static_cast<unsigned>(arg), 0xffffffffu, width);
      out[3 * 30 * 64 + base] = ptx::shfl_xor(v, arg, 0xffffffffu, width);
    }
}

// Half a warp active with mask 0x0000ffff (segments of 16), plus ballot and syncwarp.
__global__ void partial_kernel(int* out) {
  const int lane = static_cast<int>(threadIdx.x);
  out[64 + lane] = static_cast<int>(ptx::ballot(lane % 3 == 0));
  ptx::syncwarp();
  if (lane >= 16) return;
  out[lane] = ptx::shfl_xor(lane_value(lane), 5, 0x0000ffffu, 16);
  out[32 + lane] = static_cast<int>(ptx::ballot(lane % 2 == 1, 0x0000ffffu));
}

void test_shuffles() {
  Buffer out(4 * 30 * 64 * 4);
  BIVLM_LAUNCH(1, 64, 0, nullptr, shfl_kernel)(static_cast<int*>(out.data()));
  const int* o = static_cast<const int*>(out.data());
  for (int kind = 0; kind < 4; ++kind)
    for (int w = 0; w < 6; ++w)
      for (int a = 0; a < 5; ++a)
        for (int tid = 0; tid < 64; ++tid) {
          // CUDA programming guide, "Warp Shuffle Functions".
          const int lane = tid % 32, warp0 = tid - lane, width = kWidths[w], arg = kArgs[a];
          const int seg = lane / width * width;
          int src = lane;
          if (kind == 0) src = seg + arg % width;
          if (kind == 1 && lane - arg >= seg) src = lane - arg;
          if (kind == 2 && lane + arg < seg + width) src = lane + arg;
          if (kind == 3 && ((lane ^ arg) / width) <= lane / width && (lane ^ arg) < 32) src = lane ^ arg;
          const int got = o[((kind * 6 + w) * 5 + a) * 64 + tid];
          HCHECK(got == lane_value(warp0 + src), "shfl kind %d width %d arg %d lane %d: %d, want lane %d", kind,
                 width, arg, tid, got, src);
        }
  Buffer p(96 * 4);
  BIVLM_LAUNCH(1, 32, 0, nullptr, partial_kernel)(static_cast<int*>(p.data()));
  const int* q = static_cast<const int*>(p.data());
  uint32_t third = 0, odd16 = 0;
  for (int l = 0; l < 32; ++l) third |= (l % 3 == 0 ? 1u : 0u) << l;
  for (int l = 0; l < 16; ++l) odd16 |= (l % 2 == 1 ? 1u : 0u) << l;
  for (int l = 0; l < 32; ++l) HCHECK(static_cast<uint32_t>(q[64 + l]) == third, "ballot lane %d", l);
  for (int l = 0; l < 16; ++l) {
    HCHECK(q[l] == lane_value(l ^ 5), "partial-mask shfl_xor lane %d: %d", l, q[l]);
    HCHECK(static_cast<uint32_t>(q[32 + l]) == odd16, "partial-mask ballot lane %d", l);
  }
}

// ---- vector loads / stores, cp.async ------------------------------------------------------------------------

__global__ void vector_kernel(const int32_t* src, int32_t* dst) {
  const int t = static_cast<int>(threadIdx.x);
  uint4 a = ptx::ld_nc_v4(src + 4 * t);
  const uint4 b = ptx::ld_cs_v4(src + 4 * t);
  a.x ^= b.x, a.y ^= b.y, a.z ^= b.z, a.w ^= b.w;  // zero if both loads read the same 16 bytes
  a.x += static_cast<uint32_t>(ptx::ld_cs_b32(src + 4 * t + 3));
  const float4 f = ptx::ld_nc_f4(reinterpret_cast<const float*>(src + 4 * t));
  a.y = __float_as_uint(f.y) ^ b.y;  // zero if the float load read the same bytes
  a.z = __float_as_uint(f.z) ^ b.z;
  ptx::st_v4(dst + 4 * t, a);
}

// Thread t: 16 bytes from src + 16t into smem; observes smem before and after the waits.
__global__ void cp_async_kernel(const int32_t* src, int32_t* out) {
  BIVLM_DYNAMIC_SMEM(int32_t, smem);  // 2 * 32 * 4 words
  const int t = static_cast<int>(threadIdx.x);
  ptx::cp_async16(smem + 4 * t, src + 4 * t);
  ptx::cp_async_commit();
  ptx::cp_async16(smem + 128 + 4 * t, src, false);  // predicated off: zero fill
  ptx::cp_async_commit();
  out[4 * t + 0] = smem[4 * t];        // before any wait: still the old contents
  ptx::cp_async_wait<1>();
  out[4 * t + 1] = smem[4 * t];        // first group landed
  out[4 * t + 2] = smem[128 + 4 * t];  // second group not yet
  ptx::cp_async_wait<0>();
  out[4 * t + 3] = smem[128 + 4 * t];  // zero-filled
  __syncthreads();
  const uint4 v = ptx::ld_shared_v4(smem + 4 * ((t + 1) % 32));   // 16 bytes another thread's cp.async wrote
  out[128 + t] = static_cast<int32_t>(v.x ^ v.y ^ v.z ^ v.w);
}

void test_memory() {
  Buffer src(32 * 16), dst(32 * 16), out(32 * 20);
  int32_t* s = static_cast<int32_t*>(src.data());
  for (int i = 0; i < 128; ++i) s[i] = i * 2654435761u;
  BIVLM_LAUNCH(1, 32, 0, nullptr, vector_kernel)(s, static_cast<int32_t*>(dst.data()));
  const int32_t* d = static_cast<const int32_t*>(dst.data());
  for (int t = 0; t < 32; ++t) {
    HCHECK(static_cast<uint32_t>(d[4 * t]) == static_cast<uint32_t>(s[4 * t + 3]) && d[4 * t + 1] == 0 &&
               d[4 * t + 2] == 0 && d[4 * t + 3] == 0,
           "vector loads/store thread %d", t);
  }
  BIVLM_LAUNCH(1, 32, 2 * 32 * 16, nullptr, cp_async_kernel)(s, static_cast<int32_t*>(out.data()));
  const int32_t* o = static_cast<const int32_t*>(out.data());
  for (int t = 0; t < 32; ++t) {
    HCHECK(static_cast<uint32_t>(o[4 * t]) == 0xA5A5A5A5u, "cp.async visible before its wait (thread %d)", t);
    HCHECK(o[4 * t + 1] == s[4 * t], "cp.async group 0 after wait_group 1 (thread %d)", t);
    HCHECK(static_cast<uint32_t>(o[4 * t + 2]) == 0xA5A5A5A5u, "cp.async group 1 visible too early (thread %d)", t);
    HCHECK(o[4 * t + 3] == 0, "cp.async zero fill (thread %d)", t);
    const int u = (t + 1) % 32;
    HCHECK(o[128 + t] == (s[4 * u] ^ s[4 * u + 1] ^ s[4 * u + 2] ^ s[4 * u + 3]), "ld.shared.v4 (thread %d)", t);
  }
}

// ---- ldmatrix ---------------------------------------------------------------------------------------------------

// Four 8x8 b16 matrices in shared memory; row r of matrix j sits at slot (j * 8 + (r * 5) % 8) of 24 halves
// (48-byte rows, a shuffled row order: ldmatrix takes any 16-byte aligned row addresses). Element (j, r, c) =
// j * 64 + r * 8 + c. out[(variant * 32 + lane) * 4 + reg], variants: x1, x2, x4, x1.trans, x2.trans, x4.trans.
__global__ void ldmatrix_kernel(uint32_t* out) {
  BIVLM_DYNAMIC_SMEM(uint16_t, smem);  // 32 rows * 24 halves
  const int lane = static_cast<int>(threadIdx.x);
  for (int i = lane; i < 32 * 8; i += 32) {
    const int j = i / 64, r = i / 8 % 8, c = i % 8;
    smem[(j * 8 + (r * 5) % 8) * 24 + c] = static_cast<uint16_t>(j * 64 + r * 8 + c);
  }
  __syncthreads();
  const uint16_t* row = smem + ((lane / 8) * 8 + (lane % 8 * 5) % 8) * 24;
  uint32_t r1[1], r2[2], r4[4];
  ptx::ldmatrix<1>(r1, row), out[(0 * 32 + lane) * 4] = r1[0];
  ptx::ldmatrix<2>(r2, row);
  for (int j = 0; j < 2; ++j) out[(1 * 32 + lane) * 4 + j] = r2[j];
  ptx::ldmatrix<4>(r4, row);
  for (int j = 0; j < 4; ++j) out[(2 * 32 + lane) * 4 + j] = r4[j];
  ptx::ldmatrix<1, true>(r1, row), out[(3 * 32 + lane) * 4] = r1[0];
  ptx::ldmatrix<2, true>(r2, row);
  for (int j = 0; j < 2; ++j) out[(4 * 32 + lane) * 4 + j] = r2[j];
  ptx::ldmatrix<4, true>(r4, row);
  for (int j = 0; j < 4; ++j) out[(5 * 32 + lane) * 4 + j] = r4[j];
}

void test_ldmatrix() {
  Buffer out(6 * 32 * 4 * 4);
  BIVLM_LAUNCH(1, 32, 32 * 24 * 2, nullptr, ldmatrix_kernel)(static_cast<uint32_t*>(out.data()));
  const uint32_t* o = static_cast<const uint32_t*>(out.data());
  const int nmat[6] = {1, 2, 4, 1, 2, 4};
  for (int v = 0; v < 6; ++v)
    for (int lane = 0; lane < 32; ++lane)
      for (int j = 0; j < nmat[v]; ++j) {
        // PTX ISA, ldmatrix: "each thread receives a row (lane / 4) and two consecutive columns 2 * (lane % 4)" of
        // each matrix, or of its transpose with .trans.
        const int r = lane / 4, c = lane % 4 * 2;
        const bool tr = v >= 3;
        const uint32_t e0 = static_cast<uint32_t>(tr ? j * 64 + c * 8 + r : j * 64 + r * 8 + c);
        const uint32_t e1 = static_cast<uint32_t>(tr ? j * 64 + (c + 1) * 8 + r : j * 64 + r * 8 + c + 1);
        const uint32_t got = o[(v * 32 + lane) * 4 + j];
        HCHECK(got == (e0 | e1 << 16), "ldmatrix variant %d lane %d reg %d: %08x, want %08x", v, lane, j, got,
               e0 | e1 << 16);
      }
}

// ---- mma.sync.m16n8k16 ---------------------------------------------------------------------------------------

uint16_t to16(float f, bool bf16) { return bf16 ? __float2bfloat16_rn(f).x : __float2half_rn(f).x; }
float from16(uint16_t h, bool bf16) { return bf16 ? __bfloat162float(__nv_bfloat16{h}) : __half2float(__half{h}); }

// Lane-level fragments in, fragments out: frag[lane * 10 + 0..3] = a, 4..5 = b, 6..9 = c (floats as bits).
template <bool BF16>
__global__ void mma_fragment_kernel(const uint32_t* frag, float* d_out) {
  const int lane = static_cast<int>(threadIdx.x);
  uint32_t a[4], b[2];
  float acc[4];
  for (int i = 0; i < 4; ++i) a[i] = frag[lane * 10 + i];
  for (int i = 0; i < 2; ++i) b[i] = frag[lane * 10 + 4 + i];
  for (int i = 0; i < 4; ++i) acc[i] = __uint_as_float(frag[lane * 10 + 6 + i]);
  if (BF16) ptx::mma_m16n8k16_bf16(acc, a, b, acc);  // d aliases c, as kernels use it
  else ptx::mma_m16n8k16_f16(acc, a, b, acc);
  for (int i = 0; i < 4; ++i) d_out[lane * 4 + i] = acc[i];
}

// End to end: A [16][16] row-major and B [16 (k)][8 (n)] row-major in shared memory, A by ldmatrix.x4, B by
// ldmatrix.x2.trans, one mma, D [16][8] written row-major.
template <bool BF16>
__global__ void mma_smem_kernel(const uint16_t* A, const uint16_t* B, float* D) {
  BIVLM_DYNAMIC_SMEM(uint16_t, smem);  // A: 16 * 16, then B: 16 * 8
  const int lane = static_cast<int>(threadIdx.x);
  for (int i = lane; i < 256; i += 32) smem[i] = A[i];
  for (int i = lane; i < 128; i += 32) smem[256 + i] = B[i];
  __syncthreads();
  uint32_t a[4], b[2];
  // Matrix j of A: rows 8 * (j & 1) .., cols 8 * (j >> 1) ..  -> registers a0..a3 in fragment order.
  ptx::ldmatrix<4>(a, smem + (8 * (lane / 8 % 2) + lane % 8) * 16 + 8 * (lane / 16));
  // B matrices: k rows 0..7 and 8..15 (lanes 0..15 give the addresses; the others repeat them).
  ptx::ldmatrix<2, true>(b, smem + 256 + (lane % 16) * 8);
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  if (BF16) ptx::mma_m16n8k16_bf16(d, a, b, d);
  else ptx::mma_m16n8k16_f16(d, a, b, d);
  const int g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) D[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2] = d[i];
}

template <bool BF16>
void test_mma(Rng& rng) {
  for (int trial = 0; trial < 20; ++trial) {
    float A[16][16], B[16][8], C[16][8];
    auto rnd = [&](float scale) {
      return from16(to16((static_cast<float>(rng.next() % 20001) / 10000.0f - 1.0f) * scale, BF16), BF16);
    };
    for (auto& r : A) for (float& v : r) v = rnd(2.0f);
    for (auto& r : B) for (float& v : r) v = rnd(1.0f);
    for (auto& r : C) for (float& v : r) v = (static_cast<float>(rng.next() % 2001) - 1000.0f) / 64.0f;
    // Fragments from the PTX ISA's per-element formulas ("Matrix fragments for mma.m16n8k16", .f16/.bf16).
    std::vector<uint32_t> frag(32 * 10, 0);
    for (int lane = 0; lane < 32; ++lane) {
      const int groupID = lane >> 2, tig = lane % 4;
      for (int i = 0; i < 8; ++i) {  // a0..a7: two per register
        const int row = (i < 2 || (i >= 4 && i < 6)) ? groupID : groupID + 8;
        const int col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
        frag[lane * 10 + i / 2] |= static_cast<uint32_t>(to16(A[row][col], BF16)) << (16 * (i & 1));
      }
      for (int i = 0; i < 4; ++i) {  // b0..b3
        const int row = tig * 2 + (i & 1) + (i >= 2 ? 8 : 0), col = groupID;
        frag[lane * 10 + 4 + i / 2] |= static_cast<uint32_t>(to16(B[row][col], BF16)) << (16 * (i & 1));
      }
      for (int i = 0; i < 4; ++i) {  // c0..c3
        const int row = i < 2 ? groupID : groupID + 8, col = tig * 2 + (i & 1);
        frag[lane * 10 + 6 + i] = __float_as_uint(C[row][col]);
      }
    }
    Buffer fbuf(frag.size() * 4), dbuf(32 * 4 * 4);
    std::memcpy(fbuf.data(), frag.data(), fbuf.bytes());
    BIVLM_LAUNCH(1, 32, 0, nullptr, mma_fragment_kernel<BF16>)(static_cast<const uint32_t*>(fbuf.data()),
                                                               static_cast<float*>(dbuf.data()));
    const float* d = static_cast<const float*>(dbuf.data());
    // The plain definition: D = A B + C, products exact, one rounding to fp32 (what the host promises; the tensor
    // core's own rounding is not specified, see ptx_mma.cuh).
    for (int lane = 0; lane < 32; ++lane)
      for (int i = 0; i < 4; ++i) {
        const int row = i < 2 ? lane / 4 : lane / 4 + 8, col = lane % 4 * 2 + (i & 1);
        double want = C[row][col];
        for (int k = 0; k < 16; ++k) want += static_cast<double>(A[row][k]) * B[k][col];
        HCHECK(d[lane * 4 + i] == static_cast<float>(want), "mma %s lane %d d%d = %g, want %g", BF16 ? "bf16" : "f16",
               lane, i, static_cast<double>(d[lane * 4 + i]), want);
      }
    // End to end through shared memory and ldmatrix (C = 0).
    Buffer abuf(256 * 2), bbuf(128 * 2), obuf(128 * 4);
    uint16_t* a16 = static_cast<uint16_t*>(abuf.data());
    uint16_t* b16 = static_cast<uint16_t*>(bbuf.data());
    for (int r = 0; r < 16; ++r)
      for (int c = 0; c < 16; ++c) a16[r * 16 + c] = to16(A[r][c], BF16);
    for (int k = 0; k < 16; ++k)
      for (int n = 0; n < 8; ++n) b16[k * 8 + n] = to16(B[k][n], BF16);
    BIVLM_LAUNCH(1, 32, 384 * 2, nullptr, mma_smem_kernel<BF16>)(a16, b16, static_cast<float*>(obuf.data()));
    const float* o = static_cast<const float*>(obuf.data());
    for (int r = 0; r < 16; ++r)
      for (int n = 0; n < 8; ++n) {
        double want = 0;
        for (int k = 0; k < 16; ++k) want += static_cast<double>(A[r][k]) * B[k][n];
        HCHECK(o[r * 8 + n] == static_cast<float>(want), "ldmatrix+mma %s D[%d][%d] = %g, want %g",
               BF16 ? "bf16" : "f16", r, n, static_cast<double>(o[r * 8 + n]), want);
      }
  }
}

}  // namespace

int run_ptx_tests() {
  const long failures0 = g_count.failures;
  test_bits();
  test_shuffles();
  test_memory();
  test_ldmatrix();
  Rng rng(3);
  test_mma<false>(rng);
  test_mma<true>(rng);
  std::printf("ptx wrappers: ok so far (%ld checks)\n", g_count.checks);
  return g_count.failures != failures0;
}

}  // namespace harness
