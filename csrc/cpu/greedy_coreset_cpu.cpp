// Greedy k-center selection on the CPU.
//
// One OpenMP team lives for the whole selection. Each greedy step is one fused
// pass over the team's slice of rows: distance to the newest centre, running
// minimum, and the slice's argmax. One thread then combines the per-thread
// winners (in thread order, so ties go to the lowest index) and publishes the
// next centre. Nothing is allocated per step.
//
// The pass is bound by memory traffic, so it reads an fp16 copy of the rows (four rows
// at a time, to keep several loads in flight) and re-computes a row from float32 only
// when the fp16 distance cannot rule out an update (half_bound.h): float32-exact results.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <omp.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include <cmath>
#include <limits>
#include <vector>

#include "half_bound.h"
#include "ops.h"

namespace patchcore {
namespace {

// fp16 rows are padded to whole 16-value vectors.
constexpr int64_t kHalfAlign = 16;
constexpr int64_t kRowsPerPass = 4;

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

// Squared L2 between `count` (<= 4) consecutive fp16 rows and a float32 centre.
inline void squared_l2_half(const c10::Half* rows, int64_t padded_dim, const float* centre, int count,
                            float* out) {
#ifdef __AVX512F__
  __m512 acc[kRowsPerPass] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int64_t j = 0; j < padded_dim; j += kHalfAlign) {
    const __m512 c = _mm512_loadu_ps(centre + j);
    for (int r = 0; r < count; ++r) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows + r * padded_dim + j));
      const __m512 d = _mm512_sub_ps(_mm512_cvtph_ps(raw), c);
      acc[r] = _mm512_fmadd_ps(d, d, acc[r]);
    }
  }
  for (int r = 0; r < count; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
#else
  for (int r = 0; r < count; ++r) {
    float acc = 0.f;
    for (int64_t j = 0; j < padded_dim; ++j) {
      const float d = static_cast<float>(rows[r * padded_dim + j]) - centre[j];
      acc += d * d;
    }
    out[r] = acc;
  }
#endif
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

struct HalfRows {
  std::vector<c10::Half> values;  // rows x padded_dim, scaled by `scale`, zero-padded
  std::vector<float> residual;    // |x - h / scale| per row, rounded up
  int64_t padded_dim;
  float scale;
};

HalfRows to_half_rows(const float* x, int64_t rows, int64_t dim, float max_abs) {
  HalfRows half;
  half.padded_dim = (dim + kHalfAlign - 1) / kHalfAlign * kHalfAlign;
  half.scale = half_bound::scale_for(max_abs);
  half.values.assign(rows * half.padded_dim, c10::Half(0.f));
  half.residual.resize(rows);
  at::parallel_for(0, rows, 1024, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      float acc = 0.f;
      for (int64_t j = 0; j < dim; ++j) {
        const c10::Half h(x[i * dim + j] * half.scale);
        half.values[i * half.padded_dim + j] = h;
        const float diff = x[i * dim + j] - static_cast<float>(h) / half.scale;
        acc += diff * diff;
      }
      half.residual[i] = std::sqrt(acc) * (1.f + half_bound::kResidualSlack);
    }
  });
  return half;
}

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

  const float max_abs = at::linalg_vector_norm(features, std::numeric_limits<double>::infinity()).item<float>();
  const HalfRows half = to_half_rows(x, rows, dim, max_abs);
  const int64_t padded_dim = half.padded_dim;
  const float rounding = half_bound::relative_rounding(padded_dim);
  std::vector<float> centre_scaled(padded_dim, 0.f);  // centre * scale, zero-padded like the fp16 rows
  // Per row, the squared fp16 distance below which the exact distance must be computed;
  // it changes only when the row's minimum does.
  std::vector<float> threshold(rows);
  at::parallel_for(0, rows, 4096, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i)
      threshold[i] = half_bound::skip_threshold_squared(dist[i], half.residual[i], rounding, half.scale);
  });
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
        threshold[centre] = 0.f;
        for (int64_t j = 0; j < dim; ++j) centre_scaled[j] = x[centre * dim + j] * half.scale;
      }  // implicit barrier: every thread sees the new centre
      if (step + 1 == n) break;

      const float* c = x + centre * dim;
      best = {-std::numeric_limits<float>::infinity(), rows};
      for (int64_t i0 = lo; i0 < hi; i0 += kRowsPerPass) {
        const int count = static_cast<int>(std::min<int64_t>(kRowsPerPass, hi - i0));
        float approx[kRowsPerPass];
        squared_l2_half(half.values.data() + i0 * padded_dim, padded_dim, centre_scaled.data(), count, approx);
        for (int r = 0; r < count; ++r) {
          const int64_t i = i0 + r;
          float m = dist[i];
          if (approx[r] < threshold[i]) {
            const float exact = std::sqrt(squared_l2(x + i * dim, c, dim));
            if (exact < m) {
              dist[i] = m = exact;
              threshold[i] = half_bound::skip_threshold_squared(m, half.residual[i], rounding, half.scale);
            }
          }
          if (m > best.value) best = {m, i};  // ascending scan: strict > keeps the lowest index
        }
      }
      thread_best[tid] = best;
    }
  }
  return selected;
}

}  // namespace patchcore
