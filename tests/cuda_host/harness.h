// harness.h -- shared bits of the host-build test driver (tests/cuda_host/*.cpp, built by the Makefile).
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace harness {

// A buffer of exactly `bytes` bytes (16-byte aligned base), so AddressSanitizer reports the first byte past it.
// `lead` extra bytes before the data let a test misalign the base on purpose (data() = base + lead).
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(size_t bytes, size_t lead = 0) : bytes_(bytes), lead_(lead) {
    if (posix_memalign(&base_, 16, bytes + lead + (bytes + lead == 0 ? 1 : 0)) != 0) std::abort();
    std::memset(base_, 0xFF, bytes + lead);  // NaN / garbage: a value the kernel fails to write shows up
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& o) noexcept { *this = static_cast<Buffer&&>(o); }
  Buffer& operator=(Buffer&& o) noexcept {
    std::free(base_);
    base_ = o.base_, bytes_ = o.bytes_, lead_ = o.lead_;
    o.base_ = nullptr, o.bytes_ = 0, o.lead_ = 0;
    return *this;
  }
  ~Buffer() { std::free(base_); }
  void* data() const { return base_ == nullptr ? nullptr : static_cast<char*>(base_) + lead_; }
  size_t bytes() const { return bytes_; }

 private:
  void* base_ = nullptr;
  size_t bytes_ = 0, lead_ = 0;
};

// Test bookkeeping: CHECK counts and reports, a failed check does not stop the run.
struct Counter {
  long checks = 0, failures = 0;
};
extern Counter g_count;

#define HCHECK(cond, ...)                                                \
  do {                                                                   \
    ++::harness::g_count.checks;                                         \
    if (!(cond)) {                                                       \
      ++::harness::g_count.failures;                                     \
      std::fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                 \
      std::fprintf(stderr, "\n");                                        \
    }                                                                    \
  } while (0)

// Subcommands implemented by the other files.
int run_ptx_tests();      // test_ptx.cpp: each ptx.cuh primitive against a plain definition
int run_runtime_tests();  // test_runtime.cpp: the emulated machine (indices, barriers, smem, launch checks)
int run_fp16_tests();     // test_fp16.cpp: __half / __nv_bfloat16 conversions
int run_refusals();       // refusals.cpp: every argument the C ABI refuses, and that nothing is launched
int run_fault(const char* name);  // faults.cpp: misuse that must abort (run as a child process by pytest)

// Small deterministic PRNG for the C++ tests (the kernel cases come from pytest with torch's generator).
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
  uint32_t next() {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    return static_cast<uint32_t>(s >> 16);
  }
};

}  // namespace harness
