// The register-blocked dot-product tile shared by the coreset pass and the knn search, and
// the exact distance. Needs simd.h first.
//
// A tile is kRows rows of A (read in place, row-major) against one packed panel of
// kPanel rows of B (stored [dim][kPanel], so one k step loads kPanel contiguous floats).
// Each accumulator lane is one (a, b) pair summed over k in order, so the result does not
// depend on how wide the vectors are (only on whether multiply-add is fused).
#if defined(PATCHCORE_ISA_AVX512)
constexpr int kRows = 12;  // 24 accumulators + 2 panel vectors + 1 broadcast of 32 registers
#elif defined(PATCHCORE_ISA_AVX2)
constexpr int kRows = 4;   // 12 accumulators + 3 panel vectors + 1 broadcast of 16 registers
#else
constexpr int kRows = 4;
#endif
#if defined(PATCHCORE_ISA_AVX2)
constexpr int kPanelVecs = 3;  // 4 x 24 tiles: 7 loads per 12 FMAs (6 x 16 needs 8; measured 8 % slower)
#else
constexpr int kPanelVecs = 2;
#endif
constexpr int kPanel = kPanelVecs * kLanes;
// Rows of a one-vector tile (the pruned search's per-vector exact rows): at least 8
// independent chains keep two 4-cycle multiply-adds per cycle busy.
#if defined(PATCHCORE_ISA_AVX512)
constexpr int kTallRows = 12;
#else
constexpr int kTallRows = 8;
#endif

// out[r * kPanel + j] = row(r) . panel_j for r < Rows, j < Vecs kLanes, where row(r) points at
// the r-th row of A (rows in place, or gathered from anywhere) and the panel's rows are kPanel
// floats apart (a narrower tile reads the vectors from `panel` on). Every lane is the same
// sequential chain whatever Rows and Vecs are: the same float.
template <int Rows = kRows, int Vecs = kPanelVecs, class RowPointer>
inline void dot_tile_rows(RowPointer row, const float* panel, int64_t dim, float* out) {
  const float* a[Rows];
  for (int r = 0; r < Rows; ++r) a[r] = row(r);
  Vec acc[Rows][Vecs];
  for (int r = 0; r < Rows; ++r)
    for (int v = 0; v < Vecs; ++v) acc[r][v] = vzero();
  for (int64_t k = 0; k < dim; ++k) {
    Vec b[Vecs];
    for (int v = 0; v < Vecs; ++v) b[v] = vload(panel + k * kPanel + v * kLanes);
    for (int r = 0; r < Rows; ++r) {
      const Vec ar = vset1(a[r][k]);
      for (int v = 0; v < Vecs; ++v) acc[r][v] = vfmadd(ar, b[v], acc[r][v]);
    }
  }
  for (int r = 0; r < Rows; ++r)
    for (int v = 0; v < Vecs; ++v) vstore(out + r * kPanel + v * kLanes, acc[r][v]);
}

// The same for kRows rows stored a_stride floats apart from a.
inline void dot_tile(const float* a, int64_t a_stride, const float* panel, int64_t dim, float* out) {
  dot_tile_rows([&](int r) { return a + r * a_stride; }, panel, dim, out);
}

// Runs `body(a, a_stride, first_row, count)` over [lo, hi) in groups of kRows rows; the last,
// partial group is copied into a zero-padded scratch block so the tile can read whole groups.
template <class Body>
inline void for_each_row_group(const float* rows, int64_t dim, int64_t lo, int64_t hi, float* scratch, Body&& body) {
  int64_t i = lo;
  for (; i + kRows <= hi; i += kRows) body(rows + i * dim, dim, i, kRows);
  if (i < hi) {
    const int count = static_cast<int>(hi - i);
    std::memset(scratch, 0, sizeof(float) * kRows * dim);
    std::memcpy(scratch, rows + i * dim, sizeof(float) * count * dim);
    body(scratch, dim, i, count);
  }
}

// sum term(a_j, b_j) with element j in partial sum j % 16, the partial sums added pairwise in
// a fixed tree, and no fused multiply-add (kernels are compiled with -ffp-contract=off): the
// same float on every instruction set. term(0, 0) must be 0 (the tail is zero-padded).
constexpr int kExactLanes = 16;
constexpr int kExactVecs = kExactLanes / kLanes;

template <class Term>
inline float fixed_order_sum(const float* a, const float* b, int64_t dim, Term term) {
  Vec acc[kExactVecs];
  for (int v = 0; v < kExactVecs; ++v) acc[v] = vzero();
  int64_t j = 0;
  for (; j + kExactLanes <= dim; j += kExactLanes)
    for (int v = 0; v < kExactVecs; ++v) acc[v] = vadd(acc[v], term(vload(a + j + v * kLanes), vload(b + j + v * kLanes)));
  if (j < dim) {  // the tail as one zero-padded block: padded lanes add exactly zero
    float ta[kExactLanes] = {}, tb[kExactLanes] = {};
    std::memcpy(ta, a + j, sizeof(float) * (dim - j));
    std::memcpy(tb, b + j, sizeof(float) * (dim - j));
    for (int v = 0; v < kExactVecs; ++v) acc[v] = vadd(acc[v], term(vload(ta + v * kLanes), vload(tb + v * kLanes)));
  }
  float lanes[kExactLanes];
  for (int v = 0; v < kExactVecs; ++v) vstore(lanes + v * kLanes, acc[v]);
  for (int width = kExactLanes / 2; width >= 1; width /= 2)
    for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  return lanes[0];
}

// sqrt(sum (a - b)^2) in that order.
inline float exact_distance(const float* a, const float* b, int64_t dim) {
  const float sum = fixed_order_sum(a, b, dim, [](Vec x, Vec y) {
    const Vec d = vsub(x, y);
    return vmul(d, d);
  });
  return __builtin_sqrtf(sum);  // the instruction itself: no shared std::sqrt body (cpu_kernels.h)
}

// out[i * out_dim + j] = sum_k x_ik w_jk in fixed_order_sum's order (element k in partial sum
// k % 16, the same pairwise tree), for rows [lo, hi) and every weight row, computed kProjRows rows
// x kProjCols weights at a time: each element keeps its own kExactLanes partial sums, so a row's projection does
// not depend on its neighbours; the tile only shares the loads (one per row and one per weight per
// block of kExactLanes instead of two per element).
#if defined(PATCHCORE_ISA_AVX512)
constexpr int kProjRows = 4, kProjCols = 6;  // 24 accumulators of 32 registers
#elif defined(PATCHCORE_ISA_AVX2)
constexpr int kProjRows = 2, kProjCols = 3;  // 12 accumulators (2 vectors each) of 16 registers
#else
constexpr int kProjRows = 1, kProjCols = 2;
#endif

inline void project_fixed_order(const float* x, int64_t dim, int64_t lo, int64_t hi, const float* w, int64_t out_dim,
                                float* out) {
  const int64_t full = dim / kExactLanes * kExactLanes;
  // the zero-padded tails of this tile's rows and weights (padded lanes add exactly zero)
  alignas(64) float row_tail[kProjRows][kExactLanes];
  alignas(64) float weight_tail[kProjCols][kExactLanes];
  for (int64_t i0 = lo; i0 < hi; i0 += kProjRows) {
    const int rows = hi - i0 < kProjRows ? static_cast<int>(hi - i0) : kProjRows;
    const float* a[kProjRows];
    for (int r = 0; r < kProjRows; ++r) {
      a[r] = x + (i0 + (r < rows ? r : 0)) * dim;  // missing rows repeat the first: computed, not stored
      std::memset(row_tail[r], 0, sizeof(row_tail[r]));
      std::memcpy(row_tail[r], a[r] + full, sizeof(float) * (dim - full));
    }
    for (int64_t j0 = 0; j0 < out_dim; j0 += kProjCols) {
      const int cols = out_dim - j0 < kProjCols ? static_cast<int>(out_dim - j0) : kProjCols;
      const float* b[kProjCols];
      for (int c = 0; c < kProjCols; ++c) {
        b[c] = w + (j0 + (c < cols ? c : 0)) * dim;
        std::memset(weight_tail[c], 0, sizeof(weight_tail[c]));
        std::memcpy(weight_tail[c], b[c] + full, sizeof(float) * (dim - full));
      }
      Vec acc[kProjRows][kProjCols][kExactVecs];
      for (int r = 0; r < kProjRows; ++r)
        for (int c = 0; c < kProjCols; ++c)
          for (int v = 0; v < kExactVecs; ++v) acc[r][c][v] = vzero();
      const auto block = [&](const float* const* ra, int64_t ja, const float* const* cb, int64_t jb) {
        for (int v = 0; v < kExactVecs; ++v) {
          Vec wv[kProjCols];
          for (int c = 0; c < kProjCols; ++c) wv[c] = vload(cb[c] + jb + v * kLanes);
          for (int r = 0; r < kProjRows; ++r) {
            const Vec xv = vload(ra[r] + ja + v * kLanes);
            for (int c = 0; c < kProjCols; ++c) acc[r][c][v] = vadd(acc[r][c][v], vmul(xv, wv[c]));
          }
        }
      };
      for (int64_t j = 0; j < full; j += kExactLanes) block(a, j, b, j);
      if (full < dim) {
        const float* ta[kProjRows];
        const float* tb[kProjCols];
        for (int r = 0; r < kProjRows; ++r) ta[r] = row_tail[r];
        for (int c = 0; c < kProjCols; ++c) tb[c] = weight_tail[c];
        block(ta, 0, tb, 0);
      }
      for (int r = 0; r < rows; ++r)
        for (int c = 0; c < cols; ++c) {
          float lanes[kExactLanes];
          for (int v = 0; v < kExactVecs; ++v) vstore(lanes + v * kLanes, acc[r][c][v]);
          for (int width = kExactLanes / 2; width >= 1; width /= 2)
            for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
          out[(i0 + r) * out_dim + j0 + c] = lanes[0];
        }
    }
  }
}
