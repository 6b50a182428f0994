// Normalization with the batch statistics pooled with the past entries, forward and backward
// (cbn.functional.normalization.CrossIterationNorm has the derivation), in two forms:
//
// - FusedPooledNormalization, for contiguous float and double CPU inputs (the common case): one
//   pass for the channel sums, one for the centred squares (summed in double, as BatchNorm's own
//   training kernel), one for the output; backward in two passes (the channel sums of g and
//   g (x - mu_bar), then dL/dx = A g + B x + D per channel). The Python implementation takes
//   BatchNorm's Welford statistics kernel and four passes backward: the two agree to float
//   rounding (tested), not bit for bit.
// - PooledNormalization, for every other input (channels-last, half precision, other devices):
//   the Python implementation's ATen kernels in the same order, identical bit for bit.
//
//   delta   = mu_t - c,   mu_bar = c + delta / n,   var_bar = var_t / n + P / n + (n - 1) / n^2 delta^2
//   y       = (x - mu_bar) / sqrt(var_bar + eps) * gamma + beta
//   dL/dx   = gamma s (g - (G + x_hat H) / (n m)),   dL/dgamma = H,   dL/dbeta = G
//
// Where the past summary carries gradients (differentiable compensation), both forms also return
//   dL/dc = (1 - 1/n) (A - 2 B (mu_bar - c)),   dL/d(P/n) = B,
// with A = -gamma s G and B = -gamma s^2 H / 2 (past_summary_gradients of the Python form); the
// summary's own autograd function (cbn::attach_past) turns them into the producer's gradients. Given
// the summary's attachment itself (the producer's weight and bias, the coefficients, the window's
// gradient slots), the fused form does that in its own backward: one autograd
// node per layer instead of two, the same numbers.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/autograd.h>

#include <cmath>
#include <torch/library.h>

#include "cpu_simd.h"
#include "window_gradients.h"

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

// What both forms' backward needs, saved by the forward.
struct Saved {
  Tensor input, weight, mean, var, inv_entries, center;
  double eps;
  bool needs_input, needs_weight, needs_bias, needs_center, needs_share;
};

// Saves what the backward needs and returns the forward's outputs; the statistics carry no
// gradient.
variable_list finish_forward(AutogradContext* ctx, const Tensor& input, const std::optional<Tensor>& weight,
                             const std::optional<Tensor>& bias, const Tensor& output, const Tensor& batch_mean,
                             const Tensor& batch_var, const Tensor& mean, const Tensor& var,
                             const Tensor& inv_entries, const Tensor& center, const Tensor& spread_share,
                             double eps) {
  ctx->saved_data["eps"] = eps;
  ctx->saved_data["needs_input"] = input.requires_grad();
  ctx->saved_data["needs_weight"] = weight.has_value() && weight->requires_grad();
  ctx->saved_data["needs_bias"] = bias.has_value() && bias->requires_grad();
  ctx->saved_data["needs_center"] = center.requires_grad();
  ctx->saved_data["needs_share"] = spread_share.requires_grad();
  ctx->save_for_backward({input, weight.value_or(Tensor()), mean, var, inv_entries, center});
  ctx->mark_non_differentiable({batch_mean, batch_var, mean, var});
  return {output, batch_mean, batch_var, mean, var};
}

Saved read_context(AutogradContext* ctx) {
  TORCH_CHECK(!at::GradMode::is_enabled(),
              "cbn: the backward of the pooled normalization is not differentiable (no double backward)");
  const auto saved = ctx->get_saved_variables();
  return {saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], ctx->saved_data["eps"].toDouble(),
          ctx->saved_data["needs_input"].toBool(), ctx->saved_data["needs_weight"].toBool(),
          ctx->saved_data["needs_bias"].toBool(), ctx->saved_data["needs_center"].toBool(),
          ctx->saved_data["needs_share"].toBool()};
}

bool needs_summary(const Saved& saved) {
  return saved.needs_center || saved.needs_share;
}

// (dL/dc, dL/d(P/n)) of the past summary from the channel sums G = sum g, H = sum g x_hat.
std::pair<Tensor, Tensor> summary_gradients(const Saved& saved, const Tensor& sum_g, const Tensor& sum_g_xhat) {
  const auto dtype = saved.mean.scalar_type();
  const Tensor invstd = at::rsqrt(saved.var + saved.eps);
  const Tensor gamma_s = saved.weight.defined() ? invstd * saved.weight.to(dtype) : invstd;
  const Tensor grad_mean = -gamma_s * sum_g.to(dtype);
  const Tensor grad_var = -0.5 * gamma_s * invstd * sum_g_xhat.to(dtype);
  const Tensor grad_center = (1 - saved.inv_entries) * (grad_mean - 2 * grad_var * (saved.mean - saved.center));
  return {grad_center, grad_var};
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
    return finish_forward(ctx, input, weight, bias, output, batch_mean, batch_var, mean, var, inv_entries, center,
                          spread_share, eps);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Saved saved = read_context(ctx);
    const auto& [input, weight, mean, var, inv_entries, center, eps, needs_input, needs_weight, needs_bias,
                 needs_center, needs_share] = saved;
    const Tensor grad_output = grads[0].contiguous(memory_format_of(input));
    auto [grad_input, sum_g_xhat, sum_g] = at::native_batch_norm_backward(
        grad_output, input, present(weight), mean, var, std::nullopt, std::nullopt, false, eps,
        {needs_input, true, true});
    Tensor grad_center, grad_share;
    if (needs_summary(saved)) {
      std::tie(grad_center, grad_share) = summary_gradients(saved, sum_g, sum_g_xhat);
      grad_center = needs_center ? grad_center : Tensor();
      grad_share = needs_share ? grad_share : Tensor();
    }
    if (!needs_input) {
      return {Tensor(), needs_weight ? sum_g_xhat : Tensor(), needs_bias ? sum_g : Tensor(),
              grad_center, Tensor(), grad_share, Tensor(), Tensor(), Tensor()};
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
            grad_center, Tensor(), grad_share, Tensor(), Tensor(), Tensor()};
  }
};


// Per channel c of a contiguous (N, C, *) tensor: the `spatial` values of every sample n.
template <typename T, typename F>
void for_each_run(const T* data, int64_t samples, int64_t channels, int64_t spatial, int64_t c, F&& f) {
  for (int64_t n = 0; n < samples; ++n) {
    f(data + (n * channels + c) * spatial);
  }
}

template <typename T>
double run_sum(const T* x, int64_t count) {
  constexpr int kLanes = 8;
  double lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= count; j += kLanes) {
    for (int k = 0; k < kLanes; ++k) lanes[k] += static_cast<double>(x[j + k]);
  }
  double total = 0;
  for (; j < count; ++j) total += static_cast<double>(x[j]);
  for (int k = 0; k < kLanes; ++k) total += lanes[k];
  return total;
}

template <typename T>
double run_centred_dot(const T* a, const T* x, double center, int64_t count) {
  // sum a[j] (x[j] - center); with a == x, the centred sum of squares.
  constexpr int kLanes = 8;
  double lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= count; j += kLanes) {
    for (int k = 0; k < kLanes; ++k) lanes[k] += static_cast<double>(a[j + k]) * (static_cast<double>(x[j + k]) - center);
  }
  double total = 0;
  for (; j < count; ++j) total += static_cast<double>(a[j]) * (static_cast<double>(x[j]) - center);
  for (int k = 0; k < kLanes; ++k) total += lanes[k];
  return total;
}

// One value per channel, read through a pointer and a stride (0 where one value stands for every
// channel, e.g. a 0-dim count): no ATen operation where the values already have the input's dtype
// (at batch 1-2 each operation is a dispatch that costs more than the values).
template <typename scalar_t>
struct Channels {
  Tensor converted;  // keeps a converted copy alive
  const scalar_t* data = nullptr;
  int64_t stride = 0;
  bool present = false;

  Channels(const std::optional<Tensor>& values, int64_t channels) {
    if (!values.has_value() || !values->defined()) return;
    Tensor own = *values;
    if (own.scalar_type() != c10::CppTypeToScalarType<scalar_t>::value || !own.is_cpu()) {
      converted = own.to(at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value).device(at::kCPU));
      own = converted;
    }
    TORCH_CHECK(own.numel() == 1 || (own.dim() == 1 && own.size(0) == channels),
                "cbn::pooled_normalization: per-channel values of shape ", own.sizes(), " for ", channels, " channels");
    data = own.const_data_ptr<scalar_t>();
    stride = own.numel() == 1 ? 0 : own.stride(0);
    present = true;
  }

  scalar_t operator[](int64_t c) const { return data[c * stride]; }
};

bool takes_fused_form(const Tensor& input, at::ScalarType stats_dtype) {
  return input.is_cpu() && input.scalar_type() == stats_dtype &&
         (stats_dtype == at::kFloat || stats_dtype == at::kDouble) && input.dim() >= 2 &&
         input.is_contiguous() && input.numel() > 0;
}

struct FusedPooledNormalization : public torch::autograd::Function<FusedPooledNormalization> {
  static variable_list forward(
      AutogradContext* ctx, const Tensor& input, const std::optional<Tensor>& weight,
      const std::optional<Tensor>& bias, const Tensor& center, const Tensor& inv_entries,
      const Tensor& spread_share, const Tensor& delta_weight, double eps,
      const std::optional<Tensor>& producer_weight, const std::optional<Tensor>& producer_bias,
      const std::optional<Tensor>& coefficients, const std::vector<Tensor>& mean_slots,
      const std::vector<Tensor>& var_slots) {
    const bool attached = producer_weight.has_value() && producer_weight->defined();
    ctx->saved_data["attached"] = attached;
    // (Flags, not needs_input_grad: its index counts only the tensors given, and some are optional.)
    ctx->saved_data["needs_producer_weight"] = attached && producer_weight->requires_grad();
    ctx->saved_data["needs_producer_bias"] = attached && producer_bias.has_value() && producer_bias->defined() &&
                                             producer_bias->requires_grad();
    if (attached) {
      save_attachment(ctx, *producer_weight, producer_bias, inv_entries, *coefficients, mean_slots, var_slots);
    }
    const int64_t samples = input.size(0), channels = input.size(1);
    const int64_t spatial = input.numel() / (samples * channels);
    const double count = static_cast<double>(samples * spatial);
    const auto options = input.options();
    Tensor batch_mean = at::empty({channels}, options), batch_var = at::empty({channels}, options);
    Tensor mean = at::empty({channels}, options), var = at::empty({channels}, options);
    Tensor output = at::empty_like(input);
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "cbn_fused_pooled_normalization", [&] {
      const scalar_t* x = input.const_data_ptr<scalar_t>();
      scalar_t* y = output.mutable_data_ptr<scalar_t>();
      scalar_t *bm = batch_mean.mutable_data_ptr<scalar_t>(), *bv = batch_var.mutable_data_ptr<scalar_t>();
      scalar_t *pm = mean.mutable_data_ptr<scalar_t>(), *pv = var.mutable_data_ptr<scalar_t>();
      // The pooling constants may broadcast (a 0-dim count).
      const Channels<scalar_t> c0(center, channels), n_inv(inv_entries, channels);
      const Channels<scalar_t> sh(spread_share, channels), dw(delta_weight, channels);
      const Channels<scalar_t> g(weight, channels), b(bias, channels);
      const auto channel_loop = [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          double sum = 0;
          for_each_run(x, samples, channels, spatial, c, [&](const scalar_t* run) { sum += run_sum(run, spatial); });
          const double channel_mean = sum / count;
          double squares = 0;
          for_each_run(x, samples, channels, spatial, c,
                       [&](const scalar_t* run) { squares += run_centred_dot(run, run, channel_mean, spatial); });
          bm[c] = static_cast<scalar_t>(channel_mean);
          bv[c] = static_cast<scalar_t>(squares / count);
          const scalar_t delta = bm[c] - c0[c];
          pm[c] = c0[c] + delta * n_inv[c];
          pv[c] = (sh[c] + bv[c] * n_inv[c]) + delta * delta * dw[c];
          const double invstd = 1.0 / std::sqrt(static_cast<double>(pv[c]) + eps);
          const double scale = g.present ? invstd * static_cast<double>(g[c]) : invstd;
          const double shift = (b.present ? static_cast<double>(b[c]) : 0.0) - static_cast<double>(pm[c]) * scale;
          const scalar_t alpha = static_cast<scalar_t>(scale), beta_c = static_cast<scalar_t>(shift);
          for (int64_t n = 0; n < samples; ++n) {
            const int64_t offset = (n * channels + c) * spatial;
            for (int64_t j = 0; j < spatial; ++j) y[offset + j] = x[offset + j] * alpha + beta_c;
          }
        }
      };
      simd::parallel_for(channels, 1, channel_loop);
    });
    return finish_forward(ctx, input, weight, bias, output, batch_mean, batch_var, mean, var, inv_entries, center,
                          spread_share, eps);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Saved saved = read_context(ctx);
    const auto& [input, weight, mean, var, inv_entries, center, eps, needs_input, needs_weight, needs_bias,
                 needs_center, needs_share] = saved;
    const Tensor grad_output = grads[0].contiguous();
    const int64_t samples = input.size(0), channels = input.size(1);
    const int64_t spatial = input.numel() / (samples * channels);
    const double count = static_cast<double>(samples * spatial);
    const auto options = input.options();
    Tensor grad_input = needs_input ? at::empty_like(input) : Tensor();
    Tensor sum_g_xhat = at::empty({channels}, options), sum_g = at::empty({channels}, options);
    // dL/dc and dL/d(P/n), per channel in the loop below, where the past summary needs them.
    const bool attached = ctx->saved_data["attached"].toBool();
    const bool summary = needs_summary(saved) || attached;
    Tensor summary_center = summary ? at::empty({channels}, options) : Tensor();
    Tensor summary_share = summary ? at::empty({channels}, options) : Tensor();
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "cbn_fused_pooled_normalization_backward", [&] {
      const scalar_t *x = input.const_data_ptr<scalar_t>(), *dy = grad_output.const_data_ptr<scalar_t>();
      const scalar_t *pm = mean.const_data_ptr<scalar_t>(), *pv = var.const_data_ptr<scalar_t>();
      const Channels<scalar_t> n_inv(inv_entries, channels), g(weight, channels);
      scalar_t *h_out = sum_g_xhat.mutable_data_ptr<scalar_t>(), *g_out = sum_g.mutable_data_ptr<scalar_t>();
      scalar_t* dx = needs_input ? grad_input.mutable_data_ptr<scalar_t>() : nullptr;
      const Channels<scalar_t> c0(summary ? std::optional<Tensor>(center) : std::nullopt, channels);
      scalar_t* gc_out = summary ? summary_center.mutable_data_ptr<scalar_t>() : nullptr;
      scalar_t* gs_out = summary ? summary_share.mutable_data_ptr<scalar_t>() : nullptr;
      const auto channel_loop = [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          const double center = static_cast<double>(pm[c]);
          double total = 0, centred = 0;
          for (int64_t n = 0; n < samples; ++n) {
            const int64_t offset = (n * channels + c) * spatial;
            total += run_sum(dy + offset, spatial);
            centred += run_centred_dot(dy + offset, x + offset, center, spatial);
          }
          const double invstd = 1.0 / std::sqrt(static_cast<double>(pv[c]) + eps);
          const double h = centred * invstd;  // sum g x_hat
          g_out[c] = static_cast<scalar_t>(total);
          h_out[c] = static_cast<scalar_t>(h);
          const double gamma_s = (g.present ? static_cast<double>(g[c]) : 1.0) * invstd;
          if (gc_out != nullptr) {
            // A = dL/dmu_bar, B = dL/dvar_bar; dL/dc = (1 - 1/n) (A - 2 B (mu_bar - c)), dL/d(P/n) = B.
            const double grad_mean = -gamma_s * total, grad_var = -0.5 * gamma_s * invstd * h;
            gc_out[c] = static_cast<scalar_t>((1.0 - static_cast<double>(n_inv[c])) *
                                              (grad_mean - 2.0 * grad_var * (center - static_cast<double>(c0[c]))));
            gs_out[c] = static_cast<scalar_t>(grad_var);
          }
          if (dx == nullptr) continue;
          // dL/dx = gamma s (g - (G + x_hat H) / (n m)) = A g + B x + D.
          const double per_value = static_cast<double>(n_inv[c]) / count;  // 1 / (n m)
          const double slope = -gamma_s * invstd * h * per_value;
          const scalar_t a = static_cast<scalar_t>(gamma_s), bx = static_cast<scalar_t>(slope);
          const scalar_t d = static_cast<scalar_t>(-gamma_s * total * per_value - slope * center);
          for (int64_t n = 0; n < samples; ++n) {
            const int64_t offset = (n * channels + c) * spatial;
            for (int64_t j = 0; j < spatial; ++j) dx[offset + j] = a * dy[offset + j] + bx * x[offset + j] + d;
          }
        }
      };
      simd::parallel_for(channels, 1, channel_loop);
    });
    Tensor grad_producer_weight, grad_producer_bias;
    if (attached) {
      std::tie(grad_producer_weight, grad_producer_bias) = attached_producer_gradients(
          ctx, summary_center, summary_share, ctx->saved_data["needs_producer_weight"].toBool(),
          ctx->saved_data["needs_producer_bias"].toBool());
    }
    return {grad_input, needs_weight ? sum_g_xhat : Tensor(), needs_bias ? sum_g : Tensor(),
            needs_center ? summary_center : Tensor(), Tensor(), needs_share ? summary_share : Tensor(), Tensor(),
            Tensor(), grad_producer_weight, grad_producer_bias, Tensor(), Tensor(), Tensor()};
  }
};

// With a producer weight, the summary (center, spread_share) is attached to it: the coefficients
// and the window's gradient slots must be given too (empty lists where it is not attached;
// cbn.functional.differentiable_compensation.attach_to_producer).
std::vector<Tensor> pooled_normalization(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const Tensor& center, const Tensor& inv_entries, const Tensor& spread_share,
    const Tensor& delta_weight, double eps, at::ScalarType stats_dtype, at::TensorList mean_slots,
    at::TensorList var_slots, const std::optional<Tensor>& producer_weight, const std::optional<Tensor>& producer_bias,
    const std::optional<Tensor>& coefficients) {
  const bool attached = producer_weight.has_value() && producer_weight->defined();
  TORCH_CHECK(!attached || (coefficients.has_value() && !var_slots.empty()),
              "cbn.pooled_normalization: an attached summary needs its coefficients and gradient slots");
  if (takes_fused_form(input, stats_dtype)) {
    // (The slots as a std::vector: constants of the step, not autograd inputs.)
    return FusedPooledNormalization::apply(input, weight, bias, center, inv_entries, spread_share, delta_weight, eps,
                                           producer_weight, producer_bias, coefficients, mean_slots.vec(),
                                           var_slots.vec());
  }
  if (!attached) {
    return PooledNormalization::apply(input, weight, bias, center, inv_entries, spread_share, delta_weight, eps,
                                      stats_dtype);
  }
  // Other inputs: the summary's own autograd function, then the normalization.
  const std::vector<Tensor> summary = attach_past(*producer_weight, producer_bias, center, spread_share, inv_entries,
                                                  *coefficients, mean_slots, var_slots);
  return PooledNormalization::apply(input, weight, bias, summary[0], inv_entries, summary[1], delta_weight, eps,
                                    stats_dtype);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cbn, m) {
  m.def("pooled_normalization(Tensor input, Tensor? weight, Tensor? bias, Tensor center, "
        "Tensor inv_entries, Tensor spread_share, Tensor delta_weight, float eps, "
        "ScalarType stats_dtype, Tensor[] mean_slots, Tensor[] var_slots, Tensor? producer_weight=None, "
        "Tensor? producer_bias=None, Tensor? coefficients=None) -> Tensor[]");
  m.impl("pooled_normalization", c10::DispatchKey::CompositeImplicitAutograd, &pooled_normalization);
}

}  // namespace cbn
