// Torch side of the CUDA kernels: shapes, workspaces, device and stream. The .cu files
// behind it see raw pointers only.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <limits>

#include "cuda/coreset_shard_cuda.cuh"
#include "cuda/greedy_coreset_cuda.cuh"
#include "cuda/embedding_cuda.cuh"
#include "cuda/knn_cuda.cuh"
#include "embedding_bins.h"
#include "ops.h"

namespace patchcore {

static_assert(kCudaKnnMaxK == cuda::kKnnMaxK, "ops.h and knn_cuda.cuh disagree on the largest k");

int cuda_runtime_version() { return CUDART_VERSION; }

std::tuple<at::Tensor, at::Tensor> coreset_shard_pass_cuda(const at::Tensor& space, const at::Tensor& min_distance,
                                                           const at::Tensor& centres_in, int64_t offered) {
  const c10::cuda::CUDAGuard guard(space.device());
  const int64_t rows = space.size(0), dim = space.size(1);
  TORCH_CHECK_VALUE(rows < std::numeric_limits<uint32_t>::max(), "coreset shard pass: too many rows for one GPU shard");
  const at::Tensor centres = centres_in.contiguous();
  at::Tensor keys = at::empty({rows}, space.options().dtype(at::kLong));
  cuda::coreset_shard_pass_launch(space.data_ptr<float>(), rows, dim, centres.data_ptr<float>(), centres.size(0),
                                  min_distance.data_ptr<float>(), reinterpret_cast<unsigned long long*>(keys.data_ptr<int64_t>()),
                                  c10::cuda::getCurrentCUDAStream());
  // Keys are below 2^63 (a float's bits + 1, shifted by 32), so their int64 order is the offer order.
  const at::Tensor local = std::get<1>(at::topk(keys, std::min(offered, rows), 0, true, true));
  return {min_distance.index_select(0, local), local};
}

namespace {
// Both coreset kernels; `stage_cycles` (resident kernel only) as in greedy_coreset_cuda.cuh.
at::Tensor run_coreset(const at::Tensor& features_in, const at::Tensor& initial, int64_t n, CoresetKernel kernel,
                       long long* stage_cycles) {
  const c10::cuda::CUDAGuard guard(features_in.device());
  const at::Tensor features = features_in.contiguous();
  const int64_t rows = features.size(0);
  const int64_t dim = features.size(1);
  TORCH_CHECK_VALUE(rows < std::numeric_limits<uint32_t>::max(), "greedy_coreset: too many rows for the CUDA kernel");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  at::Tensor min_distance = initial.contiguous().clone();
  at::Tensor out = at::empty({n}, features.options().dtype(at::kLong));
  at::Tensor half_rows = at::empty({rows * cuda::coreset_padded_dim(dim)}, features.options().dtype(at::kHalf));
  at::Tensor half_norm_sq = at::empty({rows}, features.options());
  at::Tensor residual = at::empty({rows}, features.options());
  at::Tensor sync_words = at::zeros({6}, features.options().dtype(at::kLong));  // 3 keys, 3 arrival counters
  at::Tensor max_abs = at::linalg_vector_norm(features, std::numeric_limits<double>::infinity());

  const float* x = features.data_ptr<float>();
  auto* halves = reinterpret_cast<__half*>(half_rows.data_ptr<at::Half>());
  auto* words = reinterpret_cast<unsigned long long*>(sync_words.data_ptr<int64_t>());
  cuda::greedy_coreset_prepare(x, rows, dim, max_abs.data_ptr<float>(), halves, half_norm_sq.data_ptr<float>(),
                               residual.data_ptr<float>(), stream);
  if (kernel == CoresetKernel::kResident) {
    const cuda::CoresetDevice device = cuda::coreset_device();
    at::Tensor slots =
        at::empty({cuda::coreset_resident_slot_halves(rows, dim, device)}, features.options().dtype(at::kHalf));
    cuda::greedy_coreset_resident_launch(x, rows, dim, min_distance.data_ptr<float>(), n, out.data_ptr<int64_t>(),
                                         halves, half_norm_sq.data_ptr<float>(), residual.data_ptr<float>(), words,
                                         reinterpret_cast<__half*>(slots.data_ptr<at::Half>()),
                                         max_abs.data_ptr<float>(), stage_cycles, stream);
  } else {
    cuda::greedy_coreset_launch(x, rows, dim, min_distance.data_ptr<float>(), n, out.data_ptr<int64_t>(), halves,
                                half_norm_sq.data_ptr<float>(), residual.data_ptr<float>(), words,
                                max_abs.data_ptr<float>(), stream);
  }
  return out;
}
}  // namespace

at::Tensor greedy_coreset_cuda(const at::Tensor& features, const at::Tensor& initial, int64_t n,
                               CoresetKernel kernel) {
  return run_coreset(features, initial, n, kernel, nullptr);
}

std::tuple<at::Tensor, at::Tensor> greedy_coreset_cuda_stages(const at::Tensor& features, const at::Tensor& initial,
                                                              int64_t n) {
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t blocks = cuda::coreset_blocks(features.size(0), cuda::coreset_device());
  at::Tensor cycles = at::zeros({blocks, cuda::coreset_resident_stages()}, features.options().dtype(at::kLong));
  at::Tensor picks = run_coreset(features, initial, n, CoresetKernel::kResident,
                                 reinterpret_cast<long long*>(cycles.data_ptr<int64_t>()));
  return {picks, cycles};
}

namespace {
// Contiguous, 16-byte aligned, row length padded with zeros to the kernel's slice width.
at::Tensor kernel_layout(const at::Tensor& x) {
  at::Tensor out = x.contiguous();
  const int64_t dim = out.size(1);
  const int64_t padded = (dim + cuda::kKnnDimAlign - 1) / cuda::kKnnDimAlign * cuda::kKnnDimAlign;
  if (padded != dim) return at::constant_pad_nd(out, {0, padded - dim}, 0.0);
  if (reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 != 0) return out.clone();
  return out;
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> knn_cuda(const at::Tensor& queries_in, const at::Tensor& bank_in, int64_t k,
                                            int64_t warp_rows) {
  const c10::cuda::CUDAGuard guard(queries_in.device());
  TORCH_CHECK_VALUE(bank_in.size(0) < std::numeric_limits<int32_t>::max(), "knn: bank too large for the CUDA kernel");
  const at::Tensor queries = kernel_layout(queries_in);
  const at::Tensor bank = kernel_layout(bank_in);
  const int64_t num_queries = queries.size(0);
  const int64_t num_bank = bank.size(0);

  const int splits = cuda::knn_splits(num_queries, num_bank, queries.get_device());
  const auto f32 = queries.options();
  at::Tensor query_norms = at::empty({num_queries}, f32);
  at::Tensor bank_norms = at::empty({num_bank}, f32);
  at::Tensor out_distance = at::empty({num_queries, k}, f32);
  at::Tensor out_index = at::empty({num_queries, k}, f32.dtype(at::kLong));
  at::Tensor part_distance, part_index;
  if (splits > 1) {
    part_distance = at::empty({splits, num_queries, k}, f32);
    part_index = at::empty({splits, num_queries, k}, f32.dtype(at::kInt));
  }
  cuda::knn_launch(queries.data_ptr<float>(), num_queries, bank.data_ptr<float>(), num_bank, queries.size(1),
                   static_cast<int>(k), splits, static_cast<int>(warp_rows), query_norms.data_ptr<float>(), bank_norms.data_ptr<float>(),
                   splits > 1 ? part_distance.data_ptr<float>() : nullptr,
                   splits > 1 ? part_index.data_ptr<int32_t>() : nullptr, out_distance.data_ptr<float>(),
                   out_index.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream());
  return {out_distance, out_index};
}

at::Tensor patch_embedding_cuda(const std::vector<at::Tensor>& maps_in, int64_t dim) {
  const c10::cuda::CUDAGuard guard(maps_in[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t layers = static_cast<int64_t>(maps_in.size());
  const int64_t batch = maps_in[0].size(0), height = maps_in[0].size(2), width = maps_in[0].size(3);
  at::Tensor out = at::zeros({batch * height * width, dim}, maps_in[0].options());
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor maps = maps_in[l].contiguous();
    const int64_t h = maps.size(2), w = maps.size(3);
    at::Tensor pooled = at::empty({batch, embedding::column_count(l, dim, layers), h, w}, out.options());
    cuda::embed_layer_launch(maps.data_ptr<float>(), batch, maps.size(1), h, w, dim, l, layers,
                             pooled.data_ptr<float>(), stream);
    cuda::embed_resample_add_launch(pooled.data_ptr<float>(), batch, h, w, dim, l, layers, out.data_ptr<float>(),
                                    height, width, stream);
  }
  return out;
}

}  // namespace patchcore
