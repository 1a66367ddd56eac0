// |x|^2 of each row as every CPU search computes it (float32, summed in row order), defined
// once (knn_cpu.cpp) so that knn and the pruned search add the same floats.
#pragma once
#include <cstdint>

namespace patchcore::cpu {
void row_squared_norms(const float* x, int64_t rows, int64_t dim, float* out);
}
