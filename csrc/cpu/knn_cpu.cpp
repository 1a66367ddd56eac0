// Exact top-k squared-L2 search on the CPU.
//
// The Q x M distance matrix never exists: queries and bank are cut into tiles of
// at most `tile_elems` dot products, each tile is one BLAS call (at::mm), and the
// top-k selection runs over the tile right away into per-query sorted lists.
// Distances use the expanded form |q|^2 + |b|^2 - 2 q.b, clamped at zero, as
// faiss IndexFlatL2 and float32 brute force do.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>

#include "ops.h"

namespace patchcore {
namespace {

at::Tensor row_squared_norms(const at::Tensor& x) {
  at::Tensor out = at::empty({x.size(0)}, x.options());
  const int64_t dim = x.size(1);
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, x.size(0), 256, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const float* row = src + i * dim;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < dim; ++j) acc += row[j] * row[j];
      dst[i] = acc;
    }
  });
  return out;
}

// Insert (value, index) into an ascending list of length k whose last entry is
// larger than value. Entries equal to value keep their place ahead of it: bank
// columns arrive in ascending index order, so ties stay with the lower index.
inline void insert_sorted(float* values, int64_t* indices, int64_t k, float value, int64_t index) {
  int64_t pos = k - 1;
  while (pos > 0 && values[pos - 1] > value) {
    values[pos] = values[pos - 1];
    indices[pos] = indices[pos - 1];
    --pos;
  }
  values[pos] = value;
  indices[pos] = index;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> knn_cpu(const at::Tensor& queries_in, const at::Tensor& bank_in, int64_t k,
                                           int64_t tile_elems) {
  const at::Tensor queries = queries_in.contiguous();
  const at::Tensor bank = bank_in.contiguous();
  const int64_t num_queries = queries.size(0);
  const int64_t num_bank = bank.size(0);

  at::Tensor out_dist = at::full({num_queries, k}, std::numeric_limits<float>::infinity(), queries.options());
  at::Tensor out_index = at::full({num_queries, k}, -1, queries.options().dtype(at::kLong));
  if (num_queries == 0) return {out_dist, out_index};

  const at::Tensor query_norms = row_squared_norms(queries);
  const at::Tensor bank_norms = row_squared_norms(bank);
  const float* qn = query_norms.data_ptr<float>();
  const float* bn = bank_norms.data_ptr<float>();
  float* best_dist = out_dist.data_ptr<float>();
  int64_t* best_index = out_index.data_ptr<int64_t>();

  // Wide bank tiles keep BLAS efficient; the query tile takes the rest of the budget.
  const int64_t bank_tile = std::min(num_bank, std::max<int64_t>(k, 2048));
  const int64_t query_tile = std::clamp<int64_t>(tile_elems / bank_tile, 1, num_queries);

  for (int64_t q0 = 0; q0 < num_queries; q0 += query_tile) {
    const int64_t q1 = std::min(num_queries, q0 + query_tile);
    const at::Tensor query_block = queries.slice(0, q0, q1);
    for (int64_t m0 = 0; m0 < num_bank; m0 += bank_tile) {
      const int64_t m1 = std::min(num_bank, m0 + bank_tile);
      const int64_t width = m1 - m0;
      at::Tensor dots = at::mm(query_block, bank.slice(0, m0, m1).t());  // [q1 - q0, width], contiguous
      float* tile = dots.data_ptr<float>();
      at::parallel_for(q0, q1, 16, [&](int64_t lo, int64_t hi) {
        for (int64_t q = lo; q < hi; ++q) {
          float* row = tile + (q - q0) * width;
          const float norm = qn[q];
#pragma omp simd
          for (int64_t j = 0; j < width; ++j) row[j] = std::max(norm + bn[m0 + j] - 2.f * row[j], 0.f);
          float* values = best_dist + q * k;
          int64_t* indices = best_index + q * k;
          for (int64_t j = 0; j < width; ++j)
            if (row[j] < values[k - 1]) insert_sorted(values, indices, k, row[j], m0 + j);
        }
      });
    }
  }
  return {out_dist, out_index};
}

}  // namespace patchcore
