// Writing the new entries of many layers into their windows' slots in one call: for each layer,
// targets[l].narrow(dim, slots[l], 1).copy_(sources[l]), the copies that
// cbn.layers.window_step makes with one Python view per layer and slot otherwise.

#include <ATen/ATen.h>
#include <torch/library.h>

namespace cbn {
namespace {

void copy_into_slots(at::TensorList targets, int64_t dim, at::IntArrayRef slots, at::TensorList sources) {
  TORCH_CHECK(targets.size() == slots.size() && targets.size() == sources.size(),
              "cbn.copy_into_slots: one target, slot and source per layer");
  for (size_t l = 0; l < targets.size(); ++l) {
    at::Tensor slot = targets[l].narrow(dim, slots[l], 1);
    slot.copy_(sources[l]);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cbn, m) {
  m.def("copy_into_slots(Tensor(a!)[] targets, int dim, int[] slots, Tensor[] sources) -> ()");
  m.impl("copy_into_slots", c10::DispatchKey::CompositeExplicitAutograd, &copy_into_slots);
}

}  // namespace cbn
