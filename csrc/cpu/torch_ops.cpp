// torch_ops.cpp -- the torch-facing side of the CPU extension bivlm_kernels._C_cpu (the only file of csrc/cpu/ that
// includes torch headers; the kernels live behind kernels.h).
//
// Defines torch.ops.bivlm_cpu.{lut_linear, affine_linear, dequantize_lut, dequantize_affine, segmented_lut_linear}
// with the schemas of the Python ops torch.ops.bivlm.* (bivlm_kernels/ops/), implements them for the CPU
// dispatch key, plus bivlm_cpu.configure (dispatch knobs for tests and benchmarks), and a method-less Python
// module `_C_cpu` so that importing it runs the registrations (bivlm_kernels/backends/cpu.py plugs the ops in
// as the "cpu" backend).
//
// Linear ops dispatch by M = x.numel() / K:
//   M <= gemv_max_m : decode GEMV straight from the packed codes (kernels_avx2.cpp / kernels_scalar.cpp), output
//                     rows split over at::parallel_for; extra memory: x in fp32 [M, K] (a view when x already is
//                     contiguous fp32), group sums [M, K/g] (4-bit; 1-bit at M = 1), y in fp32 [M, N].
//   M >  gemv_max_m : dequantize tile_rows output rows at a time into one fp32 tile [tile_rows, K] (about
//                     tile_bytes) and multiply it with at::mm into y^T; never a full-weight buffer. Extra memory:
//                     x in fp32 [M, K], the tile, y^T in fp32 [N, M].
// Every result is computed in fp32 (bias added in fp32) and rounded once to out_dtype, like the reference.
#include <Python.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "kernels.h"
#include "tmac.h"

namespace {

using bivlm_cpu::Segment;

// Dispatch knobs (bivlm_cpu.configure). gemv_max_m: largest M for the decode GEMV (measured crossover with the
// tile + at::mm path on a 2-core AMD EPYC: see benchmarks/results/cpu_kernels.md). tile_bytes: fp32 tile size.
int64_t g_gemv_max_m = 16;
int64_t g_tile_bytes = int64_t{2} << 20;
constexpr int64_t kRowsPerTask = 16;   // output rows per parallel_for task (a multiple of the 4-row block)
// Least work (weights x rows of x) worth a thread of its own: ~30-60 us here. Smaller calls (the 576x1536 testbed
// layers at M = 1) run on the calling thread, which saves the wake-up of a second one (measured slower there).
int64_t g_min_task_work = int64_t{1} << 20;

// parallel_for grain (in tasks of `rows` output rows) for a call of m rows of x over k columns.
int64_t grain_tasks(int64_t rows, int64_t k, int64_t m) {
  return std::max<int64_t>(1, (g_min_task_work + rows * k * m - 1) / (rows * k * m));
}

// fn(b, e) over [0, ntasks) on the intra-op threads, handed out in chunks from a shared counter rather than one
// static range per thread (at::parallel_for): on this shared machine one of the two cores is often busy, and a
// static split then waits for the half on the busy core (measured: 2 threads slower than 1). Calls with fewer
// than 2 * grain tasks run on the calling thread.
template <class F>
void for_rows(int64_t ntasks, int64_t grain, const F& fn) {
  const int64_t threads = at::get_num_threads();
  if (threads <= 1 || ntasks < 2 * grain || at::in_parallel_region()) return fn(0, ntasks);
  const int64_t chunk = std::max<int64_t>(1, (ntasks + 8 * threads - 1) / (8 * threads));   // ~8 grabs per thread
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t b; (b = next.fetch_add(chunk)) < ntasks;) fn(b, std::min(ntasks, b + chunk));
  });
}

bivlm_cpu::DType to_dtype(at::ScalarType t) {
  return t == at::kHalf ? bivlm_cpu::DType::kHalf
                        : (t == at::kBFloat16 ? bivlm_cpu::DType::kBFloat16 : bivlm_cpu::DType::kFloat);
}

bool is_float_type(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat; }

// A checked segment plus the (possibly made contiguous) tensors its pointers point into.
struct Packed {
  Segment seg;
  at::Tensor qweight, t0, t1;
};

// group_size for a bit width (kernels.h: group_size_ok); a ValueError in Python, like formats.check_group_size.
void check_group_size(const char* op, int64_t bits, int64_t g) {
  TORCH_CHECK_VALUE(bivlm_cpu::group_size_ok(bits, g), "bivlm_cpu.", op, ": group_size must be one of ",
                    bits >= 2 ? "16, 32, 64, 128, 256" : "32, 64, 128, 256", " for bits=", bits,
                    " (16 only for bits 2 and 4: a packed int32 word must lie inside one group), got ", g);
}

Packed check_segment(const char* op, bool affine, const at::Tensor& qweight, const at::Tensor& t0,
                     const at::Tensor* t1, int64_t bits, int64_t g) {
  if (affine) {
    TORCH_CHECK(bits == 4, "bivlm_cpu.", op, ": bits must be 4 for affine weights, got ", bits);
  } else {
    TORCH_CHECK(bits == 1 || bits == 2, "bivlm_cpu.", op, ": bits must be 1 or 2 for lut weights, got ", bits);
  }
  check_group_size(op, bits, g);
  TORCH_CHECK(qweight.device().is_cpu() && qweight.scalar_type() == at::kInt, "bivlm_cpu.", op,
              ": qweight must be an int32 CPU tensor, got ", qweight.scalar_type(), " on ", qweight.device());
  TORCH_CHECK(t0.device().is_cpu() && is_float_type(t0.scalar_type()), "bivlm_cpu.", op, ": ",
              affine ? "scales" : "codebook", " must be a float16/bfloat16/float32 CPU tensor, got ",
              t0.scalar_type(), " on ", t0.device());
  if (affine) {
    TORCH_CHECK(t0.dim() == 2 && t1->sizes() == t0.sizes() && t1->scalar_type() == t0.scalar_type() &&
                    t1->device().is_cpu(),
                "bivlm_cpu.", op, ": scales and zeros must both be [N, K/group_size] of one dtype, got ",
                t0.sizes(), " ", t0.scalar_type(), " and ", t1->sizes(), " ", t1->scalar_type());
  } else {
    TORCH_CHECK(t0.dim() == 3 && t0.size(2) == (int64_t{1} << bits), "bivlm_cpu.", op,
                ": codebook must have shape [N, K/group_size, ", (1 << bits), "] for bits=", bits, ", got ",
                t0.sizes());
  }
  const int64_t n = t0.size(0), k = t0.size(1) * g;
  TORCH_CHECK(n >= 1 && k >= 1, "bivlm_cpu.", op, ": empty weight (n=", n, ", k=", k, ")");
  TORCH_CHECK(qweight.dim() == 2 && qweight.size(0) == n && qweight.size(1) == k * bits / 32, "bivlm_cpu.", op,
              ": qweight must have shape [N, K*bits/32] = [", n, ", ", k * bits / 32, "] for n=", n, ", k=", k,
              ", bits=", bits, "; got ", qweight.sizes());
  Packed p;
  p.qweight = qweight.contiguous();
  p.t0 = t0.contiguous();
  if (affine) p.t1 = t1->contiguous();
  p.seg.qweight = p.qweight.data_ptr<int32_t>();
  p.seg.table0 = p.t0.data_ptr();
  p.seg.table1 = affine ? p.t1.data_ptr() : nullptr;
  p.seg.n = n;
  p.seg.k = k;
  p.seg.bits = static_cast<int>(bits);
  p.seg.group_size = static_cast<int>(g);
  p.seg.dtype = to_dtype(t0.scalar_type());
  return p;
}

// y = x2 @ W^T + bias for W = the segments side by side along K (segment j reads columns cols[j] of x2).
// x2: fp32 [m, K] contiguous. Returns [m, n] in od.
at::Tensor linear_core(const char* op, const at::Tensor& x2, const std::vector<Packed>& segs,
                       const std::vector<int64_t>& cols, const std::optional<at::Tensor>& bias,
                       at::ScalarType od) {
  const int64_t m = x2.size(0), k = x2.size(1), n = segs[0].seg.n;
  const float* x = x2.data_ptr<float>();
  at::Tensor b32;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->device().is_cpu(), "bivlm_cpu.", op,
                ": bias must be a CPU tensor [", n, "], got ", bias->sizes(), " on ", bias->device(),
                " (m=", m, ", n=", n, ", k=", k, ")");
    b32 = bias->to(at::kFloat).contiguous();
  }
  const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
  const at::TensorOptions f32 = x2.options().dtype(at::kFloat);

  if (m <= g_gemv_max_m) {
    std::vector<bivlm_cpu::Activations> acts(segs.size());
    std::vector<at::Tensor> sums;
    at::Tensor xt[2];   // 2 / 4 bit: x in transposed 8-word chunks (kernels.h: Activations::xt), per width
    for (size_t j = 0; j < segs.size(); ++j) {
      const Segment& s = segs[j].seg;
      acts[j] = {x, m, k, cols[j], nullptr};
      const int64_t ch = 256 / s.bits;    // columns of 8 words
      if (s.bits >= 2 && s.group_size % ch == 0 && cols[j] % ch == 0) {
        at::Tensor& t = xt[s.bits == 4];
        if (!t.defined()) {
          t = at::empty({m, k}, f32);   // row stride k, like x
          bivlm_cpu::transpose_words(x, m, k, k - k % ch, 32 / s.bits, t.data_ptr<float>());
        }
        acts[j].xt = t.data_ptr<float>();
      }
      if (s.affine() || (s.bits == 1 && m == 1)) {   // affine: zero term; 1 bit, m = 1: the mask kernel
        sums.push_back(at::empty({m, s.k / s.group_size}, f32));
        bivlm_cpu::group_sums(x, m, k, cols[j], s.k, s.group_size, sums.back().data_ptr<float>());
        acts[j].xsum = sums.back().data_ptr<float>();
      }
    }
    at::Tensor y = at::empty({m, n}, f32);
    float* yp = y.data_ptr<float>();
    for_rows((n + kRowsPerTask - 1) / kRowsPerTask, grain_tasks(kRowsPerTask, k, m), [&](int64_t b, int64_t e) {
      const int64_t n0 = b * kRowsPerTask, n1 = std::min(n, e * kRowsPerTask);
      for (size_t j = 0; j < segs.size(); ++j)
        bivlm_cpu::gemv(segs[j].seg, acts[j], yp, n, j == 0 ? bp : nullptr, j > 0, n0, n1);
    });
    return od == at::kFloat ? y : y.to(od);
  }

  // Large M: fp32 tiles of tile_rows full rows (all segments), each multiplied into rows of y^T.
  const int64_t tile_rows = std::clamp<int64_t>(g_tile_bytes / (4 * k) / 8 * 8, 8, ((n + 7) / 8) * 8);
  at::Tensor tile = at::empty({std::min(tile_rows, n), k}, f32);
  at::Tensor yt = at::empty({n, m}, f32);
  const at::Tensor xt = x2.t();
  for (int64_t r0 = 0; r0 < n; r0 += tile_rows) {
    const int64_t rows = std::min(tile_rows, n - r0);
    float* tp = tile.data_ptr<float>();
    at::parallel_for(0, rows, 8, [&](int64_t b, int64_t e) {
      for (size_t j = 0; j < segs.size(); ++j) {
        Segment s = segs[j].seg;   // rows r0 + [b, e) of segment j into columns cols[j] of the tile
        bivlm_cpu::dequantize(s, tp + b * k + cols[j], k, r0 + b, r0 + e);
      }
    });
    at::Tensor dst = yt.narrow(0, r0, rows);
    at::mm_out(dst, tile.narrow(0, 0, rows), xt);
  }
  if (bp != nullptr) yt.add_(b32.unsqueeze(1));
  return at::empty({m, n}, x2.options().dtype(od)).copy_(yt.t());
}

// x as fp32 [m, K] contiguous (a view when it already is), optionally with its columns permuted.
at::Tensor as_fp32_rows(const at::Tensor& x, int64_t k, const std::optional<at::Tensor>& perm) {
  at::Tensor x2 = x.reshape({-1, k});
  if (perm.has_value() && perm->defined()) x2 = x2.index_select(1, perm->to(at::kLong));
  return x2.to(at::kFloat).contiguous();
}

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end() - 1);
  s.push_back(n);
  return s;
}

at::Tensor linear(const char* op, const at::Tensor& x, std::vector<Packed> segs, const std::optional<at::Tensor>& perm,
                  const std::optional<at::Tensor>& bias, std::optional<at::ScalarType> out_dtype) {
  int64_t k = 0;
  std::vector<int64_t> cols;
  for (const Packed& p : segs) {
    TORCH_CHECK(p.seg.n == segs[0].seg.n, "bivlm_cpu.", op, ": every segment must have N=", segs[0].seg.n,
                " rows, got ", p.seg.n);
    cols.push_back(k);
    k += p.seg.k;
  }
  TORCH_CHECK(x.device().is_cpu() && is_float_type(x.scalar_type()), "bivlm_cpu.", op,
              ": x must be a float16/bfloat16/float32 CPU tensor, got ", x.scalar_type(), " on ", x.device());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == k, "bivlm_cpu.", op, ": x's last dimension must be in_features k=", k,
              ", got shape ", x.sizes(), " (n=", segs[0].seg.n, ")");
  const at::ScalarType od = out_dtype.value_or(x.scalar_type());
  TORCH_CHECK(is_float_type(od), "bivlm_cpu.", op, ": out_dtype must be float16, bfloat16 or float32, got ", od);
  const int64_t n = segs[0].seg.n;
  if (x.numel() == 0) return at::empty(out_shape(x, n), x.options().dtype(od));
  const at::Tensor x2 = as_fp32_rows(x, k, perm);
  return linear_core(op, x2, segs, cols, bias, od).view(out_shape(x, n));
}

at::Tensor lut_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& codebook, int64_t bits,
                      int64_t group_size, const std::optional<at::Tensor>& bias,
                      std::optional<at::ScalarType> out_dtype) {
  return linear("lut_linear", x, {check_segment("lut_linear", false, qweight, codebook, nullptr, bits, group_size)},
                std::nullopt, bias, out_dtype);
}

at::Tensor affine_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                         const at::Tensor& zeros, int64_t bits, int64_t group_size,
                         const std::optional<at::Tensor>& bias, std::optional<at::ScalarType> out_dtype) {
  return linear("affine_linear", x,
                {check_segment("affine_linear", true, qweight, scales, &zeros, bits, group_size)}, std::nullopt,
                bias, out_dtype);
}

// The sub-2-bit layout in one call: x[..., perm] once, then every lut segment into one fp32 accumulator.
at::Tensor segmented_lut_linear(const at::Tensor& x, const std::optional<at::Tensor>& perm,
                                at::TensorList qweights, at::TensorList codebooks, at::IntArrayRef bits,
                                int64_t group_size, const std::optional<at::Tensor>& bias,
                                std::optional<at::ScalarType> out_dtype) {
  const char* op = "segmented_lut_linear";
  TORCH_CHECK(!qweights.empty() && qweights.size() == codebooks.size() && qweights.size() == bits.size(), "bivlm_cpu.",
              op, ": qweights, codebooks and bits must be non-empty lists of one length, got ", qweights.size(),
              ", ", codebooks.size(), ", ", bits.size());
  std::vector<Packed> segs;
  for (size_t j = 0; j < qweights.size(); ++j)
    segs.push_back(check_segment(op, false, qweights[j], codebooks[j], nullptr, bits[j], group_size));
  return linear(op, x, std::move(segs), perm, bias, out_dtype);
}

at::Tensor dequantize_impl(const Packed& p, const at::Tensor& like) {
  at::Tensor w = at::empty({p.seg.n, p.seg.k}, like.options().dtype(at::kFloat));
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, p.seg.n, 8, [&](int64_t b, int64_t e) { bivlm_cpu::dequantize(p.seg, wp + b * p.seg.k,
                                                                                     p.seg.k, b, e); });
  return like.scalar_type() == at::kFloat ? w : w.to(like.scalar_type());
}

at::Tensor dequantize_lut(const at::Tensor& qweight, const at::Tensor& codebook, int64_t bits, int64_t group_size) {
  return dequantize_impl(check_segment("dequantize_lut", false, qweight, codebook, nullptr, bits, group_size),
                         codebook);
}

at::Tensor dequantize_affine(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                             int64_t bits, int64_t group_size) {
  return dequantize_impl(check_segment("dequantize_affine", true, qweight, scales, &zeros, bits, group_size),
                         scales);
}

// ------------------------------------------------------------------------------------------------------------
// table-lookup path (tmac.h): repack once per layer (bivlm_kernels/backends/cpu.py caches it), then
// tmac_linear per call
// ------------------------------------------------------------------------------------------------------------

// (codes, coefs) of tmac.h from one neutral segment: lut (bits 1, 2; table1 absent) or affine (bits 4).
std::vector<at::Tensor> tmac_repack(const at::Tensor& qweight, const at::Tensor& table0,
                                    const std::optional<at::Tensor>& table1, int64_t bits, int64_t group_size) {
  const bool affine = table1.has_value() && table1->defined();
  const at::Tensor t1 = affine ? *table1 : at::Tensor();
  const Packed p = check_segment("tmac_repack", affine, qweight, table0, affine ? &t1 : nullptr, bits, group_size);
  const Segment& s = p.seg;
  const int64_t nb = (s.n + 7) / 8;
  const at::TensorOptions o = qweight.options();
  at::Tensor codes =
      at::zeros({nb, bivlm_cpu::tmac_words(s.k), bivlm_cpu::tmac_planes(s.bits), 8}, o.dtype(at::kInt));
  at::Tensor coefs = at::zeros({nb, s.k / s.group_size, bivlm_cpu::tmac_coefs(s.bits), 8}, o.dtype(at::kFloat));
  int32_t* cp = codes.data_ptr<int32_t>();
  float* fp = coefs.data_ptr<float>();
  at::parallel_for(0, nb, 8, [&](int64_t b, int64_t e) {   // blocks [b, e): disjoint rows of both buffers
    bivlm_cpu::tmac_repack(s, cp, fp, 8 * b, std::min(s.n, 8 * e));
  });
  return {codes, coefs};
}

// y = x[..., perm] @ W^T + bias, W = the repacked segments side by side along K (one for lut_linear /
// affine_linear). Tables are built for at most tile_bytes of x rows at a time (extra memory O(M*N + tile)).
at::Tensor tmac_linear(const at::Tensor& x, const std::optional<at::Tensor>& perm, at::TensorList codes,
                       at::TensorList coefs, at::IntArrayRef bits, int64_t n, int64_t group_size,
                       const std::optional<at::Tensor>& bias, std::optional<at::ScalarType> out_dtype) {
  const char* op = "tmac_linear";
  TORCH_CHECK(!codes.empty() && codes.size() == coefs.size() && codes.size() == bits.size(), "bivlm_cpu.", op,
              ": codes, coefs and bits must be non-empty lists of one length, got ", codes.size(), ", ",
              coefs.size(), ", ", bits.size());
  std::vector<bivlm_cpu::TmacSegment> segs;
  std::vector<int64_t> cols;
  int64_t k = 0;
  for (size_t j = 0; j < codes.size(); ++j) {
    const at::Tensor &c = codes[j], &f = coefs[j];
    const int b = static_cast<int>(bits[j]);
    TORCH_CHECK(b == 1 || b == 2 || b == 4, "bivlm_cpu.", op, ": bits must be 1, 2 or 4, got ", b);
    check_group_size(op, b, group_size);
    const int64_t nb = (n + 7) / 8;
    // K from the coefs (one per group): at g = 16, K need not fill the last 32-column code word
    TORCH_CHECK(f.device().is_cpu() && f.scalar_type() == at::kFloat && f.is_contiguous() && f.dim() == 4 &&
                    f.size(0) == nb && f.size(2) == bivlm_cpu::tmac_coefs(b) && f.size(3) == 8,
                "bivlm_cpu.", op, ": coefs[", j, "] must be contiguous fp32 [", nb, ", K/group_size, ",
                bivlm_cpu::tmac_coefs(b), ", 8] for n=", n, ", bits=", b, " (tmac_repack), got ", f.sizes());
    const int64_t kj = f.size(1) * group_size;
    TORCH_CHECK(kj >= 1 && c.device().is_cpu() && c.scalar_type() == at::kInt && c.is_contiguous() && c.dim() == 4 &&
                    c.size(0) == nb && c.size(1) == bivlm_cpu::tmac_words(kj) &&
                    c.size(2) == bivlm_cpu::tmac_planes(b) && c.size(3) == 8,
                "bivlm_cpu.", op, ": codes[", j, "] must be contiguous int32 [", nb, ", ", bivlm_cpu::tmac_words(kj),
                ", ", bivlm_cpu::tmac_planes(b), ", 8] for n=", n, ", k=", kj, ", bits=", b, " (tmac_repack), got ",
                c.sizes());
    bivlm_cpu::TmacSegment s;
    s.codes = c.data_ptr<int32_t>();
    s.coefs = f.data_ptr<float>();
    s.n = n, s.k = kj, s.bits = b, s.group_size = static_cast<int>(group_size);
    segs.push_back(s);
    cols.push_back(k);
    k += kj;
  }
  TORCH_CHECK(x.device().is_cpu() && is_float_type(x.scalar_type()) && x.dim() >= 1 && x.size(-1) == k,
              "bivlm_cpu.", op, ": x must be a float CPU tensor [..., ", k, "], got ", x.scalar_type(), " ",
              x.sizes(), " (n=", n, ")");
  const at::ScalarType od = out_dtype.value_or(x.scalar_type());
  TORCH_CHECK(is_float_type(od), "bivlm_cpu.", op, ": out_dtype must be float16, bfloat16 or float32, got ", od);
  if (x.numel() == 0) return at::empty(out_shape(x, n), x.options().dtype(od));
  const at::Tensor x2 = as_fp32_rows(x, k, perm);
  const int64_t m = x2.size(0);
  at::Tensor b32;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->device().is_cpu(), "bivlm_cpu.", op,
                ": bias must be a CPU tensor [", n, "], got ", bias->sizes(), " (m=", m, ", n=", n, ", k=", k, ")");
    b32 = bias->to(at::kFloat).contiguous();
  }
  const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
  const at::TensorOptions f32 = x2.options().dtype(at::kFloat);
  const int64_t mc = std::clamp<int64_t>(g_tile_bytes / (4 * k * bivlm_cpu::kTmacTableFloats / 32), 1, m);
  std::vector<at::Tensor> tabs, sums;
  for (const auto& s : segs) {
    tabs.push_back(at::empty({mc, bivlm_cpu::tmac_words(s.k) * bivlm_cpu::kTmacTableFloats}, f32));
    sums.push_back(at::empty({mc, s.k / s.group_size}, f32));
  }
  at::Tensor y = at::empty({m, n}, f32);
  const float* xp = x2.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t nb = (n + 7) / 8;
  for (int64_t i0 = 0; i0 < m; i0 += mc) {
    const int64_t rows = std::min(mc, m - i0);
    for (size_t j = 0; j < segs.size(); ++j)
      bivlm_cpu::tmac_tables(xp + i0 * k, rows, k, cols[j], segs[j].k, segs[j].group_size,
                             tabs[j].data_ptr<float>(), sums[j].data_ptr<float>());
    for_rows(nb, grain_tasks(8, k, rows), [&](int64_t b, int64_t e) {
      for (size_t j = 0; j < segs.size(); ++j)
        bivlm_cpu::tmac_gemv(segs[j], tabs[j].data_ptr<float>(), sums[j].data_ptr<float>(), rows, yp + i0 * n, n,
                             j == 0 ? bp : nullptr, j > 0, b, e);
    });
  }
  return (od == at::kFloat ? y : y.to(od)).view(out_shape(x, n));
}

// One segment without perm (lut_linear / affine_linear): the same, without the list arguments, whose conversion
// from Python costs ~6 us per call.
at::Tensor tmac_linear1(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& coefs, int64_t bits,
                        int64_t n, int64_t group_size, const std::optional<at::Tensor>& bias,
                        std::optional<at::ScalarType> out_dtype) {
  const std::vector<at::Tensor> c{codes}, f{coefs};
  const std::vector<int64_t> b{bits};
  return tmac_linear(x, std::nullopt, c, f, b, n, group_size, bias, out_dtype);
}

// Knobs: a value < 0 leaves a setting as it is.
// Returns [gemv_max_m, tile_bytes, force_scalar, isa_is_avx2, min_task_work].
std::vector<int64_t> configure(int64_t gemv_max_m, int64_t tile_bytes, int64_t force_scalar, int64_t min_task_work) {
  if (gemv_max_m >= 0) g_gemv_max_m = gemv_max_m;
  if (tile_bytes > 0) g_tile_bytes = tile_bytes;
  if (force_scalar >= 0) bivlm_cpu::force_scalar(force_scalar != 0);
  if (min_task_work > 0) g_min_task_work = min_task_work;
  const bool scalar_now = bivlm_cpu::force_scalar(false);
  bivlm_cpu::force_scalar(scalar_now);
  return {g_gemv_max_m, g_tile_bytes, scalar_now ? 1 : 0, std::string(bivlm_cpu::isa()) == "avx2" ? 1 : 0,
          g_min_task_work};
}

}  // namespace

// Schemas: identical to bivlm_kernels/ops/ (torch.ops.bivlm.*), so the Python op forwards its arguments as is.
TORCH_LIBRARY(bivlm_cpu, m) {
  m.def("lut_linear(Tensor x, Tensor qweight, Tensor codebook, int bits, int group_size, "
        "Tensor? bias=None, ScalarType? out_dtype=None) -> Tensor");
  m.def("affine_linear(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int bits, int group_size, "
        "Tensor? bias=None, ScalarType? out_dtype=None) -> Tensor");
  m.def("dequantize_lut(Tensor qweight, Tensor codebook, int bits, int group_size) -> Tensor");
  m.def("dequantize_affine(Tensor qweight, Tensor scales, Tensor zeros, int bits, int group_size) -> Tensor");
  m.def("segmented_lut_linear(Tensor x, Tensor? perm, Tensor[] qweights, Tensor[] codebooks, int[] bits, "
        "int group_size, Tensor? bias=None, ScalarType? out_dtype=None) -> Tensor");
  // The table-lookup path (tmac.h); not bivlm ops: bivlm_kernels/backends/cpu.py calls them behind the ops above.
  m.def("tmac_repack(Tensor qweight, Tensor table0, Tensor? table1, int bits, int group_size) -> Tensor[]");
  m.def("tmac_linear(Tensor x, Tensor? perm, Tensor[] codes, Tensor[] coefs, int[] bits, int n, int group_size, "
        "Tensor? bias=None, ScalarType? out_dtype=None) -> Tensor");
  m.def("tmac_linear1(Tensor x, Tensor codes, Tensor coefs, int bits, int n, int group_size, "
        "Tensor? bias=None, ScalarType? out_dtype=None) -> Tensor");
  // No tensor arguments, so a catch-all kernel (nothing to dispatch on).
  m.def("configure(int gemv_max_m=-1, int tile_bytes=-1, int force_scalar=-1, int min_task_work=-1) -> int[]",
        &configure);
}

TORCH_LIBRARY_IMPL(bivlm_cpu, CPU, m) {
  m.impl("lut_linear", &lut_linear);
  m.impl("affine_linear", &affine_linear);
  m.impl("dequantize_lut", &dequantize_lut);
  m.impl("dequantize_affine", &dequantize_affine);
  m.impl("segmented_lut_linear", &segmented_lut_linear);
  m.impl("tmac_repack", &tmac_repack);
  m.impl("tmac_linear", &tmac_linear);
  m.impl("tmac_linear1", &tmac_linear1);
}

// A Python module `_C_cpu` with no methods: importing it loads this library, whose static initializers above
// register the ops (no pybind11: nothing is bound; the ops are reached through torch.ops.bivlm_cpu).
PyMODINIT_FUNC PyInit__C_cpu(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C_cpu",
      "bivlm_kernels CPU kernels; registers torch.ops.bivlm_cpu.* when imported", -1, nullptr,
      nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
