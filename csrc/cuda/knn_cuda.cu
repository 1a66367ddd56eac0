// Exact top-k squared-L2 search on the GPU, selection fused into a tiled product.
//
// A block owns 128 queries and walks over 128-row bank tiles (all of them, or one
// chunk of them when the bank is split across blocks to fill the device). For each
// tile it computes the 128 x 128 dot products on CUDA cores (8 x 8 per thread,
// double-buffered shared-memory K slices), turns them into |q|^2 + |b|^2 - 2 q.b in
// shared memory, and merges them into per-query sorted lists of k (one list slot per
// warp lane, so k <= 32). Only [Q, k] results (times the number of bank chunks) ever
// reach global memory. Bank columns are visited in ascending order and an entry only
// displaces strictly larger ones, so ties keep the lower index.
#include <cfloat>
#include <algorithm>

#include "check.cuh"
#include "knn_cuda.cuh"

namespace patchcore::cuda {
namespace {

constexpr int BQ = 128;  // queries per block
constexpr int BM = 128;  // bank rows per tile
constexpr int BK = kKnnDimAlign;  // dims per shared-memory slice
constexpr int kThreads = 256;
constexpr int kPad = 4;           // keeps float4 alignment, spreads banks
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerWarp = BQ / kWarps;

struct Smem {
  union {
    struct {
      float a[2][BK][BQ + kPad];
      float b[2][BK][BM + kPad];
    } slices;
    float distance[BQ][BM + 1];
  } u;
  float list_distance[BQ][kKnnMaxK];
  int32_t list_index[BQ][kKnnMaxK];
};

__global__ void row_norms(const float* __restrict__ x, int64_t rows, int64_t dim, float* __restrict__ out) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  float acc = 0.f;
  for (int64_t j = lane; j < dim; j += 32) acc = fmaf(x[row * dim + j], x[row * dim + j], acc);
  for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_xor_sync(0xFFFFFFFFu, acc, offset);
  if (lane == 0) out[row] = acc;
}

// Loads a [128 rows x BK] slice of a row-major matrix into registers (2 float4 per thread),
// zero-filling rows past the end.
__device__ __forceinline__ void load_slice(const float* __restrict__ m, int64_t rows, int64_t dim, int64_t row0,
                                           int64_t k0, float4 (&reg)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = threadIdx.x / 4 + 64 * r;
    const int col = (threadIdx.x % 4) * 4;
    reg[r] = (row0 + row < rows) ? *reinterpret_cast<const float4*>(m + (row0 + row) * dim + k0 + col)
                                 : make_float4(0.f, 0.f, 0.f, 0.f);
  }
}

__device__ __forceinline__ void store_slice(float (*dst)[BQ + kPad], const float4 (&reg)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = threadIdx.x / 4 + 64 * r;
    const int col = (threadIdx.x % 4) * 4;
    dst[col + 0][row] = reg[r].x;
    dst[col + 1][row] = reg[r].y;
    dst[col + 2][row] = reg[r].z;
    dst[col + 3][row] = reg[r].w;
  }
}

// kWarpRows: how many 8-row thread tiles a warp spans. 2 gives each warp a 16 x 128 block of
// the tile (the measured layout); 4 gives 32 x 64, which reads a third fewer bytes of shared
// memory per multiply-add step (16 + 128 vs 32 + 64 distinct values).
template <int kWarpRows>
__global__ void __launch_bounds__(kThreads, 2)
    knn_tiles(const float* __restrict__ queries, int64_t num_queries, const float* __restrict__ bank,
              int64_t num_bank, int64_t dim, int k, int splits, const float* __restrict__ query_norms,
              const float* __restrict__ bank_norms, float* __restrict__ out_distance,
              int32_t* __restrict__ out_index32, int64_t* __restrict__ out_index64) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Smem& s = *reinterpret_cast<Smem*>(smem_raw);

  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * BQ;
  const int split = blockIdx.y;
  const int64_t tiles = (num_bank + BM - 1) / BM;
  const int64_t tile_begin = tiles * split / splits;
  const int64_t tile_end = tiles * (split + 1) / splits;

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  static_assert(kWarpRows == 2 || kWarpRows == 4, "a warp spans 2 x 16 or 4 x 8 thread tiles");
  // Thread tile coordinates 0..15 (rows ty*4.. and 64+ty*4.., columns likewise), written from
  // threadIdx.x directly so the compiler can recompute them instead of keeping registers.
  const int ty = kWarpRows == 2 ? threadIdx.x / 16 : (threadIdx.x / 64) * 4 + (threadIdx.x % 32) / 8;
  const int tx = kWarpRows == 2 ? threadIdx.x % 16 : ((threadIdx.x / 32) % 2) * 8 + threadIdx.x % 8;

  for (int t = threadIdx.x; t < BQ * kKnnMaxK; t += kThreads) {
    s.list_distance[t / kKnnMaxK][t % kKnnMaxK] = FLT_MAX;
    s.list_index[t / kKnnMaxK][t % kKnnMaxK] = -1;
  }

  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t m0 = tile * BM;
    float acc[8][8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;

    float4 a_reg[2], b_reg[2];
    load_slice(queries, num_queries, dim, q0, 0, a_reg);
    load_slice(bank, num_bank, dim, m0, 0, b_reg);
    __syncthreads();  // the previous tile's selection has finished reading the aliased distances
    store_slice(s.u.slices.a[0], a_reg);
    store_slice(s.u.slices.b[0], b_reg);
    __syncthreads();

    const int64_t slices = dim / BK;
    for (int64_t kt = 0; kt < slices; ++kt) {
      const int buf = kt & 1;
      if (kt + 1 < slices) {
        load_slice(queries, num_queries, dim, q0, (kt + 1) * BK, a_reg);
        load_slice(bank, num_bank, dim, m0, (kt + 1) * BK, b_reg);
      }
#pragma unroll
      for (int kk = 0; kk < BK; ++kk) {
        const float4 a_lo = *reinterpret_cast<const float4*>(&s.u.slices.a[buf][kk][ty * 4]);
        const float4 a_hi = *reinterpret_cast<const float4*>(&s.u.slices.a[buf][kk][64 + ty * 4]);
        const float4 b_lo = *reinterpret_cast<const float4*>(&s.u.slices.b[buf][kk][tx * 4]);
        const float4 b_hi = *reinterpret_cast<const float4*>(&s.u.slices.b[buf][kk][64 + tx * 4]);
        const float a[8] = {a_lo.x, a_lo.y, a_lo.z, a_lo.w, a_hi.x, a_hi.y, a_hi.z, a_hi.w};
        const float b[8] = {b_lo.x, b_lo.y, b_lo.z, b_lo.w, b_hi.x, b_hi.y, b_hi.z, b_hi.w};
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
      if (kt + 1 < slices) {
        store_slice(s.u.slices.a[buf ^ 1], a_reg);
        store_slice(s.u.slices.b[buf ^ 1], b_reg);
      }
      __syncthreads();
    }

    // Distances of this tile into shared memory (the K slices are no longer needed).
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int row = (i < 4) ? ty * 4 + i : 64 + ty * 4 + (i - 4);
      const float qn = (q0 + row < num_queries) ? query_norms[q0 + row] : 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int col = (j < 4) ? tx * 4 + j : 64 + tx * 4 + (j - 4);
        s.u.distance[row][col] =
            (m0 + col < num_bank) ? fmaxf(qn + bank_norms[m0 + col] - 2.f * acc[i][j], 0.f) : FLT_MAX;
      }
    }
    __syncthreads();

    // Merge into the per-query lists: each warp owns 16 query rows; lane j holds slot j.
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int row = warp * kRowsPerWarp + r;
      float list_d = s.list_distance[row][lane];
      int32_t list_i = s.list_index[row][lane];
      float threshold = __shfl_sync(0xFFFFFFFFu, list_d, k - 1);
#pragma unroll
      for (int part = 0; part < BM / 32; ++part) {
        const float value = s.u.distance[row][part * 32 + lane];
        unsigned pending = __ballot_sync(0xFFFFFFFFu, value < threshold);
        while (pending) {
          const int src = __ffs(pending) - 1;
          const float cand = __shfl_sync(0xFFFFFFFFu, value, src);
          const int32_t cand_index = static_cast<int32_t>(m0 + part * 32 + src);
          // Entries <= cand keep their place (they have lower indices); the rest shift down.
          const int pos = __popc(__ballot_sync(0xFFFFFFFFu, lane < k && list_d <= cand));
          const float up_d = __shfl_up_sync(0xFFFFFFFFu, list_d, 1);
          const int32_t up_i = __shfl_up_sync(0xFFFFFFFFu, list_i, 1);
          if (lane < k) {
            if (lane == pos) {
              list_d = cand;
              list_i = cand_index;
            } else if (lane > pos) {
              list_d = up_d;
              list_i = up_i;
            }
          }
          threshold = __shfl_sync(0xFFFFFFFFu, list_d, k - 1);
          pending &= ~(1u << src);
          pending &= __ballot_sync(0xFFFFFFFFu, value < threshold);
        }
      }
      s.list_distance[row][lane] = list_d;
      s.list_index[row][lane] = list_i;
    }
  }
  __syncthreads();

  for (int t = threadIdx.x; t < BQ * k; t += kThreads) {
    const int row = t / k;
    const int slot = t % k;
    const int64_t q = q0 + row;
    if (q >= num_queries) continue;
    const float d = s.list_distance[row][slot];
    const int32_t index = s.list_index[row][slot];
    if (out_index64 != nullptr) {
      out_distance[q * k + slot] = d;
      out_index64[q * k + slot] = index;
    } else {
      const int64_t at = (static_cast<int64_t>(split) * num_queries + q) * k + slot;
      out_distance[at] = d;
      out_index32[at] = index;
    }
  }
}

// Merges the per-chunk lists of each query; chunks cover ascending index ranges,
// so comparing (distance, index) keeps ties with the lower index.
__global__ void merge_splits(const float* __restrict__ part_distance, const int32_t* __restrict__ part_index,
                             int64_t num_queries, int k, int splits, float* __restrict__ out_distance,
                             int64_t* __restrict__ out_index) {
  const int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (q >= num_queries) return;
  int head[16];
  for (int sp = 0; sp < splits; ++sp) head[sp] = 0;
  for (int slot = 0; slot < k; ++slot) {
    int best = -1;
    float best_d = 0.f;
    int32_t best_i = 0;
    for (int sp = 0; sp < splits; ++sp) {
      if (head[sp] >= k) continue;
      const int64_t at = (static_cast<int64_t>(sp) * num_queries + q) * k + head[sp];
      const float d = part_distance[at];
      const int32_t i = part_index[at];
      if (i < 0) continue;
      if (best < 0 || d < best_d || (d == best_d && i < best_i)) {
        best = sp;
        best_d = d;
        best_i = i;
      }
    }
    if (best < 0) {  // fewer finite candidates than k (only with overflowing inputs)
      out_distance[q * k + slot] = FLT_MAX;
      out_index[q * k + slot] = -1;
      continue;
    }
    out_distance[q * k + slot] = best_d;
    out_index[q * k + slot] = best_i;
    ++head[best];
  }
}

}  // namespace

int knn_splits(int64_t num_queries, int64_t num_bank, int device) {
  int sms = 0, per_sm = 0;
  PATCHCORE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  PATCHCORE_CUDA_CHECK(cudaFuncSetAttribute(knn_tiles<2>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(sizeof(Smem))));
  PATCHCORE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, knn_tiles<2>, kThreads, sizeof(Smem)));
  const int64_t resident = static_cast<int64_t>(std::max(1, sms * per_sm));
  const int64_t query_blocks = (num_queries + BQ - 1) / BQ;
  const int64_t tiles = (num_bank + BM - 1) / BM;
  // Pick the split (at most 16, at most one per tile) whose last wave is fullest.
  int best = 1;
  double best_fill = 0.0;
  for (int splits = 1; splits <= 16 && splits <= tiles; ++splits) {
    const int64_t blocks = query_blocks * splits;
    const int64_t waves = (blocks + resident - 1) / resident;
    const double fill = static_cast<double>(blocks) / static_cast<double>(waves * resident);
    if (fill > best_fill + 0.02) {
      best = splits;
      best_fill = fill;
    }
  }
  return best;
}

void knn_launch(const float* queries, int64_t num_queries, const float* bank, int64_t num_bank, int64_t dim,
                int k, int splits, int warp_rows, float* query_norms, float* bank_norms, float* part_distance,
                int32_t* part_index, float* out_distance, int64_t* out_index, cudaStream_t stream) {
  if (k < 1 || k > kKnnMaxK) throw std::invalid_argument("patchcore_fast: knn k out of range for the CUDA kernel");
  if (dim % BK != 0) throw std::invalid_argument("patchcore_fast: knn dim must be padded to a multiple of 16");
  if (splits > 16) throw std::invalid_argument("patchcore_fast: knn splits must be <= 16");
  if (warp_rows != 2 && warp_rows != 4) throw std::invalid_argument("patchcore_fast: knn warp_rows must be 2 or 4");
  row_norms<<<static_cast<unsigned>((num_queries * 32 + 255) / 256), 256, 0, stream>>>(queries, num_queries, dim,
                                                                                        query_norms);
  PATCHCORE_CUDA_CHECK(cudaGetLastError());
  row_norms<<<static_cast<unsigned>((num_bank * 32 + 255) / 256), 256, 0, stream>>>(bank, num_bank, dim, bank_norms);
  PATCHCORE_CUDA_CHECK(cudaGetLastError());

  auto* kernel = warp_rows == 4 ? knn_tiles<4> : knn_tiles<2>;
  PATCHCORE_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(sizeof(Smem))));
  const dim3 grid(static_cast<unsigned>((num_queries + BQ - 1) / BQ), static_cast<unsigned>(splits));
  if (splits == 1) {
    kernel<<<grid, kThreads, sizeof(Smem), stream>>>(queries, num_queries, bank, num_bank, dim, k, 1, query_norms,
                                                     bank_norms, out_distance, nullptr, out_index);
    PATCHCORE_CUDA_CHECK(cudaGetLastError());
    return;
  }
  kernel<<<grid, kThreads, sizeof(Smem), stream>>>(queries, num_queries, bank, num_bank, dim, k, splits, query_norms,
                                                   bank_norms, part_distance, part_index, nullptr);
  PATCHCORE_CUDA_CHECK(cudaGetLastError());
  merge_splits<<<static_cast<unsigned>((num_queries + 127) / 128), 128, 0, stream>>>(
      part_distance, part_index, num_queries, k, splits, out_distance, out_index);
  PATCHCORE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace patchcore::cuda
