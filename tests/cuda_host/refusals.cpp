// refusals.cpp -- every argument the C ABI (bivlm_kernels.h) refuses: the launcher returns cudaErrorInvalidValue
// and launches nothing. Each case starts from a valid call (checked to succeed and launch) and breaks one thing;
// the buffers stay valid, so a missing check shows up as a launch (and usually as an ASan report).
#include <functional>
#include <vector>

#include "bivlm_kernels.h"
#include "harness.h"
#include "host/runtime.h"

namespace harness {

namespace {

struct Call {
  const char* what;
  std::function<cudaError_t()> fn;
};

void expect(const char* what, const std::function<cudaError_t()>& fn, cudaError_t want, bool launches) {
  const long before = bivlm::host::launch_count();
  const cudaError_t e = fn();
  const long launched = bivlm::host::launch_count() - before;
  HCHECK(e == want, "%s: returned %d (%s), expected %d", what, static_cast<int>(e), cudaGetErrorString(e),
         static_cast<int>(want));
  HCHECK((launched > 0) == launches, "%s: %ld launches, expected %s", what, launched, launches ? "some" : "none");
}

}  // namespace

int run_refusals() {
  const int64_t n = 8, k = 256, g = 32;
  // Buffers large enough for every variant below (4-bit, m = 16 + 1, ldx up to 2k), fp32-sized elements.
  Buffer q(n * k * 4 / 32 * 4 + 16), t0(n * (k / g) * 4 * 4), t1(n * (k / g) * 4), x(17 * 2 * k * 4 + 32),
      out(17 * n * 4), ws(32 * 17 * n * 4), deq(n * k * 4 + 32);
  std::memset(q.data(), 0, q.bytes());
  std::memset(t0.data(), 0, t0.bytes());
  std::memset(t1.data(), 0, t1.bytes());
  std::memset(x.data(), 0, x.bytes());
  auto weight = [&](int bits) {
    bivlm::PackedWeight w;
    w.qweight = static_cast<const int32_t*>(q.data());
    w.table0 = t0.data();
    w.table1 = bits == 4 ? t1.data() : nullptr;
    w.n = n;
    w.k = k;
    w.bits = bits;
    w.group_size = static_cast<int>(g);
    w.dtype = bivlm::DType::kHalf;
    return w;
  };
  float* ws_p = static_cast<float*>(ws.data());
  char* xp = static_cast<char*>(x.data());
  // The valid call each case below breaks one argument of.
  auto gemv_w = [&](const bivlm::PackedWeight& w) {
    return bivlm::launch_gemv(xp, 1, k, w, nullptr, 1, out.data(), nullptr, nullptr);
  };
  auto deq_w = [&](const bivlm::PackedWeight& w) { return bivlm::launch_dequantize(w, deq.data(), nullptr); };
  auto reduce = [&](int splits, int64_t mn, void* o, bivlm::DType dt, cudaStream_t st) {
    return bivlm::launch_splitk_reduce(ws_p, splits, mn, o, dt, st);
  };

  // ---- launch_gemv ----
  for (int bits : {1, 2, 4}) {
    expect("gemv valid", [&] { return bivlm::launch_gemv(xp, 1, k, weight(bits), nullptr, 1, out.data(), nullptr,
                                                         nullptr); }, cudaSuccess, true);
  }
  std::vector<Call> gemv = {
      {"bits = 3", [&] { auto w = weight(1); w.bits = 3; return gemv_w(w); }},
      {"bits = 8", [&] { auto w = weight(4); w.bits = 8; return gemv_w(w); }},
      {"group_size = 16", [&] { auto w = weight(1); w.group_size = 16; return gemv_w(w); }},
      {"group_size = 96", [&] { auto w = weight(1); w.group_size = 96; return gemv_w(w); }},
      {"m = 0", [&] { return bivlm::launch_gemv(xp, 0, k, weight(1), nullptr, 1, out.data(), nullptr, nullptr); }},
      {"m = kGemvMaxM + 1", [&] { return bivlm::launch_gemv(xp, bivlm::kGemvMaxM + 1, k, weight(1), nullptr, 1, out.data(), nullptr, nullptr); }},
      {"n = 0", [&] { auto w = weight(1); w.n = 0; return gemv_w(w); }},
      {"k < group_size", [&] { auto w = weight(1); w.k = 16; return gemv_w(w); }},
      {"k % group_size != 0", [&] { auto w = weight(1); w.k = k - 32 + 8; return gemv_w(w); }},
      {"splits = 0", [&] { return bivlm::launch_gemv(xp, 1, k, weight(1), nullptr, 0, nullptr, ws_p, nullptr); }},
      {"splits > 1 without out_f32", [&] { return bivlm::launch_gemv(xp, 1, k, weight(1), nullptr, 2, out.data(), nullptr, nullptr); }},
      {"no output", [&] { return bivlm::launch_gemv(xp, 1, k, weight(1), nullptr, 1, nullptr, nullptr, nullptr); }},
      {"affine without zeros", [&] { auto w = weight(4); w.table1 = nullptr; return gemv_w(w); }},
      {"lut with zeros", [&] { auto w = weight(2); w.table1 = t1.data(); return gemv_w(w); }},
      {"x misaligned", [&] { return bivlm::launch_gemv(xp + 2, 1, k, weight(1), nullptr, 1, out.data(), nullptr, nullptr); }},
      {"ldx*2 % 16 != 0", [&] { return bivlm::launch_gemv(xp, 2, k + 4, weight(1), nullptr, 1, out.data(), nullptr, nullptr); }},
      {"ldx < k", [&] { return bivlm::launch_gemv(xp, 2, k - 8, weight(1), nullptr, 1, out.data(), nullptr, nullptr); }},
      {"n > INT32_MAX", [&] { auto w = weight(1); w.n = int64_t{1} << 32; return gemv_w(w); }},
  };
  for (const Call& c : gemv) expect(c.what, c.fn, cudaErrorInvalidValue, false);

  // ---- launch_dequantize ----
  for (int bits : {1, 2, 4})
    expect("dequantize valid", [&] { return bivlm::launch_dequantize(weight(bits), deq.data(), nullptr); },
           cudaSuccess, true);
  expect("dequantize n = 0 (nothing to do)", [&] { auto w = weight(1); w.n = 0; return deq_w(w); }, cudaSuccess, false);
  std::vector<Call> dq = {
      {"dequantize bits = 3", [&] { auto w = weight(1); w.bits = 3; return deq_w(w); }},
      {"dequantize group_size = 48", [&] { auto w = weight(1); w.group_size = 48; return deq_w(w); }},
      {"dequantize n < 0", [&] { auto w = weight(1); w.n = -1; return deq_w(w); }},
      {"dequantize k % group_size", [&] { auto w = weight(1); w.k = 40; return deq_w(w); }},
      {"dequantize out null", [&] { return bivlm::launch_dequantize(weight(1), nullptr, nullptr); }},
      {"dequantize out misaligned", [&] { return bivlm::launch_dequantize(weight(1), static_cast<char*>(deq.data()) + 4, nullptr); }},
      {"dequantize affine without zeros", [&] { auto w = weight(4); w.table1 = nullptr; return deq_w(w); }},
      {"dequantize lut with zeros", [&] { auto w = weight(1); w.table1 = t1.data(); return deq_w(w); }},
  };
  for (const Call& c : dq) expect(c.what, c.fn, cudaErrorInvalidValue, false);

  // ---- launch_splitk_reduce ----
  expect("reduce valid", [&] { return reduce(2, n, out.data(), bivlm::DType::kHalf, nullptr); }, cudaSuccess, true);
  expect("reduce mn = 0 (nothing to do)", [&] { return reduce(2, 0, out.data(), bivlm::DType::kHalf, nullptr); }, cudaSuccess, false);
  std::vector<Call> rd = {
      {"reduce splits = 0", [&] { return reduce(0, n, out.data(), bivlm::DType::kHalf, nullptr); }},
      {"reduce mn < 0", [&] { return reduce(2, -1, out.data(), bivlm::DType::kHalf, nullptr); }},
      {"reduce ws null", [&] { return bivlm::launch_splitk_reduce(nullptr, 2, n, out.data(), bivlm::DType::kHalf, nullptr); }},
      {"reduce out null", [&] { return reduce(2, n, nullptr, bivlm::DType::kHalf, nullptr); }},
      {"reduce out_dtype = 7", [&] { return reduce(2, n, out.data(), static_cast<bivlm::DType>(7), nullptr); }},
  };
  for (const Call& c : rd) expect(c.what, c.fn, cudaErrorInvalidValue, false);
  return 0;
}

}  // namespace harness
