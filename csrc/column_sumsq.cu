// Per-column sums of squared activations: each thread owns VEC adjacent columns, read with one 16-byte load
// a row where the layout allows (unit column stride, 16-byte aligned rows and base, d a multiple of VEC),
// else one column; each block streams a slice of the tokens. The row's (batch, position) advance by a carry,
// not a division; the data load does not wait on the mask (padding is zeroed by a select, never read as a
// branch), so the unrolled loop keeps several rows' loads in flight. An optional fp32 weight per token (the
// loss-aware statistic's squared output-gradient norm) multiplies its squares, loaded like the mask. fp32
// accumulation, one atomicAdd per column per block.
#include <cstdint>

#include "dtype.cuh"
#include "launch.cuh"
#include "sensilora_kernels.h"

namespace {

constexpr int kThreads = 128;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__global__ void column_sumsq_kernel(float* acc, const T* x, const uint8_t* mask, const float* weight, int64_t n_tokens,
                                    int64_t seq_len, int64_t d, int64_t tokens_per_block, int64_t stride_b,
                                    int64_t stride_t, int64_t stride_d, int64_t mask_stride_b, int64_t mask_stride_t,
                                    int64_t weight_stride_b, int64_t weight_stride_t) {
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (col >= d) return;
  const int64_t start = static_cast<int64_t>(blockIdx.y) * tokens_per_block;
  const int64_t end = min(start + tokens_per_block, n_tokens);
  if (start >= end) return;
  int64_t b = start / seq_len;  // the one division: later rows carry t into b
  int64_t t = start - b * seq_len;
  const T* column = x + col * stride_d;
  float sum[VEC] = {};
#pragma unroll 4
  for (int64_t row = start; row < end; ++row) {
    const T* at = column + b * stride_b + t * stride_t;
    const bool keep = mask == nullptr || mask[b * mask_stride_b + t * mask_stride_t] != 0;
    const float w = weight == nullptr ? 1.f : weight[b * weight_stride_b + t * weight_stride_t];
    if constexpr (VEC > 1) {
      const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(at);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float v = keep ? to_float(pack.v[i]) : 0.f;
        sum[i] = fmaf(v * v, w, sum[i]);
      }
    } else {
      const float v = keep ? to_float(*at) : 0.f;
      sum[0] = fmaf(v * v, w, sum[0]);
    }
    if (++t == seq_len) {
      t = 0;
      ++b;
    }
  }
#pragma unroll
  for (int i = 0; i < VEC; ++i) atomicAdd(acc + col + i, sum[i]);
}

template <typename T, int VEC>
void launch_with(float* acc, const T* x, const uint8_t* mask, const float* weight, int64_t n_tokens, int64_t seq_len,
                 int64_t d, int64_t per_block, int splits, int64_t stride_b, int64_t stride_t, int64_t stride_d,
                 int64_t mask_stride_b, int64_t mask_stride_t, int64_t weight_stride_b, int64_t weight_stride_t,
                 cudaStream_t stream) {
  const int64_t columns_per_block = static_cast<int64_t>(kThreads) * VEC;
  const dim3 grid(static_cast<unsigned>((d + columns_per_block - 1) / columns_per_block), static_cast<unsigned>(splits));
  const auto kernel = column_sumsq_kernel<T, VEC>;  // a name without the template's comma, for the macro
  SENSILORA_LAUNCH(kernel, grid, kThreads, stream, acc, x, mask, weight, n_tokens, seq_len, d, per_block, stride_b,
                   stride_t, stride_d, mask_stride_b, mask_stride_t, weight_stride_b, weight_stride_t);
}

template <typename T>
int launch(float* acc, const void* x, const uint8_t* mask, const float* weight, int64_t batch, int64_t seq_len,
           int64_t d, int64_t stride_b, int64_t stride_t, int64_t stride_d, int64_t mask_stride_b,
           int64_t mask_stride_t, int64_t weight_stride_b, int64_t weight_stride_t, int token_splits,
           cudaStream_t stream) {
  const int64_t n_tokens = batch * seq_len;
  if (n_tokens == 0 || d == 0) return 0;
  const int splits = token_splits < 1 ? 1 : token_splits;
  const int64_t per_block = (n_tokens + splits - 1) / splits;
  const T* data = static_cast<const T*>(x);
  constexpr int kVec = 16 / sizeof(T);  // elements in one 16-byte load
  // every vector load must be whole and 16-byte aligned: contiguous columns, d and both row strides
  // multiples of kVec elements, an aligned base
  const bool vectorised = stride_d == 1 && d % kVec == 0 && stride_t % kVec == 0 && stride_b % kVec == 0 &&
                          reinterpret_cast<std::uintptr_t>(data) % 16 == 0;
  if (vectorised) {
    launch_with<T, kVec>(acc, data, mask, weight, n_tokens, seq_len, d, per_block, splits, stride_b, stride_t,
                         stride_d, mask_stride_b, mask_stride_t, weight_stride_b, weight_stride_t, stream);
  } else {
    launch_with<T, 1>(acc, data, mask, weight, n_tokens, seq_len, d, per_block, splits, stride_b, stride_t, stride_d,
                      mask_stride_b, mask_stride_t, weight_stride_b, weight_stride_t, stream);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" int sensilora_column_sumsq(float* acc, const void* x, int dtype, const uint8_t* mask, const float* weight,
                                      int64_t batch, int64_t seq_len, int64_t d, int64_t stride_b, int64_t stride_t,
                                      int64_t stride_d, int64_t mask_stride_b, int64_t mask_stride_t,
                                      int64_t weight_stride_b, int64_t weight_stride_t, int token_splits,
                                      cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    return launch<typename decltype(tag)::type>(acc, x, mask, weight, batch, seq_len, d, stride_b, stride_t, stride_d,
                                                mask_stride_b, mask_stride_t, weight_stride_b, weight_stride_t,
                                                token_splits, stream);
  });
}
