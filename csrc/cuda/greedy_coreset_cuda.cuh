// Launcher of the CUDA greedy k-center kernel: raw pointers and a stream, no torch.
#pragma once
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace patchcore::cuda {

// Row length of the fp16 copy: a multiple of 64 halves.
int64_t coreset_padded_dim(int64_t dim);

// Selects `n` rows of x [rows, dim] (float32, contiguous) greedily, starting from
// `min_distance` [rows] (overwritten: on return it holds each row's final distance,
// -1 for selected rows). Writes the picks to out [n]. Workspace: half_rows
// [rows * coreset_padded_dim(dim)], half_norm_sq [rows], residual [rows], sync_words [6]
// zeroed, and max_abs, a device scalar holding max |x|. The whole selection runs in one
// cooperative launch.
void greedy_coreset_launch(const float* x, int64_t rows, int64_t dim, float* min_distance, int64_t n,
                           int64_t* out, __half* half_rows, float* half_norm_sq, float* residual,
                           unsigned long long* sync_words, const float* max_abs, cudaStream_t stream);

}  // namespace patchcore::cuda
