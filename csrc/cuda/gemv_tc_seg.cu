// gemv_tc_seg.cu -- host side of the segmented tensor-core GEMV (gemv_tc_seg.cuh): format check, split plan,
// dispatch over dtype x M bucket x g.
#include <algorithm>
#include <cstdint>

#include "gemv_tc_seg.cuh"

namespace bivlm {

namespace {

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr size_t kSegSmemMax = 48 * 1024;   // the default dynamic shared memory limit: no opt-in needed

// How a split count s divides the segments: chunks per split of each (the 1-bit one in whole slot blocks), the
// stage's columns and the shared memory it all takes. valid: every one of the s splits has work and it fits.
struct SegPlan {
  int cps2 = 0, cps1 = 0, w2 = 0, stage_off = 0;
  size_t smem = 0;
  bool valid = false;
};

// A present segment (the 2-bit one when both are): where n, g and the dtype are read.
const TcWeight& present(const TcSegWeight& w) { return w.seg2.k > 0 ? w.seg2 : w.seg1; }

bool seg_covered(const TcSegWeight& w) {
  const TcWeight& a = w.seg2;
  const TcWeight& b = w.seg1;
  const bool has2 = a.k > 0, has1 = b.k > 0;
  const TcWeight& r = present(w);
  auto ok = [&](const TcWeight& s, int bits) {
    return s.bits == bits && s.n == r.n && s.group_size == r.group_size && s.dtype == r.dtype && s.k % s.group_size == 0 &&
           s.k <= INT32_MAX / 4 && s.qtc != nullptr && s.table != nullptr;
  };
  return (has2 || has1) && (!has2 || ok(a, 2)) && (!has1 || ok(b, 1)) &&
         gemv_tc_supported(1, r.group_size, r.dtype) && r.n >= 1 && r.n <= INT32_MAX / 2;
}

SegPlan seg_plan(int64_t m, const TcSegWeight& w, int64_t s) {
  SegPlan p;
  const int mt = detail::gemv_mt(m), g = present(w).group_size;
  const int64_t c2 = w.seg2.k > 0 ? tc2_chunks(w.seg2.k) : 0, c1 = w.seg1.k > 0 ? tc_chunks(w.seg1.k) : 0;
  const int64_t bc = cdiv(static_cast<int64_t>(mt >= 8 ? 1 : 8 / mt) * g, 256);   // chunks of a 1-bit slot block
  const int64_t cps2 = c2 > 0 ? cdiv(c2, s) : 0, cps1 = c1 > 0 ? cdiv(cdiv(c1, s), bc) * bc : 0;
  const int64_t used = std::max(cps2 > 0 ? cdiv(c2, cps2) : 0, cps1 > 0 ? cdiv(c1, cps1) : 0);
  p.cps2 = static_cast<int>(cps2), p.cps1 = static_cast<int>(cps1);
  p.w2 = static_cast<int>(cps2 * 128);
  const int ld = detail::tc_seg_ld(mt);
  size_t tc1 = 0;
  if (cps1 > 0) {
    const int sg = static_cast<int>(cps1 * 256 / g);
    tc1 = (detail::tc1_smem_bytes(mt, sg, tc1_table_steps(sg, detail::Tc1Plan<__half>::kGt)) + 15) / 16 * 16;
  }
  p.stage_off = static_cast<int>(tc1 / sizeof(float));
  p.smem = tc1 + (static_cast<size_t>(mt) * ld + 256) * 2;
  p.valid = used == s && cps2 * 128 + cps1 * 256 <= ld - 32 && p.smem <= kSegSmemMax;
  return p;
}

}  // namespace

// Split policy (NOT MEASURED, as gemv_tc_num_splits): >= 4 blocks per SM, at most 32 splits where the stage fits;
// the smallest valid count at or above that target, else the largest below it.
int gemv_tc_seg_num_splits(int64_t m, const TcSegWeight& w, int sm_count) {
  if (m < 1 || m > kGemvMaxM || !seg_covered(w)) return 0;
  const int64_t row_blocks = cdiv(tc_tiles(present(w).n), detail::kTcSegWarps * detail::kTc2Tiles);
  int64_t target = cdiv(4 * static_cast<int64_t>(sm_count > 0 ? sm_count : 1), row_blocks);
  target = std::min<int64_t>(std::max<int64_t>(target, 1), 32);
  const int64_t most = std::max(w.seg2.k > 0 ? tc2_chunks(w.seg2.k) : 0, w.seg1.k > 0 ? tc_chunks(w.seg1.k) : 0);
  int64_t below = 0;
  for (int64_t s = 1; s <= most; ++s) {
    if (!seg_plan(m, w, s).valid) continue;
    if (s >= target) return static_cast<int>(s);
    below = s;
  }
  return static_cast<int>(below);
}

namespace detail {

namespace {

template <typename T, int MT, int G>
cudaError_t launch_seg_config(const void* x, int64_t m, int64_t ldx, const TcSegWeight& w, const void* bias,
                              const SegPlan& plan, int splits, float* out_f32, cudaStream_t stream) {
  TcSegParams<T> q;
  q.s2 = tc_params<T>(x, m, ldx, w.seg2, bias, w.seg2.k > 0 ? tc2_chunks(w.seg2.k) : 0,
                      w.seg2.k > 0 ? tc2_table_groups(w.seg2.k, G) : 0, plan.cps2, nullptr, out_f32);
  q.s1 = tc_params<T>(x, m, ldx, w.seg1, bias, w.seg1.k > 0 ? tc_chunks(w.seg1.k) : 0,
                      w.seg1.k > 0 ? tc_table_groups(w.seg1.k, G) : 0, plan.cps1, nullptr, out_f32);
  q.s1.sgroups = plan.cps1 * 256 / G;
  q.perm = w.perm, q.w2 = plan.w2, q.stage_off = plan.stage_off;
  constexpr int tiles_per_block = kTcSegWarps * kTc2Tiles;
  const dim3 grid(static_cast<unsigned>(cdiv(tc_tiles(present(w).n), tiles_per_block)), static_cast<unsigned>(splits));
  BIVLM_LAUNCH(grid, kTcSegThreads, plan.smem, stream, gemv_tc_seg_kernel<T, MT, G>)(q);
  return cudaGetLastError();
}

// launch_seg_config as a Launch of dispatch_tc_config.
struct SegLaunch {
  template <typename T, int MT, int G, class... A>
  static cudaError_t run(const A&... a) {
    return launch_seg_config<T, MT, G>(a...);
  }
};

}  // namespace

}  // namespace detail

cudaError_t launch_gemv_tc_seg(const void* x, int64_t m, int64_t ldx, const TcSegWeight& w, const void* bias,
                               int splits, float* out_f32, cudaStream_t stream) {
  if (m < 1 || m > kGemvMaxM || !seg_covered(w) || splits < 1 || out_f32 == nullptr) return cudaErrorInvalidValue;
  auto aligned = [](const void* p, uintptr_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; };
  for (const TcWeight* s : {&w.seg2, &w.seg1}) {
    if (s->k > 0 && (!aligned(s->qtc, 16) || !aligned(s->table, 16))) return cudaErrorInvalidValue;
  }
  const int64_t k = w.seg2.k + w.seg1.k;
  if (x == nullptr || !aligned(x, 2) || ldx < k || (w.perm != nullptr && !aligned(w.perm, 16)))
    return cudaErrorInvalidValue;
  const SegPlan plan = seg_plan(m, w, splits);
  if (!plan.valid) return cudaErrorInvalidValue;   // not what gemv_tc_seg_num_splits gave
  const TcWeight& r = present(w);
  return detail::dispatch_tc_config<detail::SegLaunch>(r.dtype, r.group_size, m, x, m, ldx, w, bias, plan, splits,
                                                       out_f32, stream);
}

}  // namespace bivlm
