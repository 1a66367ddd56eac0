// Shared by the CPU and CUDA coreset kernels (plain C++, no torch): the rules that
// let a greedy step read a float16 copy of the rows and still give float32-exact results.
//
// Each row x is stored as h = fp16(x * scale), with `scale` a power of two that keeps
// every value in fp16 range, and r = |x - h / scale| (its rounding residual, rounded up).
// For a centre c, a = |h / scale - c| is computed in float32; by the triangle inequality
// the true distance |x - c| >= a - r. If even that lower bound, shrunk by float32
// rounding, is not below the row's current minimum, the exact float32 distance cannot
// lower it and the row is skipped. Otherwise the exact distance is computed from x.
// The skip never changes a result: the outputs equal an all-exact pass.
// When the centre is itself an fp16 copy c_h (the CUDA resident kernel), a = |h - c_h| /
// scale and the residual is r_x + r_c. The same quantities bound a row's distance from
// above (|x - c| <= a + r), which tells whether an unsettled row could matter this step.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define PATCHCORE_HD __host__ __device__ __forceinline__
#else
#define PATCHCORE_HD inline
#endif

namespace patchcore::half_bound {

// Largest |x| * scale allowed; fp16 stops at 65504.
constexpr float kMaxScaled = 32768.f;
// Relative slack on residuals computed in float32.
constexpr float kResidualSlack = 1.0f / 1024.f;

// Power-of-two scale for a tensor whose largest magnitude is `max_abs`.
PATCHCORE_HD float scale_for(float max_abs) {
  if (!(max_abs > 0.f)) return 1.f;
  int exponent = static_cast<int>(floorf(log2f(kMaxScaled / max_abs)));
  exponent = exponent < -100 ? -100 : (exponent > 100 ? 100 : exponent);
  return ldexpf(1.f, exponent);
}

// Relative error bound of a float32 sum of `dim` squares, plus its square root, with margin.
PATCHCORE_HD float relative_rounding(int64_t dim) { return static_cast<float>(dim + 4) * 1.1920929e-7f; }

// Lower bound on |h - c'| (scaled units) from the expanded form |h|^2 + |c'|^2 - 2 h.c', whose
// three float32 sums of `dim` products each err by at most (dim + 1) u times their terms'
// magnitudes; together less than `rounding` * (|h| + |c'|)^2, taken twice for margin.
PATCHCORE_HD float expanded_lower(float h_norm_sq, float c_norm_sq, float dot, float rounding) {
  const float approx = h_norm_sq + c_norm_sq - 2.f * dot;
  const float spread = sqrtf(h_norm_sq) + sqrtf(c_norm_sq);
  return sqrtf(fmaxf(approx - 2.f * rounding * spread * spread, 0.f));
}

// Upper bound on |h - c'| (scaled units): the counterpart of expanded_lower.
PATCHCORE_HD float expanded_upper(float h_norm_sq, float c_norm_sq, float dot, float rounding) {
  const float approx = h_norm_sq + c_norm_sq - 2.f * dot;
  const float spread = sqrtf(h_norm_sq) + sqrtf(c_norm_sq);
  return sqrtf(fmaxf(approx + 2.f * rounding * spread * spread, 0.f));
}

// Upper bound on the float32 distance the exact path computes, given an upper bound `approx`
// on |h/scale - c_h/scale| and the residuals r of both rows (|x - c| <= approx + r).
PATCHCORE_HD float exact_at_most(float approx, float residual, float rounding) {
  return (approx * (1.f + rounding) + residual) * (1.f + rounding) * (1.f + rounding);
}

// True when |x - c| >= current for certain, given a = |h/scale - c| and residual r.
PATCHCORE_HD bool cannot_lower(float approx, float residual, float current, float rounding) {
  const float lower = (approx * (1.f - rounding) - residual) * (1.f - rounding);
  return lower >= current;
}

// The same test as cannot_lower, moved onto the squared scaled fp16 distance so that a
// row costs one comparison: the row cannot be lowered when |h - c*scale|^2 >= the
// returned threshold. Computed in double and rounded down; picked rows (current < 0)
// get 0, so they are always skipped.
inline float skip_threshold_squared(float current, float residual, float rounding, float scale) {
  if (current < 0.f) return 0.f;
  const double keep = 1.0 - static_cast<double>(rounding);
  const double bound = (static_cast<double>(current) / keep + residual) / keep * scale;
  return static_cast<float>(bound * bound * (1.0 + 1e-6));
}

}  // namespace patchcore::half_bound
