// The locally aware patch embedding on the CPU (embedding_bins.h for the arithmetic): each
// layer's bins summed per output column on its own grid (isa/embedding.h), the first layer's
// straight into the output rows, deeper layers' into a buffer resampled onto the first grid.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "../embedding_bins.h"
#include "cpu_dispatch.h"
#include "ops.h"

namespace patchcore {

at::Tensor patch_embedding_cpu(const std::vector<at::Tensor>& maps_in, int64_t dim) {
  const cpu::Kernels& kernels = cpu::kernels();
  const int64_t layers = static_cast<int64_t>(maps_in.size());
  const int64_t batch = maps_in[0].size(0), height = maps_in[0].size(2), width = maps_in[0].size(3);
  // Every column is written first by the first layer it belongs to, and added to by a later
  // layer only where the two share it (embedding_bins.h): no zero fill.
  at::Tensor out = at::empty({batch * height * width, dim}, maps_in[0].options());
  int64_t written = 0;  // columns [0, written) hold earlier layers' parts
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor maps = maps_in[l].contiguous();
    const int64_t channels = maps.size(1), h = maps.size(2), w = maps.size(3);
    const int64_t first = embedding::first_column(l, dim, layers), columns = embedding::column_count(l, dim, layers);
    const int64_t shared = written - first;  // 0, or 1 column shared with the previous layer
    written = first + columns;
    const bool same_grid = h == height && w == width;  // resampling onto the same grid is the identity
    at::Tensor own_grid = same_grid ? at::Tensor() : at::empty({batch * h * w, columns}, out.options());
    const cpu::EmbedLayer layer{maps.data_ptr<float>(), channels, h, w, dim, l, layers, first,
                                columns, same_grid ? out.data_ptr<float>() + first : own_grid.data_ptr<float>(),
                                same_grid ? dim : columns, same_grid ? shared : 0};
    at::parallel_for(0, batch * h, 1, [&](int64_t lo, int64_t hi) { kernels.embed_layer(layer, lo, hi); });
    if (same_grid) continue;
    const cpu::ResampleAdd resample{own_grid.data_ptr<float>(), h, w, columns, out.data_ptr<float>() + first,
                                    height, width, dim, shared};
    at::parallel_for(0, batch * height, 1, [&](int64_t lo, int64_t hi) { kernels.resample_add(resample, lo, hi); });
  }
  return out;
}

}  // namespace patchcore
