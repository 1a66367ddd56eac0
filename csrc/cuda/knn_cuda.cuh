// Launcher of the CUDA top-k squared-L2 kernel: raw pointers and a stream, no torch.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace patchcore::cuda {

constexpr int kKnnMaxK = 32;     // one list slot per warp lane
constexpr int kKnnDimAlign = 16;  // rows must be padded to a multiple of this many floats

// Number of bank chunks searched by separate blocks (merged afterwards) so that the
// grid fills the device; 1 means no merge buffer is needed.
int knn_splits(int64_t queries, int64_t bank, int device);

// queries [Q, dim] and bank [M, dim], float32, contiguous, dim a multiple of
// kKnnDimAlign, 16-byte aligned. Writes out_distance / out_index [Q, k].
// Workspace: query_norms [Q], bank_norms [M], and when splits > 1,
// part_distance / part_index [splits, Q, k]. warp_rows: 2 (each warp computes a 16 x 128 part
// of a tile, measured on an H200) or 4 (32 x 64, fewer shared-memory reads; not yet measured).
void knn_launch(const float* queries, int64_t num_queries, const float* bank, int64_t num_bank, int64_t dim,
                int k, int splits, int warp_rows, float* query_norms, float* bank_norms, float* part_distance,
                int32_t* part_index, float* out_distance, int64_t* out_index, cudaStream_t stream);

}  // namespace patchcore::cuda
