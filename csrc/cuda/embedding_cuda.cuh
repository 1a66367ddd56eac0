// Launchers of the CUDA patch-embedding kernels (csrc/embedding_bins.h): raw pointers and a
// stream, no torch. All tensors float32, contiguous.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace patchcore::cuda {

// Layer `layer` of `layers`, maps [batch, channels, height, width]: its columns [first, first +
// columns) of the output, each divided by the layer count, on its own grid: pooled [batch,
// columns, height, width].
void embed_layer_launch(const float* maps, int64_t batch, int64_t channels, int64_t height, int64_t width,
                        int64_t dim, int64_t layer, int64_t layers, float* pooled, cudaStream_t stream);

// pooled [batch, columns, height, width] resampled (bilinear, align_corners=False) onto the
// output grid and added to out [batch * out_height * out_width, dim] at columns [first, first + columns).
void embed_resample_add_launch(const float* pooled, int64_t batch, int64_t height, int64_t width, int64_t dim,
                               int64_t layer, int64_t layers, float* out, int64_t out_height, int64_t out_width,
                               cudaStream_t stream);

}  // namespace patchcore::cuda
