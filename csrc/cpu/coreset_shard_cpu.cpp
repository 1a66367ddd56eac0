// The distributed greedy coreset's per-rank parts (patchcore_fast/distributed.py drives them):
// a rank's shard of the selection space with its running minima, whose pass offers the shard's
// kCandidates + 1 farthest rows, and the pick of the next batch from every rank's offers. One
// round = one pass on every rank, one all_gather of the offers (rows included), and the same
// deterministic pick on every rank: the batched selection of greedy_coreset_cpu.cpp with ranks in
// place of threads, so the picks are the single process's (coreset_batch.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <vector>

#include "coreset_batch.h"
#include "coreset_screen.h"
#include "cpu_dispatch.h"
#include "ops.h"

namespace patchcore {

CoresetShard::CoresetShard(const at::Tensor& space, const at::Tensor& initial)
    : space_(space.contiguous()), min_distance_(initial.contiguous().clone()) {
  const int64_t rows = space_.size(0), dim = space_.size(1);
  norm_sq_.resize(rows);
  norm_.resize(rows);
  skip_below_.resize(rows);
  const float* x = space_.data_ptr<float>();
  const float* m = min_distance_.data_ptr<float>();
  at::parallel_for(0, rows, 1024, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      coreset_batch::row_norms(x + i * dim, dim, norm_sq_[i], norm_[i]);
      skip_below_[i] = cpu::screen::skip_threshold(m[i], dim);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> CoresetShard::pass(const at::Tensor& centres_in) {
  const cpu::Kernels& kernels = cpu::kernels();
  const at::Tensor centres = centres_in.contiguous();
  const int64_t rows = space_.size(0), dim = space_.size(1);
  coreset_batch::Batch batch(dim, kernels.panel_width, coreset_batch::kRankBatchLimit);
  TORCH_CHECK(centres.size(0) <= batch.capacity(), "CoresetShard.pass: at most ", batch.capacity(), " centres");
  for (int64_t j = 0; j < centres.size(0); ++j) batch.add(centres.data_ptr<float>() + j * dim, j);
  cpu::CoresetPass pass{space_.data_ptr<float>(), dim, norm_sq_.data(), norm_.data(), min_distance_.data_ptr<float>(),
                        skip_below_.data(), nullptr, nullptr, nullptr, nullptr, 0, cpu::screen::relative_error(dim)};
  batch.describe(pass);

  // Threads as the single-process kernel splits them; their offers merged into the shard's own.
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), rows / 256)));
  std::vector<cpu::TopRows> tops(threads);
  if (rows > 0) {
#pragma omp parallel num_threads(threads)
    {
      const int tid = omp_get_thread_num(), team = omp_get_num_threads();
      kernels.coreset_pass(pass, rows * tid / team, rows * (tid + 1) / team, tops[tid]);
    }
  }
  // The shard's kCandidates + 1 best of its threads' offers: the last one bounds every row it
  // does not offer (coreset_batch.h: part_bound).
  std::vector<coreset_batch::Candidate> offered;
  for (const cpu::TopRows& top : tops)
    for (int j = 0; j < top.count; ++j) offered.push_back({top.value[j], top.index[j], nullptr, 0, false});
  std::sort(offered.begin(), offered.end(), [](const auto& a, const auto& b) {
    return coreset_batch::ranks_above(a.value, a.index, b.value, b.index);
  });
  const int64_t count = std::min<int64_t>(offered.size(), cpu::kCandidates + 1);
  at::Tensor values = at::empty({count}, at::kFloat), indices = at::empty({count}, at::kLong);
  for (int64_t j = 0; j < count; ++j) {
    values.data_ptr<float>()[j] = offered[j].value;
    indices.data_ptr<int64_t>()[j] = offered[j].index;
  }
  return {values, indices};
}

void CoresetShard::pin(const at::Tensor& local_rows) {
  const int64_t dim = space_.size(1);
  float* m = min_distance_.data_ptr<float>();
  const at::Tensor rows = local_rows.contiguous();
  for (int64_t j = 0; j < rows.numel(); ++j) {
    const int64_t i = rows.data_ptr<int64_t>()[j];
    TORCH_CHECK(i >= 0 && i < space_.size(0), "CoresetShard.pin: row ", i, " outside the shard");
    m[i] = -1.f;  // pinned below every distance, as the single-process kernel does
    skip_below_[i] = cpu::screen::skip_threshold(-1.f, dim);
  }
}

at::Tensor coreset_pick_batch_cpu(const at::Tensor& values_in, const at::Tensor& indices_in, const at::Tensor& rows_in,
                                  double bound, int64_t remaining) {
  const cpu::Kernels& kernels = cpu::kernels();
  const at::Tensor values = values_in.contiguous(), indices = indices_in.contiguous(), rows = rows_in.contiguous();
  const int64_t dim = rows.size(1);
  std::vector<coreset_batch::Candidate> candidates;
  for (int64_t j = 0; j < values.numel(); ++j)
    candidates.push_back({values.data_ptr<float>()[j], indices.data_ptr<int64_t>()[j],
                          rows.data_ptr<float>() + j * dim, 0, false});
  coreset_batch::Batch batch(dim, kernels.panel_width, coreset_batch::kRankBatchLimit);
  const float* first = rows.data_ptr<float>();
  std::vector<int64_t> picked;
  coreset_batch::pick_batch(candidates, static_cast<float>(bound), kernels, dim, remaining, batch, [&](const coreset_batch::Candidate& c) {
    picked.push_back((c.row - first) / dim);
  });
  return at::tensor(picked, at::kLong);
}

}  // namespace patchcore
