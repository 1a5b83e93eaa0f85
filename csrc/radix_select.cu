// One pass of the exact radix selection (see sensilora_kernels/selection.py for the driver): per block,
// 2 x 256-bucket histograms of counts and fp64 sums in shared memory, flushed with one global atomic
// per non-empty bucket, so that clustered exponents do not serialise on global atomics.
#include "sensilora_kernels.h"

namespace {

constexpr int kBuckets = 256;

__global__ void radix_histogram_kernel(const float* values, const int64_t* counts, const int64_t* block_segment,
                                       const int64_t* block_start, const int64_t* offsets, const int64_t* prefix,
                                       int shift, int block_elems, unsigned long long* hist_count,
                                       double* hist_sum) {
  __shared__ unsigned long long local_count[2][kBuckets];
  __shared__ double local_sum[2][kBuckets];
  for (int i = threadIdx.x; i < 2 * kBuckets; i += blockDim.x) {
    local_count[i / kBuckets][i % kBuckets] = 0ull;
    local_sum[i / kBuckets][i % kBuckets] = 0.0;
  }
  __syncthreads();
  const int64_t segment = block_segment[blockIdx.x];
  const int64_t start = block_start[blockIdx.x];
  const int64_t end = min(start + block_elems, offsets[segment + 1]);
  const int64_t prefix0 = prefix[segment * 2], prefix1 = prefix[segment * 2 + 1];
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    const float v = values[i];
    const int64_t key = static_cast<int64_t>(__float_as_int(v));
    const int bucket = static_cast<int>((key >> shift) & (kBuckets - 1));
    const int64_t high = key >> (shift + 8);
    const unsigned long long c = counts != nullptr ? static_cast<unsigned long long>(counts[i]) : 1ull;
    const double weighted = static_cast<double>(v) * static_cast<double>(c);
    if (high == prefix0) {
      atomicAdd(&local_count[0][bucket], c);
      atomicAdd(&local_sum[0][bucket], weighted);
    }
    if (high == prefix1) {
      atomicAdd(&local_count[1][bucket], c);
      atomicAdd(&local_sum[1][bucket], weighted);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 2 * kBuckets; i += blockDim.x) {
    const int target = i / kBuckets, bucket = i % kBuckets;
    if (local_count[target][bucket] != 0ull) {
      const int64_t slot = (segment * 2 + target) * kBuckets + bucket;
      atomicAdd(hist_count + slot, local_count[target][bucket]);
      atomicAdd(hist_sum + slot, local_sum[target][bucket]);
    }
  }
}

}  // namespace

extern "C" int sensilora_radix_histogram(const float* values, const int64_t* counts, const int64_t* block_segment,
                                         const int64_t* block_start, const int64_t* offsets, const int64_t* prefix,
                                         int shift, int64_t num_blocks, int block_elems,
                                         unsigned long long* hist_count, double* hist_sum, cudaStream_t stream) {
  if (num_blocks == 0) return 0;
  radix_histogram_kernel<<<static_cast<unsigned>(num_blocks), 256, 0, stream>>>(
      values, counts, block_segment, block_start, offsets, prefix, shift, block_elems, hist_count, hist_sum);
  return static_cast<int>(cudaGetLastError());
}
