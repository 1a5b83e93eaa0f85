// Runs the CUDA kernels of csrc/ on the CPU, for tests on machines without a GPU: every CUDA thread of a
// block is a std::thread, __syncthreads is a std::barrier, __shared__ arrays are function statics (blocks
// run one after another, so each block sees its own), atomics are std::atomic_ref. It reproduces the
// kernels' indexing, masking, striding and reduction logic, not their speed or the GPU memory model. Warp
// intrinsics (__ballot_sync, __match_any_sync, __reduce_add_sync, __shfl_sync, __syncwarp) exchange the 32
// lanes' values through a per-warp barrier, so a kernel must call them with the whole warp, as the real
// ones require of a full mask.
// Used with: g++ -std=c++20 -x c++ -include cuda_host_shim.h csrc/<kernel>.cu (see build.py).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
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
inline thread_local std::barrier<>* warp_barrier = nullptr;
inline thread_local unsigned long long* warp_slots = nullptr;  // one value per lane of this thread's warp
inline thread_local unsigned lane_id = 0;

// Runs body() once per CUDA thread of a (grid, block) launch; blocks in turn, the threads of a block together.
inline void launch(dim3 grid, dim3 block, const std::function<void()>& body) {
  const unsigned threads = block.x * block.y * block.z;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::barrier<> barrier(threads);
        const unsigned warps = (threads + 31) / 32;
        std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
        for (unsigned w = 0; w < warps; ++w)
          warp_barriers.push_back(std::make_unique<std::barrier<>>(std::min(32u, threads - 32 * w)));
        std::vector<unsigned long long> slots(32 * warps);
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (unsigned t = 0; t < threads; ++t)
          pool.emplace_back([&, t] {
            warp_barrier = warp_barriers[t / 32].get();
            warp_slots = slots.data() + 32 * (t / 32);
            lane_id = t % 32;
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

// Every lane's value, as the lanes of this thread's warp passed it (all lanes must call).
inline std::vector<unsigned long long> exchange(unsigned long long value) {
  warp_slots[lane_id] = value;
  warp_barrier->arrive_and_wait();
  std::vector<unsigned long long> all(warp_slots, warp_slots + 32);
  warp_barrier->arrive_and_wait();  // nobody writes the next exchange before everyone has read this one
  return all;
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

inline unsigned __match_any_sync(unsigned mask, unsigned value) {
  const auto all = sensilora_emulation::exchange(value);
  unsigned peers = 0;
  for (unsigned lane = 0; lane < 32; ++lane)
    if ((mask >> lane & 1u) && all[lane] == value) peers |= 1u << lane;
  return peers;
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  const auto all = sensilora_emulation::exchange(predicate != 0);
  unsigned ballot = 0;
  for (unsigned lane = 0; lane < 32; ++lane)
    if ((mask >> lane & 1u) && all[lane]) ballot |= 1u << lane;
  return ballot;
}

inline unsigned long long __shfl_sync(unsigned, unsigned long long value, int source_lane) {
  return sensilora_emulation::exchange(value)[source_lane];
}

inline void __syncwarp(unsigned = 0xFFFFFFFFu) { sensilora_emulation::warp_barrier->arrive_and_wait(); }

inline unsigned __reduce_add_sync(unsigned mask, unsigned value) {
  const auto all = sensilora_emulation::exchange(value);
  unsigned sum = 0;
  for (unsigned lane = 0; lane < 32; ++lane)
    if (mask >> lane & 1u) sum += static_cast<unsigned>(all[lane]);
  return sum;
}

inline int __ffs(unsigned value) { return __builtin_ffs(static_cast<int>(value)); }
inline int __popc(unsigned value) { return __builtin_popcount(value); }

inline int __float_as_int(float value) {
  int bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

using std::ldexp;
using std::max;
using std::min;

// The launchers report cudaGetLastError(); a host build has no CUDA runtime to ask, and nothing to report.
extern "C" inline cudaError_t cudaGetLastError() { return cudaSuccess; }
