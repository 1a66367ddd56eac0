// Pieces shared by the two CUDA greedy k-center kernels (greedy_coreset_cuda.cu,
// greedy_coreset_resident.cu): the ordering key of a candidate, the block reduction,
// and the arrival-counter barrier that ends each greedy step.
#pragma once
#include <cuda/atomic>

#include <cstdint>

namespace patchcore::cuda::coreset {

constexpr float kSelected = -1.f;            // picked rows never win again
constexpr long long kSpinLimit = 1ll << 26;  // a lost arrival traps instead of hanging

// Key ordering = greedy ordering: larger distance first, then lower index.
// Distances are >= 0 here, so their float bits order like unsigned integers.
__device__ __forceinline__ unsigned long long pack(float value, int64_t index) {
  if (value < 0.f) return 0ull;
  return (static_cast<unsigned long long>(__float_as_uint(value)) << 32) |
         static_cast<unsigned long long>(0xFFFFFFFFu - static_cast<uint32_t>(index));
}
__device__ __forceinline__ int64_t unpack_index(unsigned long long key) {
  return static_cast<int64_t>(0xFFFFFFFFu - static_cast<uint32_t>(key & 0xFFFFFFFFull));
}

// Largest key of the block, valid in thread 0. `scratch` holds 32 keys.
template <int kThreads>
__device__ __forceinline__ unsigned long long block_max(unsigned long long key, unsigned long long* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) key = max(key, __shfl_xor_sync(0xFFFFFFFFu, key, offset));
  const int warp = threadIdx.x / 32;
  if ((threadIdx.x & 31) == 0) scratch[warp] = key;
  __syncthreads();
  if (warp == 0) {
    key = (threadIdx.x < kThreads / 32) ? scratch[threadIdx.x] : 0ull;
    for (int offset = 16; offset > 0; offset >>= 1) key = max(key, __shfl_xor_sync(0xFFFFFFFFu, key, offset));
  }
  __syncthreads();  // scratch is reused by the next call
  return key;
}

// Three rotating slots: step t's winner lives in keys[t % 3], counted by arrivals[t % 3].
// Slot (t + 2) % 3 was last waited on one step ago by every block, so block 0 can clear it
// after waiting on slot t % 3; it is written again only after that block's next arrival.
struct Barrier {
  unsigned long long* keys;  // [3]
  unsigned* arrivals;        // [3]
};

// Called by one thread per block, after the block's writes it wants others to see.
__device__ __forceinline__ void arrive(const Barrier& b, int64_t slot, unsigned long long key) {
  atomicMax(&b.keys[slot], key);
  ::cuda::atomic_ref<unsigned, ::cuda::thread_scope_device> count(b.arrivals[slot]);
  count.fetch_add(1u, ::cuda::memory_order_release);
}

// Called by one thread per block: waits until every block arrived, returns the winner's key.
__device__ __forceinline__ unsigned long long wait_all(const Barrier& b, int64_t slot) {
  ::cuda::atomic_ref<unsigned, ::cuda::thread_scope_device> count(b.arrivals[slot]);
  long long spins = 0;
  while (count.load(::cuda::memory_order_acquire) < gridDim.x)
    if (++spins > kSpinLimit) __trap();
  ::cuda::atomic_ref<unsigned long long, ::cuda::thread_scope_device> key(b.keys[slot]);
  return key.load(::cuda::memory_order_relaxed);
}

__device__ __forceinline__ void clear(const Barrier& b, int64_t slot) {
  ::cuda::atomic_ref<unsigned long long, ::cuda::thread_scope_device>(b.keys[slot]).store(0ull, ::cuda::memory_order_relaxed);
  ::cuda::atomic_ref<unsigned, ::cuda::thread_scope_device>(b.arrivals[slot]).store(0u, ::cuda::memory_order_relaxed);
}

}  // namespace patchcore::cuda::coreset
