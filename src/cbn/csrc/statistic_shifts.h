// The first-order terms of window entries (statistic_shifts.cpp), for the kernels that make an
// entry: a new entry's terms taken by the same function as its terms in every later window, so
// that a Taylor step at unchanged weights moves it by exactly zero.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace cbn {

// Layer l's window is the next entries[l] slots of mean_slots, (groups, fan_in) each, and of
// var_slots, (C, fan_in) each (gradient_slots.h); weights[l]: the weight rows (C, fan_in), or a
// weight that reshapes to them. Returns two lists of (entries[l], C).
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> statistic_shifts_many(
    at::TensorList mean_slots, at::TensorList var_slots, at::IntArrayRef entries, at::TensorList weights,
    const c10::List<std::optional<at::Tensor>>& biases);

}  // namespace cbn
