// Tensor-level entry points of the two kernels, one per device.
// Inputs arrive validated by the Python layer (patchcore_fast/coreset.py, knn.py):
// float32, 2-D, finite, on one device. The C++ side re-checks the cheap
// invariants (shapes, dtype, device) so that a direct call cannot crash.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <tuple>
#include <vector>

namespace patchcore {

// Called by the calling thread between units of work (coreset passes, knn query slabs) with
// the work done so far (picks, queries); returning false stops the kernel early, its output
// then incomplete (the binding raises). Empty: run to the end.
using Progress = std::function<bool(int64_t)>;

// Greedy k-center selection. `initial` holds each point's starting distance
// (L2, same space as `features`); the first pick is its argmax. Returns the
// `n` selected row indices in selection order (int64). Ties go to the lowest index.
at::Tensor greedy_coreset_cpu(const at::Tensor& features, const at::Tensor& initial, int64_t n,
                              const Progress& progress = {});

// Exact top-k squared-L2 search: (distances [Q, k] ascending, indices [Q, k]).
// Ties go to the lower index. No query x bank matrix is ever held.
std::tuple<at::Tensor, at::Tensor> knn_cpu(const at::Tensor& queries, const at::Tensor& bank, int64_t k,
                                           const Progress& progress = {});

// Exact top-k as knn_cpu, float for float, skipping the bank rows a rigorous bound rules out
// (patchcore_fast/search_index.py builds `basis` [rank, D] and `bank_screen` [M, rank + 2];
// basis_rounding = ||basis - its float64 original||_F). Returns (distances, indices, exact
// query-row distances computed, out of Q x M for brute force).
// (distances, indices, exact distances computed, extension terms screened); bank_extension:
// the cascade's second screen (knn_pruned_cpu.cpp), or none.
std::tuple<at::Tensor, at::Tensor, int64_t, int64_t> knn_pruned_cpu(
    const at::Tensor& queries, const at::Tensor& bank, int64_t k, const at::Tensor& basis,
    const at::Tensor& bank_screen, const std::optional<at::Tensor>& bank_extension, double basis_rounding,
    const Progress& progress = {});

// Greedy-coreset pieces whose floats depend on the row alone (coreset_setup_cpu.cpp): the random
// projection (rows x weights^T) and each row's mean distance to `centres`.
at::Tensor fixed_order_projection_cpu(const at::Tensor& features, const at::Tensor& weights);
at::Tensor mean_distances_cpu(const at::Tensor& space, const at::Tensor& centres);

// The distributed greedy coreset's per-rank parts (coreset_shard_cpu.cpp). A shard holds its rows of
// the selection space and their running minima; `pass(centres [b, dim])` lowers the minima by the
// centres and returns the shard's kCandidates + 1 farthest rows (values, local rows; best first);
// `pin(rows)` marks picked rows. `coreset_pick_batch_cpu` picks the next batch from every shard's
// offers (values [U], global indices [U], rows [U, dim]) given the bound T they put on every other
// row (coreset_batch.h): positions into the offers, in pick order.
class CoresetShard {
 public:
  CoresetShard(const at::Tensor& space, const at::Tensor& initial);
  std::tuple<at::Tensor, at::Tensor> pass(const at::Tensor& centres);
  void pin(const at::Tensor& local_rows);
  at::Tensor min_distance() const { return min_distance_; }
  int64_t dim() const { return space_.size(1); }

 private:
  at::Tensor space_, min_distance_;
  std::vector<float> norm_sq_, norm_, skip_below_;
};
at::Tensor coreset_pick_batch_cpu(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& rows,
                                  double bound, int64_t remaining);

// The locally aware patch embedding (patchcore_fast/embedding.py, csrc/embedding_bins.h): feature
// maps [B, C_l, H_l, W_l] float32, one per layer (the first layer's grid is the output grid) ->
// features [B * H_0 * W_0, dim], computed without unfolding any neighbourhood.
at::Tensor patch_embedding_cpu(const std::vector<at::Tensor>& maps, int64_t dim);

#ifdef PATCHCORE_WITH_CUDA
at::Tensor patch_embedding_cuda(const std::vector<at::Tensor>& maps, int64_t dim);
// The two CUDA coreset kernels (same picks; see csrc/cuda/greedy_coreset_cuda.cuh).
enum class CoresetKernel { kCached, kResident };
at::Tensor greedy_coreset_cuda(const at::Tensor& features, const at::Tensor& initial, int64_t n,
                               CoresetKernel kernel);
// The resident kernel, also returning each block's clock cycles per step stage [blocks, stages]
// (publish, arrive and settle, wait, centre, pass, reduce; summed over the steps).
std::tuple<at::Tensor, at::Tensor> greedy_coreset_cuda_stages(const at::Tensor& features, const at::Tensor& initial,
                                                              int64_t n);
// One round of a distributed coreset shard on its GPU (csrc/cuda/coreset_shard_cuda.cuh):
// min_distance [N] lowered in place by the centres [b, D]; returns the shard's `offered` farthest
// rows (values, local rows) in the CPU shard's order, on the device.
std::tuple<at::Tensor, at::Tensor> coreset_shard_pass_cuda(const at::Tensor& space, const at::Tensor& min_distance,
                                                           const at::Tensor& centres, int64_t offered);
// warp_rows: the CUDA knn kernel's warp layout, 2 (16 x 128 per warp) or 4 (32 x 64); see knn_cuda.cuh.
std::tuple<at::Tensor, at::Tensor> knn_cuda(const at::Tensor& queries, const at::Tensor& bank, int64_t k,
                                            int64_t warp_rows);
// Largest k the fused CUDA knn kernel keeps per query (one list slot per warp lane).
constexpr int64_t kCudaKnnMaxK = 32;
int cuda_runtime_version();
#endif

}  // namespace patchcore
