// Greedy k-center selection on the GPU, all steps in one persistent cooperative kernel.
//
// Each block owns a contiguous slice of rows for the whole run. A greedy step is one
// fused pass: every group of 8 lanes takes a row, computes its distance to the newest
// centre, lowers the row's running minimum, and the block keeps the largest
// (distance, lowest index) key. Blocks combine keys with one 64-bit atomicMax and a
// grid-wide barrier; every block then reads the winner. No host synchronisation.
//
// Each row's running minimum lives in shared memory. The pass reads an fp16 copy of the
// rows, cached in shared memory as far as it fits,
// and falls back to the float32 row only when the fp16 distance cannot rule out an
// update (half_bound.h): the picks equal an all-float32 pass.
#include <cooperative_groups.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <string>

#include "check.cuh"
#include "greedy_coreset_cuda.cuh"
#include "half_bound.h"

namespace cg = cooperative_groups;

namespace patchcore::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kGroup = 8;                  // lanes per row
constexpr int kGroupsPerBlock = kThreads / kGroup;
constexpr int kHalvesPerLoad = 8;          // one 16-byte load
constexpr int kRowAlign = kGroup * kHalvesPerLoad;
constexpr float kSelected = -1.f;          // picked rows never win again

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

__device__ __forceinline__ float group_sum(float v, unsigned mask) {
  // Butterfly: every lane of the group ends with the bitwise-same sum (addition commutes).
  v += __shfl_xor_sync(mask, v, 4);
  v += __shfl_xor_sync(mask, v, 2);
  v += __shfl_xor_sync(mask, v, 1);
  return v;
}

__device__ __forceinline__ unsigned long long block_max(unsigned long long key, unsigned long long* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) key = max(key, __shfl_xor_sync(0xFFFFFFFFu, key, offset));
  const int warp = threadIdx.x / 32;
  if ((threadIdx.x & 31) == 0) scratch[warp] = key;
  __syncthreads();
  if (warp == 0) {
    key = (threadIdx.x < kThreads / 32) ? scratch[threadIdx.x] : 0ull;
    for (int offset = 16; offset > 0; offset >>= 1) key = max(key, __shfl_xor_sync(0xFFFFFFFFu, key, offset));
  }
  return key;  // valid in thread 0
}

// fp16 copy of each row, scaled by a power of two, and its rounding residual. One warp per row.
__global__ void to_half_rows(const float* __restrict__ x, int64_t rows, int64_t dim, int64_t padded_dim,
                             const float* __restrict__ max_abs, __half* __restrict__ half_rows,
                             float* __restrict__ residual) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const float scale = half_bound::scale_for(*max_abs);
  float acc = 0.f;
  for (int64_t j = lane; j < padded_dim; j += 32) {
    const float v = j < dim ? x[row * dim + j] : 0.f;
    const __half h = __float2half_rn(v * scale);
    half_rows[row * padded_dim + j] = h;
    const float diff = v - __half2float(h) / scale;
    acc += diff * diff;
  }
  for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_xor_sync(0xFFFFFFFFu, acc, offset);
  if (lane == 0) residual[row] = sqrtf(acc) * (1.f + half_bound::kResidualSlack);
}

struct Params {
  const float* x;
  const __half* half_rows;
  const float* residual;
  float* min_distance;
  int64_t* out;
  unsigned long long* keys;  // three rotating slots: step t's winner lives in keys[t % 3]
  const float* max_abs;
  int64_t rows, dim, padded_dim, n, rows_per_block, cached_rows;
  int64_t slice_stride;  // rows_per_block rounded up to 4, keeping the row cache 16-byte aligned
  bool vector_rows;      // float32 rows can be read as float4
};

// Per-lane part of |h/scale - c|^2 * scale^2 for one fp16 row (shared or global memory).
__device__ __forceinline__ float partial_squared(const __half* row, const float* centre_scaled, int64_t padded_dim,
                                                 int lane) {
  float acc = 0.f;
  for (int64_t j = lane * kHalvesPerLoad; j < padded_dim; j += kRowAlign) {
    const uint4 raw = *reinterpret_cast<const uint4*>(row + j);
    const __half2* h2 = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const float2 f = __half22float2(h2[u]);
      const float d0 = f.x - centre_scaled[j + 2 * u];
      const float d1 = f.y - centre_scaled[j + 2 * u + 1];
      acc = fmaf(d0, d0, acc);
      acc = fmaf(d1, d1, acc);
    }
  }
  return acc;
}

__global__ void __launch_bounds__(kThreads, 1) greedy_persistent(Params p) {
  cg::grid_group grid = cg::this_grid();
  extern __shared__ __align__(16) unsigned char smem[];
  float* centre = reinterpret_cast<float*>(smem);             // padded_dim, exact
  float* centre_scaled = centre + p.padded_dim;               // padded_dim, times scale
  auto* scratch = reinterpret_cast<unsigned long long*>(centre_scaled + p.padded_dim);  // 32
  float* slice_min = reinterpret_cast<float*>(scratch + 32);  // rows_per_block: running minimum
  float* slice_residual = slice_min + p.slice_stride;         // rows_per_block
  __half* cache = reinterpret_cast<__half*>(slice_residual + p.slice_stride);  // cached_rows * padded_dim

  const float scale = half_bound::scale_for(*p.max_abs);
  const float rounding = half_bound::relative_rounding(p.padded_dim);
  const int64_t lo = static_cast<int64_t>(blockIdx.x) * p.rows_per_block;
  const int64_t count = lo < p.rows ? min(p.rows - lo, p.rows_per_block) : 0;  // rows of this block
  const int64_t cached = count < p.cached_rows ? count : p.cached_rows;

  {  // The slice's state lives in shared memory for the whole run.
    const uint4* src = reinterpret_cast<const uint4*>(p.half_rows + lo * p.padded_dim);
    uint4* dst = reinterpret_cast<uint4*>(cache);
    const int64_t vectors = cached * p.padded_dim / kHalvesPerLoad;
    for (int64_t t = threadIdx.x; t < vectors; t += kThreads) dst[t] = src[t];
    for (int64_t t = threadIdx.x; t < count; t += kThreads) {
      slice_min[t] = p.min_distance[lo + t];
      slice_residual[t] = p.residual[lo + t];
    }
  }
  __syncthreads();

  const int group = threadIdx.x / kGroup;
  const int lane = threadIdx.x % kGroup;
  const unsigned group_mask = 0xFFu << ((threadIdx.x & 31) & ~(kGroup - 1));

  unsigned long long best = 0ull;
  for (int64_t t = threadIdx.x; t < count; t += kThreads) best = max(best, pack(slice_min[t], lo + t));
  best = block_max(best, scratch);
  if (threadIdx.x == 0) atomicMax(&p.keys[0], best);

  for (int64_t step = 0; step < p.n; ++step) {
    grid.sync();
    const int64_t pick = unpack_index(__ldcg(&p.keys[step % 3]));
    if (blockIdx.x == 0 && threadIdx.x == 0) {
      p.out[step] = pick;
      p.keys[(step + 2) % 3] = 0ull;  // last read one step ago, next written one step ahead
    }
    if (step + 1 == p.n) break;

    for (int64_t j = threadIdx.x; j < p.padded_dim; j += kThreads) {
      const float v = j < p.dim ? p.x[pick * p.dim + j] : 0.f;
      centre[j] = v;
      centre_scaled[j] = v * scale;
    }
    __syncthreads();

    // Lowers one row's minimum given its approximate squared distance (group-uniform).
    auto update = [&](int64_t local, float approx_squared) {
      const int64_t i = lo + local;
      float m = slice_min[local];
      bool changed = false;
      if (i == pick) {
        m = kSelected;
        changed = true;
      } else if (!half_bound::cannot_lower(sqrtf(approx_squared) / scale, slice_residual[local], m, rounding)) {
        // The float32 row comes from device memory: issue its loads together (float4 where
        // possible), since any block waiting here holds up the whole step.
        float exact = 0.f;
        if (p.vector_rows) {
          const float4* row = reinterpret_cast<const float4*>(p.x + i * p.dim);
#pragma unroll 4
          for (int64_t j = lane; j < p.dim / 4; j += kGroup) {
            const float4 v = __ldg(row + j);
            const float d0 = v.x - centre[4 * j], d1 = v.y - centre[4 * j + 1];
            const float d2 = v.z - centre[4 * j + 2], d3 = v.w - centre[4 * j + 3];
            exact = fmaf(d0, d0, exact);
            exact = fmaf(d1, d1, exact);
            exact = fmaf(d2, d2, exact);
            exact = fmaf(d3, d3, exact);
          }
        } else {
#pragma unroll 4
          for (int64_t j = lane; j < p.dim; j += kGroup) {
            const float d = __ldg(p.x + i * p.dim + j) - centre[j];
            exact = fmaf(d, d, exact);
          }
        }
        exact = sqrtf(group_sum(exact, group_mask));
        if (exact < m) {
          m = exact;
          changed = true;
        }
      }
      if (changed && lane == 0) slice_min[local] = m;
      best = max(best, pack(m, i));
    };

    best = 0ull;
    // Two rows per group per iteration: two independent load-and-reduce chains in flight.
    for (int64_t first = group; first < count; first += 2 * kGroupsPerBlock) {
      const int64_t second = first + kGroupsPerBlock;
      const bool has_second = second < count;
      const __half* row0 = first < cached ? cache + first * p.padded_dim : p.half_rows + (lo + first) * p.padded_dim;
      float a0 = partial_squared(row0, centre_scaled, p.padded_dim, lane);
      float a1 = 0.f;
      if (has_second) {
        const __half* row1 =
            second < cached ? cache + second * p.padded_dim : p.half_rows + (lo + second) * p.padded_dim;
        a1 = partial_squared(row1, centre_scaled, p.padded_dim, lane);
      }
      a0 = group_sum(a0, group_mask);
      a1 = group_sum(a1, group_mask);
      update(first, a0);
      if (has_second) update(second, a1);
    }
    best = block_max(best, scratch);
    if (threadIdx.x == 0) atomicMax(&p.keys[(step + 1) % 3], best);
  }

  __syncthreads();
  for (int64_t t = threadIdx.x; t < count; t += kThreads) p.min_distance[lo + t] = slice_min[t];
}

}  // namespace

int64_t coreset_padded_dim(int64_t dim) { return (dim + kRowAlign - 1) / kRowAlign * kRowAlign; }

void greedy_coreset_launch(const float* x, int64_t rows, int64_t dim, float* min_distance, int64_t n,
                           int64_t* out, __half* half_rows, float* residual, unsigned long long* keys,
                           const float* max_abs, cudaStream_t stream) {
  const int64_t padded_dim = coreset_padded_dim(dim);
  {
    const int threads = 256;
    const int64_t blocks = (rows * 32 + threads - 1) / threads;
    to_half_rows<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(x, rows, dim, padded_dim, max_abs,
                                                                         half_rows, residual);
    PATCHCORE_CUDA_CHECK(cudaGetLastError());
  }

  int device = 0, sms = 0, smem_optin = 0, cooperative = 0;
  PATCHCORE_CUDA_CHECK(cudaGetDevice(&device));
  PATCHCORE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  PATCHCORE_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  PATCHCORE_CUDA_CHECK(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device));
  if (!cooperative) throw std::runtime_error("patchcore_fast: this GPU cannot launch cooperative kernels");

  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(sms, (rows + kGroupsPerBlock - 1) / kGroupsPerBlock));
  Params p{x, half_rows, residual, min_distance, out, keys, max_abs, rows, dim, padded_dim, n, 0, 0, 0, false};
  p.rows_per_block = (rows + blocks - 1) / blocks;
  p.slice_stride = (p.rows_per_block + 3) / 4 * 4;
  p.vector_rows = dim % 4 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  // Centre (exact and scaled), reduction scratch, and each row's minimum and residual.
  const int64_t fixed_bytes = 2 * padded_dim * static_cast<int64_t>(sizeof(float)) + 32 * 8 + p.slice_stride * 8;
  if (fixed_bytes > smem_optin)
    throw std::invalid_argument("patchcore_fast: " + std::to_string(rows) + " rows of dim " + std::to_string(dim) +
                                " exceed the GPU coreset kernel's shared memory; use the CPU or fewer rows");
  const int64_t row_bytes = padded_dim * static_cast<int64_t>(sizeof(__half));
  p.cached_rows = std::min<int64_t>(p.rows_per_block, (smem_optin - fixed_bytes) / row_bytes);
  const size_t smem = static_cast<size_t>(fixed_bytes + p.cached_rows * row_bytes);

  PATCHCORE_CUDA_CHECK(cudaFuncSetAttribute(greedy_persistent, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(smem)));
  int per_sm = 0;
  PATCHCORE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, greedy_persistent, kThreads, smem));
  if (per_sm < 1) throw std::runtime_error("patchcore_fast: the GPU coreset kernel does not fit on this device");
  void* args[] = {&p};
  PATCHCORE_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(greedy_persistent),
                                                   dim3(static_cast<unsigned>(blocks)), dim3(kThreads), args, smem,
                                                   stream));
}

}  // namespace patchcore::cuda
