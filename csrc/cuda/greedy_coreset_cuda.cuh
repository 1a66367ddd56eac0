// Launchers of the CUDA greedy k-center kernels: raw pointers and a stream, no torch.
//
// Both kernels run the whole selection in one cooperative launch and give the same picks:
//  - cached (greedy_coreset_cuda.cu): one row per thread; rows that do not fit in shared
//    memory are read from device memory every step; uncertain rows are settled inline.
//  - resident (greedy_coreset_resident.cu): rows of up to 128 values also live in
//    registers, so a W1-sized selection stays on chip; wide rows are read by groups of
//    lanes; uncertain rows are settled together after the pass; the winner's fp16 row
//    reaches the other blocks through an L2-resident slot.
#pragma once
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace patchcore::cuda {

constexpr int kCoresetThreads = 512;

// Row length of the fp16 copy: a multiple of 64 halves.
int64_t coreset_padded_dim(int64_t dim);

struct CoresetDevice {
  int sms = 0;
  int smem_optin = 0;
};
// The current device's multiprocessors and shared memory; throws if it cannot launch cooperatively.
CoresetDevice coreset_device();
// Blocks of a selection over `rows` rows (at most one per multiprocessor).
int64_t coreset_blocks(int64_t rows, const CoresetDevice& device);

// Fills the fp16 copy: half_rows [rows * coreset_padded_dim(dim)], each row's squared norm
// (scaled, as the kernels see it) and rounding residual [rows]. max_abs: device scalar max |x|.
void greedy_coreset_prepare(const float* x, int64_t rows, int64_t dim, const float* max_abs, __half* half_rows,
                            float* half_norm_sq, float* residual, cudaStream_t stream);

// Selects `n` rows of x [rows, dim] (float32, contiguous) greedily, starting from
// `min_distance` [rows] (overwritten: on return it holds each row's final distance,
// -1 for selected rows). Writes the picks to out [n]. Needs the prepared fp16 copy and
// sync_words [6] zeroed.
void greedy_coreset_launch(const float* x, int64_t rows, int64_t dim, float* min_distance, int64_t n,
                           int64_t* out, const __half* half_rows, const float* half_norm_sq, const float* residual,
                           unsigned long long* sync_words, const float* max_abs, cudaStream_t stream);

// Halves of the resident kernel's winner slots (three per block).
int64_t coreset_resident_slot_halves(int64_t rows, int64_t dim, const CoresetDevice& device);

// Stages of a resident-kernel step that stage_cycles reports: publish, arrive and settle,
// wait, centre, pass, reduce.
int coreset_resident_stages();

// The resident kernel: same contract as greedy_coreset_launch, plus the slots workspace.
// stage_cycles: nullptr, or [blocks * coreset_resident_stages()] int64 that receives each
// block's clock cycles per stage, summed over the steps.
void greedy_coreset_resident_launch(const float* x, int64_t rows, int64_t dim, float* min_distance, int64_t n,
                                    int64_t* out, const __half* half_rows, const float* half_norm_sq,
                                    const float* residual, unsigned long long* sync_words, __half* slots,
                                    const float* max_abs, long long* stage_cycles, cudaStream_t stream);

}  // namespace patchcore::cuda
