// One round of a distributed coreset shard on its GPU (patchcore_fast/distributed.py drives the
// rounds; csrc/cpu/coreset_shard_cpu.cpp is the CPU twin): raw pointers and a stream, no torch.
//
// Every row's minimum distance is lowered by the round's centres with the CPU kernels' exact
// distance in its fixed order (element j in partial sum j % 16, no fused multiply-add, the
// partial sums added in a fixed pairwise tree, then an IEEE square root; csrc/cpu/isa/dot_tile.h
// fixed_order_sum), so each minimum is the float a CPU rank computes for the same row: the
// picks do not depend on whether a shard lives on a CPU or a GPU. Each row also gets the key
// that orders the offers as the CPU shard orders them (larger minimum first, then lower index;
// picked rows, at -1, below every distance and among themselves by index).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace patchcore::cuda {

constexpr int kShardThreads = 256;
// Centres held in shared memory at a time (a chunk of centres x dim floats within this budget).
constexpr int64_t kShardCentreBytes = 32 * 1024;

// min_distance [rows] (in place) = min(min_distance, |space_i - centre_c|) over the `count`
// centres [count, dim]; keys [rows] = the offer order (see above). space [rows, dim] float32,
// contiguous. rows < 2^32.
void coreset_shard_pass_launch(const float* space, int64_t rows, int64_t dim, const float* centres, int64_t count,
                               float* min_distance, unsigned long long* keys, cudaStream_t stream);

}  // namespace patchcore::cuda
