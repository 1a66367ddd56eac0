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

// out[r * kPanel + j] = row(r) . panel_j for r < kRows, j < kPanel, where row(r) points at
// the r-th row of A (rows in place, or gathered from anywhere).
template <class RowPointer>
inline void dot_tile_rows(RowPointer row, const float* panel, int64_t dim, float* out) {
  const float* a[kRows];
  for (int r = 0; r < kRows; ++r) a[r] = row(r);
  Vec acc[kRows][kPanelVecs];
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < kPanelVecs; ++v) acc[r][v] = vzero();
  for (int64_t k = 0; k < dim; ++k) {
    Vec b[kPanelVecs];
    for (int v = 0; v < kPanelVecs; ++v) b[v] = vload(panel + k * kPanel + v * kLanes);
    for (int r = 0; r < kRows; ++r) {
      const Vec ar = vset1(a[r][k]);
      for (int v = 0; v < kPanelVecs; ++v) acc[r][v] = vfmadd(ar, b[v], acc[r][v]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < kPanelVecs; ++v) vstore(out + r * kPanel + v * kLanes, acc[r][v]);
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

// sum a_j b_j in that order.
inline float exact_dot(const float* a, const float* b, int64_t dim) {
  return fixed_order_sum(a, b, dim, [](Vec x, Vec y) { return vmul(x, y); });
}
