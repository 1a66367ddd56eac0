// Greedy k-center selection on the GPU, all steps in one persistent cooperative kernel.
//
// Each block owns a contiguous slice of rows for the whole run, and keeps in shared
// memory each row's running minimum, and an fp16 copy of as many of its rows as fit.
// A greedy step is one fused pass in which each thread takes whole rows: distance to
// the newest centre, running minimum, and the block's largest (distance, lowest index)
// key. Blocks publish their key with a 64-bit atomicMax and arrive on a counter; each
// block's first thread waits for all arrivals, then every block reads the same winner.
// No host synchronisation, no grid-wide barrier beyond that one counter per step.
//
// The pass computes the fp16 distance in expanded form (one FMA per element) and
// re-computes a row from its float32 values only when the fp16 distance, widened by its
// rounding bounds (half_bound.h), cannot rule out an update: the picks equal an
// all-float32 pass.
#include <cuda/atomic>
#include <cuda_fp16.h>

#include <algorithm>
#include <string>

#include "check.cuh"
#include "greedy_coreset_common.cuh"
#include "greedy_coreset_cuda.cuh"
#include "../half_bound.h"

namespace patchcore::cuda {
namespace {

using namespace coreset;

constexpr int kThreads = kCoresetThreads;
constexpr int kHalvesPerLoad = 8;   // one 16-byte load
constexpr int kRowAlign = 64;       // fp16 rows padded to this many values
constexpr int kCachePad = 8;        // extra halves per cached row: spreads rows over the banks

// fp16 copy of each row scaled by a power of two, its squared norm (as the kernel will see
// it) and its rounding residual. One warp per row.
__global__ void to_half_rows(const float* __restrict__ x, int64_t rows, int64_t dim, int64_t padded_dim,
                             const float* __restrict__ max_abs, __half* __restrict__ half_rows,
                             float* __restrict__ half_norm_sq, float* __restrict__ residual) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const float scale = half_bound::scale_for(*max_abs);
  float res = 0.f, norm = 0.f;
  for (int64_t j = lane; j < padded_dim; j += 32) {
    const float v = j < dim ? x[row * dim + j] : 0.f;
    const __half h = __float2half_rn(v * scale);
    half_rows[row * padded_dim + j] = h;
    const float hf = __half2float(h);
    const float diff = v - hf / scale;
    res = fmaf(diff, diff, res);
    norm = fmaf(hf, hf, norm);
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    res += __shfl_xor_sync(0xFFFFFFFFu, res, offset);
    norm += __shfl_xor_sync(0xFFFFFFFFu, norm, offset);
  }
  if (lane == 0) {
    residual[row] = sqrtf(res) * (1.f + half_bound::kResidualSlack);
    half_norm_sq[row] = norm;
  }
}

using Params = SelectionParams;

// Exact float32 squared distance between row i of x and the centre (in shared memory),
// computed by the whole warp so that the row's loads leave together: the step waits for
// the slowest block, so a row fetched from device memory must cost one round trip.
__device__ __forceinline__ float warp_exact_squared(const Params& p, int64_t i, const float* centre, int lane) {
  float acc = exact_part<4>(p, p.x + i * p.dim, centre, lane, 32);
  for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_xor_sync(0xFFFFFFFFu, acc, offset);
  return acc;
}

__global__ void __launch_bounds__(kThreads, 1) greedy_persistent(Params p) {
  extern __shared__ __align__(16) unsigned char smem[];
  float* centre = reinterpret_cast<float*>(smem);             // padded_dim, exact
  float* centre_scaled = centre + p.padded_dim;               // padded_dim, times scale
  auto* scratch = reinterpret_cast<unsigned long long*>(centre_scaled + p.padded_dim);  // 32
  float* slice_min = reinterpret_cast<float*>(scratch + 32);  // running minimum per row
  float* slice_residual = slice_min + p.slice_stride;
  float* slice_norm_sq = slice_residual + p.slice_stride;
  __half* cache = reinterpret_cast<__half*>(slice_norm_sq + p.slice_stride);  // cached rows
  __shared__ int64_t shared_pick;
  __shared__ float shared_centre_norm_sq;

  const int64_t cache_stride = p.padded_dim + kCachePad;
  const float scale = half_bound::scale_for(*p.max_abs);
  const float rounding = half_bound::relative_rounding(p.padded_dim);
  const int64_t lo = static_cast<int64_t>(blockIdx.x) * p.rows_per_block;
  const int64_t count = lo < p.rows ? min(p.rows - lo, p.rows_per_block) : 0;
  const int64_t cached = count < p.cached_rows ? count : p.cached_rows;
  const int64_t vectors_per_row = p.padded_dim / kHalvesPerLoad;

  for (int64_t t = threadIdx.x; t < cached * vectors_per_row; t += kThreads) {
    const int64_t r = t / vectors_per_row, v = t % vectors_per_row;
    reinterpret_cast<uint4*>(cache + r * cache_stride)[v] =
        reinterpret_cast<const uint4*>(p.half_rows + (lo + r) * p.padded_dim)[v];
  }
  for (int64_t t = threadIdx.x; t < count; t += kThreads) {
    slice_min[t] = p.min_distance[lo + t];
    slice_residual[t] = p.residual[lo + t];
    slice_norm_sq[t] = p.half_norm_sq[lo + t];
  }
  __syncthreads();

  unsigned long long best = 0ull;
  for (int64_t t = threadIdx.x; t < count; t += kThreads) best = max(best, pack(slice_min[t], lo + t));
  best = block_max<kThreads>(best, scratch);
  if (threadIdx.x == 0) arrive(p.barrier, 0, best);

  for (int64_t step = 0; step < p.n; ++step) {
    if (threadIdx.x == 0) {
      shared_pick = unpack_index(wait_all(p.barrier, step % 3));
      if (blockIdx.x == 0) {
        p.out[step] = shared_pick;
        clear(p.barrier, (step + 2) % 3);
      }
    }
    __syncthreads();
    if (step + 1 == p.n) break;
    const int64_t pick = shared_pick;

    if (threadIdx.x < 32) {  // one warp loads the centre and its scaled squared norm
      float norm = 0.f;
      for (int64_t j = threadIdx.x; j < p.padded_dim; j += 32) {
        const float v = j < p.dim ? __ldg(p.x + pick * p.dim + j) : 0.f;
        const float vs = v * scale;
        centre[j] = v;
        centre_scaled[j] = vs;
        norm = fmaf(vs, vs, norm);
      }
      for (int offset = 16; offset > 0; offset >>= 1) norm += __shfl_xor_sync(0xFFFFFFFFu, norm, offset);
      if (threadIdx.x == 0) shared_centre_norm_sq = norm;
    }
    __syncthreads();
    const float centre_norm_sq = shared_centre_norm_sq;

    best = 0ull;
    // Whole warps iterate together (the exact path below is warp-cooperative).
    const int lane = threadIdx.x & 31;
    for (int64_t base = threadIdx.x - lane; base < count; base += kThreads) {
      const int64_t local = base + lane;
      const bool active = local < count;
      const int64_t i = lo + local;
      float m = kSelected;
      bool check = false;
      if (active) {
        const __half* row = local < cached ? cache + local * cache_stride : p.half_rows + i * p.padded_dim;
        float dot0 = 0.f, dot1 = 0.f;
#pragma unroll 4
        for (int64_t j = 0; j < p.padded_dim; j += kHalvesPerLoad)
          accumulate(*reinterpret_cast<const uint4*>(row + j), centre_scaled + j, dot0, dot1);
        m = slice_min[local];
        if (i == pick) {
          m = kSelected;
          slice_min[local] = m;
        } else {
          const float lower =
              half_bound::expanded_lower(slice_norm_sq[local], centre_norm_sq, dot0 + dot1, rounding) / scale;
          check = !half_bound::cannot_lower(lower, slice_residual[local], m, rounding);
        }
      }
      // Rows the fp16 bound cannot settle get their exact float32 distance, one row per warp pass.
      unsigned pending = __ballot_sync(0xFFFFFFFFu, check);
      while (pending) {
        const int src = __ffs(pending) - 1;
        pending &= pending - 1;
        const int64_t row_index = __shfl_sync(0xFFFFFFFFu, i, src);
        const float exact = sqrtf(warp_exact_squared(p, row_index, centre, lane));
        if (lane == src && exact < m) slice_min[local] = m = exact;
      }
      if (active) best = max(best, pack(m, i));
    }
    best = block_max<kThreads>(best, scratch);
    if (threadIdx.x == 0) arrive(p.barrier, (step + 1) % 3, best);
  }

  __syncthreads();
  for (int64_t t = threadIdx.x; t < count; t += kThreads) p.min_distance[lo + t] = slice_min[t];
}

}  // namespace

int64_t coreset_padded_dim(int64_t dim) { return (dim + kRowAlign - 1) / kRowAlign * kRowAlign; }

CoresetDevice coreset_device() {
  CoresetDevice d;
  int device = 0, cooperative = 0;
  PATCHCORE_CUDA_CHECK(cudaGetDevice(&device));
  PATCHCORE_CUDA_CHECK(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, device));
  PATCHCORE_CUDA_CHECK(cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  PATCHCORE_CUDA_CHECK(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device));
  if (!cooperative) throw std::runtime_error("patchcore_fast: this GPU cannot launch cooperative kernels");
  return d;
}

int64_t coreset_blocks(int64_t rows, const CoresetDevice& device) {
  // One block per multiprocessor (all must be resident for the arrival counters), fewer for small inputs.
  return std::max<int64_t>(1, std::min<int64_t>(device.sms, (rows + kCoresetThreads - 1) / kCoresetThreads));
}

void greedy_coreset_prepare(const float* x, int64_t rows, int64_t dim, const float* max_abs, __half* half_rows,
                            float* half_norm_sq, float* residual, cudaStream_t stream) {
  const int threads = 256;
  const int64_t blocks = (rows * 32 + threads - 1) / threads;
  to_half_rows<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(x, rows, dim, coreset_padded_dim(dim), max_abs,
                                                                       half_rows, half_norm_sq, residual);
  PATCHCORE_CUDA_CHECK(cudaGetLastError());
}

void greedy_coreset_launch(const float* x, int64_t rows, int64_t dim, float* min_distance, int64_t n,
                           int64_t* out, const __half* half_rows, const float* half_norm_sq, const float* residual,
                           unsigned long long* sync_words, const float* max_abs, cudaStream_t stream) {
  const int64_t padded_dim = coreset_padded_dim(dim);
  const CoresetDevice device = coreset_device();
  const int64_t blocks = coreset_blocks(rows, device);
  const int smem_optin = device.smem_optin;
  Params p = selection_params(x, rows, dim, min_distance, n, out, half_rows, half_norm_sq, residual, sync_words,
                              max_abs, blocks);
  // Centre (exact and scaled), reduction scratch, and each row's minimum, residual and norm.
  const int64_t fixed_bytes = 2 * padded_dim * static_cast<int64_t>(sizeof(float)) + 32 * 8 + p.slice_stride * 12;
  const int64_t static_bytes = 64;  // shared_pick, shared_centre_norm_sq, with margin
  if (fixed_bytes + static_bytes > smem_optin)
    throw std::invalid_argument("patchcore_fast: " + std::to_string(rows) + " rows of dim " + std::to_string(dim) +
                                " exceed the GPU coreset kernel's shared memory; use the CPU or fewer rows");
  const int64_t row_bytes = (padded_dim + kCachePad) * static_cast<int64_t>(sizeof(__half));
  p.cached_rows = std::min<int64_t>(p.rows_per_block, (smem_optin - static_bytes - fixed_bytes) / row_bytes);
  const size_t smem = static_cast<size_t>(fixed_bytes + p.cached_rows * row_bytes);

  PATCHCORE_CUDA_CHECK(cudaFuncSetAttribute(greedy_persistent, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(smem)));
  int per_sm = 0;
  PATCHCORE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, greedy_persistent, kThreads, smem));
  if (per_sm < 1) throw std::runtime_error("patchcore_fast: the GPU coreset kernel does not fit on this device");
  void* args[] = {&p};
  // A cooperative launch guarantees that all blocks are resident, which the arrival counters rely on.
  PATCHCORE_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(greedy_persistent),
                                                   dim3(static_cast<unsigned>(blocks)), dim3(kThreads), args, smem,
                                                   stream));
}

}  // namespace patchcore::cuda
