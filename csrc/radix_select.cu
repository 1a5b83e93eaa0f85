// One pass of the exact radix selection (see sensilora_kernels/selection.py for the driver): per block,
// 2 x 256-bucket histograms of counts and fp64 sums in shared memory, flushed with one global atomic
// per non-empty bucket, so that clustered exponents do not serialise on global atomics. The values come
// either from a flat fp32 array (with optional multiplicities) or, fused, from one weight matrix as the
// obs saliencies w_ij^2 / inverse_j, which are never stored.
#include "dtype.cuh"
#include "launch.cuh"
#include "sensilora_kernels.h"

namespace {

constexpr int kBuckets = 256;
constexpr int kThreads = 256;

struct FlatValues {
  const float* values;
  const int64_t* counts;  // nullptr: every value counts once
  __device__ float value(int64_t i) const { return values[i]; }
  __device__ unsigned long long count(int64_t i) const {
    return counts != nullptr ? static_cast<unsigned long long>(counts[i]) : 1ull;
  }
};

template <typename T>
struct Saliencies {  // element i is (i / d_in, i % d_in) of a (d_out, d_in) weight with element strides
  const T* weight;
  const float* inverse;
  int64_t d_in, stride_row, stride_col;
  __device__ float value(int64_t i) const {
    const int64_t row = i / d_in, col = i % d_in;
    const float w = to_float(weight[row * stride_row + col * stride_col]);
    return w * w / inverse[col];  // the same fp32 operations as the torch reference
  }
  __device__ unsigned long long count(int64_t) const { return 1ull; }
};

template <typename Source>
__global__ void radix_histogram_kernel(Source source, const int64_t* block_segment, const int64_t* block_start,
                                       const int64_t* offsets, const int64_t* prefix, int shift, int block_elems,
                                       unsigned long long* hist_count, double* hist_sum) {
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
    const float v = source.value(i);
    const int64_t key = static_cast<int64_t>(__float_as_int(v));
    const int bucket = static_cast<int>((key >> shift) & (kBuckets - 1));
    const int64_t high = key >> (shift + 8);
    const unsigned long long c = source.count(i);
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

template <typename Source>
int launch(Source source, const int64_t* block_segment, const int64_t* block_start, const int64_t* offsets,
           const int64_t* prefix, int shift, int64_t num_blocks, int block_elems, unsigned long long* hist_count,
           double* hist_sum, cudaStream_t stream) {
  if (num_blocks == 0) return 0;
  SENSILORA_LAUNCH(radix_histogram_kernel<Source>, static_cast<unsigned>(num_blocks), kThreads, stream, source,
                   block_segment, block_start, offsets, prefix, shift, block_elems, hist_count, hist_sum);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" int sensilora_radix_histogram(const float* values, const int64_t* counts, const int64_t* block_segment,
                                         const int64_t* block_start, const int64_t* offsets, const int64_t* prefix,
                                         int shift, int64_t num_blocks, int block_elems,
                                         unsigned long long* hist_count, double* hist_sum, cudaStream_t stream) {
  return launch(FlatValues{values, counts}, block_segment, block_start, offsets, prefix, shift, num_blocks,
                block_elems, hist_count, hist_sum, stream);
}

extern "C" int sensilora_saliency_histogram(const void* weight, int dtype, const float* inverse, int64_t d_in,
                                            int64_t stride_row, int64_t stride_col, const int64_t* block_segment,
                                            const int64_t* block_start, const int64_t* offsets, const int64_t* prefix,
                                            int shift, int64_t num_blocks, int block_elems,
                                            unsigned long long* hist_count, double* hist_sum, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const Saliencies<T> source{static_cast<const T*>(weight), inverse, d_in, stride_row, stride_col};
    return launch(source, block_segment, block_start, offsets, prefix, shift, num_blocks, block_elems, hist_count,
                  hist_sum, stream);
  });
}
