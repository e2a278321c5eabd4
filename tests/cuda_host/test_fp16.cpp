// test_fp16.cpp -- the host __half / __nv_bfloat16 conversions (csrc/cuda/host/fp16.h) against plain definitions:
// binary16 against the compiler's _Float16 (GCC >= 12 / clang, an independent round-to-nearest-even
// implementation), both formats against "the nearest representable value, ties to the even mantissa" computed
// in double from the format's definition.
#include <cmath>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "harness.h"

namespace harness {

namespace {

// Nearest value with `mant` fraction bits and minimum normal exponent `emin`, ties to even; inf above `max_finite`
// rounding (exactly what IEEE round-to-nearest-even means for the format).
double round_to_format(double v, int mant, int emin, double max_finite) {
  if (v == 0 || std::isnan(v) || std::isinf(v)) return v;
  int e = std::ilogb(v);
  if (e < emin) e = emin;  // subnormals share the spacing of the smallest normal binade
  const double unit = std::ldexp(1.0, e - mant);
  const double r = std::nearbyint(v / unit) * unit;  // default rounding mode: to nearest, ties to even
  const double overflow = max_finite + std::ldexp(1.0, std::ilogb(max_finite) - mant - 1);  // halfway to the next
  if (std::fabs(v) >= overflow) return std::copysign(INFINITY, v);
  return r;
}

float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

void check_f32(float f) {
  const __half h = __float2half_rn(f);
  const __nv_bfloat16 b = __float2bfloat16_rn(f);
  const float hv = __half2float(h), bv = __bfloat162float(b);
  if (std::isnan(f)) {
    HCHECK(std::isnan(hv) && std::isnan(bv), "NaN 0x%08x did not stay NaN", __float_as_uint(f));
    return;
  }
  const _Float16 ref = static_cast<_Float16>(f);
  uint16_t ref_bits;
  std::memcpy(&ref_bits, &ref, 2);
  HCHECK(h.x == ref_bits, "half(%a) = 0x%04x, _Float16 gives 0x%04x", static_cast<double>(f), h.x, ref_bits);
  const double hd = round_to_format(f, 10, -14, 65504.0);
  HCHECK(static_cast<double>(hv) == hd, "half(%a) = %a, definition gives %a", static_cast<double>(f),
         static_cast<double>(hv), hd);
  const double bd = round_to_format(f, 7, -126, 3.3895313892515355e38);
  HCHECK(static_cast<double>(bv) == bd, "bf16(%a) = %a, definition gives %a", static_cast<double>(f),
         static_cast<double>(bv), bd);
}

}  // namespace

int run_fp16_tests() {
  const long failures0 = g_count.failures;
  // Widening: every binary16 / bfloat16 bit pattern.
  for (uint32_t u = 0; u < 65536; ++u) {
    const uint16_t bits = static_cast<uint16_t>(u);
    _Float16 ref;
    std::memcpy(&ref, &bits, 2);
    const float hv = __half2float(__half{bits});
    const float rv = static_cast<float>(ref);
    HCHECK((std::isnan(hv) && std::isnan(rv)) || __float_as_uint(hv) == __float_as_uint(rv),
           "half 0x%04x -> %a, _Float16 gives %a", u, static_cast<double>(hv), static_cast<double>(rv));
    HCHECK(__float_as_uint(__bfloat162float(__nv_bfloat16{bits})) == u << 16, "bf16 0x%04x widened wrongly", u);
  }
  // Narrowing: every half/bf16 value, the midpoints between neighbours and one float ulp either side of them
  // (where ties-to-even and carries are decided), then random floats of every exponent.
  for (uint32_t u = 0; u < 65536; ++u) {
    for (int fmt = 0; fmt < 2; ++fmt) {
      const float lo = fmt ? __bfloat162float(__nv_bfloat16{static_cast<uint16_t>(u)})
                           : __half2float(__half{static_cast<uint16_t>(u)});
      const float hi = fmt ? __bfloat162float(__nv_bfloat16{static_cast<uint16_t>(u + 1)})
                           : __half2float(__half{static_cast<uint16_t>(u + 1)});
      check_f32(lo);
      if (std::isfinite(lo) && std::isfinite(hi) && (u & 0x7fffu) != 0x7fffu) {
        const float mid = static_cast<float>((static_cast<double>(lo) + hi) / 2);
        check_f32(mid);
        check_f32(std::nextafter(mid, INFINITY));
        check_f32(std::nextafter(mid, -INFINITY));
      }
    }
  }
  Rng rng(7);
  for (int i = 0; i < 1000000; ++i) check_f32(from_bits(rng.next() << 16 ^ rng.next()));
  check_f32(65519.99f), check_f32(65520.0f), check_f32(1e-8f), check_f32(2.9802322e-8f), check_f32(3.4e38f);
  check_f32(INFINITY), check_f32(-INFINITY), check_f32(NAN), check_f32(-0.0f);
  std::printf("fp16/bf16 conversions: %ld checks\n", g_count.checks);
  return g_count.failures != failures0;
}

}  // namespace harness
