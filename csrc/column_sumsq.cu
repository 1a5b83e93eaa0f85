// Per-column sums of squared activations: one thread per column, coalesced across a warp, each block
// streaming a slice of the tokens; fp32 accumulation, one atomicAdd per column per block.
#include "dtype.cuh"
#include "launch.cuh"
#include "sensilora_kernels.h"

namespace {

template <typename T>
__global__ void column_sumsq_kernel(float* acc, const T* x, const uint8_t* mask, int64_t n_tokens, int64_t seq_len,
                                    int64_t d, int64_t tokens_per_block, int64_t stride_b, int64_t stride_t,
                                    int64_t stride_d, int64_t mask_stride_b, int64_t mask_stride_t) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= d) return;
  const int64_t start = static_cast<int64_t>(blockIdx.y) * tokens_per_block;
  const int64_t end = min(start + tokens_per_block, n_tokens);
  float sum = 0.f;
  for (int64_t row = start; row < end; ++row) {
    const int64_t b = row / seq_len, t = row % seq_len;
    if (mask != nullptr && mask[b * mask_stride_b + t * mask_stride_t] == 0) continue;
    const float v = to_float(x[b * stride_b + t * stride_t + col * stride_d]);
    sum = fmaf(v, v, sum);
  }
  atomicAdd(acc + col, sum);
}

template <typename T>
int launch(float* acc, const void* x, const uint8_t* mask, int64_t batch, int64_t seq_len, int64_t d,
           int64_t stride_b, int64_t stride_t, int64_t stride_d, int64_t mask_stride_b, int64_t mask_stride_t,
           int token_splits, cudaStream_t stream) {
  const int threads = 128;
  const int64_t n_tokens = batch * seq_len;
  if (n_tokens == 0 || d == 0) return 0;
  const int splits = token_splits < 1 ? 1 : token_splits;
  const int64_t per_block = (n_tokens + splits - 1) / splits;
  const dim3 grid(static_cast<unsigned>((d + threads - 1) / threads), static_cast<unsigned>(splits));
  SENSILORA_LAUNCH(column_sumsq_kernel<T>, grid, threads, stream, acc, static_cast<const T*>(x), mask, n_tokens,
                   seq_len, d, per_block, stride_b, stride_t, stride_d, mask_stride_b, mask_stride_t);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" int sensilora_column_sumsq(float* acc, const void* x, int dtype, const uint8_t* mask, int64_t batch,
                                      int64_t seq_len, int64_t d, int64_t stride_b, int64_t stride_t,
                                      int64_t stride_d, int64_t mask_stride_b, int64_t mask_stride_t,
                                      int token_splits, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    return launch<typename decltype(tag)::type>(acc, x, mask, batch, seq_len, d, stride_b, stride_t, stride_d,
                                                mask_stride_b, mask_stride_t, token_splits, stream);
  });
}
