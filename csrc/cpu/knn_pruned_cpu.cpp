// Exact top-k squared-L2 search that skips most of the bank: the CPU side of
// patchcore_fast.SearchIndex.
//
// The index (built in Python at fit time) holds `rank` principal directions of the bank and,
// per bank row, its screen vector (Y_b, R_b, H_b) over the leading r1 <= rank of them and, for
// a cascade (r1 < rank), its extension over the rest (Y_b[r1:], R_b at the full rank, -R_b1);
// see search_bound.h for the bound and its rounding margin. Here: each query's screen and
// extension vectors (its projection by the kernels' own dot products, upper bounds on its
// residual norms, 1) and margin, an order that puts similar queries in the same block, and the
// blocks through the instruction-set kernel (isa/knn_pruned.h). Results are knn_cpu's, float
// for float.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <numeric>
#include <optional>
#include <utility>
#include <vector>

#include "cpu_dispatch.h"
#include "ops.h"
#include "row_norms.h"
#include "search_bound.h"

namespace patchcore {
namespace {

// Reorders idx[lo, hi) so that every run of `leaf` positions (from a multiple of leaf) holds
// queries close in the projected space: halves split at the median of the widest coordinate,
// left halves a multiple of leaf long (a k-d tree's leaf order). Ranges reaching `defer_depth`
// are handed back in `deferred` to be ordered in parallel.
void neighbourhood_order(const float* y, int64_t stride, int64_t dims, int64_t* idx, int64_t lo, int64_t hi,
                         int64_t leaf, int depth, int defer_depth, std::vector<std::pair<int64_t, int64_t>>* deferred) {
  const int64_t size = hi - lo;
  if (size <= leaf) return;
  if (deferred != nullptr && depth == defer_depth) {
    deferred->emplace_back(lo, hi);
    return;
  }
  std::vector<float> low(dims, std::numeric_limits<float>::infinity());
  std::vector<float> high(dims, -std::numeric_limits<float>::infinity());
  for (int64_t i = lo; i < hi; ++i)
    for (int64_t j = 0; j < dims; ++j) {
      const float v = y[idx[i] * stride + j];
      low[j] = std::min(low[j], v);
      high[j] = std::max(high[j], v);
    }
  int64_t widest = 0;
  for (int64_t j = 1; j < dims; ++j)
    if (high[j] - low[j] > high[widest] - low[widest]) widest = j;
  const int64_t half = (size / 2 + leaf - 1) / leaf * leaf;
  std::nth_element(idx + lo, idx + lo + half, idx + hi, [&](int64_t a, int64_t b) {
    const float va = y[a * stride + widest], vb = y[b * stride + widest];
    return va < vb || (va == vb && a < b);
  });
  neighbourhood_order(y, stride, dims, idx, lo, lo + half, leaf, depth + 1, defer_depth, deferred);
  neighbourhood_order(y, stride, dims, idx, lo + half, hi, leaf, depth + 1, defer_depth, deferred);
}

// The 8-bit code of one first-screen projection y[0, n) (search_bound.h step 5): z_j =
// round(y_j / s) in [-limit, limit] with s = max|y_j| / limit, written to codes[0, code_dim)
// (plus `offset`: 128 for the bank's unsigned codes, 0 for queries; the padding codes zero).
// Returns s and, rounded up, the code error |y - s z| and the norms |y| and |s z|.
struct Coded {
  float scale, error, norm, coded_norm;
  int32_t sum;  // sum_j z_j
};
template <class Code>
Coded encode(const float* y, int64_t n, int64_t code_dim, int limit, int offset, Code* codes) {
  float largest = 0.f;
  for (int64_t j = 0; j < n; ++j) largest = std::max(largest, std::fabs(y[j]));
  const float scale = largest > 0.f ? largest / static_cast<float>(limit) : 0.f;
  double error_sq = 0, norm_sq = 0, coded_sq = 0;
  int32_t sum = 0;
  for (int64_t j = 0; j < code_dim; ++j) {
    long z = 0;
    if (j < n && scale > 0.f) {  // rounded half away from zero, inline (any integer would do: e is measured)
      const double r = static_cast<double>(y[j]) / scale;
      z = std::clamp(static_cast<long>(r + (r >= 0 ? 0.5 : -0.5)), -long{limit}, long{limit});
    }
    codes[j] = static_cast<Code>(z + offset);
    sum += static_cast<int32_t>(z);
    if (j >= n) continue;
    const double coded = static_cast<double>(scale) * static_cast<double>(z);  // exact: 24 x 8 bits
    error_sq += (y[j] - coded) * (y[j] - coded);
    norm_sq += static_cast<double>(y[j]) * y[j];
    coded_sq += coded * coded;
  }
  const auto up = [](double sq) { return cpu::search_bound::round_up(std::sqrt(sq) * (1 + 1e-12)); };
  return {scale, up(error_sq), up(norm_sq), up(coded_sq), sum};
}

// Codes rows [0, n) of `screen` (rows screen_dim floats apart, their first `first` values) into
// codes[n, code_dim] in parallel; `terms(i, coded)` stores row i's other values.
template <class Code, class Terms>
void encode_rows(const float* screen, int64_t n, int64_t screen_dim, int64_t first, int64_t code_dim, int limit,
                 int offset, Code* codes, Terms&& terms) {
  at::parallel_for(0, n, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i)
      terms(i, encode(screen + i * screen_dim, first, code_dim, limit, offset, codes + i * code_dim));
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, int64_t, int64_t> knn_pruned_cpu(
    const at::Tensor& queries_in, const at::Tensor& bank_in, int64_t k, const at::Tensor& basis_in,
    const at::Tensor& bank_screen_in, const std::optional<at::Tensor>& bank_extension_in, double basis_rounding,
    const Progress& progress) {
  const cpu::Kernels& kernels = cpu::kernels();
  const at::Tensor queries = queries_in.contiguous();
  const at::Tensor bank = bank_in.contiguous();
  const at::Tensor basis = basis_in.contiguous();
  const at::Tensor bank_screen = bank_screen_in.contiguous();
  const bool cascade = bank_extension_in.has_value();
  const at::Tensor bank_extension = cascade ? bank_extension_in->contiguous() : at::Tensor();
  const int64_t num_queries = queries.size(0), num_bank = bank.size(0), dim = queries.size(1);
  const int64_t rank = basis.size(0), screen_dim = bank_screen.size(1), first = screen_dim - 2;
  const int64_t extension_dim = cascade ? rank - first + 2 : 0, width = kernels.panel_width;
  const double c = cpu::search_bound::projection_error(basis_rounding, rank, dim);
  // Codes of up to kMaxCodeDim values keep every code dot product below 2^24 (exact in float).
  constexpr int64_t kMaxCodeDim = 2048;
  TORCH_CHECK_VALUE(first <= kMaxCodeDim, "knn_pruned: the first screen has ", first,
                    " directions; at most 2048 are supported");
  const int64_t code_dim = (first + 3) / 4 * 4;

  at::Tensor out_dist = at::full({num_queries, k}, std::numeric_limits<float>::infinity(), queries.options());
  at::Tensor out_index = at::full({num_queries, k}, -1, queries.options().dtype(at::kLong));
  if (num_queries == 0) return {out_dist, out_index, 0, 0};

  const auto f32 = queries.options();
  const auto f64 = queries.options().dtype(at::kDouble);
  at::Tensor query_norms = at::empty({num_queries}, f32), bank_norms = at::empty({num_bank}, f32);
  cpu::row_squared_norms(queries.data_ptr<float>(), num_queries, dim, query_norms.data_ptr<float>());
  cpu::row_squared_norms(bank.data_ptr<float>(), num_bank, dim, bank_norms.data_ptr<float>());
  // B >= every |b|: the largest float32 norm, widened by its own rounding bound.
  const float largest = num_bank ? *std::max_element(bank_norms.data_ptr<float>(), bank_norms.data_ptr<float>() + num_bank) : 0.f;
  const double bank_norm_max =
      std::sqrt(static_cast<double>(largest) * (1 + 2 * cpu::search_bound::gamma(static_cast<double>(dim)))) * 1.000001;

  // Y_q = P32 q by the kernels' sequential dot products (the bound's g(dim) per element).
  const int64_t panels = (rank + width - 1) / width, proj_stride = panels * width;
  at::Tensor packed = at::zeros({panels * dim * width}, f32);
  float* p = packed.data_ptr<float>();
  const float* basis_data = basis.data_ptr<float>();
  for (int64_t row = 0; row < rank; ++row)
    for (int64_t j = 0; j < dim; ++j) p[(row / width) * dim * width + j * width + row % width] = basis_data[row * dim + j];
  at::Tensor projected = at::empty({num_queries, proj_stride}, f32);
  float* y = projected.data_ptr<float>();
  const float* q = queries.data_ptr<float>();
  at::parallel_for(0, num_queries, 64, [&](int64_t lo, int64_t hi) { kernels.project(q, dim, lo, hi, p, panels, y, proj_stride); });

  at::Tensor screen = at::empty({num_queries, screen_dim}, f32);
  at::Tensor extension = at::empty({num_queries, extension_dim}, f32);
  at::Tensor norm64 = at::empty({num_queries}, f64), margin = at::empty({num_queries}, f64);
  float* sc = screen.data_ptr<float>();
  float* ex = extension.data_ptr<float>();
  double* n64 = norm64.data_ptr<double>();
  double* mg = margin.data_ptr<double>();
  at::parallel_for(0, num_queries, 256, [&](int64_t lo, int64_t hi) {
    // N_q, eight queries side by side (eight sequential chains in flight, each the same sum).
    constexpr int64_t kSide = 8;
    for (int64_t i0 = lo; i0 < hi; i0 += kSide) {
      const int64_t side = std::min(kSide, hi - i0);
      double acc[kSide] = {};
      for (int64_t j = 0; j < dim; ++j)
        for (int64_t r = 0; r < side; ++r) acc[r] += static_cast<double>(q[(i0 + r) * dim + j]) * q[(i0 + r) * dim + j];
      for (int64_t r = 0; r < side; ++r) n64[i0 + r] = acc[r];
    }
    for (int64_t i = lo; i < hi; ++i) {
      const double norm_sq = n64[i];  // float products are exact in double
      double first_sq = 0, projected_sq = 0;
      for (int64_t j = 0; j < rank; ++j) {
        const float yj = y[i * proj_stride + j];
        if (j < first) sc[i * screen_dim + j] = yj;
        else ex[i * extension_dim + j - first] = yj;
        projected_sq += static_cast<double>(yj) * yj;
        if (j == first - 1) first_sq = projected_sq;
      }
      // R_q at rank r1 for the first screen; for a cascade, R_q at the full rank and R_q1 again
      // (against the bank's -R_b1) in the extension.
      const float first_residual =
          cpu::search_bound::round_up(cpu::search_bound::residual_upper(norm_sq, std::sqrt(first_sq), c));
      sc[i * screen_dim + first] = first_residual;
      sc[i * screen_dim + first + 1] = 1.f;
      if (cascade) {
        ex[i * extension_dim + rank - first] =
            cpu::search_bound::round_up(cpu::search_bound::residual_upper(norm_sq, std::sqrt(projected_sq), c));
        ex[i * extension_dim + rank - first + 1] = first_residual;
      }
      mg[i] = cpu::search_bound::margin(std::sqrt(norm_sq), bank_norm_max, c, rank, first, dim, cascade);
    }
  });

  // The first screen's codes: bank rows (unsigned, |a| <= 127) and queries (|z| <= 63).
  at::Tensor bank_codes = at::empty({num_bank, code_dim}, queries.options().dtype(at::kByte));
  at::Tensor bank_terms = at::empty({num_bank, 5}, f32);
  at::Tensor query_codes = at::empty({num_queries, code_dim}, queries.options().dtype(at::kChar));
  at::Tensor query_terms = at::empty({num_queries, 4}, f32);
  at::Tensor query_offset = at::empty({num_queries}, queries.options().dtype(at::kInt));
  {
    // Bank rows: s_b, |Y_b|, e_b, R_b, H_b. Queries: s_q, e_q, |s_q z|, R_q, and the offset.
    const float* bs = bank_screen.data_ptr<float>();
    float* bt = bank_terms.data_ptr<float>();
    encode_rows(bs, num_bank, screen_dim, first, code_dim, 127, 128, bank_codes.data_ptr<uint8_t>(),
                [&](int64_t i, const Coded& c) {
                  const float* rest = bs + i * screen_dim + first;
                  std::initializer_list<float> terms{c.scale, c.norm, c.error, rest[0], rest[1]};
                  std::copy(terms.begin(), terms.end(), bt + i * 5);
                });
    float* qt = query_terms.data_ptr<float>();
    int32_t* qo = query_offset.data_ptr<int32_t>();
    encode_rows(sc, num_queries, screen_dim, first, code_dim, 63, 0, query_codes.data_ptr<int8_t>(),
                [&](int64_t i, const Coded& c) {
                  std::initializer_list<float> terms{c.scale, c.error, c.coded_norm, sc[i * screen_dim + first]};
                  std::copy(terms.begin(), terms.end(), qt + i * 4);
                  qo[i] = 128 * c.sum;
                });
  }

  std::vector<int64_t> order(num_queries);
  std::iota(order.begin(), order.end(), 0);
  std::vector<std::pair<int64_t, int64_t>> subtrees;
  neighbourhood_order(y, proj_stride, rank, order.data(), 0, num_queries, width, 0, 4, &subtrees);
  at::parallel_for(0, static_cast<int64_t>(subtrees.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t)
      neighbourhood_order(y, proj_stride, rank, order.data(), subtrees[t].first, subtrees[t].second, width, 0, 0,
                          nullptr);
  });

  const int64_t blocks = (num_queries + width - 1) / width;
  std::vector<int64_t> exact_rows(blocks, 0), extended_rows(blocks, 0);
  const cpu::PrunedKnn search{q,
                              query_norms.data_ptr<float>(),
                              sc,
                              n64,
                              mg,
                              order.data(),
                              bank.data_ptr<float>(),
                              bank_norms.data_ptr<float>(),
                              bank_screen.data_ptr<float>(),
                              cascade ? ex : nullptr,
                              cascade ? bank_extension.data_ptr<float>() : nullptr,
                              query_codes.data_ptr<int8_t>(),
                              query_terms.data_ptr<float>(),
                              query_offset.data_ptr<int32_t>(),
                              bank_codes.data_ptr<uint8_t>(),
                              bank_terms.data_ptr<float>(),
                              code_dim,
                              cpu::has_avx512_vnni(),
                              dim,
                              screen_dim,
                              extension_dim,
                              num_queries,
                              num_bank,
                              k,
                              std::min<int64_t>(num_bank, 1 << 15),
                              out_dist.data_ptr<float>(),
                              out_index.data_ptr<int64_t>(),
                              exact_rows.data(),
                              extended_rows.data()};
  // Slabs between progress reports: as many blocks as brute force would search in ~2^35 multiply-adds.
  const int64_t slab = std::max<int64_t>(8, (int64_t{1} << 35) / std::max<int64_t>(num_bank * dim, 1) / width);
  for (int64_t b0 = 0; b0 < blocks; b0 += slab) {
    const int64_t b1 = std::min(blocks, b0 + slab);
    std::atomic<int64_t> next_block{b0};
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) kernels.knn_pruned(search, next_block, b1);
    });
    if (progress && !progress(std::min(num_queries, b1 * width))) break;
  }
  // Distances computed, and extension terms screened: every row against a whole block's panel.
  return {out_dist, out_index, std::accumulate(exact_rows.begin(), exact_rows.end(), int64_t{0}) * width,
          std::accumulate(extended_rows.begin(), extended_rows.end(), int64_t{0}) * width};
}

}  // namespace patchcore
