// Greedy k-center selection on the CPU.
//
// One OpenMP team lives for the whole selection. Each greedy step is one fused
// pass over the team's slice of rows: distance to the newest centre, running
// minimum, and the slice's argmax. One thread then combines the per-thread
// winners (in thread order, so ties go to the lowest index) and publishes the
// next centre. Nothing is allocated per step.
#include <ATen/ATen.h>
#include <omp.h>

#include <cmath>
#include <limits>
#include <vector>

#include "ops.h"

namespace patchcore {
namespace {

// Squared L2 between two float32 rows. `omp simd` lets the compiler split the sum
// over vector lanes without -ffast-math.
inline float squared_l2(const float* __restrict a, const float* __restrict b, int64_t dim) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < dim; ++j) {
    const float diff = a[j] - b[j];
    acc += diff * diff;
  }
  return acc;
}

struct Best {
  float value;
  int64_t index;
};

// Larger distance wins; on equal distance the lower index wins.
inline bool beats(const Best& candidate, const Best& best) {
  return candidate.value > best.value || (candidate.value == best.value && candidate.index < best.index);
}

// Selected rows are pinned below every real distance so they are never picked again,
// even when all remaining rows duplicate selected ones.
constexpr float kSelected = -1.f;

}  // namespace

at::Tensor greedy_coreset_cpu(const at::Tensor& features_in, const at::Tensor& initial_in, int64_t n) {
  const at::Tensor features = features_in.contiguous();
  at::Tensor min_distance = initial_in.contiguous().clone();
  at::Tensor selected = at::empty({n}, features.options().dtype(at::kLong));

  const int64_t rows = features.size(0);
  const int64_t dim = features.size(1);
  const float* x = features.data_ptr<float>();
  float* dist = min_distance.data_ptr<float>();
  int64_t* out = selected.data_ptr<int64_t>();

  int64_t centre = 0;

  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), rows / 256)));
  std::vector<Best> thread_best(threads);

#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num();
    const int team = omp_get_num_threads();
    const int64_t lo = rows * tid / team;
    const int64_t hi = rows * (tid + 1) / team;

    // Step 0: the argmax of the starting distances.
    Best best{-std::numeric_limits<float>::infinity(), rows};
    for (int64_t i = lo; i < hi; ++i)
      if (beats({dist[i], i}, best)) best = {dist[i], i};
    thread_best[tid] = best;

    for (int64_t step = 0; step < n; ++step) {
#pragma omp barrier
#pragma omp single
      {
        Best winner = thread_best[0];
        for (int t = 1; t < team; ++t)
          if (beats(thread_best[t], winner)) winner = thread_best[t];
        centre = winner.index;
        out[step] = centre;
        dist[centre] = kSelected;
      }  // implicit barrier: every thread sees the new centre
      if (step + 1 == n) break;

      const float* c = x + centre * dim;
      best = {-std::numeric_limits<float>::infinity(), rows};
      for (int64_t i = lo; i < hi; ++i) {
        const float d = std::sqrt(squared_l2(x + i * dim, c, dim));
        const float m = d < dist[i] ? d : dist[i];
        dist[i] = m;
        if (m > best.value) best = {m, i};  // ascending scan: strict > keeps the lowest index
      }
      thread_best[tid] = best;
    }
  }
  return selected;
}

}  // namespace patchcore
