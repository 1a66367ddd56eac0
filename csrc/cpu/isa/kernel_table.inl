// Compiles the CPU kernels for the instruction set the including file names, and defines
// its table. Included once each by kernels_generic.cpp, kernels_avx2.cpp, kernels_avx512.cpp.
// Everything but the table has internal linkage (see cpu_kernels.h).
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#if defined(PATCHCORE_ISA_AVX512) || defined(PATCHCORE_ISA_AVX2)
#include <immintrin.h>
#endif

#include "../coreset_screen.h"
#include "../cpu_kernels.h"
#include "../search_bound.h"
#include "../../embedding_bins.h"

namespace patchcore::cpu {
namespace {
#include "simd.h"
#include "dot_tile.h"
#include "coreset_pass.h"
#include "knn_block.h"
#include "code_tile.h"
#include "knn_pruned.h"
#include "embedding.h"
}  // namespace

const Kernels PATCHCORE_KERNEL_TABLE = {PATCHCORE_KERNEL_NAME, kPanel, &exact_distance, &project_fixed_order, &coreset_pass, &knn, &project, &knn_pruned,
                                           &embed_layer, &resample_add};

}  // namespace patchcore::cpu
