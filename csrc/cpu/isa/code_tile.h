// The pruned search's first screen in 8-bit codes (search_bound.h step 5). Needs simd.h and
// dot_tile.h first (kRows, kPanel, kPanelVecs).
//
// A bank row's code is u_j = a_j + 128 (a_j in [-127, 127]: its projection over its own scale
// s_b); a query's code is z_j in [-63, 63] over its scale s_q. The tile sums u_j z_j over the
// code dimensions in int32 (exact: |sum| < 2^24, so its float conversion is exact too), then
// D = sum - 128 sum_j z_j = a . z, and every (row, query) pair gets the screen's upper bound
//   t = s_q s_b D + e_q |Y_b| + |Z_q| e_b + R_q R_b + H_b
// (e: each side's code error, |Z_q| = |s_q z|, all rounded up where they are made). With
// |z_j| <= 63, one pair of u8 x s8 products is at most 2 x 254 x 63 < 2^15, so the 16-bit sums of
// vpmaddubsw never saturate and every path computes the same integers. The panel holds each
// query's codes as 4-byte groups: panel[(j / 4) * kPanel * 4 + lane * 4 + j % 4].

// The per-lane (query) values of a block: scales, code errors, code norms, residual bounds and
// the integer offset 128 sum_j z_j.
struct CodeLanes {
  alignas(64) float scale[kPanel];
  alignas(64) float error[kPanel];
  alignas(64) float norm[kPanel];
  alignas(64) float residual[kPanel];
  alignas(64) int32_t offset[kPanel];
};

// The per-row (bank) values, kCodeTerms floats per row: s_b, |Y_b| (up), e_b (up), R_b, H_b.
constexpr int kCodeTerms = 5;

// t for row r, lanes [v kLanes, (v + 1) kLanes), from the lanes' exact integer dot products d.
inline void code_epilogue(const float* terms, const CodeLanes& q, int v, Vec d, float* out) {
  const Vec scale = vset1(terms[0]), norm_b = vset1(terms[1]), error_b = vset1(terms[2]);
  const Vec residual_b = vset1(terms[3]), half_sq = vset1(terms[4]);
  const int o = v * kLanes;
  Vec t = vmul(vmul(d, vload(q.scale + o)), scale);
  t = vfmadd(vload(q.error + o), norm_b, t);
  t = vfmadd(vload(q.norm + o), error_b, t);
  t = vfmadd(vload(q.residual + o), residual_b, t);
  vstore(out, vadd(t, half_sq));
}

#if defined(PATCHCORE_ISA_AVX512) || defined(PATCHCORE_ISA_AVX2)
// The same integer operations at two widths: PATCHCORE_MI(op) names the intrinsic of this width.
#if defined(PATCHCORE_ISA_AVX512)
using IVec = __m512i;
#define PATCHCORE_MI(op) _mm512_##op
inline IVec ivzero() { return _mm512_setzero_si512(); }
inline IVec ivload(const void* p) { return _mm512_loadu_si512(p); }
inline void ivstore(void* p, IVec a) { _mm512_storeu_si512(p, a); }
#else
using IVec = __m256i;
#define PATCHCORE_MI(op) _mm256_##op
inline IVec ivzero() { return _mm256_setzero_si256(); }
inline IVec ivload(const void* p) { return _mm256_loadu_si256(static_cast<const IVec*>(p)); }
inline void ivstore(void* p, IVec a) { _mm256_storeu_si256(static_cast<IVec*>(p), a); }
#endif
inline IVec ivset1(int32_t x) { return PATCHCORE_MI(set1_epi32)(x); }
inline IVec ivsub(IVec a, IVec b) { return PATCHCORE_MI(sub_epi32)(a, b); }
inline Vec ivfloat(IVec a) { return {PATCHCORE_MI(cvtepi32_ps)(a)}; }
// acc + sum of 4 u8 x s8 products per 32-bit lane, without VNNI.
inline IVec ivdot4(IVec acc, IVec u, IVec s) {
  return PATCHCORE_MI(add_epi32)(acc, PATCHCORE_MI(madd_epi16)(PATCHCORE_MI(maddubs_epi16)(u, s),
                                                                  PATCHCORE_MI(set1_epi16)(1)));
}
#undef PATCHCORE_MI

inline int32_t load4(const uint8_t* p) {
  int32_t x;
  std::memcpy(&x, p, 4);
  return x;
}

// The tile's integer loop over rows in sub-tiles of SubRows (all of acc leaves registers at
// once: indexing it by the run-time count would keep it in memory through the loop), then each
// row's t into out[r * kPanel + lane]. DOT4 is the 4-product step; the loop is a macro so that
// the VNNI variant can be compiled with its own target.
#define PATCHCORE_CODE_TILE_BODY(DOT4, SubRows)                                                    \
  alignas(64) int32_t dots[kRows][kPanel];                                                         \
  for (int r0 = 0; r0 < kRows; r0 += SubRows) {                                                    \
    IVec acc[SubRows][kPanelVecs];                                                                 \
    for (int r = 0; r < SubRows; ++r)                                                              \
      for (int v = 0; v < kPanelVecs; ++v) acc[r][v] = ivzero();                                   \
    for (int64_t g = 0; g < groups; ++g) {                                                         \
      IVec b[kPanelVecs];                                                                          \
      for (int v = 0; v < kPanelVecs; ++v) b[v] = ivload(panel + (g * kPanel + v * kLanes) * 4);   \
      for (int r = 0; r < SubRows; ++r) {                                                          \
        const IVec a = ivset1(load4(rows[r0 + r] + g * 4));                                        \
        for (int v = 0; v < kPanelVecs; ++v) acc[r][v] = DOT4(acc[r][v], a, b[v]);                \
      }                                                                                            \
    }                                                                                              \
    for (int r = 0; r < SubRows; ++r)                                                              \
      for (int v = 0; v < kPanelVecs; ++v) ivstore(dots[r0 + r] + v * kLanes, acc[r][v]);          \
  }                                                                                                \
  for (int r = 0; r < count; ++r)                                                                  \
    for (int v = 0; v < kPanelVecs; ++v)                                                           \
      code_epilogue(terms[r], lanes, v, ivfloat(ivsub(ivload(dots[r] + v * kLanes),                \
                                                      ivload(lanes.offset + v * kLanes))),         \
                    out + r * kPanel + v * kLanes);

// Rows per sub-tile without VNNI: each 4-product step needs two scratch registers besides the
// accumulators, the panel vectors, the broadcast and the constant. AVX2 (16 registers): 2 rows
// x 3 vectors (4 x 3 spilled two accumulators; measured on a Xeon, 256 codes x 24 queries:
// 4 x 3 79, 3 x 3 107, 2 x 3 102 products/ns). AVX-512 (32): all 12 rows x 2 vectors fit.
#if defined(PATCHCORE_ISA_AVX512)
constexpr int kCodeRows = kRows;
#else
constexpr int kCodeRows = 2;
#endif
static_assert(kRows % kCodeRows == 0, "whole sub-tiles");

inline void code_tile_plain(const uint8_t* const* rows, const float* const* terms, int count, const int8_t* panel,
                            int64_t groups, const CodeLanes& lanes, float* out) {
  PATCHCORE_CODE_TILE_BODY(ivdot4, kCodeRows)
}

#if defined(PATCHCORE_ISA_AVX512)
// As inline assembly: GCC 12's intrinsic copies every accumulator and keeps a copy on the stack.
inline IVec ivdot4_vnni(IVec acc, IVec u, IVec s) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(s));
  return acc;
}
__attribute__((target("avx512vnni"))) inline void code_tile_vnni(const uint8_t* const* rows, const float* const* terms,
                                                                 int count, const int8_t* panel, int64_t groups,
                                                                 const CodeLanes& lanes, float* out) {
  PATCHCORE_CODE_TILE_BODY(ivdot4_vnni, kRows)
}
#endif
#undef PATCHCORE_CODE_TILE_BODY

// t for `count` rows (row pointers padded to kRows with valid rows) against the block's panel
// (its codes, and the same codes as floats [code_dim][kPanel] for the portable path); `vnni`:
// the CPU has AVX512_VNNI (the same integers either way).
inline void code_tile(const uint8_t* const* rows, const float* const* terms, int count, const int8_t* panel,
                      const float*, int64_t groups, const CodeLanes& lanes, bool vnni, float* out) {
#if defined(PATCHCORE_ISA_AVX512)
  if (vnni) return code_tile_vnni(rows, terms, count, panel, groups, lanes, out);
#endif
  (void)vnni;
  code_tile_plain(rows, terms, count, panel, groups, lanes, out);
}

#else
// Portable: the codes as floats through the float tile. Every product and partial sum is an
// integer below 2^24, so the float arithmetic is exact: the same D as the integer paths.
inline void code_tile(const uint8_t* const* rows, const float* const* terms, int count, const int8_t*,
                      const float* float_panel, int64_t groups, const CodeLanes& lanes, bool, float* out) {
  const int64_t n = groups * 4;
  float a[kRows * 2048];  // kMaxCodeDim (knn_pruned_cpu.cpp)
  for (int r = 0; r < kRows; ++r)
    for (int64_t j = 0; j < n; ++j) a[r * n + j] = static_cast<float>(static_cast<int>(rows[r][j]) - 128);
  alignas(64) float d[kRows * kPanel];
  dot_tile(a, n, float_panel, n, d);
  for (int r = 0; r < count; ++r)
    for (int v = 0; v < kPanelVecs; ++v)
      code_epilogue(terms[r], lanes, v, vload(d + r * kPanel + v * kLanes), out + r * kPanel + v * kLanes);
}
#endif
