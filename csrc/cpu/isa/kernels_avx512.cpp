// The CPU kernels for x86-64 CPUs with AVX-512 F/BW/DQ/VL (Skylake-SP, Ice Lake, Zen 4-5 and later).
// Compiled with -mavx512f -mavx512bw -mavx512dq -mavx512vl plus the AVX2 set (CMakeLists.txt).
#define PATCHCORE_ISA_AVX512
#define PATCHCORE_KERNEL_TABLE kAvx512Kernels
#define PATCHCORE_KERNEL_NAME "avx512"
#include "kernel_table.inl"
