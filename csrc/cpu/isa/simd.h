// The few vector operations the CPU kernels need, for one instruction set chosen by the
// including file: PATCHCORE_ISA_AVX512, PATCHCORE_ISA_AVX2, or neither (portable code that
// the compiler vectorises for the target's baseline: SSE2 on x86-64, NEON on aarch64).
// Included only inside an anonymous namespace (kernel_table.inl, which includes the system
// headers first), so each instruction set keeps its own copy.

#if defined(PATCHCORE_ISA_AVX512) || defined(PATCHCORE_ISA_AVX2)
// The same operations at two widths: PATCHCORE_MM(op) names the intrinsic of this width.
#if defined(PATCHCORE_ISA_AVX512)
constexpr int kLanes = 16;
using Native = __m512;
#define PATCHCORE_MM(op) _mm512_##op
#else
constexpr int kLanes = 8;
using Native = __m256;
#define PATCHCORE_MM(op) _mm256_##op
#endif
struct Vec { Native v; };
inline Vec vzero() { return {PATCHCORE_MM(setzero_ps)()}; }
inline Vec vload(const float* p) { return {PATCHCORE_MM(loadu_ps)(p)}; }
inline void vstore(float* p, Vec a) { PATCHCORE_MM(storeu_ps)(p, a.v); }
inline Vec vset1(float x) { return {PATCHCORE_MM(set1_ps)(x)}; }
inline Vec vadd(Vec a, Vec b) { return {PATCHCORE_MM(add_ps)(a.v, b.v)}; }
inline Vec vsub(Vec a, Vec b) { return {PATCHCORE_MM(sub_ps)(a.v, b.v)}; }
inline Vec vmul(Vec a, Vec b) { return {PATCHCORE_MM(mul_ps)(a.v, b.v)}; }
inline Vec vdiv(Vec a, Vec b) { return {PATCHCORE_MM(div_ps)(a.v, b.v)}; }
inline Vec vmax(Vec a, Vec b) { return {PATCHCORE_MM(max_ps)(a.v, b.v)}; }
inline Vec vfmadd(Vec a, Vec b, Vec c) { return {PATCHCORE_MM(fmadd_ps)(a.v, b.v, c.v)}; }
// Bit l set where !(a[l] >= b[l]) (NaN included) / where a[l] < b[l] / where a[l] <= b[l].
#if defined(PATCHCORE_ISA_AVX512)
inline unsigned vmask_not_ge(Vec a, Vec b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_NGE_UQ); }
inline unsigned vmask_lt(Vec a, Vec b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ); }
inline unsigned vmask_le(Vec a, Vec b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_LE_OQ); }
#else
inline unsigned vmask_not_ge(Vec a, Vec b) {
  return static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(a.v, b.v, _CMP_NGE_UQ)));
}
inline unsigned vmask_lt(Vec a, Vec b) {
  return static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ)));
}
inline unsigned vmask_le(Vec a, Vec b) {
  return static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(a.v, b.v, _CMP_LE_OQ)));
}
#endif
#undef PATCHCORE_MM

#else
// GCC/Clang vector extensions: 4 floats in one SSE2 or NEON register on any target.
constexpr int kLanes = 4;
typedef float Float4 __attribute__((vector_size(16)));
struct Vec { Float4 v; };
inline Vec vzero() { return {Float4{0.f, 0.f, 0.f, 0.f}}; }
inline Vec vload(const float* p) { Float4 r; std::memcpy(&r, p, sizeof r); return {r}; }
inline void vstore(float* p, Vec a) { std::memcpy(p, &a.v, sizeof a.v); }
inline Vec vset1(float x) { return {Float4{x, x, x, x}}; }
inline Vec vadd(Vec a, Vec b) { return {a.v + b.v}; }
inline Vec vsub(Vec a, Vec b) { return {a.v - b.v}; }
inline Vec vmul(Vec a, Vec b) { return {a.v * b.v}; }
inline Vec vdiv(Vec a, Vec b) { return {a.v / b.v}; }
inline Vec vmax(Vec a, Vec b) { return {a.v > b.v ? a.v : b.v}; }
// No fused multiply-add in the baseline instruction sets: multiply, then add.
inline Vec vfmadd(Vec a, Vec b, Vec c) { return {a.v * b.v + c.v}; }
inline unsigned lane_bits(decltype(Float4{} < Float4{}) m) {
  return static_cast<unsigned>((m[0] & 1) | (m[1] & 2) | (m[2] & 4) | (m[3] & 8));
}
inline unsigned vmask_not_ge(Vec a, Vec b) { return lane_bits(~(a.v >= b.v)); }
inline unsigned vmask_lt(Vec a, Vec b) { return lane_bits(a.v < b.v); }
inline unsigned vmask_le(Vec a, Vec b) { return lane_bits(a.v <= b.v); }
#endif
