// First-order terms (d mu/dW . W + b, d var/dW . W) of many layers' window entries in one call:
// the loop of cbn.functional.statistic_gradients.statistic_shifts over the layers of a model.
//
// The mean terms use the same ATen kernels as the Python implementation (identical results).
// The variance terms, one dot product of fan_in values per channel and entry, are summed here
// in one pass over the gradients: the Python form (an element-wise product, then a sum) writes
// and reads back a temporary as large as the gradient window, (k - 1) weight-sized tensors, which
// is most of the Taylor step's memory traffic on large models. Both forms are float dot products
// in a different order, so they agree to rounding (within n u sum |a b|), not bit for bit. Every
// product of one run comes from the same kernel, so a Taylor step at unchanged weights leaves an
// entry exactly as stored.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace cbn {
namespace {

using at::Tensor;

// Sum of a[j] * b[j]: independent partial sums in kLanes lanes (which the compiler keeps in SIMD
// registers), folded pairwise in a fixed order: the same result for any thread count.
template <typename scalar_t>
scalar_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  constexpr int kLanes = 16;
  scalar_t lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      lanes[k] += a[j + k] * b[j + k];
    }
  }
  scalar_t tail = 0;
  for (; j < n; ++j) {
    tail += a[j] * b[j];
  }
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int k = 0; k < width; ++k) {
      lanes[k] += lanes[k + width];
    }
  }
  return lanes[0] + tail;
}

// gradients (C, k, fan_in) and rows (C, fan_in) -> (k, C): out[t, c] = gradients[c, t] . rows[c].
Tensor row_dot_products(const Tensor& gradients, const Tensor& rows) {
  const Tensor grads = gradients.contiguous();
  const Tensor weights = rows.contiguous();
  const int64_t channels = grads.size(0), entries = grads.size(1), fan_in = grads.size(2);
  TORCH_CHECK(weights.size(0) == channels && weights.size(1) == fan_in,
              "cbn.statistic_shifts_many: gradients ", grads.sizes(), " do not match weight rows ", weights.sizes());
  Tensor out = at::empty({entries, channels}, grads.options());
  AT_DISPATCH_FLOATING_TYPES(grads.scalar_type(), "cbn_row_dot_products", [&] {
    const scalar_t* g = grads.const_data_ptr<scalar_t>();
    const scalar_t* w = weights.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, entries * fan_in));
    at::parallel_for(0, channels, grain, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        for (int64_t t = 0; t < entries; ++t) {
          o[t * channels + c] = dot(g + (c * entries + t) * fan_in, w + c * fan_in, fan_in);
        }
      }
    });
  });
  return out;
}

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
    // The one-pass kernel reads host memory: other devices take the ATen form.
    Tensor var_shift = var_grad.is_cpu() ? row_dot_products(var_grad, rows) : (var_grad * rows.unsqueeze(1)).sum(-1).t();
    const std::optional<Tensor> bias = biases.get(l);
    if (bias.has_value() && bias->defined()) {
      mean_shift = mean_shift + *bias;
    }
    mean_shifts.push_back(std::move(mean_shift));
    var_shifts.push_back(std::move(var_shift));
  }
  return {std::move(mean_shifts), std::move(var_shifts)};
}

// The number by which a layer sees its producer's weights change
// (cbn.producer_call.producer_fingerprint): sum over tensors of tensors[i] . probes[i], in one
// call instead of a view, a dot product and a read-back per tensor (at batch 1-2 each ATen
// operation is a dispatch that costs more than the values). Contiguous float CPU tensors take
// the dot product above; other ones ATen's. Unchanged values give the same number.
double weight_fingerprint(at::TensorList tensors, at::TensorList probes) {
  TORCH_CHECK(tensors.size() == probes.size(), "cbn.weight_fingerprint: one probe per tensor");
  double total = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const Tensor& values = tensors[i];
    const Tensor& probe = probes[i];
    TORCH_CHECK(values.numel() == probe.numel(), "cbn.weight_fingerprint: a probe of ", probe.numel(),
                " values for a tensor of ", values.numel());
    const auto dtype = values.scalar_type();
    if (!values.is_cpu() || !values.is_contiguous() || !probe.is_contiguous() || probe.scalar_type() != dtype ||
        (dtype != at::kFloat && dtype != at::kDouble)) {
      total += at::dot(values.reshape({-1}), probe.reshape({-1}).to(values.options())).item<double>();
      continue;
    }
    AT_DISPATCH_FLOATING_TYPES(dtype, "cbn_weight_fingerprint", [&] {
      total += static_cast<double>(dot(values.const_data_ptr<scalar_t>(), probe.const_data_ptr<scalar_t>(),
                                       values.numel()));
    });
  }
  return total;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cbn, m) {
  m.def("weight_fingerprint(Tensor[] tensors, Tensor[] probes) -> float");
  m.impl("weight_fingerprint", c10::DispatchKey::CompositeImplicitAutograd, &weight_fingerprint);
  m.def("statistic_shifts_many(Tensor[] mean_gradients, Tensor[] var_gradients, Tensor[] weights, "
        "Tensor?[] biases) -> (Tensor[], Tensor[])");
  m.impl("statistic_shifts_many", c10::DispatchKey::CompositeImplicitAutograd, &statistic_shifts_many);
}

}  // namespace cbn
