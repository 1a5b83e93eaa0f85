// torch bindings of the CUDA kernels: ops sensilora_cuda::column_sumsq_, radix_histogram_ and
// saliency_histogram_, registered for the CUDA dispatch key.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "sensilora_kernels.h"

namespace {

void check_cuda(int status, const char* what) {
  TORCH_CHECK(status == 0, "sensilora_kernels._C: ", what, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(status)));
}

int dtype_code(const at::Tensor& x, const char* op) {
  switch (x.scalar_type()) {
    case at::kFloat: return SENSILORA_FLOAT32;
    case at::kHalf: return SENSILORA_FLOAT16;
    case at::kBFloat16: return SENSILORA_BFLOAT16;
    default: TORCH_CHECK(false, "sensilora_kernels._C.", op, ": expected fp32, fp16 or bf16, got ", x.scalar_type());
  }
  return -1;
}

void check_histograms(const at::Tensor& hist_count, const at::Tensor& hist_sum, const char* op) {
  TORCH_CHECK(hist_count.scalar_type() == at::kLong && hist_sum.scalar_type() == at::kDouble &&
                  hist_count.is_contiguous() && hist_sum.is_contiguous(),
              op, ": hist_count must be contiguous int64 and hist_sum contiguous fp64");
}

void column_sumsq_(at::Tensor acc, const at::Tensor& x, const std::optional<at::Tensor>& mask,
                   const std::optional<at::Tensor>& row_weight) {
  TORCH_CHECK(x.dim() == 3, "column_sumsq_: x must be a (batch, seq, d) view");
  TORCH_CHECK(acc.scalar_type() == at::kFloat && acc.is_contiguous() && acc.numel() == x.size(2),
              "column_sumsq_: acc must be a contiguous fp32 vector of length d");
  const uint8_t* mask_ptr = nullptr;
  int64_t msb = 0, mst = 0;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kByte && mask->dim() == 2, "column_sumsq_: mask must be (batch, seq) uint8");
    mask_ptr = mask->data_ptr<uint8_t>();
    msb = mask->stride(0);
    mst = mask->stride(1);
  }
  const float* weight_ptr = nullptr;
  int64_t wsb = 0, wst = 0;
  if (row_weight.has_value()) {
    TORCH_CHECK(row_weight->scalar_type() == at::kFloat && row_weight->dim() == 2,
                "column_sumsq_: row_weight must be (batch, seq) fp32");
    weight_ptr = row_weight->data_ptr<float>();
    wsb = row_weight->stride(0);
    wst = row_weight->stride(1);
  }
  const c10::cuda::CUDAGuard guard(x.device());
  int sms = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.device().index()), "multiprocessor count");
  const int64_t columns_per_block = 128 * (16 / x.element_size());  // 128 threads, 16 bytes each when vectorised
  const int64_t column_blocks = (x.size(2) + columns_per_block - 1) / columns_per_block;
  const int64_t tokens = x.size(0) * x.size(1);
  const int splits = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(4 * sms / std::max<int64_t>(column_blocks, 1), tokens / 64)));
  check_cuda(sensilora_column_sumsq(acc.data_ptr<float>(), x.data_ptr(), dtype_code(x, "column_sumsq_"), mask_ptr, weight_ptr,
                                    x.size(0), x.size(1), x.size(2), x.stride(0), x.stride(1), x.stride(2), msb, mst,
                                    wsb, wst, splits,
                                    c10::cuda::getCurrentCUDAStream()),
             "column_sumsq launch");
}

// The compaction's outputs (all three or none): candidate values fp32, their segments' offsets int64 (S+1),
// a zeroed int64 cursor (S).
struct CandidateOutputs {
  float* values = nullptr;
  const int64_t* offsets = nullptr;
  unsigned long long* cursor = nullptr;
};

CandidateOutputs candidate_outputs(const std::optional<at::Tensor>& values, const std::optional<at::Tensor>& offsets,
                                   const std::optional<at::Tensor>& cursor, const char* op) {
  if (!values.has_value() && !offsets.has_value() && !cursor.has_value()) return {};
  TORCH_CHECK(values.has_value() && offsets.has_value() && cursor.has_value(), op,
              ": candidates, candidate_offsets and candidate_cursor go together");
  TORCH_CHECK(values->scalar_type() == at::kFloat && values->is_contiguous() &&
                  offsets->scalar_type() == at::kLong && offsets->is_contiguous() &&
                  cursor->scalar_type() == at::kLong && cursor->is_contiguous(),
              op, ": candidates must be contiguous fp32, candidate_offsets and candidate_cursor contiguous int64");
  return {values->data_ptr<float>(), offsets->data_ptr<int64_t>(),
          reinterpret_cast<unsigned long long*>(cursor->data_ptr<int64_t>())};
}

void radix_histogram_(const at::Tensor& values, const std::optional<at::Tensor>& counts, const at::Tensor& segment,
                      const at::Tensor& start, const at::Tensor& offsets, const at::Tensor& prefix, int64_t shift,
                      int64_t bits, int64_t block_elems, at::Tensor hist_count, at::Tensor hist_sum,
                      const std::optional<at::Tensor>& candidates, const std::optional<at::Tensor>& candidate_offsets,
                      const std::optional<at::Tensor>& candidate_cursor) {
  TORCH_CHECK(values.scalar_type() == at::kFloat && values.is_contiguous(),
              "radix_histogram_: values must be contiguous fp32");
  check_histograms(hist_count, hist_sum, "radix_histogram_");
  const auto out = candidate_outputs(candidates, candidate_offsets, candidate_cursor, "radix_histogram_");
  const c10::cuda::CUDAGuard guard(values.device());
  const int64_t* counts_ptr = counts.has_value() ? counts->data_ptr<int64_t>() : nullptr;
  check_cuda(sensilora_radix_histogram(values.data_ptr<float>(), counts_ptr, segment.data_ptr<int64_t>(),
                                       start.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
                                       prefix.data_ptr<int64_t>(),
                                       static_cast<int>(shift), static_cast<int>(bits), segment.numel(),
                                       static_cast<int>(block_elems),
                                       reinterpret_cast<unsigned long long*>(hist_count.data_ptr<int64_t>()),
                                       hist_sum.data_ptr<double>(), out.values, out.offsets, out.cursor,
                                       c10::cuda::getCurrentCUDAStream()),
             "radix_histogram launch");
}

void saliency_histogram_(const at::Tensor& weight, const at::Tensor& reciprocal, const at::Tensor& segment,
                         const at::Tensor& start, const at::Tensor& offsets, const at::Tensor& prefix, int64_t shift,
                         int64_t bits, int64_t block_elems, at::Tensor hist_count, at::Tensor hist_sum,
                         const std::optional<at::Tensor>& candidates,
                         const std::optional<at::Tensor>& candidate_offsets,
                         const std::optional<at::Tensor>& candidate_cursor) {
  TORCH_CHECK(weight.dim() == 2, "saliency_histogram_: weight must be a (d_out, d_in) matrix");
  TORCH_CHECK(reciprocal.scalar_type() == at::kFloat && reciprocal.is_contiguous() &&
                  reciprocal.numel() == weight.size(1),
              "saliency_histogram_: reciprocal must be a contiguous fp32 vector of length d_in");
  check_histograms(hist_count, hist_sum, "saliency_histogram_");
  const auto out = candidate_outputs(candidates, candidate_offsets, candidate_cursor, "saliency_histogram_");
  const c10::cuda::CUDAGuard guard(weight.device());
  check_cuda(sensilora_saliency_histogram(weight.data_ptr(), dtype_code(weight, "saliency_histogram_"),
                                          reciprocal.data_ptr<float>(), weight.size(1), weight.stride(0),
                                          weight.stride(1), segment.data_ptr<int64_t>(), start.data_ptr<int64_t>(),
                                          offsets.data_ptr<int64_t>(), prefix.data_ptr<int64_t>(),
                                          static_cast<int>(shift), static_cast<int>(bits), segment.numel(),
                                          static_cast<int>(block_elems),
                                          reinterpret_cast<unsigned long long*>(hist_count.data_ptr<int64_t>()),
                                          hist_sum.data_ptr<double>(), out.values, out.offsets, out.cursor,
                                          c10::cuda::getCurrentCUDAStream()),
             "saliency_histogram launch");
}

}  // namespace

TORCH_LIBRARY(sensilora_cuda, m) {
  m.def("column_sumsq_(Tensor(a!) acc, Tensor x, Tensor? mask, Tensor? row_weight) -> ()");
  m.def("radix_histogram_(Tensor values, Tensor? counts, Tensor segment, Tensor start, Tensor offsets, "
        "Tensor prefix, int shift, int bits, int block_elems, Tensor(a!) hist_count, Tensor(b!) hist_sum, "
        "Tensor(c!)? candidates, Tensor? candidate_offsets, Tensor(d!)? candidate_cursor) -> ()");
  m.def("saliency_histogram_(Tensor weight, Tensor reciprocal, Tensor segment, Tensor start, Tensor offsets, "
        "Tensor prefix, int shift, int bits, int block_elems, Tensor(a!) hist_count, Tensor(b!) hist_sum, "
        "Tensor(c!)? candidates, Tensor? candidate_offsets, Tensor(d!)? candidate_cursor) -> ()");
}

TORCH_LIBRARY_IMPL(sensilora_cuda, CUDA, m) {
  m.impl("column_sumsq_", &column_sumsq_);
  m.impl("radix_histogram_", &radix_histogram_);
  m.impl("saliency_histogram_", &saliency_histogram_);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
