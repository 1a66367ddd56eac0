// The CPU kernels for x86-64 CPUs with AVX2, FMA and F16C (Haswell, Zen 1-3 and later).
// Compiled with -mavx2 -mfma -mf16c (CMakeLists.txt); run only where the CPU has them.
#define PATCHCORE_ISA_AVX2
#define PATCHCORE_KERNEL_TABLE kAvx2Kernels
#define PATCHCORE_KERNEL_NAME "avx2"
#include "kernel_table.inl"
