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

}  // namespace patchcore::cpu
