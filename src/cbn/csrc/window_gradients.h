// The backward of a past summary attached to its producer (differentiable compensation), shared by
// the summary's own autograd function (cbn::attach_past) and the pooled normalization that takes the
// attachment itself (cbn::pooled_normalization with a producer weight: one autograd node per layer
// instead of two). Defined in window_gradients.cpp.
#pragma once

#include <ATen/ATen.h>
#include <torch/autograd.h>

#include <optional>
#include <tuple>
#include <vector>

namespace cbn {

// (dL/dW, dL/db) of differentiable compensation from dL/dc and dL/d(P/n) scaled by 1/n
// (cbn.functional.differentiable_compensation.producer_gradients), one pass over the window's
// gradient slots (gradient_slots.h).
std::tuple<at::Tensor, at::Tensor> compensation_gradients(const at::Tensor& coefficients, const at::Tensor& grad_center,
                                                          const at::Tensor& grad_spread, at::TensorList mean_slots,
                                                          at::TensorList var_slots, at::IntArrayRef weight_shape);

// Keeps in ctx what the producer's gradients need: the window's gradient slots themselves (not
// saved for backward: constants of the step, which the window never writes), the pooling's 1/n,
// and the shapes and dtypes of the producer's weight and bias.
void save_attachment(torch::autograd::AutogradContext* ctx, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, const at::Tensor& inv_entries,
                     const at::Tensor& coefficients, at::TensorList mean_slots, at::TensorList var_slots);

// (dL/dW, dL/db) of the producer, in the dtypes of its weight and bias, from the summary's
// gradients dL/dc and dL/d(P/n) (either undefined: zeros).
std::tuple<at::Tensor, at::Tensor> attached_producer_gradients(torch::autograd::AutogradContext* ctx,
                                                               const at::Tensor& grad_center,
                                                               const at::Tensor& grad_share, bool needs_weight,
                                                               bool needs_bias);

// (c, P/n) as functions of the producer's weight and bias: views of center and spread_share whose
// backward gives the producer's gradients (the summary's own autograd node).
std::vector<at::Tensor> attach_past(const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                    const at::Tensor& center, const at::Tensor& spread_share,
                                    const at::Tensor& inv_entries, const at::Tensor& coefficients,
                                    at::TensorList mean_slots, at::TensorList var_slots);

}  // namespace cbn
