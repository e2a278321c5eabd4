// dequantize.cu -- packed weight -> dense [N, K] in the table dtype.
//
// Used by the dequantize_lut / dequantize_affine ops and by the large-M path of the linear ops (dequantize into a
// temporary, then cuBLAS). One thread per packed word: it decodes the word's 32/16/8 codes with the group table
// held in registers and writes them as 16-byte stores:
//
//     word idx = row * kw + wi   ->   out[row, wi*CPW .. wi*CPW + CPW)      (CPW = 32 / BITS codes per word)
//
// Since K is a multiple of the group size (>= 32), every word is full and lies in group wi * CPW / g, and
// out + row * K + wi * CPW is 16-byte aligned for every dtype (CPW * sizeof(T) >= 16).
//
// Instantiated configs: T in {__half, __nv_bfloat16, float} x BITS in {1, 2, 4} = 9 kernels.
#include <cstdint>

#include "common.cuh"

namespace bivlm {
namespace detail {

// T: table/output type; BITS: 1, 2 (lut) or 4 (affine). Grid-stride over all n * kw words.
template <typename T, int BITS>
__global__ void dequantize_kernel(const int32_t* __restrict__ q, const T* __restrict__ t0, const T* __restrict__ t1,
                                  int64_t total_words, int kw, int groups, int wpg_shift, T* __restrict__ out) {
  using C = Codes<BITS>;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total_words;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = idx / kw;
    const int wi = static_cast<int>(idx - row * kw);
    float e[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    load_table<T, BITS>(t0, t1, row * groups + (wi >> wpg_shift), e);
    const uint32_t word = static_cast<uint32_t>(ptx::ld_cs_b32(q + idx));
    T* o = out + row * (static_cast<int64_t>(kw) * C::kPerWord) + static_cast<int64_t>(wi) * C::kPerWord;
#pragma unroll
    for (int s = 0; s < C::kSubChunks; ++s) {
      float w[8];
      dequant8<BITS>(word, s, e, w);
      store8(o + 8 * s, w);
    }
  }
}

template <typename T, int BITS>
cudaError_t launch_dequantize_typed(const PackedWeight& w, void* out, cudaStream_t stream) {
  const int kw = static_cast<int>(w.k * BITS / 32);
  const int64_t total = w.n * kw;
  const int threads = 256;
  int64_t blocks = (total + threads - 1) / threads;
  if (blocks > (1 << 20)) blocks = 1 << 20;  // grid-stride loop covers the rest
  BIVLM_LAUNCH(static_cast<unsigned>(blocks), threads, 0, stream, dequantize_kernel<T, BITS>)(
      w.qweight, static_cast<const T*>(w.table0), static_cast<const T*>(w.table1), total, kw,
      static_cast<int>(w.k / w.group_size), ilog2(w.group_size * BITS / 32), static_cast<T*>(out));
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_dequantize_bits(const PackedWeight& w, void* out, cudaStream_t stream) {
  switch (w.bits) {
    case 1:
      return launch_dequantize_typed<T, 1>(w, out, stream);
    case 2:
      return launch_dequantize_typed<T, 2>(w, out, stream);
    case 4:
      return launch_dequantize_typed<T, 4>(w, out, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace detail

cudaError_t launch_dequantize(const PackedWeight& w, void* out, cudaStream_t stream) {
  const bool group_ok = w.group_size == 32 || w.group_size == 64 || w.group_size == 128 || w.group_size == 256;
  if (!group_ok || w.n < 0 || w.k < 0 || w.k % w.group_size != 0 || w.k > INT32_MAX || out == nullptr ||
      reinterpret_cast<uintptr_t>(out) % 16 != 0 || (w.bits == 4) != (w.table1 != nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (w.n == 0 || w.k == 0) return cudaSuccess;
  switch (w.dtype) {
    case DType::kHalf:
      return detail::launch_dequantize_bits<__half>(w, out, stream);
    case DType::kBFloat16:
      return detail::launch_dequantize_bits<__nv_bfloat16>(w, out, stream);
    case DType::kFloat:
      return detail::launch_dequantize_bits<float>(w, out, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace bivlm
