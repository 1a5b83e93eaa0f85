// Runs the CUDA kernels of csrc/ on the CPU, for tests on machines without a GPU: every CUDA thread of a
// block is a std::thread, __syncthreads is a std::barrier, __shared__ arrays are function statics (blocks
// run one after another, so each block sees its own), atomics are std::atomic_ref. It reproduces the
// kernels' indexing, masking, striding and reduction logic, not their speed or the GPU memory model.
// Used with: g++ -std=c++20 -x c++ -include cuda_host_shim.h csrc/<kernel>.cu (see build.py).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#undef __global__
#undef __device__
#undef __forceinline__
#undef __shared__
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

namespace sensilora_emulation {

inline thread_local dim3 thread_index, block_index, block_dim, grid_dim;
inline thread_local std::barrier<>* block_barrier = nullptr;

// Runs body() once per CUDA thread of a (grid, block) launch; blocks in turn, the threads of a block together.
inline void launch(dim3 grid, dim3 block, const std::function<void()>& body) {
  const unsigned threads = block.x * block.y * block.z;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::barrier<> barrier(threads);
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (unsigned t = 0; t < threads; ++t)
          pool.emplace_back([&, t] {
            thread_index = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            block_index = dim3(bx, by, bz);
            block_dim = block;
            grid_dim = grid;
            block_barrier = &barrier;
            body();
          });
        for (auto& thread : pool) thread.join();
      }
}

}  // namespace sensilora_emulation

#define threadIdx (sensilora_emulation::thread_index)
#define blockIdx (sensilora_emulation::block_index)
#define blockDim (sensilora_emulation::block_dim)
#define gridDim (sensilora_emulation::grid_dim)
#define SENSILORA_LAUNCH(kernel, grid, block, stream, ...) \
  sensilora_emulation::launch(dim3(grid), dim3(block), [&] { kernel(__VA_ARGS__); })

inline void __syncthreads() { sensilora_emulation::block_barrier->arrive_and_wait(); }

template <typename T>
inline T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}

inline int __float_as_int(float value) {
  int bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

using std::max;
using std::min;

// The launchers report cudaGetLastError(); a host build has no CUDA runtime to ask, and nothing to report.
extern "C" inline cudaError_t cudaGetLastError() { return cudaSuccess; }
