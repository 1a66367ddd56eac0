// The rule that lets the CPU coreset pass skip most exact distances and still return
// exactly what an all-exact pass returns. Plain C++, internal linkage only (compiled into
// every instruction set's kernels; see cpu_kernels.h).
//
// The pass computes, for row x and centre c, S = (|x|^2 + |c|^2) - 2 x.c in float32 from
// precomputed squared norms (one multiply-add per element instead of a subtract and a
// multiply-add). Each of the three float32 sums of `dim` products errs by at most
// dim u / (1 - dim u) times the sum of its terms' magnitudes (u = 2^-24, any order, fused or
// not), and |x.c| <= |x||c|, so with the two roundings that combine them
//     |S - |x - c|^2| <= (dim + 3) u' (|x| + |c|)^2 + underflow,
// where u' covers the 1/(1 - dim u) factor; `relative_error` doubles that for margin (the
// norms it is multiplied by are themselves float32 results), and `kUnderflowPerTerm` bounds
// what products below the normal range can lose (2^-149 each, several sums).
//
// The exact path computes d = sqrt(sum (x - c)^2) in float32; its sum of `dim` squares errs by
// at most (dim + 2) u relative, plus dim 2^-149 from underflow. Since float rounding and sqrt
// are monotone, d >= m whenever that sum >= m^2, which holds whenever
//     |x - c|^2 >= (m^2 + dim 2^-149) / (1 - (dim + 2) u)      ("skip_threshold").
// So a row with S - E >= skip_threshold(m) cannot lower its minimum m: the exact distance is
// computed only for the rest. Selected rows (m < 0) get -inf and are always skipped; a NaN
// from overflowing norms fails the comparison and takes the exact path.
#pragma once
#include <cstdint>

namespace patchcore::cpu::screen {

constexpr double kUnitRoundoff = 1.0 / (1 << 24);
constexpr float kUnderflowPerTerm = 8.f * 1.4012985e-45f;  // 8 x 2^-149 per element of the row

// E / (|x| + |c|)^2 for rows of `dim` values.
static inline float relative_error(int64_t dim) {
  const double d = static_cast<double>(dim) + 4.0;
  return static_cast<float>(2.0 * d * kUnitRoundoff / (1.0 - d * kUnitRoundoff));
}

// The bound on S's error for rows with norms nx and nc (float32; see above).
static inline float absolute_underflow(int64_t dim) { return kUnderflowPerTerm * static_cast<float>(dim); }

// The squared-distance level at or above which a row with running minimum m cannot be lowered.
static inline float skip_threshold(float m, int64_t dim) {
  if (m < 0.f) return -__builtin_inff();
  const double d = static_cast<double>(dim);
  const double m2 = static_cast<double>(m) * static_cast<double>(m);
  const double bound = (m2 + d * 1.4012984643248171e-45) / (1.0 - (d + 2.0) * kUnitRoundoff);
  return static_cast<float>(bound * (1.0 + 1.0 / (1 << 20)));  // covers the rounding to float
}

}  // namespace patchcore::cpu::screen
