// Which instruction set's CPU kernels run (cpu_kernels.h): the best this CPU supports, or
// the one PATCHCORE_CPU_ISA names (generic, avx2, avx512; "auto" or unset for the best).
#pragma once
#include <string>
#include <vector>

#include "cpu_kernels.h"

namespace patchcore::cpu {

// The table to use now. Reads PATCHCORE_CPU_ISA on every call, so a process can switch paths;
// naming an unknown path, or one this CPU or build lacks, raises a ValueError that says why.
const Kernels& kernels();

// Paths compiled into this build, and those of them this CPU can run, best last.
std::vector<std::string> compiled_isas();
std::vector<std::string> supported_isas();

// Whether the AVX-512 kernels may use AVX512_VNNI (the pruned search's 8-bit screen): the CPU has
// it and PATCHCORE_CPU_VNNI is not "0" (which tests the path without it; the integers are the same).
bool has_avx512_vnni();

}  // namespace patchcore::cpu
