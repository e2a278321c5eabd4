// cpu_decode_primitives.cpp -- what one core of this CPU can do per 8 weights, for the decode loops of
// csrc/cpu/ (issue 17: "where a floor is not met, what bounds it"). A timing tool, not a test.
//
//   g++ -O3 -mavx2 -mfma benchmarks/cpu_decode_primitives.cpp -o /tmp/cpu_prims && /tmp/cpu_prims
//
// Every variant runs the inner loop of a kernel on codes that stay in L2 (256 KiB) and activations in L1, with
// 4 output rows (or 4 row vectors) sharing each activation load, as the M = 1 kernels do. So the figures are the
// compute bound of a loop, without DRAM: ns per 8 weights on one core, and what that makes a 4096 x 4096 layer.
//
//   fma only         y += w * x with w already decoded: the bound of ANY exact fp32 kernel (one FMA / 8 weights)
//   4-bit affine     srli + and + cvtdq2ps + fma          (csrc/cpu/kernels_avx2.cpp, block_t, BITS = 4)
//   2-bit codebook   srli + vpermilps + fma               (block_t, BITS = 2)
//   1-bit mask       byte load + and (mask table) + add   (block_mask1)
//   1-bit lookup     srli + vpermilps + add per 16 weights: 8 rows x 2 columns per vector (tmac_avx2.cpp)
//   vpermilps alone  srli + vpermilps + add per 8 weights: the permute's cost without the FMA
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

constexpr int kWords = 1 << 16;        // 256 KiB of codes
constexpr int kReps = 20;
alignas(32) int32_t g_masks[256][8];
float g_sink;

void sink(__m256 a, __m256 b, __m256 c, __m256 d) {
  alignas(32) float f[8];
  _mm256_store_ps(f, _mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, d)));
  g_sink += f[0];
}

// Runs body(v0..v3, xv, j, acc) over the codes: per 32 words (4 vectors of 8 words, one per row), PER_WORD steps
// of 8 columns each; weights per step = 8 per row. Returns ns per 8 weights.
template <int PER_WORD, class Body>
double run(const std::vector<uint32_t>& q, const std::vector<float>& x, Body body) {
  double best = 1e30;
  for (int rep = 0; rep < 5; ++rep) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const double t = now();
    for (int it = 0; it < kReps; ++it) {
      for (int c = 0; c < kWords; c += 32) {
        const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(&q[c]));
        const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(&q[c + 8]));
        const __m256i v2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(&q[c + 16]));
        const __m256i v3 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(&q[c + 24]));
        const float* xc = &x[((c >> 5) & 31) * 8 * PER_WORD];
        const uint8_t* qb = reinterpret_cast<const uint8_t*>(&q[c]);
#pragma GCC unroll 32
        for (int j = 0; j < PER_WORD; ++j) body(v0, v1, v2, v3, qb, xc, j, a0, a1, a2, a3);
      }
    }
    const double dt = now() - t;
    if (dt < best) best = dt;
    sink(a0, a1, a2, a3);
  }
  const double steps = double(kReps) * (kWords / 32) * PER_WORD * 4;   // 8-weight steps (4 rows)
  return best / steps * 1e9;
}

void report(const char* name, double ns8) {
  std::printf("| %-44s | %6.3f | %7.2f |\n", name, ns8, ns8 * 4096.0 * 4096.0 / 8 * 1e-6);
}

}  // namespace

int main() {
  for (int b = 0; b < 256; ++b)
    for (int i = 0; i < 8; ++i) g_masks[b][i] = ((b >> i) & 1) ? -1 : 0;
  std::vector<uint32_t> q(kWords);
  for (auto& v : q) v = static_cast<uint32_t>(std::rand()) * 2654435761u;
  std::vector<float> x(32 * 8 * 32);
  for (auto& v : x) v = static_cast<float>(std::rand()) / RAND_MAX - 0.5f;
  const __m256 cb = _mm256_setr_ps(-1.5f, -0.5f, 0.5f, 1.5f, -1.5f, -0.5f, 0.5f, 1.5f);
  const __m256i m15 = _mm256_set1_epi32(15);

  std::printf("| loop (4 rows share each x load) | ns / 8 weights, one core | 4096x4096 ms |\n|---|---|---|\n");
  report("fma only (weights already decoded)", run<8>(q, x, [&](auto v0, auto, auto, auto, auto, const float* xc,
                                                               int j, __m256& a0, __m256& a1, __m256& a2,
                                                               __m256& a3) {
    const __m256 xv = _mm256_loadu_ps(xc + 8 * j), w = _mm256_castsi256_ps(v0);
    a0 = _mm256_fmadd_ps(w, xv, a0), a1 = _mm256_fmadd_ps(w, xv, a1);
    a2 = _mm256_fmadd_ps(w, xv, a2), a3 = _mm256_fmadd_ps(w, xv, a3);
  }));
  report("4-bit affine: srli + and + cvtdq2ps + fma", run<8>(q, x, [&](auto v0, auto v1, auto v2, auto v3, auto,
                                                                      const float* xc, int j, __m256& a0,
                                                                      __m256& a1, __m256& a2, __m256& a3) {
    const __m256 xv = _mm256_loadu_ps(xc + 8 * j);
    auto dec = [&](__m256i v) { return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 4 * j), m15)); };
    a0 = _mm256_fmadd_ps(dec(v0), xv, a0), a1 = _mm256_fmadd_ps(dec(v1), xv, a1);
    a2 = _mm256_fmadd_ps(dec(v2), xv, a2), a3 = _mm256_fmadd_ps(dec(v3), xv, a3);
  }));
  report("2-bit codebook: srli + vpermilps + fma", run<16>(q, x, [&](auto v0, auto v1, auto v2, auto v3, auto,
                                                                     const float* xc, int j, __m256& a0,
                                                                     __m256& a1, __m256& a2, __m256& a3) {
    const __m256 xv = _mm256_loadu_ps(xc + 8 * j);
    auto dec = [&](__m256i v) { return _mm256_permutevar_ps(cb, _mm256_srli_epi32(v, 2 * j)); };
    a0 = _mm256_fmadd_ps(dec(v0), xv, a0), a1 = _mm256_fmadd_ps(dec(v1), xv, a1);
    a2 = _mm256_fmadd_ps(dec(v2), xv, a2), a3 = _mm256_fmadd_ps(dec(v3), xv, a3);
  }));
  report("vpermilps alone: srli + vpermilps + add", run<16>(q, x, [&](auto v0, auto v1, auto v2, auto v3, auto,
                                                                      const float*, int j, __m256& a0,
                                                                      __m256& a1, __m256& a2, __m256& a3) {
    auto dec = [&](__m256i v) { return _mm256_permutevar_ps(cb, _mm256_srli_epi32(v, 2 * j)); };
    a0 = _mm256_add_ps(dec(v0), a0), a1 = _mm256_add_ps(dec(v1), a1);
    a2 = _mm256_add_ps(dec(v2), a2), a3 = _mm256_add_ps(dec(v3), a3);
  }));
  report("1-bit mask: byte load + and + add", run<4>(q, x, [&](auto, auto, auto, auto, const uint8_t* qb,
                                                               const float* xc, int j, __m256& a0, __m256& a1,
                                                               __m256& a2, __m256& a3) {
    const __m256 xv = _mm256_loadu_ps(xc + 8 * j);
    auto m = [&](int r) { return _mm256_load_ps(reinterpret_cast<const float*>(g_masks[qb[32 * r + j]])); };
    a0 = _mm256_add_ps(a0, _mm256_and_ps(xv, m(0))), a1 = _mm256_add_ps(a1, _mm256_and_ps(xv, m(1)));
    a2 = _mm256_add_ps(a2, _mm256_and_ps(xv, m(2))), a3 = _mm256_add_ps(a3, _mm256_and_ps(xv, m(3)));
  }));
  // Lookup: one vector = 8 rows x 2 columns (16 weights), the 4 subset sums of the column pair in each 128-bit
  // half; counted per 8 weights, so one step here (4 vectors) is 64 weights = 8 steps of 8.
  const double lk = run<16>(q, x, [&](auto v0, auto v1, auto v2, auto v3, auto, const float* xc, int j,
                                      __m256& a0, __m256& a1, __m256& a2, __m256& a3) {
    const __m256 t = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(xc + 4 * j));
    auto dec = [&](__m256i v) { return _mm256_permutevar_ps(t, _mm256_srli_epi32(v, 2 * j)); };
    a0 = _mm256_add_ps(dec(v0), a0), a1 = _mm256_add_ps(dec(v1), a1);
    a2 = _mm256_add_ps(dec(v2), a2), a3 = _mm256_add_ps(dec(v3), a3);
  });
  report("1-bit lookup: srli + vpermilps + add / 16 w", lk / 2);
  return g_sink == 12345.f;
}
