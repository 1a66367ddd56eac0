// The pieces of a greedy coreset that must give the same floats for a row wherever it is
// computed (one process, or a shard on any rank; patchcore_fast/distributed.py): the random
// projection, the start distances, and one plain greedy step. Each value is a sum in one fixed
// order (the kernels' exact_dot / exact_distance), so it depends on the row alone, not on how
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
  at::parallel_for(0, rows, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i)
      for (int64_t j = 0; j < out_dim; ++j) y[i * out_dim + j] = kernels.exact_dot(x + i * dim, w + j * dim, dim);
  });
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

std::tuple<double, int64_t> coreset_step_cpu(const at::Tensor& space_in, at::Tensor& min_distance,
                                             const std::optional<at::Tensor>& centre) {
  const cpu::Kernels& kernels = cpu::kernels();
  const at::Tensor space = space_in.contiguous();
  const int64_t rows = space.size(0), dim = space.size(1);
  const float* x = space.data_ptr<float>();
  float* m = min_distance.data_ptr<float>();
  const float* c = centre ? centre->data_ptr<float>() : nullptr;
  const int threads = at::get_num_threads();
  std::vector<float> best_value(threads, -std::numeric_limits<float>::infinity());
  std::vector<int64_t> best_index(threads, -1);
  at::parallel_for(0, rows, 1024, [&](int64_t lo, int64_t hi) {
    float value = -std::numeric_limits<float>::infinity();
    int64_t index = -1;
    for (int64_t i = lo; i < hi; ++i) {
      if (c != nullptr && m[i] >= 0.f) {  // picked rows hold -inf and stay there
        const float d = kernels.exact_distance(x + i * dim, c, dim);
        if (d < m[i]) m[i] = d;
      }
      if (index < 0 || m[i] > value) {
        value = m[i];
        index = i;
      }
    }
    const int t = at::get_thread_num();
    if (index >= 0 && (best_index[t] < 0 || value > best_value[t] || (value == best_value[t] && index < best_index[t]))) {
      best_value[t] = value;
      best_index[t] = index;
    }
  });
  float value = -std::numeric_limits<float>::infinity();
  int64_t index = -1;
  for (int t = 0; t < threads; ++t)
    if (best_index[t] >= 0 && (index < 0 || best_value[t] > value || (best_value[t] == value && best_index[t] < index))) {
      value = best_value[t];
      index = best_index[t];
    }
  return {static_cast<double>(value), index};
}

}  // namespace patchcore
