// Launchers of the CUDA kernels, callable without torch headers (plain pointers and a stream).
// Every launcher returns the cudaError_t of its launch (0 on success).
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum SensiloraDtype { SENSILORA_FLOAT32 = 0, SENSILORA_FLOAT16 = 1, SENSILORA_BFLOAT16 = 2 };

// acc[j] += sum over real tokens of w[b, t] * x[b, t, j]^2; x is (batch, seq_len, d) with element strides;
// mask is (batch, seq_len) uint8 with its strides, or NULL for no padding; weight (batch, seq_len) fp32 with
// its strides, or NULL for w = 1.
int sensilora_column_sumsq(float* acc, const void* x, int dtype, const uint8_t* mask, const float* weight,
                           int64_t batch, int64_t seq_len, int64_t d, int64_t stride_b, int64_t stride_t,
                           int64_t stride_d, int64_t mask_stride_b, int64_t mask_stride_t, int64_t weight_stride_b,
                           int64_t weight_stride_t, int token_splits, cudaStream_t stream);

// One radix-select pass over `bits` bits (1..10, or 11 on the first pass, shift + bits = 31, where both
// prefixes are 0): for every block of block_elems values (block_segment/block_start from the block table),
// add counts and sums of the values whose bits above shift+bits equal prefix[seg, target] into
// hist_count/hist_sum[seg, target, (key >> shift) & (2^bits - 1)], for both targets (0 and 1). A block's
// sums are exact (64-bit fixed point), converted to fp64 once; its total multiplicity must stay below 2^39.
// With candidates non-NULL (only without counts) the pass also writes every value that matches a target to
// candidates[candidate_offsets[seg] + n], n counted in candidate_cursor[seg] (zeroed by the caller; room for
// the targets' matching elements, known from the previous pass's counts), in no particular order.
int sensilora_radix_histogram(const float* values, const int64_t* counts, const int64_t* block_segment,
                              const int64_t* block_start, const int64_t* offsets, const int64_t* prefix,
                              int shift, int bits, int64_t num_blocks, int block_elems,
                              unsigned long long* hist_count, double* hist_sum, float* candidates,
                              const int64_t* candidate_offsets, unsigned long long* candidate_cursor,
                              cudaStream_t stream);

// The same pass over the obs saliencies (w_ij * w_ij) * reciprocal[j] in fp32 of one (d_out, d_in) weight
// (dtype code, element strides), element i being (i / d_in, i % d_in), reciprocal[j] = 1 / [H^-1]_jj; the
// saliencies are computed on the fly and never stored (only the candidates, when asked for).
int sensilora_saliency_histogram(const void* weight, int dtype, const float* reciprocal, int64_t d_in,
                                 int64_t stride_row, int64_t stride_col, const int64_t* block_segment,
                                 const int64_t* block_start, const int64_t* offsets, const int64_t* prefix,
                                 int shift, int bits, int64_t num_blocks, int block_elems,
                                 unsigned long long* hist_count, double* hist_sum, float* candidates,
                                 const int64_t* candidate_offsets, unsigned long long* candidate_cursor,
                                 cudaStream_t stream);

#ifdef __cplusplus
}
#endif
