// Normalization with the batch statistics pooled with the past entries, forward and backward:
// the same ATen kernels, in the same order, as cbn.functional.normalization.CrossIterationNorm
// (its docstring has the derivation), without a Python frame per operation. Results are
// identical to the Python implementation's, bit for bit.
//
//   delta   = mu_t - c,   mu_bar = c + delta / n,   var_bar = var_t / n + P / n + (n - 1) / n^2 delta^2
//   y       = (x - mu_bar) / sqrt(var_bar + eps) * gamma + beta
//   dL/dx   = gamma s (g - (G + x_hat H) / (n m)),   dL/dgamma = H,   dL/dbeta = G

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace cbn {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::optional<Tensor> present(const Tensor& tensor) {
  return tensor.defined() ? std::optional<Tensor>(tensor) : std::nullopt;
}

at::MemoryFormat memory_format_of(const Tensor& input) {
  // As the Python implementation: channels-last is kept for 4-D inputs only.
  if (input.dim() == 4 && input.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

struct PooledNormalization : public torch::autograd::Function<PooledNormalization> {
  static variable_list forward(
      AutogradContext* ctx, const Tensor& input, const std::optional<Tensor>& weight,
      const std::optional<Tensor>& bias,
      const Tensor& center, const Tensor& inv_entries, const Tensor& spread_share,
      const Tensor& delta_weight, double eps, at::ScalarType stats_dtype) {
    const Tensor stats_input = input.scalar_type() == stats_dtype ? input : input.to(stats_dtype);
    auto [batch_mean, batch_var] = at::batch_norm_update_stats(stats_input, std::nullopt, std::nullopt, 0.0);
    const Tensor delta = batch_mean - center;
    const Tensor mean = at::addcmul(center, delta, inv_entries);
    const Tensor var = at::addcmul(at::addcmul(spread_share, batch_var, inv_entries), delta.square(), delta_weight);
    Tensor output = std::get<0>(
        at::native_batch_norm(input, weight, bias, mean, var, false, 0.0, eps));
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["needs_input"] = input.requires_grad();
    ctx->saved_data["needs_weight"] = weight.has_value() && weight->requires_grad();
    ctx->saved_data["needs_bias"] = bias.has_value() && bias->requires_grad();
    ctx->save_for_backward({input, weight.value_or(Tensor()), mean, var, inv_entries});
    ctx->mark_non_differentiable({batch_mean, batch_var, mean, var});
    return {output, batch_mean, batch_var, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "cbn: the backward of the pooled normalization is not differentiable (no double backward)");
    const auto saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &weight = saved[1], &mean = saved[2], &var = saved[3];
    const Tensor& inv_entries = saved[4];
    const double eps = ctx->saved_data["eps"].toDouble();
    const bool needs_input = ctx->saved_data["needs_input"].toBool();
    const bool needs_weight = ctx->saved_data["needs_weight"].toBool();
    const bool needs_bias = ctx->saved_data["needs_bias"].toBool();
    const Tensor grad_output = grads[0].contiguous(memory_format_of(input));
    auto [grad_input, sum_g_xhat, sum_g] = at::native_batch_norm_backward(
        grad_output, input, present(weight), mean, var, std::nullopt, std::nullopt, false, eps,
        {needs_input, true, true});
    if (!needs_input) {
      return {Tensor(), needs_weight ? sum_g_xhat : Tensor(), needs_bias ? sum_g : Tensor(),
              Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    }
    // gamma s g from the kernel above, then - gamma s (G + x_hat H) / (n m): BatchNorm's forward
    // of the input with scale -gamma s^2 H / (n m) and shift -gamma s G / (n m).
    const Tensor invstd = at::rsqrt(var + eps);
    Tensor scale = invstd.mul(inv_entries).mul_(-static_cast<double>(input.size(1)) / static_cast<double>(input.numel()));
    if (weight.defined()) {
      scale.mul_(weight);
    }
    const Tensor correction = std::get<0>(at::native_batch_norm(
        input, scale * invstd * sum_g_xhat, scale * sum_g, mean, at::ones_like(var), false, 0.0, 0.0));
    grad_input.add_(correction);
    return {grad_input, needs_weight ? sum_g_xhat : Tensor(), needs_bias ? sum_g : Tensor(),
            Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::vector<Tensor> pooled_normalization(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const Tensor& center, const Tensor& inv_entries, const Tensor& spread_share,
    const Tensor& delta_weight, double eps, at::ScalarType stats_dtype) {
  return PooledNormalization::apply(input, weight, bias, center, inv_entries, spread_share, delta_weight,
                                    eps, stats_dtype);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cbn, m) {
  m.def("pooled_normalization(Tensor input, Tensor? weight, Tensor? bias, Tensor center, "
        "Tensor inv_entries, Tensor spread_share, Tensor delta_weight, float eps, "
        "ScalarType stats_dtype) -> Tensor[]");
  m.impl("pooled_normalization", c10::DispatchKey::CompositeImplicitAutograd, &pooled_normalization);
}

}  // namespace cbn
