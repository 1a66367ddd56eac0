// Greedy k-center selection on the CPU.
//
// The plain greedy step (pick the row farthest from the selection, lower every row's
// minimum by its distance to the pick) reads every row once per pick, so it is bound by
// memory traffic. Here one pass over the rows serves a whole batch of picks:
//
// 1. A pass (instruction-set kernels, isa/coreset_pass.h) lowers every row's minimum by its
//    distances to the batch's centres, and each thread offers the kCandidates + 1 rows of its
//    slice with the largest minima.
// 2. One thread then picks the next batch from those rows alone (coreset_batch.h: why every
//    pick is exactly the one the one-pick-per-pass loop makes, with the same distances).
//
// Inside a pass the distances come from dot products (register tiles of rows x centres)
// screened with a rigorous rounding bound (coreset_screen.h); only pairs the screen cannot
// rule out get the exact float32 distance, which is computed in one fixed order on every
// instruction set, so all paths return identical picks.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "coreset_batch.h"
#include "coreset_screen.h"
#include "cpu_dispatch.h"
#include "ops.h"

namespace patchcore {

using coreset_batch::Batch;
using coreset_batch::Candidate;

at::Tensor greedy_coreset_cpu(const at::Tensor& features_in, const at::Tensor& initial_in, int64_t n,
                              const Progress& progress) {
  const cpu::Kernels& kernels = cpu::kernels();
  const at::Tensor features = features_in.contiguous();
  at::Tensor min_distance_t = initial_in.contiguous().clone();
  at::Tensor selected = at::empty({n}, features.options().dtype(at::kLong));

  const int64_t rows = features.size(0);
  const int64_t dim = features.size(1);
  const float* x = features.data_ptr<float>();
  float* min_distance = min_distance_t.data_ptr<float>();
  int64_t* out = selected.data_ptr<int64_t>();

  std::vector<float> norm_sq(rows), norm(rows), skip_below(rows);
  at::parallel_for(0, rows, 1024, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      coreset_batch::row_norms(x + i * dim, dim, norm_sq[i], norm[i]);
      skip_below[i] = cpu::screen::skip_threshold(min_distance[i], dim);
    }
  });

  Batch batch(dim, kernels.panel_width);
  cpu::CoresetPass pass{x, dim, norm_sq.data(), norm.data(), min_distance, skip_below.data(),
                        nullptr, nullptr, nullptr, nullptr, 0, cpu::screen::relative_error(dim)};
  batch.describe(pass);

  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), rows / 256)));
  std::vector<cpu::TopRows> tops(threads);
  std::vector<Candidate> candidates;
  int64_t step = 0;
  bool keep_going = true;

#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num();
    const int team = omp_get_num_threads();
    const int64_t lo = rows * tid / team;
    const int64_t hi = rows * (tid + 1) / team;
    while (true) {
      kernels.coreset_pass(pass, lo, hi, tops[tid]);
#pragma omp barrier
#pragma omp single
      {
        candidates.clear();
        float bound = -std::numeric_limits<float>::infinity();
        for (const cpu::TopRows& top : tops) {
          for (int j = 0; j < top.count; ++j)
            candidates.push_back({top.value[j], top.index[j], x + top.index[j] * dim, 0, false});
          bound = std::max(bound, coreset_batch::part_bound(top.value, top.count));
        }
        coreset_batch::pick_batch(candidates, bound, kernels, dim, n - step, batch, [&](const Candidate& c) {
          out[step++] = c.index;
          min_distance[c.index] = -1.f;  // pinned below every distance: never picked again
          skip_below[c.index] = cpu::screen::skip_threshold(-1.f, dim);
        });
        batch.describe(pass);
      }  // implicit barrier: every thread sees the batch
      if (step == n) break;
      // The calling thread (the team's master) reports progress and may stop the selection.
#pragma omp master
      keep_going = !progress || progress(step);
#pragma omp barrier
      if (!keep_going) break;
    }
  }
  return selected;
}

}  // namespace patchcore
