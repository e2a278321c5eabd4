// torch_ops.cpp -- the torch-facing side of the CUDA extension bivlm_kernels._C (the only translation unit that
// includes torch headers; the kernels live in *.cu files behind bivlm_kernels.h).
//
// Defines torch.ops.bivlm_cuda.{lut_linear, affine_linear, dequantize_lut, dequantize_affine} with schemas
// identical to the Python ops torch.ops.bivlm.* (bivlm_kernels/ops/), implements them for the CUDA dispatch key,
// and defines a method-less Python module `_C` so that `from bivlm_kernels import _C` loads the library (its static
// initializers run the TORCH_LIBRARY registrations; bivlm_kernels/backends/cuda/register.py then plugs the ops in as the
// "cuda" backend of torch.ops.bivlm.*).
//
// Every implementation: checks dtype / device / contiguity / shapes (messages carry m, n, k), guards the device,
// launches on the current CUDA stream, allocates only its outputs and temporaries through the caching allocator
// and never synchronizes -- so it can be captured in a CUDA graph.
//
// Only c10/cuda headers are used (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE/cuSOLVER headers
// that a minimal CUDA toolkit lacks); cuBLAS is reached through at::mm.
//
// Linear ops dispatch by M = x.numel() / K:
//   M <= kGemvMaxM : decode GEMV kernel (split-K with an fp32 workspace when N is small), fp32 accumulation;
//                    tc_linear: the tensor-core 1/2/4-bit GEMVs on the repacked layouts (same split-K scheme);
//   M >  kGemvMaxM : dequantize into a temporary [N, K] in x's dtype, then cuBLAS (at::mm / at::addmm).
#include <Python.h>

#include <atomic>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "bivlm_kernels.h"

namespace bivlm {
namespace {

bool is_float_type(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat;
}

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return DType::kHalf;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      return DType::kFloat;
  }
}

// Checks the packed buffers of one segment and returns them as a PackedWeight (n, k filled in).
// tables = {codebook} for lut, {scales, zeros} for affine.
PackedWeight check_weight(const char* op, bool affine, const at::Tensor& qweight, const at::Tensor& t0,
                          const at::Tensor* t1, int64_t bits, int64_t group_size) {
  if (affine) {
    TORCH_CHECK(bits == 4, "bivlm_cuda.", op, ": bits must be 4 for affine weights, got ", bits);
  } else {
    TORCH_CHECK(bits == 1 || bits == 2, "bivlm_cuda.", op, ": bits must be 1 or 2 for lut weights, got ", bits);
  }
  TORCH_CHECK(group_size == 32 || group_size == 64 || group_size == 128 || group_size == 256, "bivlm_cuda.", op,
              ": group_size must be one of 32, 64, 128, 256, got ", group_size);
  TORCH_CHECK(qweight.is_cuda(), "bivlm_cuda.", op, ": qweight must be a CUDA tensor, got device ",
              qweight.device());
  TORCH_CHECK(qweight.scalar_type() == at::kInt, "bivlm_cuda.", op, ": qweight must be int32, got ",
              qweight.scalar_type());
  const char* names[2] = {affine ? "scales" : "codebook", "zeros"};
  const at::Tensor* tables[2] = {&t0, t1};
  for (int i = 0; i < (affine ? 2 : 1); ++i) {
    const at::Tensor& t = *tables[i];
    TORCH_CHECK(t.device() == qweight.device(), "bivlm_cuda.", op, ": ", names[i], " is on ", t.device(),
                " but qweight is on ", qweight.device());
    TORCH_CHECK(is_float_type(t.scalar_type()), "bivlm_cuda.", op, ": ", names[i],
                " must be float16, bfloat16 or float32, got ", t.scalar_type());
    TORCH_CHECK(t.scalar_type() == t0.scalar_type(), "bivlm_cuda.", op, ": ", names[i], " dtype ",
                t.scalar_type(), " differs from ", names[0], " dtype ", t0.scalar_type());
    TORCH_CHECK(t.is_contiguous(), "bivlm_cuda.", op, ": ", names[i], " must be contiguous");
  }
  if (affine) {
    TORCH_CHECK(t0.dim() == 2 && t1->sizes() == t0.sizes(), "bivlm_cuda.", op,
                ": scales and zeros must both have shape [N, K/group_size], got ", t0.sizes(), " and ",
                t1->sizes());
  } else {
    TORCH_CHECK(t0.dim() == 3 && t0.size(2) == (int64_t{1} << bits), "bivlm_cuda.", op,
                ": codebook must have shape [N, K/group_size, ", (1 << bits), "] for bits=", bits, ", got ",
                t0.sizes());
  }
  const int64_t n = t0.size(0);
  const int64_t k = t0.size(1) * group_size;
  TORCH_CHECK(n >= 1 && k >= 1, "bivlm_cuda.", op, ": empty weight (n=", n, ", k=", k, ")");
  TORCH_CHECK(n <= INT32_MAX && k <= INT32_MAX, "bivlm_cuda.", op, ": n=", n, ", k=", k,
              " exceed the kernels' 32-bit row/column indexing");
  const int64_t kw = k * bits / 32;
  TORCH_CHECK(qweight.dim() == 2 && qweight.size(0) == n && qweight.size(1) == kw, "bivlm_cuda.", op,
              ": qweight must have shape [N, K*bits/32] = [", n, ", ", kw, "] for n=", n, ", k=", k, ", bits=", bits,
              "; got ", qweight.sizes());
  TORCH_CHECK(qweight.is_contiguous(), "bivlm_cuda.", op, ": qweight must be contiguous (n=", n, ", k=", k, ")");

  PackedWeight w;
  w.qweight = qweight.data_ptr<int32_t>();
  w.table0 = t0.data_ptr();
  w.table1 = affine ? t1->data_ptr() : nullptr;
  w.n = n;
  w.k = k;
  w.bits = static_cast<int>(bits);
  w.group_size = static_cast<int>(group_size);
  w.dtype = to_dtype(t0.scalar_type());
  return w;
}

// Multiprocessor count of a device, queried once per device (cudaDeviceGetAttribute: no sync, capture-safe).
int sm_count(c10::DeviceIndex device) {
  static std::atomic<int> cache[64];
  if (device < 0 || device >= 64) device = 0;
  int v = cache[device].load(std::memory_order_relaxed);
  if (v == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(v, std::memory_order_relaxed);
  }
  return v;
}

void check_launch(cudaError_t err, const char* op, const char* what, int64_t m, int64_t n, int64_t k) {
  TORCH_CHECK(err == cudaSuccess, "bivlm_cuda.", op, ": ", what, " failed (m=", m, ", n=", n, ", k=", k,
              "): ", cudaGetErrorString(err));
}

// x as the decode kernels read it: [m, k] with unit column stride, a 16-byte aligned base and a row stride that keeps
// rows 16-byte aligned (8 activations per 16-byte load), plus the checked bias and the output shape and dtype.
struct XView {
  at::Tensor x2;
  int64_t m = 0, ldx = 0;
  std::vector<int64_t> out_shape;
  at::ScalarType od;
  const void* bias_ptr = nullptr;
};

XView prepare_x(const char* op, const at::Tensor& x, const at::Tensor& table, int64_t n, int64_t k,
                const std::optional<at::Tensor>& bias, std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK(x.is_cuda() && x.device() == table.device(), "bivlm_cuda.", op, ": x is on ", x.device(),
              " but the weight is on ", table.device(), " (n=", n, ", k=", k, ")");
  TORCH_CHECK(x.scalar_type() == table.scalar_type(), "bivlm_cuda.", op, ": x has dtype ", x.scalar_type(),
              " but the weight tables have ", table.scalar_type(), " (n=", n, ", k=", k, ")");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == k, "bivlm_cuda.", op, ": x's last dimension must be in_features k=", k,
              ", got shape ", x.sizes(), " (n=", n, ")");
  XView v;
  v.m = x.numel() / k;
  const int64_t m = v.m;
  v.od = out_dtype.value_or(x.scalar_type());
  TORCH_CHECK(is_float_type(v.od), "bivlm_cuda.", op, ": out_dtype must be float16, bfloat16 or float32, got ", v.od,
              " (m=", m, ", n=", n, ", k=", k, ")");
  if (bias.has_value() && bias->defined()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.device() == x.device() && b.scalar_type() == x.scalar_type() && b.dim() == 1 && b.size(0) == n,
                "bivlm_cuda.", op, ": bias must be [", n, "] with x's dtype ", x.scalar_type(), " and device ",
                x.device(), ", got ", b.sizes(), " ", b.scalar_type(), " ", b.device(), " (m=", m, ", n=", n,
                ", k=", k, ")");
    TORCH_CHECK(b.is_contiguous(), "bivlm_cuda.", op, ": bias must be contiguous (m=", m, ", n=", n, ", k=", k, ")");
    v.bias_ptr = b.data_ptr();
  }
  v.out_shape.assign(x.sizes().begin(), x.sizes().end() - 1);
  v.out_shape.push_back(n);
  if (m == 0) return v;
  // Views such as x[..., k0:k1] of a mixed-segment layer pass without a copy; anything else is copied once.
  v.x2 = x.reshape({m, k});
  const int64_t es = static_cast<int64_t>(v.x2.element_size());
  v.ldx = m == 1 ? k : v.x2.stride(0);
  const bool x_ok = v.x2.stride(1) == 1 && v.ldx >= k && (v.ldx * es) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(v.x2.data_ptr()) % 16 == 0;
  if (!x_ok) {
    v.x2 = at::empty({m, k}, x.options()).copy_(v.x2);  // fresh allocation: contiguous and aligned
    v.ldx = k;
  }
  return v;
}

// Runs a decode kernel launch(splits, out, out_f32) for M <= kGemvMaxM: one pass writing x's dtype or fp32, or
// fp32 partials (split-K, another out dtype, or a kernel that only writes partials: direct = false) and the
// deterministic reduction.
template <class Launch>
at::Tensor run_decode(const char* op, const at::Tensor& x, const XView& v, int64_t n, int64_t k, int splits,
                      Launch launch, bool direct = true) {
  const int64_t m = v.m;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor out = at::empty({m, n}, x.options().dtype(v.od));
  if (direct && splits == 1 && v.od == x.scalar_type()) {
    check_launch(launch(1, out.data_ptr(), nullptr, stream), op, "gemv kernel", m, n, k);
  } else if (direct && splits == 1 && v.od == at::kFloat) {
    check_launch(launch(1, nullptr, out.data_ptr<float>(), stream), op, "gemv kernel", m, n, k);
  } else {
    at::Tensor ws = at::empty({splits, m, n}, x.options().dtype(at::kFloat));
    check_launch(launch(splits, nullptr, ws.data_ptr<float>(), stream), op, "gemv kernel", m, n, k);
    check_launch(launch_splitk_reduce(ws.data_ptr<float>(), splits, m * n, out.data_ptr(), to_dtype(v.od), stream),
                 op, "split-K reduce kernel", m, n, k);
  }
  return out.view(v.out_shape);
}

// y = x @ W^T (+ bias) for one packed weight; shared by lut_linear and affine_linear.
at::Tensor linear_impl(const char* op, const at::Tensor& x, const at::Tensor& table, const PackedWeight& w,
                       const std::optional<at::Tensor>& bias, std::optional<at::ScalarType> out_dtype) {
  const int64_t n = w.n, k = w.k;
  const XView v = prepare_x(op, x, table, n, k, bias, out_dtype);
  const c10::cuda::CUDAGuard guard(x.device());
  if (v.m == 0) return at::empty(v.out_shape, x.options().dtype(v.od));
  if (v.m > kGemvMaxM) {
    // Large-M path (first step): dequantize into a temporary, then cuBLAS in x's dtype.
    at::Tensor wd = at::empty({n, k}, x.options());
    check_launch(launch_dequantize(w, wd.data_ptr(), c10::cuda::getCurrentCUDAStream()), op, "dequantize kernel",
                 v.m, n, k);
    at::Tensor y = v.bias_ptr != nullptr ? at::addmm(*bias, v.x2, wd.t()) : at::mm(v.x2, wd.t());
    if (v.od != x.scalar_type()) y = y.to(v.od);
    return y.view(v.out_shape);
  }
  const int splits = gemv_num_splits(v.m, w, sm_count(x.get_device()));
  return run_decode(op, x, v, n, k, splits, [&](int s, void* out, float* out_f32, cudaStream_t stream) {
    return launch_gemv(v.x2.data_ptr(), v.m, v.ldx, w, v.bias_ptr, s, out, out_f32, stream);
  });
}

// The repacked operands of one tensor-core weight: a format the kernels cover, qtc int32 [tiles, chunks, 32, 4],
// table [tiles + 1, tg, 8, 2, entries], contiguous, on one CUDA device.
void check_tc_operands(const char* op, const at::Tensor& qtc, const at::Tensor& table, int64_t n, int64_t k,
                       int64_t bits, int64_t group_size) {
  TORCH_CHECK(gemv_tc_supported(static_cast<int>(bits), static_cast<int>(group_size), to_dtype(table.scalar_type())) &&
                  table.scalar_type() != at::kFloat && k % group_size == 0,
              "bivlm_cuda.", op, ": covers bits 1, 2 (lut) or 4 (affine), group_size 64 or 128 (dividing k), float16 or "
              "bfloat16 tables; got "
              "bits=", bits, ", group_size=", group_size, ", k=", k, ", ", table.scalar_type());
  const int g = static_cast<int>(group_size);
  const int64_t tiles = tc_tiles(n);
  const int64_t chunks = bits == 2 ? tc2_chunks(k) : bits == 4 ? tc4_chunks(k) : tc_chunks(k);
  const int64_t tg = bits == 2 ? tc2_table_groups(k, g) : bits == 4 ? tc4_table_groups(k, g) : tc_table_groups(k, g);
  // 1 bit: D fp32 + (c0, c1) in fragment order (tc1_table_entries); 2 bits: 4 entries; 4 bits: (scale, zero)
  const int64_t entries = bits == 1 ? tc1_table_entries(to_dtype(table.scalar_type())) : bits == 2 ? 4 : 2;
  TORCH_CHECK(qtc.is_cuda() && qtc.scalar_type() == at::kInt && qtc.is_contiguous() &&
                  qtc.sizes() == at::IntArrayRef({tiles, chunks, 32, 4}),
              "bivlm_cuda.", op, ": qtc must be a contiguous CUDA int32 [", tiles, ", ", chunks, ", 32, 4] for n=", n,
              ", k=", k, ", bits=", bits, "; got ", qtc.sizes(), " ", qtc.scalar_type(), " ", qtc.device());
  TORCH_CHECK(table.device() == qtc.device() && table.is_contiguous() &&
                  table.sizes() == at::IntArrayRef({tiles + 1, tg, 8, 2, entries}),
              "bivlm_cuda.", op, ": table must be contiguous [", tiles + 1, ", ", tg, ", 8, 2, ", entries,
              "] on qtc's device for n=", n, ", k=", k, ", bits=", bits, ", group_size=", group_size, "; got ",
              table.sizes(), " on ", table.device());
}

// The tensor-core GEMVs on the tc1 / tc2 / tc4 repacks (bivlm_kernels/backends/cuda/tc_repack.py): lut 1 or 2 bits (table: the
// codebook entries), affine 4 bits (table: scale, zero), M <= kGemvMaxM.
at::Tensor tc_linear(const at::Tensor& x, const at::Tensor& qtc, const at::Tensor& table, int64_t n, int64_t k,
                         int64_t bits, int64_t group_size, const std::optional<at::Tensor>& bias,
                         std::optional<at::ScalarType> out_dtype) {
  const char* op = "tc_linear";
  TORCH_CHECK(n >= 1 && k >= 1 && n <= INT32_MAX / 2 && k <= INT32_MAX / 2, "bivlm_cuda.", op,
              ": n and k must be in [1, 2^30), got n=", n, ", k=", k);
  check_tc_operands(op, qtc, table, n, k, bits, group_size);
  const XView v = prepare_x(op, x, table, n, k, bias, out_dtype);
  TORCH_CHECK(v.m <= kGemvMaxM, "bivlm_cuda.", op, ": covers m <= ", kGemvMaxM, " rows of x, got m=", v.m,
              " (lut_linear handles larger m)");
  const c10::cuda::CUDAGuard guard(x.device());
  if (v.m == 0) return at::empty(v.out_shape, x.options().dtype(v.od));
  TcWeight w;
  w.qtc = qtc.data_ptr();
  w.table = table.data_ptr();
  w.n = n;
  w.k = k;
  w.bits = static_cast<int>(bits);
  w.group_size = static_cast<int>(group_size);
  w.dtype = to_dtype(table.scalar_type());
  const int splits = gemv_tc_num_splits(v.m, w, sm_count(x.get_device()));
  return run_decode(op, x, v, n, k, splits, [&](int s, void* out, float* out_f32, cudaStream_t stream) {
    return launch_gemv_tc(v.x2.data_ptr(), v.m, v.ldx, w, v.bias_ptr, s, out, out_f32, stream);
  });
}

// The sub-2-bit layout in one decode launch (gemv_tc_seg.cu): x[..., perm] . [W2 | W1]^T (+ bias) on the tc2 / tc1
// repacks of a 2-bit lut segment of k2 columns and a 1-bit one of k1 (k = 0: absent, its tensors None), perm int32
// [k2 + k1] or None, M <= kGemvMaxM; fp32 partials per split, then the reduce.
at::Tensor seg_tc_linear(const at::Tensor& x, const std::optional<at::Tensor>& perm,
                         const std::optional<at::Tensor>& qtc2, const std::optional<at::Tensor>& table2,
                         const std::optional<at::Tensor>& qtc1, const std::optional<at::Tensor>& table1, int64_t n,
                         int64_t k2, int64_t k1, int64_t group_size, const std::optional<at::Tensor>& bias,
                         std::optional<at::ScalarType> out_dtype) {
  const char* op = "seg_tc_linear";
  const int64_t k = k2 + k1;
  TORCH_CHECK(n >= 1 && k2 >= 0 && k1 >= 0 && k >= 1 && n <= INT32_MAX / 2 && k <= INT32_MAX / 4, "bivlm_cuda.", op,
              ": need n in [1, 2^30), k2, k1 >= 0 with k2 + k1 in [1, 2^29); got n=", n, ", k2=", k2, ", k1=", k1);
  TcSegWeight w;
  const at::Tensor* tab = nullptr;   // a present segment's table
  for (auto [s, kk, q, t, bits] : {std::tuple{&w.seg2, k2, &qtc2, &table2, 2}, std::tuple{&w.seg1, k1, &qtc1, &table1, 1}}) {
    TORCH_CHECK(kk == 0 || (q->has_value() && t->has_value()), "bivlm_cuda.", op, ": the ", bits,
                "-bit segment has k=", kk, " columns but no qtc / table");
    if (kk == 0) continue;
    check_tc_operands(op, **q, **t, n, kk, bits, group_size);
    TORCH_CHECK(tab == nullptr || (tab->scalar_type() == (*t)->scalar_type() && tab->device() == (*t)->device()),
                "bivlm_cuda.", op, ": both segments' tables must share a dtype and device, got ", tab->scalar_type(),
                " and ", (*t)->scalar_type());
    tab = &**t;
    s->qtc = (*q)->data_ptr(), s->table = (*t)->data_ptr();
    s->n = n, s->k = kk, s->bits = bits, s->group_size = static_cast<int>(group_size);
    s->dtype = to_dtype(tab->scalar_type());
  }
  if (perm.has_value()) {
    const at::Tensor& p = *perm;
    TORCH_CHECK(p.device() == tab->device() && p.scalar_type() == at::kInt && p.dim() == 1 && p.size(0) == k &&
                    p.is_contiguous() && reinterpret_cast<uintptr_t>(p.data_ptr()) % 16 == 0,
                "bivlm_cuda.", op, ": perm must be a contiguous, 16-byte aligned int32 [", k, "] on the tables' device, "
                "got ", p.sizes(), " ", p.scalar_type(), " ", p.device());
  }
  const XView v = prepare_x(op, x, *tab, n, k, bias, out_dtype);
  TORCH_CHECK(v.m <= kGemvMaxM, "bivlm_cuda.", op, ": covers m <= ", kGemvMaxM, " rows of x, got m=", v.m);
  const c10::cuda::CUDAGuard guard(x.device());
  if (v.m == 0) return at::empty(v.out_shape, x.options().dtype(v.od));
  TORCH_CHECK(v.m * v.ldx < INT32_MAX, "bivlm_cuda.", op, ": x must have < 2^31 elements (m=", v.m, ", ldx=", v.ldx,
              ")");
  w.perm = perm.has_value() ? perm->data_ptr<int32_t>() : nullptr;
  const int splits = gemv_tc_seg_num_splits(v.m, w, sm_count(x.get_device()));
  TORCH_CHECK(splits > 0, "bivlm_cuda.", op, ": no split plan for n=", n, ", k2=", k2, ", k1=", k1, ", m=", v.m);
  return run_decode(op, x, v, n, k, splits, [&](int sp, void*, float* out_f32, cudaStream_t stream) {
    return launch_gemv_tc_seg(v.x2.data_ptr(), v.m, v.ldx, w, v.bias_ptr, sp, out_f32, stream);
  }, /*direct=*/false);
}

at::Tensor lut_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& codebook, int64_t bits,
                      int64_t group_size, const std::optional<at::Tensor>& bias,
                      std::optional<at::ScalarType> out_dtype) {
  const PackedWeight w = check_weight("lut_linear", false, qweight, codebook, nullptr, bits, group_size);
  return linear_impl("lut_linear", x, codebook, w, bias, out_dtype);
}

at::Tensor affine_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                         const at::Tensor& zeros, int64_t bits, int64_t group_size,
                         const std::optional<at::Tensor>& bias, std::optional<at::ScalarType> out_dtype) {
  const PackedWeight w = check_weight("affine_linear", true, qweight, scales, &zeros, bits, group_size);
  return linear_impl("affine_linear", x, scales, w, bias, out_dtype);
}

at::Tensor dequantize_impl(const char* op, const at::Tensor& table, const PackedWeight& w) {
  const c10::cuda::CUDAGuard guard(table.device());
  at::Tensor out = at::empty({w.n, w.k}, table.options());
  check_launch(launch_dequantize(w, out.data_ptr(), c10::cuda::getCurrentCUDAStream()), op, "dequantize kernel", 0,
               w.n, w.k);
  return out;
}

at::Tensor dequantize_lut(const at::Tensor& qweight, const at::Tensor& codebook, int64_t bits, int64_t group_size) {
  const PackedWeight w = check_weight("dequantize_lut", false, qweight, codebook, nullptr, bits, group_size);
  return dequantize_impl("dequantize_lut", codebook, w);
}

at::Tensor dequantize_affine(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                             int64_t bits, int64_t group_size) {
  const PackedWeight w = check_weight("dequantize_affine", true, qweight, scales, &zeros, bits, group_size);
  return dequantize_impl("dequantize_affine", scales, w);
}

}  // namespace
}  // namespace bivlm

// Schemas: identical to bivlm_kernels/ops/ (torch.ops.bivlm.*), so the Python op can forward its arguments as is.
TORCH_LIBRARY(bivlm_cuda, m) {
  m.def("lut_linear(Tensor x, Tensor qweight, Tensor codebook, int bits, int group_size, "
        "Tensor? bias=None, ScalarType? out_dtype=None) -> Tensor");
  m.def("affine_linear(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int bits, int group_size, "
        "Tensor? bias=None, ScalarType? out_dtype=None) -> Tensor");
  m.def("dequantize_lut(Tensor qweight, Tensor codebook, int bits, int group_size) -> Tensor");
  m.def("dequantize_affine(Tensor qweight, Tensor scales, Tensor zeros, int bits, int group_size) -> Tensor");
  // The tensor-core 1/2/4-bit paths on a load-time repack (bivlm_kernels/backends/cuda/tc_repack.py); the cuda backend's
  // lut_linear and affine_linear route eligible calls here (bivlm_kernels/backends/cuda/routing.py).
  m.def("tc_linear(Tensor x, Tensor qtc, Tensor table, int n, int k, int bits, int group_size, "
        "Tensor? bias=None, ScalarType? out_dtype=None) -> Tensor");
  // The sub-2-bit layout in one launch; the cuda backend's segmented_lut_linear routes eligible calls here.
  m.def("seg_tc_linear(Tensor x, Tensor? perm, Tensor? qtc2, Tensor? table2, Tensor? qtc1, Tensor? table1, int n, "
        "int k2, int k1, int group_size, Tensor? bias=None, ScalarType? out_dtype=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(bivlm_cuda, CUDA, m) {
  m.impl("lut_linear", &bivlm::lut_linear);
  m.impl("affine_linear", &bivlm::affine_linear);
  m.impl("dequantize_lut", &bivlm::dequantize_lut);
  m.impl("dequantize_affine", &bivlm::dequantize_affine);
  m.impl("tc_linear", &bivlm::tc_linear);
  m.impl("seg_tc_linear", &bivlm::seg_tc_linear);
}

// A Python module `_C` with no methods: importing it loads this library, whose static initializers above register
// the ops. (No pybind11: nothing is bound; the ops are reached through torch.ops.bivlm_cuda.)
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C",
      "bivlm_kernels CUDA kernels; registers torch.ops.bivlm_cuda.* when imported", -1, nullptr,
      nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
