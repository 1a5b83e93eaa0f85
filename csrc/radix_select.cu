// One pass of the exact radix selection (see sensilora_kernels/radix_select.py for the driver). Per block,
// 2 x 256-bucket histograms of counts and sums in shared memory, flushed with one global atomic per non-empty
// bucket. Designed for the shared-memory atomic units (sm_90 SASS, csrc/compile_check.sh):
//  - only 32-bit shared atomics (ATOMS.ADD, native): 64-bit or fp64 shared atomics compile to
//    compare-and-swap loops (ATOMS.CAST.SPIN.64) that spin under the contention of clustered exponents;
//  - sums exact in fixed point: every value a pass can put in one bucket shares its float's top 8 bits
//    (sign and the exponent's top 7: two binades), so it is an integer below 2^25 in units of
//    2^(unit_exponent) and a bucket's sum is an exact 64-bit integer, kept as two 32-bit words with carry
//    (converted to fp64 once, at the flush);
//  - warp aggregation: the lanes of a warp with the same bucket are found with one MATCH.ANY, their counts
//    and sums added with REDUX.SUM, and one lane adds them: clustered data costs a few atomics per warp;
//  - while both targets share their prefix (the whole first pass, and often later) one histogram serves both;
//  - 4 loads in flight per thread, no 64-bit division per element (the saliency's row/column advance by
//    carry).
// The values come from a flat fp32 array (with optional multiplicities) or, fused, from one weight matrix
// as the obs saliencies w_ij^2 / inverse_j, which are never stored.
#include "dtype.cuh"
#include "launch.cuh"
#include "sensilora_kernels.h"

namespace {

constexpr int kBuckets = 256;
constexpr int kThreads = 256;
constexpr int kUnroll = 4;  // elements a thread loads before it adds any of them
constexpr unsigned kFullWarp = 0xFFFFFFFFu;
constexpr unsigned kNoBucket = 0xFFFFFFFFu;  // a lane whose element matches neither target (or is past the end)

template <bool kWithCounts>
struct FlatValues {
  static constexpr bool kHasCounts = kWithCounts;
  const float* values;
  const int64_t* counts;  // read only when kHasCounts: every value counts once otherwise
  __device__ void seek(int64_t) {}
  __device__ float value(int64_t i) const { return values[i]; }
  __device__ unsigned long long count(int64_t i) const { return static_cast<unsigned long long>(counts[i]); }
};

template <typename T>
struct Saliencies {  // element i is (i / d_in, i % d_in) of a (d_out, d_in) weight with element strides
  static constexpr bool kHasCounts = false;
  const T* weight;
  const float* inverse;
  int64_t d_in, stride_row, stride_col;
  // the element most recently given to seek/value: its column and its offset in weight, advanced by
  // kThreads elements a call with a carry into the row (no multiplication or division per element)
  int64_t col = 0, offset = 0;
  __device__ void seek(int64_t i) {  // the thread's first element: one division per thread and block
    const int64_t row = i / d_in;
    col = i - row * d_in;
    offset = row * stride_row + col * stride_col;
  }
  __device__ float value(int64_t) {
    const float w = to_float(weight[offset]);
    const float s = w * w / inverse[col];  // IEEE division (no fast-math): the torch reference's fp32 operations
    col += kThreads;
    offset += kThreads * stride_col;
    while (col >= d_in) {
      col -= d_in;
      offset += stride_row - d_in * stride_col;
    }
    return s;
  }
};

// A non-negative fp32 value (bit pattern key) as an exact integer below 2^25 in units of
// 2^unit_exponent(key >> 24): value = mantissa (with the implicit bit when normal) x 2^(max(e, 1) - 150).
__device__ __forceinline__ unsigned fixed_point(unsigned key) {
  const unsigned exponent = key >> 23;
  const unsigned mantissa = (key & 0x7FFFFFu) | (exponent != 0 ? 0x800000u : 0u);
  const unsigned unit = max(2u * (key >> 24), 1u);  // the smaller of the two binades' exponent fields
  return mantissa << (max(exponent, 1u) - unit);
}

__device__ __forceinline__ int unit_exponent(unsigned top_bits) { return max(2 * static_cast<int>(top_bits), 1) - 150; }

// *word += value exactly, a 64-bit unsigned kept as two 32-bit shared words (native 32-bit atomics): the
// one add that wraps the low word sees it wrap in its returned old value and carries into the high word.
__device__ __forceinline__ void add_wide(unsigned* low, unsigned* high, unsigned long long value) {
  const unsigned add_low = static_cast<unsigned>(value), add_high = static_cast<unsigned>(value >> 32);
  const unsigned old = atomicAdd(low, add_low);
  const unsigned carry = old + add_low < old ? 1u : 0u;
  if (add_high + carry != 0u) atomicAdd(high, add_high + carry);
}

struct SharedHistograms {  // [word: 0 low, 1 high][target][bucket]
  unsigned count[2][2][kBuckets];
  unsigned sum[2][2][kBuckets];
  __device__ void add(int slot, unsigned long long count_value, unsigned long long sum_value) {
    add_wide(&count[0][0][0] + slot, &count[1][0][0] + slot, count_value);
    add_wide(&sum[0][0][0] + slot, &sum[1][0][0] + slot, sum_value);
  }
  __device__ unsigned long long wide(const unsigned (&words)[2][2][kBuckets], int slot) const {
    return (static_cast<unsigned long long>((&words[1][0][0])[slot]) << 32) | (&words[0][0][0])[slot];
  }
};

template <typename Source>
__global__ void radix_histogram_kernel(Source source, const int64_t* block_segment, const int64_t* block_start,
                                       const int64_t* offsets, const int64_t* prefix, int shift, int block_elems,
                                       unsigned long long* hist_count, double* hist_sum) {
  __shared__ SharedHistograms local;
  for (int i = threadIdx.x; i < 2 * 2 * kBuckets; i += blockDim.x) {
    (&local.count[0][0][0])[i] = 0u;
    (&local.sum[0][0][0])[i] = 0u;
  }
  __syncthreads();
  const int64_t segment = block_segment[blockIdx.x];
  const int64_t start = block_start[blockIdx.x];
  const int64_t end = min(start + block_elems, offsets[segment + 1]);
  const int64_t prefix0 = prefix[segment * 2], prefix1 = prefix[segment * 2 + 1];
  const bool shared_prefix = prefix0 == prefix1;  // one histogram serves both targets
  const int64_t second_prefix = shared_prefix ? -1 : prefix1;  // -1 matches no element (keys are >= 0)
  const unsigned lane = threadIdx.x & 31u;
  source.seek(start + threadIdx.x);
  // Every thread runs the same number of iterations (warp intrinsics need the whole warp); past the end a
  // lane loads nothing and takes part with kNoBucket.
  for (int64_t base = start; base < end; base += kUnroll * kThreads) {
    float v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kThreads + threadIdx.x;
      v[u] = i < end ? source.value(i) : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kThreads + threadIdx.x;
      const unsigned key = static_cast<unsigned>(__float_as_int(v[u]));
      const int64_t high = static_cast<int64_t>(key) >> (shift + 8);
      const unsigned bucket = (key >> shift) & (kBuckets - 1);
      unsigned label = kNoBucket;
      if (i < end && high == prefix0) label = bucket;
      else if (i < end && high == second_prefix) label = kBuckets + bucket;
      const unsigned fixed = fixed_point(key);
      if constexpr (Source::kHasCounts) {  // few elements (one per column in diag mode): no aggregation
        if (label != kNoBucket) {
          const unsigned long long c = source.count(i);
          local.add(static_cast<int>(label), c, c * fixed);
        }
        continue;
      }
      // Past the first pass most warps hold no element of the targets' buckets: they skip the aggregation.
      if (!__any_sync(kFullWarp, label != kNoBucket)) continue;
      const unsigned peers = __match_any_sync(kFullWarp, label);
      const unsigned group_sum = __reduce_add_sync(peers, fixed);  // < 32 x 2^25: no overflow
      if (label != kNoBucket && lane == static_cast<unsigned>(__ffs(peers) - 1))
        local.add(static_cast<int>(label), static_cast<unsigned long long>(__popc(peers)), group_sum);
    }
  }
  __syncthreads();
  for (int slot = threadIdx.x; slot < 2 * kBuckets; slot += blockDim.x) {
    const int source_slot = shared_prefix ? slot % kBuckets : slot;
    const unsigned long long count = local.wide(local.count, source_slot);
    if (count == 0ull) continue;
    const int target = slot / kBuckets, bucket = slot % kBuckets;
    const int64_t target_prefix = target == 0 ? prefix0 : prefix1;
    const int64_t slot_bits = (target_prefix << (shift + 8)) | (static_cast<int64_t>(bucket) << shift);
    const unsigned top_bits = static_cast<unsigned>(slot_bits >> 24);  // sign and top 7 exponent bits
    const double sum = ldexp(static_cast<double>(local.wide(local.sum, source_slot)), unit_exponent(top_bits));
    const int64_t global_slot = segment * 2 * kBuckets + slot;
    atomicAdd(hist_count + global_slot, count);
    atomicAdd(hist_sum + global_slot, sum);
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
  if (counts != nullptr)
    return launch(FlatValues<true>{values, counts}, block_segment, block_start, offsets, prefix, shift, num_blocks,
                  block_elems, hist_count, hist_sum, stream);
  return launch(FlatValues<false>{values, counts}, block_segment, block_start, offsets, prefix, shift, num_blocks,
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
