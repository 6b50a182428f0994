// Writing the new entries of many layers into their windows' slots in one call: for each layer,
// targets[l].narrow(dim, slots[l], 1).copy_(sources[l]), the copies that
// cbn.layers.window_record makes with one Python view per layer and slot otherwise. Contiguous
// CPU targets with a contiguous source of their dtype are copied block by block here (no ATen
// operation per copy: at batch 1-2 each one is a dispatch that costs more than the bytes); the
// rest goes through ATen's copy.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstring>

namespace cbn {
namespace {

bool copies_directly(const at::Tensor& target, int64_t dim, const at::Tensor& source) {
  if (!target.is_cpu() || !source.is_cpu() || !target.is_contiguous() || !source.is_contiguous() ||
      target.scalar_type() != source.scalar_type() || source.numel() * target.size(dim) != target.numel()) {
    return false;
  }
  // The source has the slot's shape (its size 1 along dim), or the same values without that axis.
  auto expected = target.sizes().vec();
  expected[dim] = 1;
  if (source.sizes().vec() == expected) return true;
  expected.erase(expected.begin() + dim);
  return source.sizes().vec() == expected;
}

void copy_into_slots(at::TensorList targets, int64_t dim, at::IntArrayRef slots, at::TensorList sources) {
  TORCH_CHECK(targets.size() == slots.size() && targets.size() == sources.size(),
              "cbn.copy_into_slots: one target, slot and source per layer");
  for (size_t l = 0; l < targets.size(); ++l) {
    const at::Tensor& target = targets[l];
    const at::Tensor& source = sources[l];
    TORCH_CHECK(slots[l] >= 0 && slots[l] < target.size(dim), "cbn.copy_into_slots: slot ", slots[l],
                " outside dimension ", dim, " of size ", target.size(dim));
    if (!copies_directly(target, dim, source)) {
      target.narrow(dim, slots[l], 1).copy_(source);
      continue;
    }
    int64_t outer = 1, inner = 1;
    for (int64_t d = 0; d < dim; ++d) outer *= target.size(d);
    for (int64_t d = dim + 1; d < target.dim(); ++d) inner *= target.size(d);
    const int64_t entries = target.size(dim), bytes = inner * static_cast<int64_t>(target.element_size());
    char* out = static_cast<char*>(target.data_ptr());
    const char* in = static_cast<const char*>(source.const_data_ptr());
    for (int64_t o = 0; o < outer; ++o) {
      std::memcpy(out + (o * entries + slots[l]) * bytes, in + o * bytes, bytes);
    }
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cbn, m) {
  m.def("copy_into_slots(Tensor(a!)[] targets, int dim, int[] slots, Tensor[] sources) -> ()");
  m.impl("copy_into_slots", c10::DispatchKey::CompositeExplicitAutograd, &copy_into_slots);
}

}  // namespace cbn
