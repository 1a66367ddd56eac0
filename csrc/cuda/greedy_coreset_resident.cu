// Greedy k-center selection with the rows kept on chip: the "resident" CUDA kernel.
//
// Same contract and the same picks as the cached kernel (greedy_coreset_cuda.cu); it
// removes the three costs that kernel pays every step (benchmarks/NOTES.md):
//  1. Rows of up to 128 values: each thread keeps one fp16 row in registers and shared
//     memory holds the next ones, so a block's 1,188 W1 rows are all on chip (512 in
//     registers, 676 in shared memory) and a step reads no fp16 row from device memory.
//     Wider rows are read by groups of 8 lanes, so loads from device memory coalesce.
//  2. Rows the fp16 bound cannot settle are queued in shared memory during the pass and
//     settled together, a warp per row: one device-memory round trip per block and step
//     instead of one per row in a chain. The fp16 copies also bound a queued row's exact
//     distance from above; when no queued row could become the block's best (nearly
//     always: they are the rows close to the new centre), the block arrives first and
//     settles them while the other blocks arrive, off the step's critical path.
//  3. Before arriving, each block writes the fp16 copy of its best row (with its norm and
//     residual) to a slot; after the barrier every block reads the winner's slot, which
//     sits in L2, instead of fetching the float32 row from device memory. The pass then
//     measures fp16 rows against the fp16 centre, and the bound adds the centre's
//     residual to the row's (half_bound.h); the exact path reads both float32 rows.
#include <cuda_fp16.h>

#include <algorithm>
#include <string>

#include "../half_bound.h"
#include "check.cuh"
#include "greedy_coreset_common.cuh"
#include "greedy_coreset_cuda.cuh"

namespace patchcore::cuda {
namespace {

using namespace coreset;

constexpr int kThreads = kCoresetThreads;
constexpr int kGroup = 8;                    // lanes per row in the wide pass
constexpr int kGroupsPerBlock = kThreads / kGroup;
constexpr int kCachePad = 8;                 // extra halves per cached row: spreads rows over the banks
constexpr int kSlotTail = 8;                 // halves after a slot's row: its squared norm and residual

struct ResidentParams : SelectionParams {
  __half* slots;  // [3][blocks][padded_dim + kSlotTail]: each block's best row, per barrier slot
  long long* stage_cycles;  // optional [blocks][kStages]: see Stage
};

// Where a block's time goes, when the caller asks (stage_cycles != nullptr): thread 0 adds the
// clock cycles since its previous mark to the stage that just ended, summed over all steps.
enum Stage { kPublish, kArriveAndSettle, kWait, kCentre, kPass, kReduce, kStages };

// Part of the exact float32 squared distance between rows a and b of x (see exact_part).
__device__ __forceinline__ float exact_rows_part(const ResidentParams& p, int64_t a, int64_t b, int sub, int stride) {
  return exact_part<2>(p, p.x + a * p.dim, p.x + b * p.dim, sub, stride);
}

// kRegVecs > 0: rows of exactly 8 * kRegVecs halves, one row per thread, the block's first
// kThreads rows in registers. kRegVecs == 0: any width, 8 lanes per row, no registers.
template <int kRegVecs>
__global__ void __launch_bounds__(kThreads, 1) greedy_resident(ResidentParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  float* centre_scaled = reinterpret_cast<float*>(smem);  // padded_dim: the winner's fp16 row, as floats
  auto* scratch = reinterpret_cast<unsigned long long*>(centre_scaled + p.padded_dim);  // 32
  float* slice_min = reinterpret_cast<float*>(scratch + 32);  // running minimum per row
  float* slice_residual = slice_min + p.slice_stride;
  float* slice_norm_sq = slice_residual + p.slice_stride;
  int* pending = reinterpret_cast<int*>(slice_norm_sq + p.slice_stride);  // rows queued for the exact phase
  __half* cache = reinterpret_cast<__half*>(pending + p.slice_stride);
  __shared__ int64_t shared_pick;
  __shared__ float shared_centre_norm_sq, shared_centre_residual;
  __shared__ int pending_count, shared_candidate;
  __shared__ unsigned long long pending_key_bound;  // largest key a queued row could end with
  __shared__ bool shared_settle_now;
  __shared__ long long stage_sums[kStages + 1];  // the last entry holds the previous mark

  const int tid = threadIdx.x;
  const int64_t vectors = p.padded_dim / 8;  // 16-byte vectors per fp16 row
  const int64_t cache_stride = p.padded_dim + kCachePad;
  const int64_t slot_stride = p.padded_dim + kSlotTail;
  const float scale = half_bound::scale_for(*p.max_abs);
  const float rounding = half_bound::relative_rounding(p.padded_dim);
  const int64_t lo = static_cast<int64_t>(blockIdx.x) * p.rows_per_block;
  const int64_t count = lo < p.rows ? min(p.rows - lo, p.rows_per_block) : 0;
  // Block-local rows [0, in_registers) live in registers, the next `cached` in shared memory,
  // the rest are read from device memory every step.
  const int64_t in_registers = kRegVecs > 0 ? min(count, static_cast<int64_t>(kThreads)) : 0;
  const int64_t cached = min(count - in_registers, p.cached_rows);
  const int64_t on_chip = in_registers + cached;
  auto row_of = [&](int64_t local) -> const uint4* {
    return reinterpret_cast<const uint4*>(local < on_chip ? cache + (local - in_registers) * cache_stride
                                                          : p.half_rows + (lo + local) * p.padded_dim);
  };

  uint4 reg[kRegVecs > 0 ? kRegVecs : 1];
  if constexpr (kRegVecs > 0) {
    if (tid < in_registers) {
      const uint4* src = reinterpret_cast<const uint4*>(p.half_rows + (lo + tid) * p.padded_dim);
#pragma unroll
      for (int v = 0; v < kRegVecs; ++v) reg[v] = src[v];
    }
  }
  for (int64_t t = tid; t < cached * vectors; t += kThreads) {
    const int64_t r = t / vectors, v = t % vectors;
    reinterpret_cast<uint4*>(cache + r * cache_stride)[v] =
        reinterpret_cast<const uint4*>(p.half_rows + (lo + in_registers + r) * p.padded_dim)[v];
  }
  for (int64_t t = tid; t < count; t += kThreads) {
    slice_min[t] = p.min_distance[lo + t];
    slice_residual[t] = p.residual[lo + t];
    slice_norm_sq[t] = p.half_norm_sq[lo + t];
  }
  if (tid == 0) {
    pending_count = 0;
    pending_key_bound = 0ull;
    for (int i = 0; i < kStages; ++i) stage_sums[i] = 0;
  }
  __syncthreads();
  // Kept in shared memory, not registers: the register rows leave none to spare.
  auto mark = [&](Stage stage) {
    if (p.stage_cycles == nullptr || tid != 0) return;
    const long long now = clock64();
    if (stage < kStages) stage_sums[stage] += now - stage_sums[kStages];
    stage_sums[kStages] = now;
  };

  // Exact phase: a warp per queued row, all `queued` rows of the block at once. Returns the
  // largest key of this thread's settled rows.
  auto settle_queued = [&](int queued, int64_t pick) {
    unsigned long long key = 0ull;
    for (int base = 0; base < queued; base += kThreads / 32) {  // uniform across the block
      const int q = base + tid / 32, lane = tid & 31;
      const int64_t local = q < queued ? pending[q] : 0;
      float acc = q < queued ? exact_rows_part(p, lo + local, pick, lane, 32) : 0.f;
      for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_xor_sync(0xFFFFFFFFu, acc, offset);
      if (q < queued && lane == 0) {
        float m = slice_min[local];
        const float exact = sqrtf(acc);
        if (exact < m) slice_min[local] = m = exact;
        key = max(key, pack(m, lo + local));
      }
    }
    return key;
  };

  unsigned long long best = 0ull;
  for (int64_t t = tid; t < count; t += kThreads) best = max(best, pack(slice_min[t], lo + t));
  best = block_max<kThreads>(best, scratch);
  if (tid == 0) shared_candidate = best ? static_cast<int>(unpack_index(best) - lo) : -1;
  __syncthreads();
  int queued = 0;              // rows left for the exact phase of the previous centre
  int64_t previous_pick = -1;  // that centre

  mark(kStages);  // start
  for (int64_t step = 0; step < p.n; ++step) {
    // Publish the block's best row (shared_candidate) in this step's slot, arrive with its key,
    // settle the queued rows that could not change the key while the other blocks arrive,
    // then wait for the winner.
    const int candidate = shared_candidate;
    if (candidate >= 0) {
      uint4* dst = reinterpret_cast<uint4*>(p.slots + ((step % 3) * gridDim.x + blockIdx.x) * slot_stride);
      if (candidate < in_registers) {
        if constexpr (kRegVecs > 0) {
          if (tid == candidate) {
#pragma unroll
            for (int v = 0; v < kRegVecs; ++v) __stcg(dst + v, reg[v]);
          }
        }
      } else {
        const uint4* src = row_of(candidate);
        for (int64_t v = tid; v < vectors; v += kThreads) __stcg(dst + v, src[v]);
      }
      if (tid == kThreads - 1)
        __stcg(reinterpret_cast<float4*>(dst + vectors),
               make_float4(slice_norm_sq[candidate], slice_residual[candidate], 0.f, 0.f));
    }
    __syncthreads();  // the release in arrive() then covers the whole block's slot writes
    mark(kPublish);
    if (tid == 0) arrive(p.barrier, step % 3, best);
    if (queued > 0) settle_queued(queued, previous_pick);
    mark(kArriveAndSettle);
    if (tid == 0) {
      shared_pick = unpack_index(wait_all(p.barrier, step % 3));
      mark(kWait);
      if (blockIdx.x == 0) {
        p.out[step] = shared_pick;
        clear(p.barrier, (step + 2) % 3);
      }
    }
    __syncthreads();
    if (step + 1 == p.n) break;
    const int64_t pick = shared_pick;

    // The winner's slot was written this step, so it is read from L2 (never from a stale L1 line).
    const uint4* slot = reinterpret_cast<const uint4*>(
        p.slots + ((step % 3) * gridDim.x + pick / p.rows_per_block) * slot_stride);
    for (int64_t v = tid; v <= vectors; v += kThreads) {
      if (v < vectors) {
        const uint4 raw = __ldcg(slot + v);
        const __half2* h2 = reinterpret_cast<const __half2*>(&raw);
        float4 a, b;
        *reinterpret_cast<float2*>(&a.x) = __half22float2(h2[0]);
        *reinterpret_cast<float2*>(&a.z) = __half22float2(h2[1]);
        *reinterpret_cast<float2*>(&b.x) = __half22float2(h2[2]);
        *reinterpret_cast<float2*>(&b.z) = __half22float2(h2[3]);
        reinterpret_cast<float4*>(centre_scaled + 8 * v)[0] = a;
        reinterpret_cast<float4*>(centre_scaled + 8 * v)[1] = b;
      } else {
        const float4 tail = __ldcg(reinterpret_cast<const float4*>(slot + vectors));
        shared_centre_norm_sq = tail.x;
        shared_centre_residual = tail.y;
      }
    }
    __syncthreads();
    mark(kCentre);
    const float centre_norm_sq = shared_centre_norm_sq;
    const float centre_residual = shared_centre_residual;

    best = 0ull;
    // Settles row `local` if the fp16 bound allows; else queues it for the exact phase and
    // records the largest key it could end with.
    auto consider = [&](int64_t local, float dot) {
      float m = slice_min[local];
      if (m < 0.f) return;  // already selected
      const int64_t i = lo + local;
      if (i == pick) {
        slice_min[local] = kSelected;
        return;
      }
      const float h_norm_sq = slice_norm_sq[local];
      const float residual = slice_residual[local] + centre_residual;
      const float lower = half_bound::expanded_lower(h_norm_sq, centre_norm_sq, dot, rounding) / scale;
      if (half_bound::cannot_lower(lower, residual, m, rounding)) {
        best = max(best, pack(m, i));
        return;
      }
      pending[atomicAdd(&pending_count, 1)] = static_cast<int>(local);  // room for every row
      const float upper = half_bound::expanded_upper(h_norm_sq, centre_norm_sq, dot, rounding) / scale;
      atomicMax(&pending_key_bound, pack(fminf(m, half_bound::exact_at_most(upper, residual, rounding)), i));
    };

    if constexpr (kRegVecs > 0) {
      if (tid < in_registers) {
        float dot0 = 0.f, dot1 = 0.f;
#pragma unroll
        for (int v = 0; v < kRegVecs; ++v) {
          // Opaque to the compiler, so it cannot hoist the conversions out of the step loop
          // (128 floats would not fit beside everything else).
          asm volatile("" : "+r"(reg[v].x), "+r"(reg[v].y), "+r"(reg[v].z), "+r"(reg[v].w));
          accumulate(reg[v], centre_scaled + 8 * v, dot0, dot1);
        }
        consider(tid, dot0 + dot1);
      }
      for (int64_t local = in_registers + tid; local < count; local += kThreads) {
        const uint4* row = row_of(local);
        float dot0 = 0.f, dot1 = 0.f;
#pragma unroll 4  // not fully: the register rows already hold 4 * kRegVecs registers
        for (int v = 0; v < kRegVecs; ++v) accumulate(row[v], centre_scaled + 8 * v, dot0, dot1);
        consider(local, dot0 + dot1);
      }
    } else {
      // Each warp takes 4 rows at a time; the loop bound is uniform across the warp, so
      // every lane reaches the shuffles.
      const int lane = tid & 31, sub = tid & (kGroup - 1);
      for (int64_t base = (tid / 32) * (32 / kGroup); base < count; base += kGroupsPerBlock) {
        const int64_t local = base + lane / kGroup;
        float dot0 = 0.f, dot1 = 0.f;
        if (local < count) {
          const uint4* row = row_of(local);
#pragma unroll 8  // 8 loads in flight per lane: enough bytes in flight to keep device memory busy
          for (int64_t v = sub; v < vectors; v += kGroup) accumulate(row[v], centre_scaled + 8 * v, dot0, dot1);
        }
        float dot = dot0 + dot1;
        for (int offset = kGroup / 2; offset > 0; offset >>= 1) dot += __shfl_xor_sync(0xFFFFFFFFu, dot, offset);
        if (local < count && sub == 0) consider(local, dot);
      }
    }
    __syncthreads();
    mark(kPass);

    // The key goes out before the queued rows are settled unless one of them could change it.
    queued = pending_count;
    const unsigned long long queued_bound = pending_key_bound;
    best = block_max<kThreads>(best, scratch);  // its barriers also end the reads above
    if (tid == 0) {
      shared_settle_now = queued_bound > best;
      pending_count = 0;
      pending_key_bound = 0ull;
    }
    __syncthreads();
    if (shared_settle_now) {
      const unsigned long long settled = settle_queued(queued, pick);
      best = block_max<kThreads>(tid == 0 ? max(best, settled) : settled, scratch);
      queued = 0;
    }
    previous_pick = pick;
    if (tid == 0) shared_candidate = best ? static_cast<int>(unpack_index(best) - lo) : -1;
    __syncthreads();
    mark(kReduce);
  }

  __syncthreads();
  for (int64_t t = tid; t < count; t += kThreads) p.min_distance[lo + t] = slice_min[t];
  if (tid < kStages && p.stage_cycles != nullptr) p.stage_cycles[blockIdx.x * kStages + tid] = stage_sums[tid];
}

template <int kRegVecs>
void launch(const ResidentParams& params, int64_t blocks, const CoresetDevice& device, cudaStream_t stream) {
  ResidentParams p = params;
  const int64_t in_registers = kRegVecs > 0 ? std::min<int64_t>(p.rows_per_block, kThreads) : 0;
  // Winner centre, reduction scratch, each row's minimum, residual, norm and exact-phase queue entry.
  const int64_t fixed_bytes = p.padded_dim * static_cast<int64_t>(sizeof(float)) + 32 * 8 + p.slice_stride * 16;
  auto* kernel = greedy_resident<kRegVecs>;
  cudaFuncAttributes attributes{};
  PATCHCORE_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  const int64_t static_bytes = static_cast<int64_t>(attributes.sharedSizeBytes);  // the __shared__ scalars
  if (fixed_bytes + static_bytes > device.smem_optin)
    throw std::invalid_argument("patchcore_fast: " + std::to_string(p.rows) + " rows of dim " +
                                std::to_string(p.dim) +
                                " exceed the GPU coreset kernel's shared memory; use the CPU or fewer rows");
  const int64_t row_bytes = (p.padded_dim + kCachePad) * static_cast<int64_t>(sizeof(__half));
  p.cached_rows =
      std::min<int64_t>(p.rows_per_block - in_registers, (device.smem_optin - static_bytes - fixed_bytes) / row_bytes);
  const size_t smem = static_cast<size_t>(fixed_bytes + p.cached_rows * row_bytes);

  PATCHCORE_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  int per_sm = 0;
  PATCHCORE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
  if (per_sm < 1) throw std::runtime_error("patchcore_fast: the GPU coreset kernel does not fit on this device");
  void* args[] = {&p};
  // A cooperative launch guarantees that all blocks are resident, which the arrival counters rely on.
  PATCHCORE_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(kernel),
                                                   dim3(static_cast<unsigned>(blocks)), dim3(kThreads), args, smem,
                                                   stream));
}

}  // namespace

int coreset_resident_stages() { return kStages; }

int64_t coreset_resident_slot_halves(int64_t rows, int64_t dim, const CoresetDevice& device) {
  return 3 * coreset_blocks(rows, device) * (coreset_padded_dim(dim) + kSlotTail);
}

void greedy_coreset_resident_launch(const float* x, int64_t rows, int64_t dim, float* min_distance, int64_t n,
                                    int64_t* out, const __half* half_rows, const float* half_norm_sq,
                                    const float* residual, unsigned long long* sync_words, __half* slots,
                                    const float* max_abs, long long* stage_cycles, cudaStream_t stream) {
  const CoresetDevice device = coreset_device();
  const int64_t blocks = coreset_blocks(rows, device);
  ResidentParams p{selection_params(x, rows, dim, min_distance, n, out, half_rows, half_norm_sq, residual,
                                    sync_words, max_abs, blocks),
                   slots, stage_cycles};
  if (p.padded_dim == 64)
    launch<8>(p, blocks, device, stream);
  else if (p.padded_dim == 128)
    launch<16>(p, blocks, device, stream);
  else
    launch<0>(p, blocks, device, stream);
}

}  // namespace patchcore::cuda
