// The locally aware patch embedding on the GPU (csrc/embedding_bins.h for the arithmetic), in
// two kernels per layer: (1) each thread one output column of one cell of the layer's grid,
// its bins summed straight from the maps (threads of a warp take neighbouring cells of a row,
// so their reads of a map row are coalesced; no neighbourhood is unfolded); (2) each thread one
// column of one output cell, the four bilinear taps of (1) added into the output row. The
// summation order is the CPU kernel's (isa/embedding.h); only contraction into fused
// multiply-adds may round differently.
#include <cuda_runtime.h>

#include <stdexcept>

#include "../embedding_bins.h"
#include "check.cuh"
#include "embedding_cuda.cuh"

namespace patchcore::cuda {
namespace {

namespace emb = patchcore::embedding;

constexpr int kThreads = 256;

unsigned blocks_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65535 * 16 ? blocks : 65535 * 16);  // grid-stride beyond this
}

__global__ void embed_layer_kernel(const float* maps, int64_t batch, int64_t channels, int64_t height,
                                   int64_t width, int64_t dim, int64_t layer, int64_t layers, float* pooled) {
  const int64_t columns = emb::column_count(layer, dim, layers), first = emb::first_column(layer, dim, layers);
  const int64_t length = 9 * channels, total = batch * columns * height * width;
  const float layer_count = static_cast<float>(layers);
  for (int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; index < total;
       index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t x = index % width, y = index / width % height;
    const int64_t column = first + index / (width * height) % columns, image = index / (width * height * columns);
    const float* image_maps = maps + image * channels * height * width;
    // The entries of the layers' concatenation this column averages, within this layer.
    int64_t entry_lo = column * layers, entry_hi = (column + 1) * layers;
    if (entry_lo < layer * dim) entry_lo = layer * dim;
    if (entry_hi > (layer + 1) * dim) entry_hi = (layer + 1) * dim;
    float value = 0.0f;
    for (int64_t entry = entry_lo; entry < entry_hi; ++entry) {
      const int64_t bin = entry - layer * dim;
      const int64_t start = emb::bin_start(bin, length, dim), end = emb::bin_end(bin, length, dim);
      float sum = 0.0f;
      for (int64_t u = start; u < end; ++u) {
        const int64_t c = u / 9, source_y = y + u % 9 / 3 - 1, source_x = x + u % 3 - 1;
        if (source_y >= 0 && source_y < height && source_x >= 0 && source_x < width) {
          sum += image_maps[(c * height + source_y) * width + source_x];
        } else {
          sum += 0.0f;  // zero padding, added as unfold's zeros are (a -0.0 sum becomes +0.0)
        }
      }
      value += sum / static_cast<float>(end - start);
    }
    pooled[index] = value / layer_count;
  }
}

__global__ void embed_resample_add_kernel(const float* pooled, int64_t batch, int64_t height, int64_t width,
                                          int64_t dim, int64_t layer, int64_t layers, float* out,
                                          int64_t out_height, int64_t out_width) {
  const int64_t columns = emb::column_count(layer, dim, layers), first = emb::first_column(layer, dim, layers);
  const int64_t total = batch * out_height * out_width * columns;
  for (int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; index < total;
       index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = index % columns, cell = index / columns;
    const int64_t x = cell % out_width, y = cell / out_width % out_height, image = cell / (out_width * out_height);
    const emb::Taps ty = emb::bilinear_taps(y, height, out_height);
    const emb::Taps tx = emb::bilinear_taps(x, width, out_width);
    const float* plane = pooled + (image * columns + j) * height * width;
    const float a = plane[ty.i0 * width + tx.i0], b = plane[ty.i0 * width + tx.i1];
    const float c = plane[ty.i1 * width + tx.i0], d = plane[ty.i1 * width + tx.i1];
    out[cell * dim + first + j] += ty.w0 * (tx.w0 * a + tx.w1 * b) + ty.w1 * (tx.w0 * c + tx.w1 * d);
  }
}

}  // namespace

void embed_layer_launch(const float* maps, int64_t batch, int64_t channels, int64_t height, int64_t width,
                        int64_t dim, int64_t layer, int64_t layers, float* pooled, cudaStream_t stream) {
  if (layer < 0 || layer >= layers || dim < 1) throw std::invalid_argument("patchcore_fast: embedding layer out of range");
  const int64_t work = batch * emb::column_count(layer, dim, layers) * height * width;
  if (work == 0) return;
  embed_layer_kernel<<<blocks_for(work), kThreads, 0, stream>>>(maps, batch, channels, height, width, dim, layer,
                                                                 layers, pooled);
  PATCHCORE_CUDA_CHECK(cudaGetLastError());
}

void embed_resample_add_launch(const float* pooled, int64_t batch, int64_t height, int64_t width, int64_t dim,
                               int64_t layer, int64_t layers, float* out, int64_t out_height, int64_t out_width,
                               cudaStream_t stream) {
  if (layer < 0 || layer >= layers || dim < 1) throw std::invalid_argument("patchcore_fast: embedding layer out of range");
  const int64_t work = batch * out_height * out_width * emb::column_count(layer, dim, layers);
  if (work == 0) return;
  embed_resample_add_kernel<<<blocks_for(work), kThreads, 0, stream>>>(pooled, batch, height, width, dim, layer,
                                                                        layers, out, out_height, out_width);
  PATCHCORE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace patchcore::cuda
