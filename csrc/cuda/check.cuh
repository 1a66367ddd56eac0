// CUDA error checking for the launchers: a failed call becomes a C++ exception that
// pybind11 turns into a Python RuntimeError.
#pragma once
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#define PATCHCORE_CUDA_CHECK(expr)                                                                  \
  do {                                                                                              \
    const cudaError_t status_ = (expr);                                                             \
    if (status_ != cudaSuccess)                                                                     \
      throw std::runtime_error(std::string("patchcore_fast CUDA error: ") + cudaGetErrorString(status_) + \
                               " at " __FILE__ ":" + std::to_string(__LINE__));                     \
  } while (0)
