// First-order terms (d mu/dW . W + b, d var/dW . W) of many layers' window entries in one call:
// the loop of cbn.functional.statistic_gradients.statistic_shifts over the layers of a model.
//
// Both terms are dot products of fan_in values with the channel's weight row, summed here in one
// pass over the channels: each weight row is read from memory once for the variance terms of every
// entry, the entries' rows side by side (simd::dots: several memory streams at once), then, for a
// block of channels whose rows are still in cache, for the mean terms against their group's mean
// patches (simd::dots_shared: a chunk of the patches read once for the block, not once per channel;
// bit for bit simd::dots' sums).
// The Python form reads the row twice, in a matrix product and in an element-wise product whose
// temporary is as large as the gradient window, (k - 1) weight-sized tensors: most of the Taylor
// step's memory traffic on large models. Both forms are float dot products in a different order,
// so they agree to rounding (within n u sum |a b|), not bit for bit. Every product of one run
// comes from the same kernel, and dots gives each row the sums dot gives it alone, so a Taylor
// step at unchanged weights leaves an entry exactly as stored.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cpu_simd.h"
#include "gradient_slots.h"

#include <algorithm>
#include <vector>

namespace cbn {
namespace {

using at::Tensor;

// The terms of one layer in one pass over the channels, into columns [column, column + C) of the
// (k, total) outputs:
//   mean[t, c] = mean_slots[t][group(c)] . rows[c] + bias[c],   var[t, c] = var_slots[t][c] . rows[c]
// mean_slots k of (groups, fan_in), var_slots k of (C, fan_in) (gradient_slots.h), rows (C, fan_in)
// contiguous, bias (C) or undefined, all host tensors of the outputs' floating dtype.
void row_shifts(const std::vector<Tensor>& mean_slots, const std::vector<Tensor>& var_slots, const Tensor& rows,
                const Tensor& bias, Tensor& mean_out, Tensor& var_out, int64_t column) {
  const int64_t channels = rows.size(0), entries = static_cast<int64_t>(var_slots.size()), fan_in = rows.size(1);
  const int64_t groups = mean_slots[0].size(0), total = mean_out.size(1);
  const int64_t per_group = channels / groups;
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "cbn_row_shifts", [&] {
    const SlotRows<scalar_t> g_mu(mean_slots), g_var(var_slots);
    const scalar_t* w = rows.const_data_ptr<scalar_t>();
    const scalar_t* b = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* mean = mean_out.mutable_data_ptr<scalar_t>() + column;
    scalar_t* var = var_out.mutable_data_ptr<scalar_t>() + column;
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, entries * fan_in));
    const auto channel_loop = [&](int64_t begin, int64_t end) {
      std::vector<const scalar_t*> mean_rows(entries), var_rows(entries);
      std::vector<scalar_t> mean_dots(entries * simd::kMostRows), var_dots(entries);
      for (int64_t first = begin; first < end; first += simd::kMostRows) {
        const int64_t last = std::min(end, first + simd::kMostRows);
        for (int64_t c = first; c < last; ++c) {
          for (int64_t t = 0; t < entries; ++t) var_rows[t] = g_var.row(t, c);
          simd::dots(var_rows.data(), w + c * fan_in, fan_in, entries, var_dots.data());
          for (int64_t t = 0; t < entries; ++t) var[t * total + c] = var_dots[t];
        }
        // The block's weight rows, just read, against their groups' mean patches (one group for a
        // plain convolution: each chunk of its patches read once for the block).
        for (int64_t start = first; start < last;) {
          const int64_t group = start / per_group, run_end = std::min(last, (group + 1) * per_group);
          for (int64_t t = 0; t < entries; ++t) mean_rows[t] = g_mu.row(t, group);
          simd::dots_shared(mean_rows.data(), entries, w + start * fan_in, fan_in, run_end - start, fan_in,
                            mean_dots.data());
          for (int64_t c = start; c < run_end; ++c) {
            const scalar_t offset = b == nullptr ? scalar_t(0) : b[c];
            for (int64_t t = 0; t < entries; ++t) mean[t * total + c] = mean_dots[(c - start) * entries + t] + offset;
          }
          start = run_end;
        }
      }
    };
    simd::parallel_for(channels, grain, channel_loop);
  });
}

// The ATen form, for other devices and mixed dtypes: a matrix product (or, for grouped
// convolutions, element-wise products and sums) for the mean terms, products and sums for the
// variance terms.
std::tuple<Tensor, Tensor> aten_row_shifts(const Tensor& mean_grad, const Tensor& var_grad, const Tensor& rows,
                                           const std::optional<Tensor>& bias) {
  const int64_t channels = rows.size(0), groups = mean_grad.size(0);
  Tensor mean_shift;
  if (groups == 1) {
    mean_shift = at::mm(mean_grad.select(0, 0), rows.t());
  } else {
    const Tensor grouped_rows = rows.view({groups, 1, channels / groups, -1});
    mean_shift = (mean_grad.unsqueeze(2) * grouped_rows).sum(-1).transpose(0, 1).flatten(1);
  }
  if (bias.has_value() && bias->defined()) {
    mean_shift = mean_shift + *bias;
  }
  return {std::move(mean_shift), (var_grad * rows.unsqueeze(1)).sum(-1).t()};
}

// Layer l's window is the next `entries` slots of mean_slots, (groups, fan_in) each, and of
// var_slots, (C, fan_in) each (gradient_slots.h); weights[l]: the weight rows (C, fan_in), or a
// weight that reshapes to them. Returns the terms of all layers side by side, two (entries, total C)
// tensors in the slots' dtype: one allocation each, where two tensors per layer, returned to
// Python and concatenated there, cost 2-3 us a layer (about a third of a ResNet-20 call).
std::tuple<Tensor, Tensor> statistic_shifts_many(at::TensorList mean_slots, at::TensorList var_slots, int64_t entries,
                                                 at::TensorList weights,
                                                 const c10::List<std::optional<Tensor>>& biases) {
  const size_t layers = weights.size();
  TORCH_CHECK(layers > 0 && entries > 0 && biases.size() == layers && mean_slots.size() == var_slots.size() &&
                  var_slots.size() == layers * static_cast<size_t>(entries),
              "cbn.statistic_shifts_many: ", entries, " mean and variance slots, a weight and a bias per layer");
  int64_t total = 0;
  for (const Tensor& weight : weights) {
    total += weight.size(0);
  }
  Tensor mean_out = at::empty({entries, total}, var_slots[0].options());
  Tensor var_out = at::empty({entries, total}, var_slots[0].options());
  const auto dtype = var_out.scalar_type();
  int64_t column = 0;
  for (size_t l = 0; l < layers; ++l) {
    const at::TensorList layer_mean = mean_slots.slice(l * entries, entries);
    const at::TensorList layer_var = var_slots.slice(l * entries, entries);
    const int64_t channels = weights[l].size(0);
    Tensor rows = weights[l].dim() == 2 ? weights[l] : weights[l].reshape({channels, -1});
    if (rows.scalar_type() != dtype) {
      rows = rows.to(dtype);
    }
    const auto [groups, slot_channels, fan_in] = slot_shapes(layer_mean, layer_var, "cbn.statistic_shifts_many");
    TORCH_CHECK(slot_channels == channels && rows.size(1) == fan_in, "cbn.statistic_shifts_many: gradient slots ",
                layer_var[0].sizes(), " do not match weight rows ", rows.sizes());
    const std::optional<Tensor> bias = biases.get(l);
    const bool has_bias = bias.has_value() && bias->defined();
    // The one-pass kernel reads host memory of one floating dtype; anything else takes ATen's form.
    const bool one_pass = layer_var[0].is_cpu() && layer_mean[0].is_cpu() && rows.is_cpu() && var_out.is_cpu() &&
                          (dtype == at::kFloat || dtype == at::kDouble) && layer_mean[0].scalar_type() == dtype &&
                          layer_var[0].scalar_type() == dtype &&
                          (!has_bias || (bias->is_cpu() && bias->scalar_type() == dtype));
    if (one_pass) {
      row_shifts(checked_slots(layer_mean, groups, fan_in, dtype, "cbn.statistic_shifts_many"),
                 checked_slots(layer_var, channels, fan_in, dtype, "cbn.statistic_shifts_many"), rows.contiguous(),
                 has_bias ? bias->contiguous() : Tensor(), mean_out, var_out, column);
    } else {
      const auto [mean_shift, var_shift] = aten_row_shifts(stacked_slots(layer_mean), stacked_slots(layer_var), rows, bias);
      mean_out.narrow(1, column, channels).copy_(mean_shift);
      var_out.narrow(1, column, channels).copy_(var_shift);
    }
    column += channels;
  }
  return {std::move(mean_out), std::move(var_out)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cbn, m) {
  m.def("statistic_shifts_many(Tensor[] mean_slots, Tensor[] var_slots, int entries, Tensor[] weights, "
        "Tensor?[] biases) -> (Tensor, Tensor)");
  m.impl("statistic_shifts_many", c10::DispatchKey::CompositeImplicitAutograd, &statistic_shifts_many);
}

}  // namespace cbn
