// The distributed coreset's per-round pass on the GPU; the contract is in coreset_shard_cuda.cuh.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "coreset_shard_cuda.cuh"

namespace patchcore::cuda {
namespace {

constexpr int kFixedLanes = 16;  // the CPU kernels' kExactLanes

// sqrt(sum (a_j - b_j)^2) in the CPU kernels' fixed order. The _rn intrinsics are never
// contracted into fused multiply-adds, so each operation rounds as the CPU's does.
__device__ __forceinline__ float fixed_order_distance(const float* a, const float* b, int64_t dim) {
  float lanes[kFixedLanes];
#pragma unroll
  for (int l = 0; l < kFixedLanes; ++l) lanes[l] = 0.f;
  int64_t j = 0;
  for (; j + kFixedLanes <= dim; j += kFixedLanes) {
#pragma unroll
    for (int l = 0; l < kFixedLanes; ++l) {
      const float d = __fsub_rn(__ldg(a + j + l), b[j + l]);
      lanes[l] = __fadd_rn(lanes[l], __fmul_rn(d, d));
    }
  }
#pragma unroll
  for (int l = 0; l < kFixedLanes; ++l)
    if (j + l < dim) {  // the CPU pads the tail with zeros, whose terms add exactly zero
      const float d = __fsub_rn(__ldg(a + j + l), b[j + l]);
      lanes[l] = __fadd_rn(lanes[l], __fmul_rn(d, d));
    }
#pragma unroll
  for (int width = kFixedLanes / 2; width >= 1; width /= 2)
#pragma unroll
    for (int l = 0; l < width; ++l) lanes[l] = __fadd_rn(lanes[l], lanes[l + width]);
  return __fsqrt_rn(lanes[0]);
}

// Offer order: (bits of the minimum + 1, so that +0 ranks above the picked rows) then the
// complement of the index (lower index first).
__device__ __forceinline__ unsigned long long offer_key(float value, int64_t index) {
  const unsigned long long low = 0xFFFFFFFFull - static_cast<unsigned long long>(index);
  if (!(value >= 0.f)) return low;
  return ((static_cast<unsigned long long>(__float_as_uint(value + 0.f)) + 1ull) << 32) | low;
}

// One thread per row; the centres pass through shared memory `chunk` at a time.
__global__ void __launch_bounds__(kShardThreads) shard_pass(const float* space, int64_t rows, int64_t dim,
                                                            const float* centres, int64_t count, int64_t chunk,
                                                            float* min_distance, unsigned long long* keys) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  float* held = reinterpret_cast<float*>(shared_bytes);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kShardThreads + threadIdx.x;
  float best = i < rows ? min_distance[i] : 0.f;
  for (int64_t first = 0; first < count; first += chunk) {
    const int64_t width = count - first < chunk ? count - first : chunk;
    __syncthreads();  // the previous chunk is no longer read
    for (int64_t e = threadIdx.x; e < width * dim; e += kShardThreads) held[e] = centres[first * dim + e];
    __syncthreads();
    if (i < rows)
      for (int64_t c = 0; c < width; ++c) {
        const float d = fixed_order_distance(space + i * dim, held + c * dim, dim);
        if (d < best) best = d;  // a picked row (-1) stays picked
      }
  }
  if (i < rows) {
    min_distance[i] = best;
    keys[i] = offer_key(best, i);
  }
}

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw std::runtime_error(std::string("coreset shard pass: ") + what + ": " + cudaGetErrorString(status));
}

}  // namespace

void coreset_shard_pass_launch(const float* space, int64_t rows, int64_t dim, const float* centres, int64_t count,
                               float* min_distance, unsigned long long* keys, cudaStream_t stream) {
  if (rows == 0) return;
  const int64_t fit = kShardCentreBytes / (dim * static_cast<int64_t>(sizeof(float)));
  const int64_t chunk = fit < 1 ? 1 : fit;
  const size_t smem = static_cast<size_t>(chunk * dim) * sizeof(float);
  if (smem > 48 * 1024) check(cudaFuncSetAttribute(shard_pass, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                   static_cast<int>(smem)), "shared memory for one centre");
  const int64_t blocks = (rows + kShardThreads - 1) / kShardThreads;
  shard_pass<<<dim3(static_cast<unsigned>(blocks)), dim3(kShardThreads), smem, stream>>>(space, rows, dim, centres, count,
                                                                                           chunk, min_distance, keys);
  check(cudaGetLastError(), "launch");
}

}  // namespace patchcore::cuda
