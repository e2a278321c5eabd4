// driver.cpp -- main of the host-build test driver, and the kernel cases that tests/test_cuda_host.py generates.
//
//   bivlm_host_tests cases IN OUT   runs every case of IN through the C ABI (bivlm_kernels.h), writes OUT
//                                   and OUT.kernels (each kernel instantiation launched, with its count)
//   bivlm_host_tests selftest       wrapper primitives, fp16/bf16 conversions, the emulated machine
//   bivlm_host_tests refusals       argument refusals (cudaErrorInvalidValue and no launch)
//   bivlm_host_tests fault NAME     one misuse that must abort with a message (pytest checks it does)
//
// Case file (little-endian): "BVHC", int32 count, then per case int64 h[16] and h[15] blobs (int64 size + bytes).
//   h[0] op: 1 linear (the GEMV path exactly as torch_ops.cpp drives it), 2 dequantize, 3 split-K reduce alone
//   h[1] bits  h[2] group_size  h[3] dtype (bivlm::DType)  h[4] m  h[5] n  h[6] k  h[7] ldx  h[8] has bias
//   h[9] sm_count (drives the split-K policy)  h[10] out dtype  h[11] qweight base offset in words (0/1)
//   h[12] splits (op 3); op 4: the tensor-core GEMV on the tc1 repack (blobs x, qtc, table, bias)
//   op 5: the segmented tensor-core GEMV, h[6] = k2 (2-bit columns), h[12] = k1 (1-bit), h[13] has perm (blobs x,
//   perm, qtc2, table2, qtc1, table1, bias)
//   blobs: linear x, qweight, table0, table1, bias; dequantize qweight, table0, table1; reduce ws.
// Every buffer is allocated at exactly its blob's size: the blob is the contract's size (pytest writes x as the
// (m-1)*ldx + k elements the kernel may touch), so ASan reports any access past it.
// Output per case: int64 err_gemv, err_reduce, splits, vec4, nbytes, then the output bytes.
#include <cstdio>
#include <string>
#include <vector>

#include "bivlm_kernels.h"
#include "harness.h"
#include "host/runtime.h"

namespace harness {
Counter g_count;
}

namespace {

using harness::Buffer;

size_t dsize(int64_t dt) { return dt == static_cast<int64_t>(bivlm::DType::kFloat) ? 4 : 2; }

struct Reader {
  FILE* f;
  void read(void* p, size_t n) {
    if (n > 0 && std::fread(p, 1, n, f) != n) {
      std::fprintf(stderr, "case file truncated\n");
      std::exit(2);
    }
  }
  int64_t i64() {
    int64_t v;
    read(&v, 8);
    return v;
  }
  Buffer blob(size_t lead = 0) {
    const int64_t n = i64();
    Buffer b(static_cast<size_t>(n), lead);
    read(b.data(), static_cast<size_t>(n));
    return b;
  }
};

void write_result(FILE* f, int64_t e0, int64_t e1, int64_t splits, int64_t vec4, const Buffer& out) {
  const int64_t h[5] = {e0, e1, splits, vec4, static_cast<int64_t>(out.bytes())};
  std::fwrite(h, 8, 5, f);
  if (out.bytes() > 0) std::fwrite(out.data(), 1, out.bytes(), f);
}

int run_cases(const char* in_path, const char* out_path) {
  FILE* in = std::fopen(in_path, "rb");
  FILE* out = std::fopen(out_path, "wb");
  if (in == nullptr || out == nullptr) {
    std::fprintf(stderr, "cannot open %s or %s\n", in_path, out_path);
    return 2;
  }
  Reader r{in};
  char magic[4];
  r.read(magic, 4);
  int32_t count;
  r.read(&count, 4);
  if (std::memcmp(magic, "BVHC", 4) != 0 || count < 0) {
    std::fprintf(stderr, "%s is not a case file\n", in_path);
    return 2;
  }
  long launches = 0;
  for (int c = 0; c < count; ++c) {
    int64_t h[16];
    r.read(h, sizeof(h));
    const int64_t op = h[0], m = h[4], n = h[5], k = h[6];
    const auto dtype = static_cast<bivlm::DType>(h[3]);
    const auto od = static_cast<bivlm::DType>(h[10]);
    const long before = bivlm::host::launch_count();
    if (op == 3) {  // split-K reduce alone: ws [splits, mn] -> out_dtype
      Buffer ws = r.blob();
      const int splits = static_cast<int>(h[12]);
      const int64_t mn = static_cast<int64_t>(ws.bytes() / 4) / (splits > 0 ? splits : 1);
      Buffer o(static_cast<size_t>(mn) * dsize(h[10]));
      const cudaError_t e = bivlm::launch_splitk_reduce(static_cast<const float*>(ws.data()), splits, mn, o.data(),
                                                        od, nullptr);
      write_result(out, e, 0, splits, 0, o);
    } else if (op == 4) {  // tensor-core GEMV on the tc1 repack: x, qtc, table, bias
      Buffer x = r.blob();
      Buffer q = r.blob();
      Buffer tb = r.blob();
      Buffer bias = r.blob();
      bivlm::TcWeight w;
      w.qtc = q.data();
      w.table = tb.data();
      w.n = n;
      w.k = k;
      w.bits = static_cast<int>(h[1]);
      w.group_size = static_cast<int>(h[2]);
      w.dtype = dtype;
      const int splits = bivlm::gemv_tc_num_splits(m, w, static_cast<int>(h[9]));
      const void* b = h[8] ? bias.data() : nullptr;
      Buffer o(static_cast<size_t>(m * n) * dsize(h[10]));
      cudaError_t e0 = cudaSuccess, e1 = cudaSuccess;
      if (splits == 1 && od == dtype) {
        e0 = bivlm::launch_gemv_tc(x.data(), m, h[7], w, b, 1, o.data(), nullptr, nullptr);
      } else {
        Buffer ws(static_cast<size_t>(splits * m * n) * 4);
        e0 = bivlm::launch_gemv_tc(x.data(), m, h[7], w, b, splits, nullptr, static_cast<float*>(ws.data()),
                                   nullptr);
        if (e0 == cudaSuccess)
          e1 = bivlm::launch_splitk_reduce(static_cast<const float*>(ws.data()), splits, m * n, o.data(), od,
                                           nullptr);
      }
      write_result(out, e0, e1, splits, 1, o);
    } else if (op == 5) {  // segmented tensor-core GEMV: x, perm, qtc2, table2, qtc1, table1, bias
      Buffer x = r.blob();
      Buffer perm = r.blob();
      Buffer q2 = r.blob();
      Buffer t2 = r.blob();
      Buffer q1 = r.blob();
      Buffer t1 = r.blob();
      Buffer bias = r.blob();
      bivlm::TcSegWeight w;
      w.seg2.qtc = q2.data(), w.seg2.table = t2.data(), w.seg2.n = n, w.seg2.k = k, w.seg2.bits = 2;
      w.seg1.qtc = q1.data(), w.seg1.table = t1.data(), w.seg1.n = n, w.seg1.k = h[12], w.seg1.bits = 1;
      w.seg2.group_size = w.seg1.group_size = static_cast<int>(h[2]);
      w.seg2.dtype = w.seg1.dtype = dtype;
      w.perm = h[13] ? static_cast<const int32_t*>(perm.data()) : nullptr;
      const int splits = bivlm::gemv_tc_seg_num_splits(m, w, static_cast<int>(h[9]));
      Buffer o(static_cast<size_t>(m * n) * dsize(h[10]));
      cudaError_t e0 = cudaErrorInvalidValue, e1 = cudaSuccess;
      if (splits > 0) {
        Buffer ws(static_cast<size_t>(splits * m * n) * 4);
        e0 = bivlm::launch_gemv_tc_seg(x.data(), m, h[7], w, h[8] ? bias.data() : nullptr, splits,
                                       static_cast<float*>(ws.data()), nullptr);
        if (e0 == cudaSuccess)
          e1 = bivlm::launch_splitk_reduce(static_cast<const float*>(ws.data()), splits, m * n, o.data(), od,
                                           nullptr);
      }
      write_result(out, e0, e1, splits, 1, o);
    } else {
      Buffer x = op == 1 ? r.blob() : Buffer();
      Buffer q = r.blob(static_cast<size_t>(4 * h[11]));
      Buffer t0 = r.blob();
      Buffer t1 = r.blob();
      Buffer bias = op == 1 ? r.blob() : Buffer();
      bivlm::PackedWeight w;
      w.qweight = static_cast<const int32_t*>(q.data());
      w.table0 = t0.data();
      w.table1 = t1.bytes() > 0 ? t1.data() : nullptr;
      w.n = n;
      w.k = k;
      w.bits = static_cast<int>(h[1]);
      w.group_size = static_cast<int>(h[2]);
      w.dtype = dtype;
      if (op == 2) {
        Buffer o(static_cast<size_t>(n * k) * dsize(h[3]));
        const cudaError_t e = bivlm::launch_dequantize(w, o.data(), nullptr);
        write_result(out, e, 0, 1, 0, o);
      } else {
        // The dispatch of torch_ops.cpp's linear_impl (M <= kGemvMaxM): direct output, direct fp32, or split-K.
        const int splits = bivlm::gemv_num_splits(m, w, static_cast<int>(h[9]));
        const bool vec4 = bivlm::gemv_uses_vec4(w);
        const void* b = h[8] ? bias.data() : nullptr;
        Buffer o(static_cast<size_t>(m * n) * dsize(h[10]));
        cudaError_t e0 = cudaSuccess, e1 = cudaSuccess;
        if (splits == 1 && od == dtype) {
          e0 = bivlm::launch_gemv(x.data(), m, h[7], w, b, 1, o.data(), nullptr, nullptr);
        } else if (splits == 1 && od == bivlm::DType::kFloat) {
          e0 = bivlm::launch_gemv(x.data(), m, h[7], w, b, 1, nullptr, static_cast<float*>(o.data()), nullptr);
        } else {
          Buffer ws(static_cast<size_t>(splits * m * n) * 4);
          e0 = bivlm::launch_gemv(x.data(), m, h[7], w, b, splits, nullptr, static_cast<float*>(ws.data()), nullptr);
          if (e0 == cudaSuccess)
            e1 = bivlm::launch_splitk_reduce(static_cast<const float*>(ws.data()), splits, m * n, o.data(), od,
                                             nullptr);
        }
        write_result(out, e0, e1, splits, vec4, o);
      }
    }
    launches += bivlm::host::launch_count() - before;
  }
  std::fclose(in);
  std::fclose(out);
  const std::string kernels = bivlm::host::launched_kernels();
  FILE* kf = std::fopen((std::string(out_path) + ".kernels").c_str(), "w");
  if (kf != nullptr) std::fputs(kernels.c_str(), kf), std::fclose(kf);
  std::printf("cases: %d run, %ld kernel launches\n", count, launches);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string cmd = argc > 1 ? argv[1] : "";
  if (cmd == "cases" && argc == 4) return run_cases(argv[2], argv[3]);
  if (cmd == "selftest") {
    const int bad = harness::run_fp16_tests() + harness::run_ptx_tests() + harness::run_runtime_tests();
    std::printf("selftest: %ld checks, %ld failures\n", harness::g_count.checks, harness::g_count.failures);
    return bad != 0 || harness::g_count.failures != 0;
  }
  if (cmd == "refusals") {
    harness::run_refusals();
    std::printf("refusals: %ld checks, %ld failures\n", harness::g_count.checks, harness::g_count.failures);
    return harness::g_count.failures != 0;
  }
  if (cmd == "fault" && argc == 3) return harness::run_fault(argv[2]);
  std::fprintf(stderr, "usage: %s cases IN OUT | selftest | refusals | fault NAME\n", argv[0]);
  return 2;
}
