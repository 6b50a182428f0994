// Statistic gradients of many convolution producers in one call: the one-convolution form of
// cbn.functional.statistic_gradients.producer_statistic_gradients (groups == 1, batch below
// _SPLIT_BATCH, zero padding), looped over the layers of a model.
//
// For channel c over the m output positions i of a batch, with u[i] the input patch:
//   d mu[c]/d W[c]  = mean_i u[i]                          (the same for every channel)
//   d var[c]/d W[c] = (2/m) sum_i (y[i, c] - mu[c]) u[i]
// Both are the weight gradient of one convolution whose grad_output is [y - mu | 1/2], C + 1
// channels, scaled by 2/m.
//
// 2-D float32 producers below batch 8 with at most kMostInputChannels input channels and at least
// two kernel taps (ResNet-20's layers, ResNets' first stage) take one of two direct loops, with the
// grad_output centred and scaled in one pass and the input planes zero-padded, in rows of the
// padded width P, so that the input value under kernel tap (a, b) of output position (h, w) is at
// position (h s + a d) P + (w s + b d) for stride s and dilation d:
// - channel vectors, where the input channels come in eights (any stride and dilation): the
//   padded input laid out channels last, each value of the grad_output broadcast against the
//   eight input channels under each tap (simd::channel_taps): 8 x taps weight-gradient values per
//   pass over the positions, no fold of lanes;
// - shifted rows, stride and dilation 1 (a stem on 1 or 3 channels): the grad_output in rows of P
//   with zeros past the output's width, so that each weight-gradient value is a dot product of a
//   grad_output row with the input plane shifted by the tap's offset a P + b, all taps of a (row,
//   plane) pair in one pass (simd::shifted_dots).
// Over ResNet-20's 21 layers they take about 0.7x the time of oneDNN's weight gradient at batch
// 1-2 (whose blocking suits many channels: kMostInputChannels). They sum in another order, so they
// agree with the Python implementation to float rounding (tested against float64 sums). The other
// producers take ATen's weight gradient, the same kernels in the same order as the Python
// implementation (bit for bit): the grad_output scaled by 2/m when a channel has fewer samples
// than weight values (m < fan_in), else the result, whichever is smaller (_scales_activations);
// the weight passed to the convolution is uninitialized memory in the input's memory format (only
// its shape is read, and an expanded scalar would be copied into a contiguous weight at every call).

#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu_simd.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace cbn {
namespace {

using at::Tensor;

constexpr int64_t kVector = 8;  // floats per vector of the simd loops
constexpr int64_t kBlock = 8;   // output rows per cache block (and input planes, in the row form)
// The most input channels the direct loops take. Measured at batch 1-2 against ATen's weight
// gradient (benchmarks/statistic_gradient_forms.py, docs/performance.md session J): 16-32 channels
// 0.4-0.5x its time, 64 channels 0.6-0.7x on 7x7 planes and 0.9-1.2x on 32-40 px planes; with
// 128-256 channels oneDNN's blocked kernel is the faster (1.1-1.7x in the direct loops), and with
// one kernel tap (1x1) by 4-8x (each of the loop's sums waits on the last).
constexpr int64_t kMostInputChannels = 64;

enum class Form { kAten, kChannelVectors, kShiftedRows };

Form form_of(const Tensor& input, const Tensor& output, const Tensor& weight, at::IntArrayRef stride,
             at::IntArrayRef dilation) {
  const auto all_one = [](at::IntArrayRef values) {
    return std::all_of(values.begin(), values.end(), [](int64_t v) { return v == 1; });
  };
  if (input.dim() != 4 || !input.is_cpu() || input.scalar_type() != at::kFloat || output.scalar_type() != at::kFloat ||
      !input.is_contiguous() || !output.is_contiguous() || output.numel() == 0) {
    return Form::kAten;
  }
  if (input.size(1) > kMostInputChannels || weight.size(2) * weight.size(3) == 1) {
    return Form::kAten;
  }
  if (input.size(1) % kVector == 0) {
    return Form::kChannelVectors;
  }
  return all_one(stride) && all_one(dilation) ? Form::kShiftedRows : Form::kAten;
}

// (C + 1, Cin * taps): the C variance-gradient rows (2/m) sum (y - mu) u, then the mean patch
// (1/m) sum u, of a 2-D convolution in one of the two direct forms (the file's comment).
Tensor direct_gradients(Form form, const Tensor& input, const Tensor& output, const Tensor& mean,
                        at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation) {
  const bool by_channels = form == Form::kChannelVectors;
  const int64_t images = input.size(0), in_channels = input.size(1);
  const int64_t height = input.size(2), width = input.size(3);
  const int64_t channels = output.size(1), out_h = output.size(2), out_w = output.size(3);
  const int64_t row = width + 2 * padding[1];  // P
  const int64_t plane = (height + 2 * padding[0]) * row;
  const int64_t rows = channels + 1, taps = kernel[0] * kernel[1];
  const float scale = static_cast<float>(2.0 / static_cast<double>(images * out_h * out_w));
  // The grad_output [y - mu | 1/2] scaled by 2/m: compact (n, c, h, w) in the channel form; in the
  // row form in rows of P, with zeros past the output's width and past its last position up to a
  // whole vector. The input planes zero-padded: (n, position, Cin) in the channel form; (n, Cin,
  // position) in the row form, where every read ends before plane + kVector (the last output's
  // last tap, a vector on) and the values past the plane are zeros.
  const int64_t length = by_channels ? out_h * out_w : ((out_h - 1) * row + out_w + kVector - 1) / kVector * kVector;
  const int64_t grad_row = by_channels ? out_w : row;
  const int64_t plane_step = by_channels ? plane * in_channels : plane + kVector;

  // Scratch memory of the calling thread, kept between calls up to kScratchFloats (a model's
  // layers reuse it: fresh buffers cost the allocator at every layer); larger operands take a
  // tensor of their own. Both parts start on a 64-byte line, as ATen's allocations do, so that the
  // loops' 32-byte loads of channels-last rows never straddle two lines (measured: 15-20 % slower
  // at batch 1 on 16-byte-aligned memory).
  constexpr int64_t kLine = 16;                 // floats per 64-byte line
  constexpr int64_t kScratchFloats = 1 << 20;   // 4 MiB
  const int64_t planes_size = (images * (by_channels ? 1 : in_channels) * plane_step + kLine - 1) / kLine * kLine;
  const int64_t needed = planes_size + images * rows * length;
  thread_local std::vector<float> scratch;
  Tensor own;
  float* aligned = nullptr;
  if (needed <= kScratchFloats) {
    if (static_cast<int64_t>(scratch.size()) < needed + kLine) {
      scratch.resize(needed + kLine);
    }
    const auto address = reinterpret_cast<std::uintptr_t>(scratch.data());
    aligned = scratch.data() + ((64 - address % 64) % 64) / sizeof(float);
  } else {
    own = at::empty({needed}, input.options());
    aligned = own.data_ptr<float>();
  }
  std::fill(aligned, aligned + needed, 0.0f);
  const float* x = input.const_data_ptr<float>();
  const float* y = output.const_data_ptr<float>();
  const Tensor mean_values = mean.to(at::kFloat).contiguous();
  const float* mu = mean_values.const_data_ptr<float>();
  float* padded = aligned;
  float* grad = aligned + planes_size;
  const auto prepare = [&] {
    for (int64_t n = 0; n < images; ++n) {
      for (int64_t h = 0; h < height; ++h) {
        const int64_t position = (h + padding[0]) * row + padding[1];
        if (by_channels) {
          // Position by position, the channels in order: contiguous writes, reads from cached rows.
          float* to = padded + n * plane_step + position * in_channels;
          const float* from = x + n * in_channels * height * width + h * width;
          for (int64_t w = 0; w < width; ++w) {
            for (int64_t ci = 0; ci < in_channels; ++ci) to[w * in_channels + ci] = from[ci * height * width + w];
          }
          continue;
        }
        for (int64_t ci = 0; ci < in_channels; ++ci) {
          std::memcpy(padded + (n * in_channels + ci) * plane_step + position,
                      x + ((n * in_channels + ci) * height + h) * width, width * sizeof(float));
        }
      }
      for (int64_t c = 0; c < rows; ++c) {
        for (int64_t h = 0; h < out_h; ++h) {
          float* to = grad + (n * rows + c) * length + h * grad_row;
          if (c == channels) {
            std::fill(to, to + out_w, 0.5f * scale);
            continue;
          }
          const float* from = y + ((n * channels + c) * out_h + h) * out_w;
          for (int64_t w = 0; w < out_w; ++w) to[w] = (from[w] - mu[c]) * scale;
        }
      }
    }
  };
  simd::run(prepare);

  // The input under tap (a, b) of output position (h, w) is at position (h s + a d) P + w s + b d.
  const int64_t position_step = by_channels ? in_channels : 1;
  std::vector<int64_t> offsets(taps);
  for (int64_t a = 0; a < kernel[0]; ++a) {
    for (int64_t b = 0; b < kernel[1]; ++b) {
      offsets[a * kernel[1] + b] = (a * dilation[0] * row + b * dilation[1]) * position_step;
    }
  }
  Tensor result = at::empty({rows, in_channels * taps}, input.options());
  float* out = result.data_ptr<float>();
  const auto block_loop = [&](int64_t begin, int64_t end) {
    std::vector<float> sums(by_channels ? kVector * taps : 0);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t c_end = std::min(rows, (block + 1) * kBlock);
      if (by_channels) {
        // Eight input channels against a block of rows: their planes' vectors stay in the cache.
        for (int64_t first = 0; first < in_channels; first += kVector) {
          for (int64_t c = block * kBlock; c < c_end; ++c) {
            simd::channel_taps(grad + c * length, padded + first, offsets.data(), taps, images, out_h, out_w,
                               rows * length, plane_step, stride[0] * row * in_channels, stride[1] * in_channels,
                               sums.data());
            for (int64_t l = 0; l < kVector; ++l) {
              for (int64_t t = 0; t < taps; ++t) out[(c * in_channels + first + l) * taps + t] = sums[t * kVector + l];
            }
          }
        }
        continue;
      }
      for (int64_t first = 0; first < in_channels; first += kBlock) {
        const int64_t last = std::min(in_channels, first + kBlock);
        for (int64_t c = block * kBlock; c < c_end; ++c) {
          for (int64_t ci = first; ci < last; ++ci) {
            simd::shifted_dots(grad + c * length, padded + ci * plane_step, offsets.data(), taps, length, images,
                               rows * length, in_channels * plane_step, out + (c * in_channels + ci) * taps);
          }
        }
      }
    }
  };
  simd::parallel_for((rows + kBlock - 1) / kBlock, 1, block_loop);
  return result;
}

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
    const Form form = form_of(input, output, weights[l], stride, dilation);
    if (form != Form::kAten) {
      const Tensor both = direct_gradients(form, input, output, means[l], weights[l].sizes().slice(2), stride,
                                           padding, dilation).view({channels + 1, 1, -1});
      mean_grads.push_back(both.narrow(0, channels, 1));
      var_grads.push_back(both.narrow(0, 0, channels));
      continue;
    }
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
