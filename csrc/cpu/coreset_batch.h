// The batched greedy selection's second step, shared by the single-process CPU kernel
// (greedy_coreset_cpu.cpp) and the per-rank shards of the distributed coreset
// (coreset_shard_cpu.cpp): from the rows a pass (or every rank's pass) offered, pick the next
// batch of centres without reading any other row.
//
// The offered rows are the kCandidates + 1 rows with the largest minima of each part of the
// rows (a thread's slice, or a rank's shard; a part with fewer rows offers all of them). A part's
// last offered value bounds every row of it that was not offered, so T, the largest of these
// bounds over the parts that offered a full list, bounds every row outside the union of offers.
// Minima only fall, so T stays a bound while the batch grows. The farthest offered row, its
// minimum brought up to date with the batch's picks, is then the farthest row overall as long as
// its value is above T (strictly, so that a row outside the offers cannot tie with a lower
// index). The first pick after a pass is always certain (the farthest offered row is the
// farthest row); the batch ends at the first pick that is not, or when it is full. Every pick is
// exactly the one the one-pick-per-pass loop makes, with the same distances, whatever the
// partition.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu_dispatch.h"

namespace patchcore::coreset_batch {

// Picks per pass at most: the whole panels of centres (24 or 32 wide) that fit in 64, i.e. two
// panels on either instruction set, enough to make the pass bound by arithmetic rather than
// memory (measured, 15,680 picks of 156,800 x 128 rows, 2 threads: AVX-512 3.8 s with one panel,
// 2.9 s with two, 3.1 s with three; AVX2 4.3 s with two panels, 4.5 s with four). Across ranks a round also costs a
// collective and a wait for the slowest rank, so there a batch may take up to 96 picks (as many
// as one rank offers candidates; how many are certain depends on the data).
constexpr int kBatchLimit = 64;
constexpr int kRankBatchLimit = 96;
inline int max_batch(int panel_width, int limit = kBatchLimit) { return std::max(1, limit / panel_width) * panel_width; }

// |x|^2 and |x| of a row, summed in index order: the one definition every caller uses, so that a
// row's norms are the same floats in every process.
inline void row_norms(const float* x, int64_t dim, float& norm_sq, float& norm) {
  float acc = 0.f;
  for (int64_t j = 0; j < dim; ++j) acc += x[j] * x[j];
  norm_sq = acc;
  norm = std::sqrt(acc);
}

inline bool ranks_above(float value, int64_t index, float other_value, int64_t other_index) {
  return value > other_value || (value == other_value && index < other_index);
}

struct Candidate {
  float value;     // the row's minimum after centres [0, applied) of the current batch
  int64_t index;   // the row's index in the whole selection space (orders equal values)
  const float* row;
  int applied;
  bool picked;
};

// The batch of centres a pass takes: packed the way the kernels' dot tiles read them, and as
// plain rows for the exact distances.
class Batch {
 public:
  Batch(int64_t dim, int panel_width, int limit = kBatchLimit)
      : dim_(dim), width_(panel_width), capacity_(max_batch(panel_width, limit)), packed_(capacity_ * dim, 0.f),
        rows_(capacity_ * dim, 0.f), norm_sq_(capacity_, 0.f), norm_(capacity_, 0.f), index_(capacity_, 0) {}

  void clear() {
    std::fill(packed_.begin(), packed_.end(), 0.f);
    std::fill(norm_sq_.begin(), norm_sq_.end(), 0.f);
    std::fill(norm_.begin(), norm_.end(), 0.f);
    size_ = 0;
  }

  void add(const float* src, int64_t index) {
    const int64_t panel = size_ / width_, lane = size_ % width_;
    float* dst = packed_.data() + panel * dim_ * width_ + lane;
    for (int64_t k = 0; k < dim_; ++k) dst[k * width_] = src[k];
    std::copy(src, src + dim_, rows_.begin() + size_ * dim_);
    row_norms(src, dim_, norm_sq_[size_], norm_[size_]);
    index_[size_] = index;
    ++size_;
  }

  int size() const { return size_; }
  int capacity() const { return capacity_; }
  const float* row(int j) const { return rows_.data() + j * dim_; }
  int64_t index(int j) const { return index_[j]; }

  void describe(cpu::CoresetPass& pass) const {
    pass.centres = packed_.data();
    pass.centre_norm_sq = norm_sq_.data();
    pass.centre_norm = norm_.data();
    pass.centre_rows = rows_.data();
    pass.batch = size_;
  }

 private:
  int64_t dim_;
  int width_, capacity_;
  std::vector<float> packed_, rows_, norm_sq_, norm_;
  std::vector<int64_t> index_;
  int size_ = 0;
};

// The bound a part's offer puts on its other rows: its smallest offered value when it offered a
// full list, else -inf (it offered every row it has).
inline float part_bound(const float* values, int count) {
  if (count < cpu::kCandidates + 1) return -std::numeric_limits<float>::infinity();
  return *std::min_element(values, values + count);
}

// Picks up to `remaining` centres from the offered rows `candidates` into `batch` (cleared first),
// T = `bound`; `on_pick(candidate)` is called for each, in order. Returns the number of picks.
template <typename OnPick>
int pick_batch(std::vector<Candidate>& candidates, float bound, const cpu::Kernels& kernels, int64_t dim,
               int64_t remaining, Batch& batch, OnPick&& on_pick) {
  batch.clear();
  while (batch.size() < remaining && batch.size() < batch.capacity()) {
    // Lazy argmax: candidates' values are upper bounds; bring the leader up to date until the
    // leader is current. Stale values only fall, so a current leader is the true one. Rows
    // selected in earlier batches sit at -1 and are never leaders.
    Candidate* leader = nullptr;
    while (true) {
      leader = nullptr;
      for (Candidate& c : candidates)
        if (!c.picked && c.value >= 0.f && (leader == nullptr || ranks_above(c.value, c.index, leader->value, leader->index)))
          leader = &c;
      if (leader == nullptr || leader->applied == batch.size()) break;
      for (; leader->applied < batch.size(); ++leader->applied)
        leader->value = std::min(leader->value, kernels.exact_distance(leader->row, batch.row(leader->applied), dim));
    }
    if (leader == nullptr || (batch.size() > 0 && !(leader->value > bound))) break;
    leader->picked = true;
    batch.add(leader->row, leader->index);
    on_pick(*leader);
  }
  return batch.size();
}

}  // namespace patchcore::coreset_batch
