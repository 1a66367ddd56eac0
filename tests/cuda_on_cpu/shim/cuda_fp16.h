// fp16 for the CPU emulation of the CUDA kernels (see cuda_runtime.h), on GCC's _Float16.
#pragma once
#include "cuda_runtime.h"

struct __half {
  _Float16 v;
};
struct alignas(4) __half2 {
  __half x, y;
};
inline __half __float2half_rn(float f) { return {static_cast<_Float16>(f)}; }
inline float __half2float(__half h) { return static_cast<float>(h.v); }
inline float2 __half22float2(__half2 h) { return {static_cast<float>(h.x.v), static_cast<float>(h.y.v)}; }
