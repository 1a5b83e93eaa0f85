// One pass of the exact radix selection (see sensilora_kernels/radix_select.py for the driver). Per block,
// histograms of counts and sums over the next `bits` bits in shared memory (2048 slots: one 2048-bucket
// histogram on the first pass, where both targets share the empty prefix, or 2 x 1024 after), flushed with
// one global atomic per non-empty bucket. Designed for the shared-memory atomic units (sm_90 SASS,
// csrc/compile_check.sh):
//  - only 32-bit shared atomics (ATOMS.ADD, native): 64-bit or fp64 shared atomics compile to
//    compare-and-swap loops (ATOMS.CAST.SPIN.64) that spin under the contention of clustered exponents;
//  - sums exact in fixed point: every value a pass can put in one bucket shares its float's top 8 bits
//    (sign and the exponent's top 7: two binades), so it is an integer below 2^25 in units of
//    2^(unit_exponent) and a bucket's sum is an exact 64-bit integer, kept as two 32-bit words with carry
//    (converted to fp64 once, at the flush);
//  - warp aggregation: the lanes of a warp with the same bucket are found with one MATCH.ANY, their counts
//    and sums added with REDUX.SUM, and one lane adds them: clustered data costs a few atomics per warp;
//  - while both targets share their prefix (the whole first pass, and often later) one histogram serves both;
//  - 4 loads in flight per thread, no 64-bit division or fp32 division per element (the saliency's
//    row/column advance by carry; it multiplies by the column's reciprocal, as the reference does);
//  - fewest passes over the data: 3 passes of 11, 10 and 10 bits (the sign bit of a non-negative value is
//    0), and the second pass also compacts the elements that still match a target (a 1/8-binade bucket of
//    the first pass: a few percent of a weight's saliencies) into a candidate buffer, through a per-warp
//    shared stage flushed with one global atomic per 128-256 candidates; the third pass reads only those.
// The values come from a flat fp32 array (with optional multiplicities) or, fused, from one weight matrix
// as the obs saliencies w_ij^2 * reciprocal_j, which are never stored (only the candidates are).
#include "dtype.cuh"
#include "launch.cuh"
#include "sensilora_kernels.h"

namespace {

constexpr int kSlots = 2048;   // shared histogram slots: 2^11 buckets for one target, or 2 x 2^10
constexpr int kMaxBits = 11;   // widest pass; only the first (shared, empty prefix) may use it
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;     // elements a thread loads before it adds any of them
constexpr int kStage = 256;    // candidates a warp collects in shared memory before one global reservation
constexpr unsigned kFullWarp = 0xFFFFFFFFu;
constexpr unsigned kNoBucket = 0xFFFFFFFFu;  // a lane whose element matches neither target (or is past the end)
constexpr unsigned kNoPrefix = 0xFFFFFFFFu;  // the second target's prefix while both share the first

// A source of values: seek(i) before the thread's first element i, then value() gives elements i,
// i + kThreads, i + 2 kThreads, ... in turn (no index arithmetic per element).
template <bool kWithCounts>
struct FlatValues {
  static constexpr bool kHasCounts = kWithCounts;
  const float* values;
  const int64_t* counts;  // read only when kHasCounts: every value counts once otherwise
  const float* next = nullptr;
  __device__ void seek(int64_t i) { next = values + i; }
  __device__ float value() {
    const float v = *next;
    next += kThreads;
    return v;
  }
  __device__ unsigned long long count(int64_t i) const { return static_cast<unsigned long long>(counts[i]); }
};

template <typename T>
struct Saliencies {  // element i is (i / d_in, i % d_in) of a (d_out, d_in) weight with element strides
  static constexpr bool kHasCounts = false;
  const T* weight;
  const float* reciprocal;  // 1 / [H^-1]_jj, rounded once per column (the reference's operations)
  int64_t d_in, stride_row, stride_col;
  // the next element's column (32-bit: d_in < 2^31) and offset in weight, advanced by kThreads elements a
  // call: col_step columns and offset_step, with one carry into the next row (no multiplication, division
  // or loop per element)
  int col = 0, col_step = 0, columns = 0;
  int64_t offset = 0, offset_step = 0, wrap = 0;
  __device__ void seek(int64_t i) {  // the thread's first element: the divisions once per thread and block
    const int64_t row = i / d_in, row_step = kThreads / d_in;
    col = static_cast<int>(i - row * d_in);
    offset = row * stride_row + col * stride_col;
    col_step = static_cast<int>(kThreads - row_step * d_in);
    offset_step = row_step * stride_row + col_step * stride_col;
    wrap = stride_row - d_in * stride_col;
    columns = static_cast<int>(d_in);
  }
  __device__ float value() {
    const float w = to_float(weight[offset]);
    const float s = w * w * reciprocal[col];  // fp32, rounded as the reference rounds: (w * w) * r
    col += col_step;
    offset += offset_step;
    if (col >= columns) {  // col_step < d_in: one row at most
      col -= columns;
      offset += wrap;
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

struct SharedHistograms {  // [word: 0 low, 1 high][slot: target * buckets + bucket]
  unsigned count[2][kSlots];
  unsigned sum[2][kSlots];
  __device__ void add(int slot, unsigned long long count_value, unsigned long long sum_value) {
    add_wide(&count[0][slot], &count[1][slot], count_value);
    add_wide(&sum[0][slot], &sum[1][slot], sum_value);
  }
  // Elements without multiplicities: a block counts fewer than 2^31 of them, so the count's high word stays 0.
  __device__ void add_elements(int slot, unsigned elements, unsigned long long sum_value) {
    atomicAdd(&count[0][slot], elements);
    add_wide(&sum[0][slot], &sum[1][slot], sum_value);
  }
  __device__ unsigned long long wide(const unsigned (&words)[2][kSlots], int slot) const {
    return (static_cast<unsigned long long>(words[1][slot]) << 32) | words[0][slot];
  }
};

// Where the compacting pass writes the elements that still match a target: segment s's candidates go to
// values[offsets[s] + ...), cursor[s] counting those reserved so far.
struct Candidates {
  float* values;
  const int64_t* offsets;
  unsigned long long* cursor;
};

// One warp's stage of candidates in shared memory: lanes append with a ballot, the warp writes the stage out
// (coalesced) after one global atomic reserves its room; `fill` is the same in every lane.
struct WarpStage {
  float* slots;  // kStage floats of this warp
  int fill = 0;
  __device__ void flush(const Candidates& out, int64_t segment, unsigned lane) {
    __syncwarp();  // the stage's writes are seen by the whole warp
    unsigned long long base = 0;
    if (lane == 0) base = atomicAdd(out.cursor + segment, static_cast<unsigned long long>(fill));
    base = __shfl_sync(kFullWarp, base, 0);
    float* destination = out.values + out.offsets[segment] + base;
#pragma unroll 1  // at most kStage / 32 steps, once per kStage / 2 candidates or more: kept short
    for (int j = static_cast<int>(lane); j < fill; j += 32) destination[j] = slots[j];
    __syncwarp();  // read before the next appends overwrite
    fill = 0;
  }
  // Room for one loop iteration's candidates (kUnroll x 32) is made before the iteration, not per element.
  __device__ void make_room(const Candidates& out, int64_t segment, unsigned lane) {
    if (fill > kStage - kUnroll * 32) flush(out, segment, lane);
  }
  __device__ void append(unsigned lane, unsigned wanted, bool mine, float v) {
    if (mine) slots[fill + __popc(wanted & ((1u << lane) - 1u))] = v;
    fill += __popc(wanted);
  }
};

template <typename Source, bool kCompact>
__global__ void radix_histogram_kernel(Source source, const int64_t* block_segment, const int64_t* block_start,
                                       const int64_t* offsets, const int64_t* prefix, int shift, int bits,
                                       int block_elems, unsigned long long* hist_count, double* hist_sum,
                                       Candidates candidates) {
  __shared__ SharedHistograms local;
  __shared__ float stage_slots[kCompact ? kWarps : 1][kStage];
  for (int i = threadIdx.x; i < 2 * kSlots; i += blockDim.x) {
    (&local.count[0][0])[i] = 0u;
    (&local.sum[0][0])[i] = 0u;
  }
  __syncthreads();
  const int buckets = 1 << bits;
  const int64_t segment = block_segment[blockIdx.x];
  const int64_t start = block_start[blockIdx.x];
  const int elements = static_cast<int>(min(static_cast<int64_t>(block_elems), offsets[segment + 1] - start));
  // 32-bit prefixes (shift + bits <= 31, so key >> (shift + bits) < 2^31 and kNoPrefix matches nothing)
  const unsigned prefix0 = static_cast<unsigned>(prefix[segment * 2]);
  const unsigned prefix1 = static_cast<unsigned>(prefix[segment * 2 + 1]);
  // One histogram serves both targets while they share a prefix; the 11-bit first pass has only room for one
  // (its prefixes are both 0: the sign of a non-negative value).
  const bool shared_prefix = prefix0 == prefix1 || bits == kMaxBits;
  const unsigned second_prefix = shared_prefix ? kNoPrefix : prefix1;
  const unsigned lane = threadIdx.x & 31u;
  WarpStage stage{stage_slots[kCompact ? threadIdx.x / 32 : 0]};
  source.seek(start + threadIdx.x);
  // Every thread runs the same number of iterations (warp intrinsics need the whole warp); past the end a
  // lane loads nothing and takes part with kNoBucket.
  for (int base = 0; base < elements; base += kUnroll * kThreads) {
    if constexpr (kCompact) stage.make_room(candidates, segment, lane);
    float v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      v[u] = base + u * kThreads + static_cast<int>(threadIdx.x) < elements ? source.value() : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const bool inside = base + u * kThreads + static_cast<int>(threadIdx.x) < elements;
      const unsigned key = static_cast<unsigned>(__float_as_int(v[u]));
      const unsigned high = key >> (shift + bits);
      const unsigned bucket = (key >> shift) & static_cast<unsigned>(buckets - 1);
      unsigned label = kNoBucket;
      if (inside && high == prefix0) label = bucket;
      else if (inside && high == second_prefix) label = buckets + bucket;
      const unsigned fixed = fixed_point(key);
      if constexpr (Source::kHasCounts) {  // few elements (one per column in diag mode): no aggregation
        if (label != kNoBucket) {
          const unsigned long long c = source.count(start + base + u * kThreads + threadIdx.x);
          local.add(static_cast<int>(label), c, c * fixed);
        }
        continue;
      }
      // Past the first pass most warps hold no element of the targets' buckets: they skip the aggregation.
      const unsigned wanted = __ballot_sync(kFullWarp, label != kNoBucket);
      if (wanted == 0u) continue;
      if constexpr (kCompact) stage.append(lane, wanted, label != kNoBucket, v[u]);
      const unsigned peers = __match_any_sync(kFullWarp, label);
      const unsigned group_sum = __reduce_add_sync(peers, fixed);  // < 32 x 2^25: no overflow
      if (label != kNoBucket && lane == static_cast<unsigned>(__ffs(peers) - 1))
        local.add_elements(static_cast<int>(label), static_cast<unsigned>(__popc(peers)), group_sum);
    }
  }
  if constexpr (kCompact) {
    if (stage.fill > 0) stage.flush(candidates, segment, lane);
  }
  __syncthreads();
  for (int slot = threadIdx.x; slot < 2 * buckets; slot += blockDim.x) {
    const int source_slot = shared_prefix ? slot % buckets : slot;
    const unsigned long long count = local.wide(local.count, source_slot);
    if (count == 0ull) continue;
    const int target = slot / buckets, bucket = slot % buckets;
    const unsigned target_prefix = target == 0 ? prefix0 : prefix1;
    const int64_t slot_bits =
        (static_cast<int64_t>(target_prefix) << (shift + bits)) | (static_cast<int64_t>(bucket) << shift);
    const unsigned top_bits = static_cast<unsigned>(slot_bits >> 24);  // sign and top 7 exponent bits
    const double sum = ldexp(static_cast<double>(local.wide(local.sum, source_slot)), unit_exponent(top_bits));
    const int64_t global_slot = segment * 2 * buckets + slot;
    atomicAdd(hist_count + global_slot, count);
    atomicAdd(hist_sum + global_slot, sum);
  }
}

template <typename Source>
int launch(Source source, const int64_t* block_segment, const int64_t* block_start, const int64_t* offsets,
           const int64_t* prefix, int shift, int bits, int64_t num_blocks, int block_elems,
           unsigned long long* hist_count, double* hist_sum, const Candidates& candidates, cudaStream_t stream) {
  // 2 x 2^bits slots (2^11 only on the first pass, whose prefixes are both empty); shift + bits <= 31.
  if (bits < 1 || bits > kMaxBits || (bits == kMaxBits && shift + bits < 31) || shift < 0 || shift + bits > 31)
    return static_cast<int>(cudaErrorInvalidValue);
  if (num_blocks == 0) return 0;
  auto* kernel = &radix_histogram_kernel<Source, false>;
  if (candidates.values != nullptr) {
    if constexpr (Source::kHasCounts) return static_cast<int>(cudaErrorInvalidValue);  // multiplicities: no compaction
    else kernel = &radix_histogram_kernel<Source, true>;
  }
  SENSILORA_LAUNCH(kernel, static_cast<unsigned>(num_blocks), kThreads, stream, source, block_segment, block_start,
                   offsets, prefix, shift, bits, block_elems, hist_count, hist_sum, candidates);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" int sensilora_radix_histogram(const float* values, const int64_t* counts, const int64_t* block_segment,
                                         const int64_t* block_start, const int64_t* offsets, const int64_t* prefix,
                                         int shift, int bits, int64_t num_blocks, int block_elems,
                                         unsigned long long* hist_count, double* hist_sum, float* candidates,
                                         const int64_t* candidate_offsets, unsigned long long* candidate_cursor,
                                         cudaStream_t stream) {
  const Candidates out{candidates, candidate_offsets, candidate_cursor};
  if (counts != nullptr)
    return launch(FlatValues<true>{values, counts}, block_segment, block_start, offsets, prefix, shift, bits,
                  num_blocks, block_elems, hist_count, hist_sum, out, stream);
  return launch(FlatValues<false>{values, counts}, block_segment, block_start, offsets, prefix, shift, bits,
                num_blocks, block_elems, hist_count, hist_sum, out, stream);
}

extern "C" int sensilora_saliency_histogram(const void* weight, int dtype, const float* reciprocal, int64_t d_in,
                                            int64_t stride_row, int64_t stride_col, const int64_t* block_segment,
                                            const int64_t* block_start, const int64_t* offsets, const int64_t* prefix,
                                            int shift, int bits, int64_t num_blocks, int block_elems,
                                            unsigned long long* hist_count, double* hist_sum, float* candidates,
                                            const int64_t* candidate_offsets, unsigned long long* candidate_cursor,
                                            cudaStream_t stream) {
  const Candidates out{candidates, candidate_offsets, candidate_cursor};
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const Saliencies<T> source{static_cast<const T*>(weight), reciprocal, d_in, stride_row, stride_col};
    return launch(source, block_segment, block_start, offsets, prefix, shift, bits, num_blocks, block_elems,
                  hist_count, hist_sum, out, stream);
  });
}
