// First-order terms (d mu/dW . W + b, d var/dW . W) of many layers' window entries in one call:
// the loop of cbn.functional.statistic_gradients.statistic_shifts over the layers of a model,
// with the same ATen kernels in the same order, so that the results are identical to the
// Python implementation's, bit for bit (a Taylor step at unchanged weights must leave an entry
// exactly as stored, whichever implementation computed its two terms).

#include <ATen/ATen.h>
#include <torch/library.h>

namespace cbn {
namespace {

using at::Tensor;

// mean_gradients[l]: (groups, k, fan_in); var_gradients[l]: (C, k, fan_in); weights[l]: the
// weight rows (C, fan_in), or a weight that reshapes to them. Returns two lists of (k, C).
std::tuple<std::vector<Tensor>, std::vector<Tensor>> statistic_shifts_many(
    at::TensorList mean_gradients, at::TensorList var_gradients, at::TensorList weights,
    const c10::List<std::optional<Tensor>>& biases) {
  const size_t layers = weights.size();
  TORCH_CHECK(mean_gradients.size() == layers && var_gradients.size() == layers && biases.size() == layers,
              "cbn.statistic_shifts_many: one mean gradient, variance gradient, weight and bias per layer");
  std::vector<Tensor> mean_shifts, var_shifts;
  mean_shifts.reserve(layers);
  var_shifts.reserve(layers);
  for (size_t l = 0; l < layers; ++l) {
    const Tensor& mean_grad = mean_gradients[l];
    const Tensor& var_grad = var_gradients[l];
    const int64_t channels = weights[l].size(0);
    const int64_t groups = mean_grad.size(0);
    Tensor rows = weights[l].dim() == 2 ? weights[l] : weights[l].reshape({channels, -1});
    if (rows.scalar_type() != var_grad.scalar_type()) {
      rows = rows.to(var_grad.scalar_type());
    }
    Tensor mean_shift;
    if (groups == 1) {
      mean_shift = at::mm(mean_grad.select(0, 0), rows.t());
    } else {
      const Tensor grouped_rows = rows.view({groups, 1, channels / groups, -1});
      mean_shift = (mean_grad.unsqueeze(2) * grouped_rows).sum(-1).transpose(0, 1).flatten(1);
    }
    Tensor var_shift = (var_grad * rows.unsqueeze(1)).sum(-1).t();
    const std::optional<Tensor> bias = biases.get(l);
    if (bias.has_value() && bias->defined()) {
      mean_shift = mean_shift + *bias;
    }
    mean_shifts.push_back(std::move(mean_shift));
    var_shifts.push_back(std::move(var_shift));
  }
  return {std::move(mean_shifts), std::move(var_shifts)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cbn, m) {
  m.def("statistic_shifts_many(Tensor[] mean_gradients, Tensor[] var_gradients, Tensor[] weights, "
        "Tensor?[] biases) -> (Tensor[], Tensor[])");
  m.impl("statistic_shifts_many", c10::DispatchKey::CompositeImplicitAutograd, &statistic_shifts_many);
}

}  // namespace cbn
