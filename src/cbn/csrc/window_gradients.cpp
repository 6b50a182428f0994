// The producer's weight gradient of differentiable compensation, in one pass over a layer's window
// (cbn.functional.differentiable_compensation.window_weight_gradient is the Python form):
//
//   out[c, f] = sum_t a[c, t] G_mu[group(c), t, f] + b[c, t] G_var[c, t, f]
//
// with a, b (C, k) the per-entry coefficients of the backward and G_mu, G_var the window's statistic
// gradients, k slots of (groups, fan_in) and (C, fan_in) (gradient_slots.h). Each output value is
// summed over the k entries in a vector register and written once, so the window is read once and
// the result written once (the row is never read back); an entry whose two coefficients are zero
// for a channel (an empty slot) is not read. The ATen form (a matrix product for the mean patches,
// then a batched product for the variance gradients) is taken for other devices; both are float
// sums in another order, equal to rounding.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/accumulate.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu_simd.h"
#include "gradient_slots.h"
#include "window_gradients.h"

namespace cbn {
namespace {

using at::Tensor;

// One channel's row of the window's weight gradient,
//   row[f] = sum_t mean_weights[t] patches[t][f] + var_weights[t] gradients[t][f],
// the entries summed in order into each value before it is written (the row is written once and
// never read back), those whose two weights are both zero (the slots not yet filled) skipped.
template <typename scalar_t>
void window_row(scalar_t* row, int64_t fan_in, int64_t entries, const scalar_t* mean_weights,
                const scalar_t* var_weights, const SlotRows<scalar_t>& patches, int64_t group,
                const SlotRows<scalar_t>& gradients, int64_t channel) {
  constexpr int64_t kMaxEntries = 16;
  const scalar_t* patch[kMaxEntries];
  const scalar_t* gradient[kMaxEntries];
  scalar_t mean_weight[kMaxEntries], var_weight[kMaxEntries];
  int64_t first = 0;
  do {  // (more entries than kMaxEntries: a block of kMaxEntries at a time, each added to the row)
    int64_t used = 0;
    for (int64_t t = first; t < std::min(entries, first + kMaxEntries); ++t) {
      if (mean_weights[t] == scalar_t(0) && var_weights[t] == scalar_t(0)) continue;
      patch[used] = patches.row(t, group);
      gradient[used] = gradients.row(t, channel);
      mean_weight[used] = mean_weights[t];
      var_weight[used] = var_weights[t];
      ++used;
    }
    const bool add_to_row = first > 0;
    int64_t f = 0;
#if defined(__GNUC__) || defined(__clang__)
    using L = simd::Lanes<scalar_t>;
    using V = typename L::type;
    for (; f + L::width <= fan_in; f += L::width) {
      V sum = add_to_row ? L::load(row + f) : V{};
      for (int64_t u = 0; u < used; ++u) {
        sum += mean_weight[u] * L::load(patch[u] + f) + var_weight[u] * L::load(gradient[u] + f);
      }
      __builtin_memcpy(row + f, &sum, sizeof(sum));
    }
#endif
    for (; f < fan_in; ++f) {
      scalar_t sum = add_to_row ? row[f] : scalar_t(0);
      for (int64_t u = 0; u < used; ++u) {
        sum += mean_weight[u] * patch[u][f] + var_weight[u] * gradient[u][f];
      }
      row[f] = sum;
    }
    first += kMaxEntries;
  } while (first < entries);
}

Tensor aten_window_weight_gradient(const Tensor& mean_coefficients, const Tensor& mean_gradients,
                                   const Tensor& var_coefficients, const Tensor& var_gradients) {
  const int64_t channels = var_gradients.size(0), entries = var_gradients.size(1), fan_in = var_gradients.size(2);
  const int64_t groups = mean_gradients.size(0);
  Tensor out;
  if (groups == 1) {
    out = at::mm(mean_coefficients, mean_gradients.select(0, 0));
  } else {
    out = at::bmm(mean_coefficients.reshape({groups, channels / groups, entries}), mean_gradients)
              .reshape({channels, fan_in});
  }
  return at::baddbmm(out.unsqueeze(1), var_coefficients.unsqueeze(1), var_gradients).squeeze(1);
}

Tensor window_weight_gradient(const Tensor& mean_coefficients, at::TensorList mean_slots,
                              const Tensor& var_coefficients, at::TensorList var_slots) {
  const auto [groups, channels, fan_in] = slot_shapes(mean_slots, var_slots, "cbn.window_weight_gradient");
  const int64_t entries = static_cast<int64_t>(var_slots.size());
  TORCH_CHECK(mean_coefficients.sizes() == at::IntArrayRef({channels, entries}) &&
                  var_coefficients.sizes() == at::IntArrayRef({channels, entries}),
              "cbn.window_weight_gradient: coefficients ", mean_coefficients.sizes(), " and ",
              var_coefficients.sizes(), " must be (", channels, ", ", entries, ")");
  const auto dtype = var_slots[0].scalar_type();
  const Tensor mean_coef = mean_coefficients.to(dtype).contiguous(), var_coef = var_coefficients.to(dtype).contiguous();
  if (!var_slots[0].is_cpu() || (dtype != at::kFloat && dtype != at::kDouble)) {
    return aten_window_weight_gradient(mean_coef, stacked_slots(mean_slots).to(dtype), var_coef,
                                       stacked_slots(var_slots).to(dtype));
  }
  const auto mean_grads = checked_slots(mean_slots, groups, fan_in, dtype, "cbn.window_weight_gradient");
  const auto var_grads = checked_slots(var_slots, channels, fan_in, dtype, "cbn.window_weight_gradient");
  Tensor out = at::empty({channels, fan_in}, var_grads[0].options());
  const int64_t per_group = channels / groups;
  AT_DISPATCH_FLOATING_TYPES(dtype, "cbn_window_weight_gradient", [&] {
    const scalar_t *a = mean_coef.const_data_ptr<scalar_t>(), *b = var_coef.const_data_ptr<scalar_t>();
    const SlotRows<scalar_t> g_mu(mean_grads), g_var(var_grads);
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, entries * fan_in));
    const auto channel_loop = [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        window_row(o + c * fan_in, fan_in, entries, a + c * entries, b + c * entries, g_mu, c / per_group, g_var, c);
      }
    };
    simd::parallel_for(channels, grain, channel_loop);
  });
  return out;
}

}  // namespace

// The producer's gradients of differentiable compensation from the backward's dL/dc and dL/dP
// (cbn.functional.differentiable_compensation.producer_gradients), for one layer in one call:
//   a[c, t] = w[c, t] g_c[c] + p[c, t] g_P[c],   b[c, t] = q[c, t] g_P[c],   dL/db[c] = sum_t a[c, t]
// and dL/dW[c] = sum_t a[c, t] G_mu[group(c), t] + b[c, t] G_var[c, t] as in window_weight_gradient,
// the coefficients made inside the channel loop (no operation per coefficient tensor).
// coefficients: (C, 3, k), per channel the rows w, p, q; g_c, g_P: (C,). Returns (dL/dW in the
// shape weight_shape, whose values are its (C, fan_in) rows in order, dL/db (C,)). dL/dW is a
// tensor of its own, not a view: autograd then adds the producer's other weight gradient into it
// in place instead of allocating their sum.
std::tuple<Tensor, Tensor> compensation_gradients(const Tensor& coefficients, const Tensor& grad_center,
                                                  const Tensor& grad_spread, at::TensorList mean_slots,
                                                  at::TensorList var_slots, at::IntArrayRef weight_shape) {
  const auto [groups, channels, fan_in] = slot_shapes(mean_slots, var_slots, "cbn.compensation_gradients");
  const int64_t entries = static_cast<int64_t>(var_slots.size());
  const auto dtype = var_slots[0].scalar_type();
  TORCH_CHECK(coefficients.dim() == 3 && coefficients.size(0) == channels && coefficients.size(1) == 3 &&
                  coefficients.size(2) == entries && grad_center.numel() == channels &&
                  grad_spread.numel() == channels,
              "cbn.compensation_gradients: coefficients ", coefficients.sizes(), " do not match ", entries,
              " gradient slots of ", channels, " channels");
  TORCH_CHECK(c10::multiply_integers(weight_shape) == channels * fan_in, "cbn.compensation_gradients: a weight of shape ",
              weight_shape, " does not have ", channels, " rows of ", fan_in);
  const bool one_dtype = coefficients.scalar_type() == dtype && grad_center.scalar_type() == dtype &&
                         grad_spread.scalar_type() == dtype && mean_slots[0].scalar_type() == dtype;
  if (!var_slots[0].is_cpu() || !one_dtype || (dtype != at::kFloat && dtype != at::kDouble) ||
      !coefficients.is_contiguous()) {
    const Tensor g_c = grad_center.to(dtype).unsqueeze(1), g_p = grad_spread.to(dtype).unsqueeze(1);
    const Tensor coef = coefficients.to(dtype);
    const Tensor mean_coefficients = coef.select(1, 0) * g_c + coef.select(1, 1) * g_p;
    const Tensor var_coefficients = coef.select(1, 2) * g_p;
    return {window_weight_gradient(mean_coefficients, mean_slots, var_coefficients, var_slots).reshape(weight_shape),
            mean_coefficients.sum(1)};
  }
  const auto mean_grads = checked_slots(mean_slots, groups, fan_in, dtype, "cbn.compensation_gradients");
  const auto var_grads = checked_slots(var_slots, channels, fan_in, dtype, "cbn.compensation_gradients");
  const int64_t per_group = channels / groups;
  Tensor rows = at::empty(weight_shape, var_grads[0].options());
  Tensor grad_bias = at::empty({channels}, var_grads[0].options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "cbn_compensation_gradients", [&] {
    const scalar_t* coef = coefficients.const_data_ptr<scalar_t>();
    const scalar_t *g_c = grad_center.const_data_ptr<scalar_t>(), *g_p = grad_spread.const_data_ptr<scalar_t>();
    const int64_t gc_s = grad_center.stride(0), gp_s = grad_spread.stride(0);
    const SlotRows<scalar_t> g_mu(mean_grads), g_var(var_grads);
    scalar_t *o = rows.mutable_data_ptr<scalar_t>(), *db = grad_bias.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, entries * fan_in));
    const auto channel_loop = [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> mean_weights(entries), var_weights(entries);
      for (int64_t c = begin; c < end; ++c) {
        const scalar_t center = g_c[c * gc_s], spread = g_p[c * gp_s];
        const scalar_t *w = coef + c * 3 * entries, *p = w + entries, *q = p + entries;
        scalar_t bias = 0;
        for (int64_t t = 0; t < entries; ++t) {
          mean_weights[t] = w[t] * center + p[t] * spread;
          var_weights[t] = q[t] * spread;
          bias += mean_weights[t];
        }
        db[c] = bias;
        window_row(o + c * fan_in, fan_in, entries, mean_weights.data(), var_weights.data(), g_mu, c / per_group,
                   g_var, c);
      }
    };
    simd::parallel_for(channels, grain, channel_loop);
  });
  return {std::move(rows), std::move(grad_bias)};
}

void save_attachment(torch::autograd::AutogradContext* ctx, const Tensor& weight, const std::optional<Tensor>& bias,
                     const Tensor& inv_entries, const Tensor& coefficients, at::TensorList mean_slots,
                     at::TensorList var_slots) {
  ctx->saved_data["attached_inv_entries"] = inv_entries;
  ctx->saved_data["coefficients"] = coefficients;
  ctx->saved_data["mean_slots"] = mean_slots.vec();
  ctx->saved_data["var_slots"] = var_slots.vec();
  ctx->saved_data["weight_shape"] = weight.sizes();
  ctx->saved_data["weight_dtype"] = weight.scalar_type();
  ctx->saved_data["bias_dtype"] = bias.has_value() ? c10::IValue(bias->scalar_type()) : c10::IValue();
}

std::tuple<Tensor, Tensor> attached_producer_gradients(torch::autograd::AutogradContext* ctx, const Tensor& grad_center,
                                                       const Tensor& grad_share, bool needs_weight, bool needs_bias) {
  TORCH_CHECK(!at::GradMode::is_enabled(),
              "cbn: the backward of differentiable compensation is not differentiable (no double backward)");
  const Tensor inv_entries = ctx->saved_data["attached_inv_entries"].toTensor();
  const Tensor coefficients = ctx->saved_data["coefficients"].toTensor();
  const int64_t channels = coefficients.size(0);
  const Tensor center = grad_center.defined() ? grad_center : at::zeros({channels}, inv_entries.options());
  const Tensor share = grad_share.defined() ? grad_share : at::zeros({channels}, inv_entries.options());
  const auto weight_shape = ctx->saved_data["weight_shape"].toIntVector();
  auto [grad_weight, grad_bias] = compensation_gradients(
      coefficients, center, share * inv_entries, ctx->saved_data["mean_slots"].toTensorVector(),
      ctx->saved_data["var_slots"].toTensorVector(), weight_shape);
  const auto in_dtype = [](const Tensor& gradient, const c10::IValue& dtype) {
    const auto scalar_type = dtype.toScalarType();
    return gradient.scalar_type() == scalar_type ? gradient : gradient.to(scalar_type);
  };
  const auto& bias_dtype = ctx->saved_data["bias_dtype"];
  return {needs_weight ? in_dtype(grad_weight, ctx->saved_data["weight_dtype"]) : Tensor(),
          needs_bias && !bias_dtype.isNone() ? in_dtype(grad_bias, bias_dtype) : Tensor()};
}

namespace {

// The past summary (c, P/n) of differentiable compensation as a function of the producer's weight
// and bias (cbn.functional.differentiable_compensation._AttachedPast is the Python form): the
// forward returns views of c and P/n; the backward turns dL/dc and dL/d(P/n) into the producer's
// gradients with compensation_gradients, g_P = dL/d(P/n) / n, from the gradient slots the summary
// was computed from (the window never writes them: a later entry replaces a slot's tensors), so
// that every backward of it, before or after later forwards, reads the entries it pooled.
// cbn::pooled_normalization takes the same attachment itself where it normalizes with the summary.
struct AttachedPast : public torch::autograd::Function<AttachedPast> {
  // (The slots as a std::vector, not a TensorList: constants of the step, not autograd inputs.)
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const Tensor& weight, const std::optional<Tensor>& bias,
      const Tensor& center, const Tensor& spread_share, const Tensor& inv_entries, const Tensor& coefficients,
      const std::vector<Tensor>& mean_slots, const std::vector<Tensor>& var_slots) {
    save_attachment(ctx, weight, bias, inv_entries, coefficients, mean_slots, var_slots);
    return {center.view_as(center), spread_share.view_as(spread_share)};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto [grad_weight, grad_bias] =
        attached_producer_gradients(ctx, grads[0], grads[1], ctx->needs_input_grad(0), ctx->needs_input_grad(1));
    return {grad_weight, grad_bias, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

}  // namespace

std::vector<Tensor> attach_past(const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& center,
                                const Tensor& spread_share, const Tensor& inv_entries, const Tensor& coefficients,
                                at::TensorList mean_slots, at::TensorList var_slots) {
  return AttachedPast::apply(weight, bias, center, spread_share, inv_entries, coefficients, mean_slots.vec(),
                             var_slots.vec());
}

TORCH_LIBRARY_FRAGMENT(cbn, m) {
  m.def("window_weight_gradient(Tensor mean_coefficients, Tensor[] mean_slots, Tensor var_coefficients, "
        "Tensor[] var_slots) -> Tensor");
  m.impl("window_weight_gradient", c10::DispatchKey::CompositeImplicitAutograd, &window_weight_gradient);
  m.def("compensation_gradients(Tensor coefficients, Tensor grad_center, Tensor grad_spread, Tensor[] mean_slots, "
        "Tensor[] var_slots, int[] weight_shape) -> (Tensor, Tensor)");
  m.impl("compensation_gradients", c10::DispatchKey::CompositeImplicitAutograd, &compensation_gradients);
  m.def("attach_past(Tensor weight, Tensor? bias, Tensor center, Tensor spread_share, Tensor inv_entries, "
        "Tensor coefficients, Tensor[] mean_slots, Tensor[] var_slots) -> Tensor[]");
  m.impl("attach_past", c10::DispatchKey::CompositeImplicitAutograd, &attach_past);
}

}  // namespace cbn
