// gemv_tc_dispatch.cu -- host side of the tensor-core GEMVs (1, 2, 4 bits): format check, split-K policy, argument
// checks and dispatch by bit width to launch_tc1 / launch_tc2 / launch_tc4 (their instantiations: gemv_tc_b1.cu,
// gemv_tc_b2.cu, gemv_tc_b4.cu).
#include <cstdint>

#include "gemv_tc1.cuh"   // the 1-bit kernel's shared-memory size (tc1_smem_bytes, Tc1Plan) bounds its splits

namespace bivlm {

namespace {

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }


// Chunks of one slot block (1 bit): a split must start on one. The 2-bit kernel has no slot blocks.
int64_t block_chunks(int bits, int mt, int g) {
  if (bits == 2) return 1;
  const int s = mt >= 8 ? 1 : 8 / mt;
  return cdiv(static_cast<int64_t>(s) * g, 256 / bits);
}

int64_t chunks_of(const TcWeight& w) {
  return w.bits == 2 ? tc2_chunks(w.k) : w.bits == 4 ? tc4_chunks(w.k) : tc_chunks(w.k);
}

int tiles_per_block(int bits, int mt) { return detail::kTcWarps * (bits != 4 || mt <= 8 ? 4 : 2); }

// The block keeps per-group values of its split in shared memory, at most 32 KiB. 4 bits: S and SQ (8 MT bytes per
// group), so at most 16 G / MT chunks (a multiple of block_chunks for every bucket). 1 bit: S, V and the table
// product's B fragments (tc1_smem_bytes), as many whole slot blocks as fit.
int64_t max_chunks_per_split(int bits, int mt, int g) {
  if (bits == 2) return INT32_MAX;
  if (bits == 4) return 16 * bits * static_cast<int64_t>(g) / mt;
  static_assert(detail::Tc1Plan<__half>::kGt == detail::Tc1Plan<__nv_bfloat16>::kGt, "one table-step size");
  const int64_t bc = block_chunks(1, mt, g);
  int64_t best = bc;
  for (int64_t c = bc; c <= 4096; c += bc) {
    const int sg = static_cast<int>(c * 256 / g);
    if (detail::tc1_smem_bytes(mt, sg, tc1_table_steps(sg, detail::Tc1Plan<__half>::kGt)) > 32768) break;
    best = c;
  }
  return best;
}

int64_t chunks_per_split(int64_t m, const TcWeight& w, int splits) {
  const int mt = detail::gemv_mt(m);
  const int64_t bc = block_chunks(w.bits, mt, w.group_size);
  return cdiv(cdiv(chunks_of(w), splits), bc) * bc;
}

}  // namespace

bool gemv_tc_supported(int bits, int group_size, DType dtype) {
  return (bits == 1 || bits == 2 || bits == 4) && (group_size == 64 || group_size == 128) &&
         (dtype == DType::kHalf || dtype == DType::kBFloat16);
}

// Split-K policy (NOT MEASURED, as gemv_num_splits): >= 4 blocks per SM; splits start on slot blocks; <= 32.
int gemv_tc_num_splits(int64_t m, const TcWeight& w, int sm_count) {
  const int mt = detail::gemv_mt(m);
  const int64_t row_blocks = cdiv(tc_tiles(w.n), tiles_per_block(w.bits, mt));
  const int64_t target = 4 * static_cast<int64_t>(sm_count > 0 ? sm_count : 1);
  int64_t splits = cdiv(target, row_blocks);
  const int64_t max_splits = cdiv(chunks_of(w), block_chunks(w.bits, mt, w.group_size));
  const int64_t min_splits = cdiv(chunks_of(w), max_chunks_per_split(w.bits, mt, w.group_size));
  if (splits > max_splits) splits = max_splits;
  if (splits > 32) splits = 32;
  if (splits < min_splits) splits = min_splits;  // may exceed 32 for K > 32 * 16 G / MT: correct, rare
  if (splits < 1) splits = 1;
  splits = cdiv(chunks_of(w), chunks_per_split(m, w, static_cast<int>(splits)));
  return static_cast<int>(splits < 1 ? 1 : splits);
}

namespace {

bool aligned(const void* p, uintptr_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

}  // namespace

cudaError_t launch_gemv_tc(const void* x, int64_t m, int64_t ldx, const TcWeight& w, const void* bias, int splits,
                           void* out, float* out_f32, cudaStream_t stream) {
  if (!gemv_tc_supported(w.bits, w.group_size, w.dtype) || m < 1 || m > kGemvMaxM || w.n < 1 ||
      w.k < w.group_size || w.k % w.group_size != 0 || w.n > INT32_MAX / 2 || w.k > INT32_MAX / 2 || splits < 1 ||
      (splits > 1 && out_f32 == nullptr) || (out == nullptr && out_f32 == nullptr) || w.qtc == nullptr ||
      w.table == nullptr || !aligned(w.qtc, 16) || !aligned(w.table, w.bits == 4 ? 8 : 16)) {
    return cudaErrorInvalidValue;
  }
  // x is read 16 bytes at a time at columns that are multiples of 8.
  if (x == nullptr || !aligned(x, 16) || (ldx * 2) % 16 != 0 || ldx < w.k) return cudaErrorInvalidValue;
  const int64_t cps = chunks_per_split(m, w, splits);
  if (cdiv(chunks_of(w), cps) != splits || cps > max_chunks_per_split(w.bits, detail::gemv_mt(m), w.group_size))
    return cudaErrorInvalidValue;  // not what gemv_tc_num_splits gave
  if (w.bits == 2) return detail::launch_tc2(x, m, ldx, w, bias, splits, static_cast<int>(cps), out, out_f32, stream);
  if (w.bits == 4) return detail::launch_tc4(x, m, ldx, w, bias, splits, static_cast<int>(cps), out, out_f32, stream);
  return detail::launch_tc1(x, m, ldx, w, bias, splits, static_cast<int>(cps), out, out_f32, stream);
}

}  // namespace bivlm
