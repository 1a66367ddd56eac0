// Greedy k-center selection on the CPU.
//
// The plain greedy step (pick the row farthest from the selection, lower every row's
// minimum by its distance to the pick) reads every row once per pick, so it is bound by
// memory traffic. Here one pass over the rows serves a whole batch of picks:
//
// 1. A pass (instruction-set kernels, isa/coreset_pass.h) lowers every row's minimum by its
//    distances to the batch's centres, and returns the kCandidates rows with the largest
//    minima plus the next value T, an upper bound on every other row's minimum from now on
//    (minima only fall).
// 2. One thread then picks the next batch from the candidates alone: the farthest candidate,
//    its minimum brought up to date with the picks made since the pass, is the farthest row
//    overall as long as its value is above T (strictly, so that a row outside the candidates
//    cannot tie with a lower index). The first pick after a pass is always certain; the batch
//    ends at the first pick that is not, or when the batch is full (kBatchLimit).
// Every pick is exactly the one the one-pick-per-pass loop makes, with the same distances.
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

#include "coreset_screen.h"
#include "cpu_dispatch.h"
#include "ops.h"

namespace patchcore {
namespace {

using cpu::kCandidates;
using cpu::TopRows;

// Picks per pass at most: the whole panels of centres (24 or 32 wide) that fit in 48, enough to
// make the pass bound by arithmetic rather than memory.
constexpr int kBatchLimit = 48;
int max_batch(int panel_width) { return std::max(1, kBatchLimit / panel_width) * panel_width; }

struct Candidate {
  float value;     // the row's minimum after centres [0, applied) of the current batch
  int64_t index;
  int applied;
  bool picked;
};

bool ranks_above(float value, int64_t index, float other_value, int64_t other_index) {
  return value > other_value || (value == other_value && index < other_index);
}

// The batch of centres a pass takes, packed the way the kernels' dot tiles read them.
class Batch {
 public:
  Batch(const float* rows, int64_t dim, int panel_width)
      : rows_(rows), dim_(dim), width_(panel_width),
        capacity_(max_batch(panel_width)),
        packed_(capacity_ * dim, 0.f), norm_sq_(capacity_, 0.f), norm_(capacity_, 0.f), index_(capacity_, 0) {}

  void clear() {
    std::fill(packed_.begin(), packed_.end(), 0.f);
    std::fill(norm_sq_.begin(), norm_sq_.end(), 0.f);
    std::fill(norm_.begin(), norm_.end(), 0.f);
    size_ = 0;
  }

  void add(int64_t row, float norm_sq, float norm) {
    const int64_t panel = size_ / width_, lane = size_ % width_;
    float* dst = packed_.data() + panel * dim_ * width_ + lane;
    const float* src = rows_ + row * dim_;
    for (int64_t k = 0; k < dim_; ++k) dst[k * width_] = src[k];
    norm_sq_[size_] = norm_sq;
    norm_[size_] = norm;
    index_[size_] = row;
    ++size_;
  }

  int size() const { return size_; }
  int capacity() const { return capacity_; }
  int64_t centre(int j) const { return index_[j]; }

  void describe(cpu::CoresetPass& pass) const {
    pass.centres = packed_.data();
    pass.centre_norm_sq = norm_sq_.data();
    pass.centre_norm = norm_.data();
    pass.centre_index = index_.data();
    pass.batch = size_;
  }

 private:
  const float* rows_;
  int64_t dim_;
  int width_, capacity_;
  std::vector<float> packed_, norm_sq_, norm_;
  std::vector<int64_t> index_;
  int size_ = 0;
};

// Step 2 above: picks the next batch from the passes' top rows. Returns the number of picks.
int pick_batch(const std::vector<TopRows>& tops, const cpu::Kernels& kernels, const float* rows, int64_t dim,
               const float* norm_sq, const float* norm, float* min_distance, float* skip_below, int64_t* out,
               int64_t& step, int64_t n, Batch& batch) {
  std::vector<Candidate> merged;
  for (const TopRows& top : tops)
    for (int j = 0; j < top.count; ++j) merged.push_back({top.value[j], top.index[j], 0, false});
  const auto order = [](const Candidate& a, const Candidate& b) { return ranks_above(a.value, a.index, b.value, b.index); };
  std::sort(merged.begin(), merged.end(), order);
  const float bound = merged.size() > static_cast<size_t>(kCandidates) ? merged[kCandidates].value
                                                                      : -std::numeric_limits<float>::infinity();
  merged.resize(std::min<size_t>(merged.size(), kCandidates));

  batch.clear();
  while (step < n && batch.size() < batch.capacity()) {
    // Lazy argmax: candidates' values are upper bounds; bring the leader up to date until the
    // leader is current. Stale values only fall, so a current leader is the true one. Rows
    // selected in earlier batches sit at -1 and are never leaders.
    Candidate* leader = nullptr;
    while (true) {
      leader = nullptr;
      for (Candidate& c : merged)
        if (!c.picked && c.value >= 0.f && (leader == nullptr || ranks_above(c.value, c.index, leader->value, leader->index))) leader = &c;
      if (leader == nullptr || leader->applied == batch.size()) break;
      for (; leader->applied < batch.size(); ++leader->applied) {
        const float d = kernels.exact_distance(rows + leader->index * dim, rows + batch.centre(leader->applied) * dim, dim);
        leader->value = std::min(leader->value, d);
      }
    }
    if (leader == nullptr || (batch.size() > 0 && !(leader->value > bound))) break;
    leader->picked = true;
    const int64_t row = leader->index;
    out[step++] = row;
    min_distance[row] = -1.f;  // pinned below every distance: never picked again
    skip_below[row] = cpu::screen::skip_threshold(-1.f, dim);
    batch.add(row, norm_sq[row], norm[row]);
  }
  return batch.size();
}

}  // namespace

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
      float acc = 0.f;
      for (int64_t j = 0; j < dim; ++j) acc += x[i * dim + j] * x[i * dim + j];
      norm_sq[i] = acc;
      norm[i] = std::sqrt(acc);
      skip_below[i] = cpu::screen::skip_threshold(min_distance[i], dim);
    }
  });

  Batch batch(x, dim, kernels.panel_width);
  cpu::CoresetPass pass{x, dim, norm_sq.data(), norm.data(), min_distance, skip_below.data(),
                        nullptr, nullptr, nullptr, nullptr, 0, cpu::screen::relative_error(dim)};
  batch.describe(pass);

  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), rows / 256)));
  std::vector<TopRows> tops(threads);
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
        pick_batch(tops, kernels, x, dim, norm_sq.data(), norm.data(), min_distance, skip_below.data(), out, step, n,
                   batch);
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
