// A window's statistic gradients as the kernels take them: one tensor per slot.
//
// A call position keeps each entry's gradients as tensors of their own (the mean patches
// (groups, fan_in), the variance gradients (C, fan_in)): a new entry replaces its slot's tensors
// instead of being copied into a window-sized tensor, and a summary keeps the tensors it pooled
// (cbn.layers.window_state). The kernels read slot t's row r at slot_rows.row(t, r); a slot may be
// a view with strided rows (a slot of a (rows, k, fan_in) window: its unbind(1)), each row contiguous.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace cbn {

// (groups, C, fan_in) of a window's slots, checked: its mean slots (groups, fan_in), its variance
// slots (C, fan_in), as many of each, C a multiple of groups.
inline std::tuple<int64_t, int64_t, int64_t> slot_shapes(at::TensorList mean_slots, at::TensorList var_slots,
                                                         const char* op) {
  TORCH_CHECK(!var_slots.empty() && mean_slots.size() == var_slots.size(), op, ": ", mean_slots.size(),
              " mean gradient slots and ", var_slots.size(), " variance gradient slots (one or more of each)");
  TORCH_CHECK(var_slots[0].dim() == 2 && mean_slots[0].dim() == 2, op, ": gradient slots must be 2-D");
  const int64_t groups = mean_slots[0].size(0), channels = var_slots[0].size(0), fan_in = var_slots[0].size(1);
  TORCH_CHECK(groups > 0 && channels % groups == 0 && mean_slots[0].size(1) == fan_in, op, ": mean gradient slots ",
              mean_slots[0].sizes(), " do not match variance gradient slots ", var_slots[0].sizes());
  return {groups, channels, fan_in};
}

// The slots in dtype, each (rows, fan_in) with contiguous rows; checked against the first one's shape.
inline std::vector<at::Tensor> checked_slots(at::TensorList slots, int64_t rows, int64_t fan_in, at::ScalarType dtype,
                                             const char* op) {
  std::vector<at::Tensor> checked;
  checked.reserve(slots.size());
  for (const at::Tensor& slot : slots) {
    TORCH_CHECK(slot.dim() == 2 && slot.size(0) == rows && slot.size(1) == fan_in, op, ": a gradient slot of shape ",
                slot.sizes(), " where (", rows, ", ", fan_in, ") was expected");
    at::Tensor converted = slot.scalar_type() == dtype ? slot : slot.to(dtype);
    checked.push_back(converted.stride(1) == 1 ? std::move(converted) : converted.contiguous());
  }
  return checked;
}

// The slots stacked as a window (rows, k, fan_in), for the ATen forms.
inline at::Tensor stacked_slots(at::TensorList slots) {
  return at::stack(slots, 1);
}

template <typename scalar_t>
struct SlotRows {
  explicit SlotRows(const std::vector<at::Tensor>& slots) {
    for (const at::Tensor& slot : slots) {
      data.push_back(slot.const_data_ptr<scalar_t>());
      stride.push_back(slot.stride(0));
    }
  }
  const scalar_t* row(size_t t, int64_t r) const {
    return data[t] + r * stride[t];
  }
  std::vector<const scalar_t*> data;
  std::vector<int64_t> stride;
};

}  // namespace cbn
