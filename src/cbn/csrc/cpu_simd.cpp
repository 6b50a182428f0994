// Which copy of the fused loops (cpu_simd.h) this process runs, for reports and run records.

#include <torch/library.h>

#include <string>

#include "cpu_simd.h"

namespace cbn {
namespace {

std::string instruction_set() { return simd::instruction_set(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(cbn, m) {
  m.def("instruction_set() -> str");
  m.impl("instruction_set", c10::DispatchKey::CompositeImplicitAutograd, &instruction_set);
}

}  // namespace cbn
