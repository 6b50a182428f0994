// Statistic gradients of many convolution producers in one call: the one-convolution form of
// cbn.functional.statistic_gradients.producer_statistic_gradients (groups == 1, batch below
// _SPLIT_BATCH, zero padding), looped over the layers of a model, with the same ATen kernels in
// the same order, so that the results equal the Python implementation's bit for bit.
//
// For channel c over the m output positions i of a batch, with u[i] the input patch:
//   d mu[c]/d W[c]  = mean_i u[i]                          (the same for every channel)
//   d var[c]/d W[c] = (2/m) sum_i (y[i, c] - mu[c]) u[i]
// Both are the weight gradient of one convolution whose grad_output is [y - mu | 1/2], C + 1
// channels, scaled by 2/m: the grad_output when a channel has fewer samples than weight values
// (m < fan_in), else the result, whichever is smaller (_scales_activations). The weight passed
// to the convolution is uninitialized memory in the input's memory format: only its shape is
// read, and an expanded scalar would be copied into a contiguous weight at every call.

#include <ATen/ATen.h>
#include <torch/library.h>

namespace cbn {
namespace {

using at::Tensor;

// settings: per layer, its stride, padding and dilation (one value per spatial dimension each),
// one layer after the other. Returns, per layer, the mean gradients (1, 1, fan_in) and the
// variance gradients (C, 1, fan_in): views of one (C + 1, 1, fan_in) tensor.
std::tuple<std::vector<Tensor>, std::vector<Tensor>> convolution_statistic_gradients(
    at::TensorList inputs, at::TensorList outputs, at::TensorList means, at::TensorList weights,
    at::IntArrayRef settings) {
  const size_t layers = inputs.size();
  TORCH_CHECK(outputs.size() == layers && means.size() == layers && weights.size() == layers,
              "cbn.convolution_statistic_gradients: one input, output, mean and weight per layer");
  std::vector<Tensor> mean_grads, var_grads;
  mean_grads.reserve(layers);
  var_grads.reserve(layers);
  size_t offset = 0;
  for (size_t l = 0; l < layers; ++l) {
    const Tensor& input = inputs[l];
    const Tensor& output = outputs[l];
    const int64_t spatial = input.dim() - 2;
    TORCH_CHECK(offset + 3 * spatial <= settings.size(), "cbn.convolution_statistic_gradients: settings too short");
    const at::IntArrayRef stride = settings.slice(offset, spatial);
    const at::IntArrayRef padding = settings.slice(offset + spatial, spatial);
    const at::IntArrayRef dilation = settings.slice(offset + 2 * spatial, spatial);
    offset += 3 * spatial;

    const int64_t channels = output.size(1);
    const int64_t samples = output.numel() / channels;
    const int64_t fan_in = weights[l].numel() / weights[l].size(0);
    const bool scale_first = samples < fan_in;
    const double scale = 2.0 / static_cast<double>(samples);
    std::vector<int64_t> mean_shape(output.dim(), 1);
    mean_shape[1] = channels;
    std::vector<int64_t> grad_shape = output.sizes().vec();
    grad_shape[1] = channels + 1;
    Tensor grad_output = at::empty(grad_shape, output.options());
    grad_output.narrow(1, channels, 1).fill_(scale_first ? 0.5 * scale : 0.5);
    Tensor centred = grad_output.narrow(1, 0, channels);
    at::sub_out(centred, output, means[l].view(mean_shape));
    if (scale_first) {
      centred.mul_(scale);
    }

    std::vector<int64_t> weight_shape = weights[l].sizes().vec();
    weight_shape[0] = channels + 1;
    const Tensor placeholder =
        at::empty(weight_shape, output.options().memory_format(input.suggest_memory_format()));
    const std::vector<int64_t> no_output_padding(spatial, 0);
    Tensor both = std::get<1>(at::convolution_backward(
        grad_output, input, placeholder, std::nullopt, stride, padding, dilation, false, no_output_padding, 1,
        {false, true, false}));
    if (!scale_first) {
      both.mul_(scale);
    }
    both = both.reshape({channels + 1, 1, -1});
    mean_grads.push_back(both.narrow(0, channels, 1));
    var_grads.push_back(both.narrow(0, 0, channels));
  }
  return {std::move(mean_grads), std::move(var_grads)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cbn, m) {
  m.def("convolution_statistic_gradients(Tensor[] inputs, Tensor[] outputs, Tensor[] means, Tensor[] weights, "
        "int[] settings) -> (Tensor[], Tensor[])");
  m.impl("convolution_statistic_gradients", c10::DispatchKey::CompositeImplicitAutograd,
         &convolution_statistic_gradients);
}

}  // namespace cbn
