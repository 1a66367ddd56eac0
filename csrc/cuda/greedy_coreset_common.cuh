// Pieces shared by the two CUDA greedy k-center kernels (greedy_coreset_cuda.cu,
// greedy_coreset_resident.cu): their common parameters, the fp16 dot product and the exact
// float32 distance, the ordering key of a candidate, the block reduction, and the
// arrival-counter barrier that ends each greedy step.
#pragma once
#include <cuda/atomic>
#include <cuda_fp16.h>

#include <cstdint>

#include "greedy_coreset_cuda.cuh"

namespace patchcore::cuda::coreset {

constexpr float kSelected = -1.f;            // picked rows never win again
constexpr long long kSpinLimit = 1ll << 26;  // a lost arrival traps instead of hanging

// Three rotating slots: step t's winner lives in keys[t % 3], counted by arrivals[t % 3].
// Slot (t + 2) % 3 was last waited on one step ago by every block, so block 0 can clear it
// after waiting on slot t % 3; it is written again only after that block's next arrival.
struct Barrier {
  unsigned long long* keys;  // [3]
  unsigned* arrivals;        // [3]
};

// What both kernels are given; each block owns rows [blockIdx.x * rows_per_block, ...).
struct SelectionParams {
  const float* x;
  const __half* half_rows;
  const float* half_norm_sq;
  const float* residual;
  float* min_distance;
  int64_t* out;
  Barrier barrier;
  const float* max_abs;
  int64_t rows, dim, padded_dim, n, rows_per_block;
  int64_t cached_rows;   // rows per block with an fp16 copy in shared memory (set by the launcher)
  int64_t slice_stride;  // rows_per_block rounded up to 4, keeping the row cache 16-byte aligned
  bool vector_rows;      // float32 rows can be read as float4
};

inline SelectionParams selection_params(const float* x, int64_t rows, int64_t dim, float* min_distance, int64_t n,
                                        int64_t* out, const __half* half_rows, const float* half_norm_sq,
                                        const float* residual, unsigned long long* sync_words, const float* max_abs,
                                        int64_t blocks) {
  SelectionParams p{x, half_rows, half_norm_sq, residual, min_distance, out,
                    Barrier{sync_words, reinterpret_cast<unsigned*>(sync_words + 3)}, max_abs, rows, dim,
                    coreset_padded_dim(dim), n, (rows + blocks - 1) / blocks, 0, 0, false};
  p.slice_stride = (p.rows_per_block + 3) / 4 * 4;
  p.vector_rows = dim % 4 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  return p;
}

// dot0/dot1 += the 8 halves of `raw` times centre[0..7] (two chains for latency).
__device__ __forceinline__ void accumulate(const uint4& raw, const float* centre, float& dot0, float& dot1) {
  const __half2* h2 = reinterpret_cast<const __half2*>(&raw);
  const float4 c0 = *reinterpret_cast<const float4*>(centre);
  const float4 c1 = *reinterpret_cast<const float4*>(centre + 4);
  const float2 f0 = __half22float2(h2[0]), f1 = __half22float2(h2[1]);
  const float2 f2 = __half22float2(h2[2]), f3 = __half22float2(h2[3]);
  dot0 = fmaf(f0.x, c0.x, dot0);
  dot1 = fmaf(f0.y, c0.y, dot1);
  dot0 = fmaf(f1.x, c0.z, dot0);
  dot1 = fmaf(f1.y, c0.w, dot1);
  dot0 = fmaf(f2.x, c1.x, dot0);
  dot1 = fmaf(f2.y, c1.y, dot1);
  dot0 = fmaf(f3.x, c1.z, dot0);
  dot1 = fmaf(f3.y, c1.w, dot1);
}

// Part of the exact float32 squared distance between `row` (device memory) and `centre`
// (shared or device memory), both of p.dim values: elements sub, sub + stride, ... (in
// float4 units when the rows allow it). Both kernels sum in this order, so their picks agree.
template <int kUnroll>
__device__ __forceinline__ float exact_part(const SelectionParams& p, const float* row, const float* centre, int sub,
                                            int stride) {
  float acc = 0.f;
  if (p.vector_rows) {
    const float4* r4 = reinterpret_cast<const float4*>(row);
#pragma unroll kUnroll
    for (int64_t j = sub; j < p.dim / 4; j += stride) {
      const float4 v = __ldg(r4 + j);
      const float d0 = v.x - centre[4 * j], d1 = v.y - centre[4 * j + 1];
      const float d2 = v.z - centre[4 * j + 2], d3 = v.w - centre[4 * j + 3];
      acc = fmaf(d0, d0, acc);
      acc = fmaf(d1, d1, acc);
      acc = fmaf(d2, d2, acc);
      acc = fmaf(d3, d3, acc);
    }
  } else {
#pragma unroll kUnroll
    for (int64_t j = sub; j < p.dim; j += stride) {
      const float d = __ldg(row + j) - centre[j];
      acc = fmaf(d, d, acc);
    }
  }
  return acc;
}

// Key ordering = greedy ordering: larger distance first, then lower index.
// Distances are >= 0 here, so their float bits order like unsigned integers; -0.0 is first
// made +0.0 (its sign bit would rank it above every distance).
__device__ __forceinline__ unsigned long long pack(float value, int64_t index) {
  if (value < 0.f) return 0ull;
  return (static_cast<unsigned long long>(__float_as_uint(value + 0.f)) << 32) |
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
