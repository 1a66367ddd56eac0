// The CPU kernels' instruction-set-specific parts, as one table of plain functions per
// instruction set (raw pointers, no torch types). csrc/cpu/isa/kernels_<isa>.cpp compiles
// the same source (isa/*.h) once per instruction set with that set's compiler flags;
// cpu_dispatch.cpp picks the table at run time from what the CPU supports, or from the
// PATCHCORE_CPU_ISA environment variable.
//
// Everything in this header has internal linkage or is a plain type, so translation units
// compiled with different -m flags never share a function body (no ODR surprises).
#pragma once
#include <atomic>
#include <cstdint>

namespace patchcore::cpu {

// Most candidates a coreset pass keeps for the batched selection (see greedy_coreset_cpu.cpp).
constexpr int kCandidates = 96;

// The (value, index) pairs with the largest values seen, lower index first on equal values.
struct TopRows {
  float value[kCandidates + 1];
  int64_t index[kCandidates + 1];
  int count;
};

// One greedy-coreset pass: every row in [lo, hi) takes its distance to each of the batch's
// centres into its running minimum, and the pass collects the rows with the largest minima.
struct CoresetPass {
  const float* rows;          // [N, dim] row-major, the selection space
  int64_t dim;
  const float* norm_sq;       // [N] |x|^2 of each row (float32)
  const float* norm;          // [N] |x| of each row
  float* min_distance;        // [N] running minimum distance to the selection (L2)
  float* skip_below;          // [N] screen threshold on squared distance (see coreset_screen.h)
  const float* centres;       // packed centre panels, [panels][dim][panel_width]
  const float* centre_norm_sq;  // [batch]
  const float* centre_norm;     // [batch]
  const float* centre_rows;     // [batch, dim] the centres' rows (copies: a rank's centres may live elsewhere)
  int batch;                  // number of centres (0: only collect the top rows)
  float screen_error;         // relative error bound of the screen's expanded form
};

// Exact top-k by squared L2 for a range of queries against a packed bank.
struct KnnBlock {
  const float* queries;       // [Q, dim]
  const float* query_norm_sq; // [Q]
  const float* bank;          // packed bank panels, [panels][dim][panel_width]
  const float* bank_norm_sq;  // [M]
  int64_t dim, num_bank, k;
  float* out_distance;        // [Q, k] ascending, pre-filled with +inf
  int64_t* out_index;         // [Q, k], pre-filled with -1
};

// Exact top-k as KnnBlock, skipping bank rows a rigorous bound rules out (search_bound.h).
// Queries go in blocks of panel_width, taken in `order` (neighbours together, so the rows
// their bounds leave are mostly the same); per block and bank chunk: the screen in
// screen_dim dimensions, exact distances to each query's best-screened rows (thresholds),
// then exact distances to every row that survives some query's cut. With an extension (a
// cascade), the rows the first screen keeps are screened again with more directions (only
// their extension_dim extra terms are computed) before any exact distance.
struct PrunedKnn {
  const float* queries;         // [Q, dim]
  const float* query_norm_sq;   // [Q] float32, as knn computes it
  const float* query_screen;    // [Q, screen_dim]: Y_q, R_q, 1
  const double* query_norm64;   // [Q] N_q
  const double* query_margin;   // [Q] margin(q)
  const int64_t* order;         // [Q] the order queries are taken in
  const float* bank;            // [M, dim]
  const float* bank_norm_sq;    // [M] float32, as knn computes it
  const float* bank_screen;     // [M, screen_dim]: Y_b, R_b, H_b
  const float* query_extension; // [Q, extension_dim]: Y_q of the further directions, R_q', R_q (or null)
  const float* bank_extension;  // [M, extension_dim]: Y_b of the further directions, R_b', -R_b (or null)
  // The first screen in 8-bit codes (isa/code_tile.h, search_bound.h step 5), code_dim a multiple of 4:
  const int8_t* query_codes;     // [Q, code_dim] z in [-63, 63]
  const float* query_code_terms; // [Q, 4] s_q, e_q (up), |s_q z| (up), R_q
  const int32_t* query_code_offset; // [Q] 128 sum_j z_j
  const uint8_t* bank_codes;     // [M, code_dim] a + 128, a in [-127, 127]
  const float* bank_code_terms;  // [M, 5] s_b, |Y_b| (up), e_b (up), R_b, H_b
  int64_t code_dim;
  bool vnni;                     // the CPU has AVX512_VNNI (used by the AVX-512 kernels)
  int64_t dim, screen_dim, extension_dim, num_queries, num_bank, k;
  int64_t chunk_rows;           // bank rows screened at once (bounds the scratch memory)
  float* out_distance;          // [Q, k]
  int64_t* out_index;           // [Q, k]
  int64_t* exact_rows;          // [blocks]: bank rows computed exactly for each block
  int64_t* extended_rows;       // [blocks]: bank rows screened again by the extension
};

// One layer of the locally aware patch embedding (embedding_bins.h) for cells of its own grid:
// each cell's neighbourhood bins, summed per output column and divided by the layer count, are
// written to its row of `out` (added to the first `added_columns`, which the previous layer
// shares). Rows are cells in (image, y, x) order.
struct EmbedLayer {
  const float* maps;            // [B, channels, height, width]
  int64_t channels, height, width;
  int64_t dim;                  // bins of a neighbourhood vector
  int64_t layer, layers;        // bin b feeds column (layer * dim + b) / layers
  int64_t first_column, columns;
  float* out;                   // cell r, column j at out[r * out_stride + j - first_column]
  int64_t out_stride, added_columns;
};

// Bilinear resampling (align_corners=False) of a layer's columns onto the first layer's grid,
// written to `out` (added to the first `added_columns`). Rows are output cells' rows,
// image * out_height + y.
struct ResampleAdd {
  const float* source;          // [B, height, width, columns]
  int64_t height, width, columns;
  float* out;                   // cell r, column j at out[r * out_stride + j]
  int64_t out_height, out_width, out_stride, added_columns;
};

struct Kernels {
  const char* name;           // "generic", "avx2" or "avx512"
  int panel_width;            // centres or bank rows per packed panel
  // sqrt of the squared L2 between two rows, summed in one fixed order on every
  // instruction set (16 interleaved partial sums, no fused multiply-add), so every
  // path returns the same float bit for bit.
  float (*exact_distance)(const float* a, const float* b, int64_t dim);
  // a.b summed in the same fixed order: the same float on every path.
  // out[i * out_dim + j] = x_i . w_j summed as exact_distance sums (one fixed order, no fused
  // multiply-add), for rows i in [lo, hi) of x [*, dim] and the rows of w [out_dim, dim]
  void (*project_fixed_order)(const float* x, int64_t dim, int64_t lo, int64_t hi, const float* w, int64_t out_dim,
                              float* out);
  void (*coreset_pass)(const CoresetPass& pass, int64_t lo, int64_t hi, TopRows& top);
  void (*knn)(const KnnBlock& block, int64_t q_lo, int64_t q_hi);
  // out[i * out_stride + j] = rows_i . panel row j for rows i in [lo, hi), j < panels * panel_width
  // (packed panels as for knn; each dot product one sequential sum).
  void (*project)(const float* rows, int64_t dim, int64_t lo, int64_t hi, const float* packed, int64_t panels,
                  float* out, int64_t out_stride);
  // Blocks are claimed one at a time from next_block until block_end: their costs differ
  // (the rows each keeps), so a static split leaves a thread idle.
  void (*knn_pruned)(const PrunedKnn& search, std::atomic<int64_t>& next_block, int64_t block_end);
  // Rows [lo, hi) of a layer's grid (image * height + y) / of the output grid.
  void (*embed_layer)(const EmbedLayer& layer, int64_t row_lo, int64_t row_hi);
  void (*resample_add)(const ResampleAdd& resample, int64_t row_lo, int64_t row_hi);
};

extern const Kernels kGenericKernels;
#if defined(PATCHCORE_X86_KERNELS)
extern const Kernels kAvx2Kernels;
extern const Kernels kAvx512Kernels;
#endif

}  // namespace patchcore::cpu
