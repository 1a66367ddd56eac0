// The CPU kernels for any CPU: portable C++ vectorised by the compiler for the target's
// baseline (SSE2 on x86-64, NEON on aarch64).
#define PATCHCORE_KERNEL_TABLE kGenericKernels
#define PATCHCORE_KERNEL_NAME "generic"
#include "kernel_table.inl"
