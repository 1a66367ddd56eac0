// Run-time choice of the CPU kernels' instruction set. The CPU is asked through the
// compiler's __builtin_cpu_supports (GCC and Clang; it also checks that the OS saves the
// vector registers), the same test GCC's function multiversioning uses.
#include "cpu_dispatch.h"

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <cstdlib>

namespace patchcore::cpu {
namespace {

struct Path {
  const char* name;
  const Kernels* table;
  bool (*cpu_has)();
  const char* needs;
};

#if defined(PATCHCORE_X86_KERNELS)
bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
bool has_avx512() {
  __builtin_cpu_init();
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
}
#endif
bool always() { return true; }

// Worst to best.
const Path kPaths[] = {
    {"generic", &kGenericKernels, &always, ""},
#if defined(PATCHCORE_X86_KERNELS)
    {"avx2", &kAvx2Kernels, &has_avx2, "AVX2, FMA and F16C"},
    {"avx512", &kAvx512Kernels, &has_avx512, "AVX-512 F, BW, DQ and VL"},
#endif
};

}  // namespace

const Kernels& kernels() {
  const char* forced = std::getenv("PATCHCORE_CPU_ISA");
  if (forced == nullptr || *forced == '\0' || std::string(forced) == "auto") {
    static const Kernels* best = [] {
      const Kernels* table = &kGenericKernels;
      for (const Path& path : kPaths)
        if (path.cpu_has()) table = path.table;
      return table;
    }();
    return *best;
  }
  for (const Path& path : kPaths) {
    if (std::string(forced) != path.name) continue;
    TORCH_CHECK_VALUE(path.cpu_has(), "PATCHCORE_CPU_ISA=", forced, " but this CPU lacks ", path.needs,
                      "; it supports: ", c10::Join(", ", supported_isas()));
    return *path.table;
  }
  const bool known = std::string(forced) == "avx2" || std::string(forced) == "avx512";
  TORCH_CHECK_VALUE(false, "PATCHCORE_CPU_ISA=", forced,
                    known ? " is not compiled into this build (not an x86-64 build)" : " is not a CPU path",
                    "; choose one of: auto, ", c10::Join(", ", compiled_isas()));
}

std::vector<std::string> compiled_isas() {
  std::vector<std::string> names;
  for (const Path& path : kPaths) names.emplace_back(path.name);
  return names;
}

bool has_avx512_vnni() {
  const char* allowed = std::getenv("PATCHCORE_CPU_VNNI");
  if (allowed != nullptr && std::string(allowed) == "0") return false;
#if defined(PATCHCORE_X86_KERNELS)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (const Path& path : kPaths)
    if (path.cpu_has()) names.emplace_back(path.name);
  return names;
}

}  // namespace patchcore::cpu
