// The rule that lets the pruned search (knn_pruned_cpu.cpp) skip bank rows and still return
// exactly what `knn` returns. Plain C++ in double precision, used by the driver only.
//
// Notation: q a query, b a bank row (float32 vectors of `dim` values), N_q = |q|^2 and
// N_b = |b|^2 (exact reals), P the index's `rank` orthonormal directions (float64 rows P64;
// the kernels use their float32 rounding P32), u = 2^-24, g(n) = n u / (1 - n u).
//
// 1. What knn computes. knn returns d(q, b) = max(0, fl(fl(n_q + n_b) - 2 s)) with n_q, n_b, s
//    float32 sums of `dim` products, each off by at most g(dim) times the sum of its terms'
//    magnitudes (any summation order, fused or not), and |q.b| <= |q||b|. With the two
//    roundings that combine them, |d - |q - b|^2| <= g(dim + 3) (|q| + |b|)^2 + underflow.
// 2. The bound. With y = P x and rho = |x - P^T P x| (the part outside the directions),
//    q.b = y_q.y_b + (residual parts) <= y_q.y_b + rho_q rho_b (Cauchy-Schwarz), so
//    |q - b|^2 >= N_q + N_b - 2 (y_q.y_b + rho_q rho_b).
// 3. What the screen computes. Bank rows carry Y_b = fl32(y_b) (|Y_b - y_b| <= u |b|, from
//    float64), R_b >= rho_b (float64, rounded up) and H_b = fl32(-N_b / 2); queries carry
//    Y_q = the float32 kernel projection with P32, |Y_q - y_q| <= c |q| where
//    c = ||P32 - P64||_F + sqrt(rank) g(dim) (+ float64 slack), and R_q >= rho_q taken from
//    rho_q^2 = N_q - |y_q|^2 <= N_q - max(0, |Y_q| - c |q|)^2. Then
//      y_q.y_b <= Y_q.Y_b + (1.01 c + 1.02 u) |q||b|
//    and the screen's float32 dot product t = fl(Y_q.Y_b + R_q R_b + H_b) over rank + 2 terms
//    is off by at most g(rank + 2) (1.01 |q||b| + 0.51 N_b) (Cauchy-Schwarz on the extended
//    vectors, whose norms exceed |q|, |b| by under 1 % while c < 1e-3), H_b by u N_b / 2.
// Together, with B >= every |b|:  knn's d(q, b) >= N_q - 2 t - margin(q), where
//    margin(q) = 2 g(rank + 2) (1.01 |q| B + 0.51 B^2) + u B^2 + 2 (1.01 c + 1.02 u) |q| B
//              + g(dim + 3) (|q| + B)^2 + underflow,
// all multiplied by 1.01 for the double arithmetic that evaluates it. A row whose d exceeds the
// query's current k-th distance `thr` can never enter its list, so the search may skip b when
//    t < cut(q) = (N_q - thr - margin(q)) / 2     (rounded down to float32).
// 4. A cascade. The first screen uses the leading r1 of the rank directions: t1 over r1 + 2
//    terms (Y_q[:r1], R_q1 = R at rank r1, 1) . (Y_b[:r1], R_b1, H_b). Rows it keeps are screened
//    again by adding e = (Y_q[r1:], R_q, R_q1) . (Y_b[r1:], R_b, -R_b1), so that in reals
//    t2 = t1 + e = Y_q.Y_b + R_q R_b + H_b, step 3's value at the full rank. The float32 t2 is
//    a sum of n = rank + 4 products in some order, off by at most g(n) times the sum of their
//    magnitudes, which Cauchy-Schwarz on (Y, R, R1) (norms under sqrt(2) x 1.005 |x|) bounds by
//    2.03 |q||b| + 0.51 N_b. The prefix bounds of steps 2-3 hold for t1 as well (|Y_q[:r1] -
//    y_q[:r1]| <= c |q|, and R_q1, R_b1 bound the rank-r1 residuals), with fewer terms. So one
//    margin, margin(q) with g(rank + 4) and 2.03 in the first term, covers both stages, and
//    both compare with the same cut(q).
// 5. The first screen in 8-bit codes (isa/code_tile.h). Each side's first-screen projection Y is
//    coded as s z with z integer (bank |z_j| <= 127, queries |z_j| <= 63) and its code error
//    e = |Y - s z| computed in double and rounded up, as are |Y_b| and |Z_q| = |s_q z_q|. In reals,
//    Y_q.Y_b = Z_q.Z_b + (Y_q - Z_q).Y_b + Z_q.(Y_b - Z_b) <= Z_q.Z_b + e_q |Y_b| + |Z_q| e_b, so
//      t1 = s_q s_b (z_q.z_b) + e_q |Y_b| + |Z_q| e_b + R_q R_b + H_b
//    bounds step 3's rank-r1 value from above (z_q.z_b is an exact integer below 2^24, exact in
//    float). Evaluated in float32 by at most 10 roundings (two products, three multiply-adds and a
//    sum; the portable path rounds products and sums separately), it is off by at most g(10) times
//    the sum of its terms' magnitudes. The quantisation errors are at most sqrt(r1) s / 2 with
//    s <= max|Y_j| / 63 <= |Y| / 63, so w := e_q / |q| + e_b / |b| <= sqrt(r1) / 84 and (step 3's
//    norms, |Z| <= |Y| + e) the magnitudes sum to at most a |q||b| + 0.51 N_b with
//    a = 1.05 (1 + w)^2 + 1.2 w. margin(q) gains 2 g(10) (a |q| B + 0.51 B^2). A cascade
//    adds the extension to this t1 (an upper bound, so t1 + e still bounds step 4's t2), with step
//    4's margin for the extension and the sum, and this one for t1.
#pragma once
#include <cmath>
#include <cstdint>

namespace patchcore::cpu::search_bound {

// static: every file that includes this gets its own copy (see cpu_kernels.h).
constexpr double kUnitRoundoff = 1.0 / (1 << 24);
constexpr double kUnderflowPerTerm = 8.0 * 1.4012984643e-45;  // 8 x 2^-149 per product

static inline double gamma(double n) { return n * kUnitRoundoff / (1.0 - n * kUnitRoundoff); }

// c: the float32 projection's error per unit of |q|, given ||P32 - P64||_F.
static inline double projection_error(double basis_rounding, int64_t rank, int64_t dim) {
  return basis_rounding + std::sqrt(static_cast<double>(rank)) * gamma(static_cast<double>(dim)) + 1e-12;
}

// margin(q) above, for |q| = query_norm and every |b| <= bank_norm_max; `cascade`: step 4's
// margin (a screen with an extension), which also covers its first stage.
// first_rank: r1, the directions of the first screen, which is coded (step 5).
static inline double margin(double query_norm, double bank_norm_max, double c, int64_t rank, int64_t first_rank,
                            int64_t dim, bool cascade) {
  const double q = query_norm, b = bank_norm_max, u = kUnitRoundoff;
  const double terms = static_cast<double>(cascade ? rank + 4 : rank + 2), cross = cascade ? 2.03 : 1.01;
  const double coded = std::sqrt(static_cast<double>(first_rank)) / 84.0;
  const double coded_terms = 1.05 * (1 + coded) * (1 + coded) + 1.2 * coded;
  const double m = 2 * gamma(terms) * (cross * q * b + 0.51 * b * b) + u * b * b +
                   2 * gamma(10) * (coded_terms * q * b + 0.51 * b * b) +
                   2 * (1.01 * c + 1.02 * u) * q * b + gamma(static_cast<double>(dim + 3)) * (q + b) * (q + b) +
                   static_cast<double>(dim + rank + 10) * kUnderflowPerTerm;
  return 1.01 * m;
}

// R_q: an upper bound on the query's residual norm rho_q, from N_q (exact), |Y_q| and c.
static inline double residual_upper(double norm_sq, double projected_norm, double c) {
  const double inside = std::fmax(0.0, projected_norm - c * std::sqrt(norm_sq));
  return std::sqrt(std::fmax(0.0, norm_sq - inside * inside)) * (1.0 + 1e-9);
}

// cut(q) as a float32 no larger than the real value (so the screen keeps every row it must).
// Also compiled into the instruction-set kernels, so builtins only (no shared library templates).
static inline float cut(double norm_sq, float threshold, double margin) {
  if (!__builtin_isfinite(threshold)) return -__builtin_inff();
  const double value = 0.5 * (norm_sq - static_cast<double>(threshold) - margin) - 1e-12 * (norm_sq + margin);
  float f = static_cast<float>(value);
  if (static_cast<double>(f) > value) f = __builtin_nextafterf(f, -__builtin_inff());
  return f;
}

// float32 x rounded up (never below the double value).
static inline float round_up(double x) {
  float f = static_cast<float>(x);
  if (static_cast<double>(f) < x) f = std::nextafter(f, INFINITY);
  return f;
}

}  // namespace patchcore::cpu::search_bound
