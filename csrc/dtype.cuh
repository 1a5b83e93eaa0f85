// The element types the kernels read (csrc/sensilora_kernels.h: SensiloraDtype): their fp32 view on the
// device, and the dispatch from a dtype code to a templated launcher on the host.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "sensilora_kernels.h"

namespace {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
struct DtypeTag {
  using type = T;
};

// body(DtypeTag<T>{}) for the element type T of a SensiloraDtype code; cudaErrorInvalidValue for any other code.
template <typename Body>
int dispatch_dtype(int dtype, Body&& body) {
  switch (dtype) {
    case SENSILORA_FLOAT32: return body(DtypeTag<float>{});
    case SENSILORA_FLOAT16: return body(DtypeTag<__half>{});
    case SENSILORA_BFLOAT16: return body(DtypeTag<__nv_bfloat16>{});
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace
