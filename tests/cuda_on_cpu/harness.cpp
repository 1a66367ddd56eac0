// Runs our CUDA kernels on the CPU through the shim in shim/ (see
// tests/test_cuda_kernels_on_cpu.py), playing the part of csrc/cuda/cuda_ops.cpp.
//
// usage: harness KERNEL SMS SMEM_OPTIN_BYTES < input > output
//   KERNEL cached | resident | resident-stages (greedy coreset)
//     input:  int64 rows, dim, n; float32 x [rows * dim]; float32 initial distances [rows]
//     output: int64 picks [n] (resident-stages: then int64 cycles [blocks * stages])
//   KERNEL knn
//     input:  int64 Q, M, dim (a multiple of 16), k, splits, warp_rows; float32 queries [Q * dim],
//             bank [M * dim]
//     output: float32 distances [Q * k], int64 indices [Q * k]
//   KERNEL shard-pass (one round of a distributed coreset shard)
//     input:  int64 rows, dim, count, offered; float32 space [rows * dim], minima [rows],
//             centres [count * dim]
//     output: float32 minima [rows], float32 offered values [min(rows, offered)], int64 their indices
//   KERNEL embedding
//     input:  int64 layers, dim, batch, then per layer int64 channels, height, width;
//             float32 maps of each layer [batch * channels * height * width]
//     output: float32 features [batch * height_0 * width_0 * dim]
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "../embedding_bins.h"
#include "coreset_shard_cuda.cuh"
#include "embedding_cuda.cuh"
#include "greedy_coreset_cuda.cuh"
#include "knn_cuda.cuh"

namespace pc = patchcore::cuda;

template <class T>
void read_exactly(T* out, size_t count) {
  if (std::fread(out, sizeof(T), count, stdin) != count) throw std::runtime_error("short input");
}

void run_knn() {
  int64_t header[6];
  read_exactly(header, 6);
  const int64_t num_queries = header[0], num_bank = header[1], dim = header[2], k = header[3];
  const int splits = static_cast<int>(header[4]), warp_rows = static_cast<int>(header[5]);
  float* queries = emu::device_alloc<float>(num_queries * dim);
  float* bank = emu::device_alloc<float>(num_bank * dim);
  read_exactly(queries, num_queries * dim);
  read_exactly(bank, num_bank * dim);
  float* query_norms = emu::device_alloc<float>(num_queries);
  float* bank_norms = emu::device_alloc<float>(num_bank);
  float* part_distance = emu::device_alloc<float>(splits * num_queries * k);
  auto* part_index = emu::device_alloc<int32_t>(splits * num_queries * k);
  float* distance = emu::device_alloc<float>(num_queries * k);
  int64_t* index = emu::device_alloc<int64_t>(num_queries * k);
  pc::knn_launch(queries, num_queries, bank, num_bank, dim, static_cast<int>(k), splits, warp_rows, query_norms,
                 bank_norms, part_distance, part_index, distance, index, nullptr);
  std::fwrite(distance, sizeof(float), num_queries * k, stdout);
  std::fwrite(index, sizeof(int64_t), num_queries * k, stdout);
}

// As csrc/cuda/cuda_ops.cpp coreset_shard_pass_cuda does: the pass, then the `offered` largest keys.
void run_shard_pass() {
  int64_t header[4];
  read_exactly(header, 4);
  const int64_t rows = header[0], dim = header[1], count = header[2], offered = header[3];
  float* space = emu::device_alloc<float>(rows * dim);
  float* minima = emu::device_alloc<float>(rows);
  float* centres = emu::device_alloc<float>(count * dim);
  read_exactly(space, rows * dim);
  read_exactly(minima, rows);
  read_exactly(centres, count * dim);
  auto* keys = emu::device_alloc<unsigned long long>(rows);
  pc::coreset_shard_pass_launch(space, rows, dim, centres, count, minima, keys, nullptr);
  std::vector<int64_t> order(rows);
  for (int64_t i = 0; i < rows; ++i) order[i] = i;
  const int64_t top = std::min(rows, offered);
  std::partial_sort(order.begin(), order.begin() + top, order.end(), [&](int64_t a, int64_t b) { return keys[a] > keys[b]; });
  std::vector<float> values(top);
  for (int64_t j = 0; j < top; ++j) values[j] = minima[order[j]];
  std::fwrite(minima, sizeof(float), rows, stdout);
  std::fwrite(values.data(), sizeof(float), top, stdout);
  std::fwrite(order.data(), sizeof(int64_t), top, stdout);
}

// As csrc/cuda/cuda_ops.cpp patch_embedding_cuda does.
void run_embedding() {
  int64_t header[3];
  read_exactly(header, 3);
  const int64_t layers = header[0], dim = header[1], batch = header[2];
  std::vector<int64_t> shapes(3 * layers);
  read_exactly(shapes.data(), shapes.size());
  std::vector<float*> maps(layers);
  for (int64_t l = 0; l < layers; ++l) {
    const int64_t count = batch * shapes[3 * l] * shapes[3 * l + 1] * shapes[3 * l + 2];
    maps[l] = emu::device_alloc<float>(count);
    read_exactly(maps[l], count);
  }
  const int64_t height = shapes[1], width = shapes[2];
  float* out = emu::device_alloc<float>(batch * height * width * dim, true);
  for (int64_t l = 0; l < layers; ++l) {
    const int64_t h = shapes[3 * l + 1], w = shapes[3 * l + 2];
    float* pooled = emu::device_alloc<float>(batch * patchcore::embedding::column_count(l, dim, layers) * h * w);
    pc::embed_layer_launch(maps[l], batch, shapes[3 * l], h, w, dim, l, layers, pooled, nullptr);
    pc::embed_resample_add_launch(pooled, batch, h, w, dim, l, layers, out, height, width, nullptr);
  }
  std::fwrite(out, sizeof(float), batch * height * width * dim, stdout);
}

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: harness cached|resident|resident-stages|knn|embedding|shard-pass SMS SMEM_OPTIN_BYTES < input\n");
    return 2;
  }
  const std::string kernel = argv[1];
  emu::sms = std::stoi(argv[2]);
  emu::smem_optin = std::stoi(argv[3]);
  try {
    if (kernel == "knn") {
      run_knn();
      return 0;
    }
    if (kernel == "embedding") {
      run_embedding();
      return 0;
    }
    if (kernel == "shard-pass") {
      run_shard_pass();
      return 0;
    }
    int64_t header[3];
    read_exactly(header, 3);
    const int64_t rows = header[0], dim = header[1], n = header[2];
    float* x = emu::device_alloc<float>(rows * dim);
    float* min_distance = emu::device_alloc<float>(rows);
    read_exactly(x, rows * dim);
    read_exactly(min_distance, rows);

    float* max_abs = emu::device_alloc<float>(1, true);
    for (int64_t i = 0; i < rows * dim; ++i) *max_abs = std::max(*max_abs, std::fabs(x[i]));
    int64_t* out = emu::device_alloc<int64_t>(n);
    __half* half_rows = emu::device_alloc<__half>(rows * pc::coreset_padded_dim(dim));
    float* half_norm_sq = emu::device_alloc<float>(rows);
    float* residual = emu::device_alloc<float>(rows);
    auto* sync_words = emu::device_alloc<unsigned long long>(6, true);  // at::zeros in cuda_ops.cpp

    pc::greedy_coreset_prepare(x, rows, dim, max_abs, half_rows, half_norm_sq, residual, nullptr);
    std::vector<long long> cycles;
    if (kernel == "cached") {
      pc::greedy_coreset_launch(x, rows, dim, min_distance, n, out, half_rows, half_norm_sq, residual, sync_words,
                                max_abs, nullptr);
    } else if (kernel == "resident" || kernel == "resident-stages") {
      const pc::CoresetDevice device = pc::coreset_device();
      __half* slots = emu::device_alloc<__half>(pc::coreset_resident_slot_halves(rows, dim, device));
      long long* stage_cycles = nullptr;
      const int64_t stage_count = pc::coreset_blocks(rows, device) * pc::coreset_resident_stages();
      if (kernel == "resident-stages") stage_cycles = emu::device_alloc<long long>(stage_count, true);
      pc::greedy_coreset_resident_launch(x, rows, dim, min_distance, n, out, half_rows, half_norm_sq, residual,
                                         sync_words, slots, max_abs, stage_cycles, nullptr);
      if (stage_cycles != nullptr) cycles.assign(stage_cycles, stage_cycles + stage_count);
    } else {
      throw std::invalid_argument("unknown kernel " + kernel);
    }
    std::fwrite(out, sizeof(int64_t), n, stdout);
    if (!cycles.empty()) std::fwrite(cycles.data(), sizeof(long long), cycles.size(), stdout);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}
