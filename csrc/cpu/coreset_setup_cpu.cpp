// The pieces of a greedy coreset that must give the same floats for a row wherever it is
// computed (one process, or a shard on any rank; patchcore_fast/distributed.py): the random
// projection and the start distances. Each value is a sum in one fixed
// order (the kernels' project_fixed_order / exact_distance), so it depends on the row alone, not on how
// many rows share the call, the thread count, or the instruction set.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <limits>
#include <vector>

#include "cpu_dispatch.h"
#include "ops.h"

namespace patchcore {

at::Tensor fixed_order_projection_cpu(const at::Tensor& features_in, const at::Tensor& weights_in) {
  const cpu::Kernels& kernels = cpu::kernels();
  const at::Tensor features = features_in.contiguous(), weights = weights_in.contiguous();
  const int64_t rows = features.size(0), dim = features.size(1), out_dim = weights.size(0);
  at::Tensor out = at::empty({rows, out_dim}, features.options());
  const float* x = features.data_ptr<float>();
  const float* w = weights.data_ptr<float>();
  float* y = out.data_ptr<float>();
  at::parallel_for(0, rows, 64, [&](int64_t lo, int64_t hi) { kernels.project_fixed_order(x, dim, lo, hi, w, out_dim, y); });
  return out;
}

at::Tensor mean_distances_cpu(const at::Tensor& space_in, const at::Tensor& centres_in) {
  const cpu::Kernels& kernels = cpu::kernels();
  const at::Tensor space = space_in.contiguous(), centres = centres_in.contiguous();
  const int64_t rows = space.size(0), dim = space.size(1), count = centres.size(0);
  at::Tensor out = at::empty({rows}, space.options());
  const float* x = space.data_ptr<float>();
  const float* c = centres.data_ptr<float>();
  float* m = out.data_ptr<float>();
  at::parallel_for(0, rows, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      float sum = 0.f;  // centres in order, then one division
      for (int64_t s = 0; s < count; ++s) sum += kernels.exact_distance(x + i * dim, c + s * dim, dim);
      m[i] = sum / static_cast<float>(count);
    }
  });
  return out;
}

}  // namespace patchcore
