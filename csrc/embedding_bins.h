// The locally aware patch embedding (patchcore_fast/embedding.py) as index arithmetic, shared by
// the CPU kernel (cpu/isa/embedding.h) and the CUDA kernel (cuda/embedding_cuda.cu).
//
// Layer l of `layers` has C channels; a cell's neighbourhood vector has L = 9 C elements, element
// u = c * 9 + ky * 3 + kx being channel c at offset (ky - 1, kx - 1) (zero outside the map).
// torch's adaptive average pooling to `dim` averages elements [start(b), end(b)) into bin b. The
// layers' dim-vectors are concatenated and pooled to dim again: output column j averages entries
// [j * layers, (j + 1) * layers) of the concatenation, so bin b of layer l feeds exactly one
// column, (l * dim + b) / layers. Deeper layers are resampled (bilinear, align_corners=False) to
// the first layer's grid; all of this is linear, so a layer's columns are summed on its own grid
// and resampled once.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define PATCHCORE_HOST_DEVICE __host__ __device__
#else
#define PATCHCORE_HOST_DEVICE
#endif

namespace patchcore::embedding {

PATCHCORE_HOST_DEVICE inline int64_t bin_start(int64_t bin, int64_t length, int64_t dim) {
  return bin * length / dim;
}
PATCHCORE_HOST_DEVICE inline int64_t bin_end(int64_t bin, int64_t length, int64_t dim) {
  return ((bin + 1) * length + dim - 1) / dim;
}
// The output column bin `bin` of layer `layer` feeds.
PATCHCORE_HOST_DEVICE inline int64_t column_of(int64_t layer, int64_t bin, int64_t dim, int64_t layers) {
  return (layer * dim + bin) / layers;
}
// The columns layer `layer` feeds: [first_column, first_column + column_count).
PATCHCORE_HOST_DEVICE inline int64_t first_column(int64_t layer, int64_t dim, int64_t layers) {
  return layer * dim / layers;
}
PATCHCORE_HOST_DEVICE inline int64_t column_count(int64_t layer, int64_t dim, int64_t layers) {
  return ((layer + 1) * dim - 1) / layers + 1 - first_column(layer, dim, layers);
}

// One axis of torch's bilinear resampling (align_corners=False, output size given): output
// index `out` reads input indices i0, i1 with weights w0, w1, computed in float as torch does.
struct Taps {
  int64_t i0, i1;
  float w0, w1;
};
PATCHCORE_HOST_DEVICE inline Taps bilinear_taps(int64_t out, int64_t in_size, int64_t out_size) {
  const float scale = static_cast<float>(in_size) / static_cast<float>(out_size);
  float real = scale * (static_cast<float>(out) + 0.5f) - 0.5f;
  if (real < 0.0f) real = 0.0f;
  int64_t i0 = static_cast<int64_t>(real);  // real >= 0: truncation is floor
  if (i0 > in_size - 1) i0 = in_size - 1;
  float w1 = real - static_cast<float>(i0);
  w1 = w1 < 0.0f ? 0.0f : (w1 > 1.0f ? 1.0f : w1);
  return Taps{i0, i0 + (i0 < in_size - 1 ? 1 : 0), 1.0f - w1, w1};
}

}  // namespace patchcore::embedding
