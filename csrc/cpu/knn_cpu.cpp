// Exact top-k squared-L2 search on the CPU.
//
// The bank is packed once into panels of the kernels' width ([dim][width] each, so a dot
// tile loads a panel row as whole vectors); the instruction-set kernels (isa/knn_block.h)
// then run blocks of queries against every panel with the distances and the top-k
// selection fused into the tile, so the Q x M distance matrix never exists. Distances use
// the expanded form |q|^2 + |b|^2 - 2 q.b, clamped at zero, as faiss IndexFlatL2 and float32
// brute force do.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

#include "cpu_dispatch.h"
#include "ops.h"
#include "row_norms.h"

namespace patchcore {
namespace cpu {

void row_squared_norms(const float* x, int64_t rows, int64_t dim, float* out) {
  // Each row's sum is one sequential chain of float additions; eight rows advance side by side
  // so that eight chains are in flight (one chain waits on its adder's latency): the same floats.
  constexpr int64_t kSide = 8;
  at::parallel_for(0, rows, 256, [&](int64_t lo, int64_t hi) {
    int64_t i = lo;
    for (; i + kSide <= hi; i += kSide) {
      float acc[kSide] = {};
      for (int64_t j = 0; j < dim; ++j)
        for (int64_t r = 0; r < kSide; ++r) acc[r] += x[(i + r) * dim + j] * x[(i + r) * dim + j];
      for (int64_t r = 0; r < kSide; ++r) out[i + r] = acc[r];
    }
    for (; i < hi; ++i) {
      float acc = 0.f;
      for (int64_t j = 0; j < dim; ++j) acc += x[i * dim + j] * x[i * dim + j];
      out[i] = acc;
    }
  });
}

}  // namespace cpu

std::tuple<at::Tensor, at::Tensor> knn_cpu(const at::Tensor& queries_in, const at::Tensor& bank_in, int64_t k,
                                           const Progress& progress) {
  const cpu::Kernels& kernels = cpu::kernels();
  const at::Tensor queries = queries_in.contiguous();
  const at::Tensor bank = bank_in.contiguous();
  const int64_t num_queries = queries.size(0);
  const int64_t num_bank = bank.size(0);
  const int64_t dim = queries.size(1);

  at::Tensor out_dist = at::full({num_queries, k}, std::numeric_limits<float>::infinity(), queries.options());
  at::Tensor out_index = at::full({num_queries, k}, -1, queries.options().dtype(at::kLong));
  if (num_queries == 0) return {out_dist, out_index};

  const int64_t width = kernels.panel_width;
  const int64_t panels = (num_bank + width - 1) / width;
  at::Tensor packed = at::zeros({panels * dim * width}, queries.options());
  at::Tensor bank_norms = at::zeros({panels * width}, queries.options());  // padded lanes are masked out
  at::Tensor query_norms = at::empty({num_queries}, queries.options());
  const float* b = bank.data_ptr<float>();
  float* p = packed.data_ptr<float>();
  at::parallel_for(0, panels, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t panel = lo; panel < hi; ++panel)
      for (int64_t lane = 0; lane < width && panel * width + lane < num_bank; ++lane) {
        const float* src = b + (panel * width + lane) * dim;
        float* dst = p + panel * dim * width + lane;
        for (int64_t j = 0; j < dim; ++j) dst[j * width] = src[j];
      }
  });
  cpu::row_squared_norms(b, num_bank, dim, bank_norms.data_ptr<float>());
  cpu::row_squared_norms(queries.data_ptr<float>(), num_queries, dim, query_norms.data_ptr<float>());

  const cpu::KnnBlock block{queries.data_ptr<float>(), query_norms.data_ptr<float>(), p, bank_norms.data_ptr<float>(),
                            dim, num_bank, k, out_dist.data_ptr<float>(), out_index.data_ptr<int64_t>()};
  // Slabs of queries worth about 2^33 multiply-adds (a few tenths of a second) between progress reports.
  const int64_t slab = std::max<int64_t>(256, (int64_t{1} << 33) / std::max<int64_t>(num_bank * dim, 1));
  for (int64_t s0 = 0; s0 < num_queries; s0 += slab) {
    const int64_t s1 = std::min(num_queries, s0 + slab);
    at::parallel_for(s0, s1, 16, [&](int64_t lo, int64_t hi) { kernels.knn(block, lo, hi); });
    if (progress && !progress(s1)) break;
  }
  return {out_dist, out_index};
}

}  // namespace patchcore
