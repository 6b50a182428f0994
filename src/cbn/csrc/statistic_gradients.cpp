// Statistic gradients of many convolution producers in one call: the one-convolution form of
// cbn.functional.statistic_gradients.producer_statistic_gradients (groups == 1, batch below
// _SPLIT_BATCH, zero padding), looped over the layers of a model.
//
// For channel c over the m output positions i of a batch, with u[i] the input patch:
//   d mu[c]/d W[c]  = mean_i u[i]                          (the same for every channel)
//   d var[c]/d W[c] = (2/m) sum_i (y[i, c] - mu[c]) u[i]
// Both are the weight gradient of one convolution whose grad_output is [y - mu | 1/2], C + 1
// channels, scaled by 2/m; 2-D producers on the host take the mean patch from window sums
// (mean_patches) beside a weight gradient of the C rows instead (takes_mean_patches).
//
// Small 2-D float32 producers below batch 8 (at most kMostInputChannels input channels, at least
// two kernel taps, and the bounds of form_of: ResNet-20's layers) take one of two direct loops, with the
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
// 1-2 (whose blocking suits many channels and large planes: form_of). They sum in another order,
// so they agree with the Python implementation to float rounding (tested against float64 sums).
// The other producers take ATen's weight gradient: the grad_output scaled by 2/m when a channel
// has fewer samples than weight values (m < fan_in), else the result, whichever is smaller
// (_scales_activations); the weight passed to the convolution is uninitialized memory in the
// input's memory format (only its shape is read, and an expanded scalar would be copied into a
// contiguous weight at every call). The variance rows are then the Python implementation's bit for
// bit where the weight gradient of C rows gives each row the sums it gives it among C + 1 rows,
// and the 2-D mean patches are window sums in another order, equal to rounding (both tested).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cpu_simd.h"
#include "mean_patches.h"

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
// Where the channel vectors stop paying against ATen's weight gradient of C rows beside the mean
// patches' window sums, measured over 3x3 layers of 16-64 channels on 7-56 px planes at batch 1-2
// (docs/performance.md, session K): with p = N H_out W_out output positions, at stride 1 while
// Cin p is at most kMostUnitStrideWork (Cin <= 32) or kMostWideWork (Cin = 64: ResNet-20's 7x7
// stage, not resnet18's 40x40 one), at other strides while Cin Cout p is at most kMostStridedWork
// and Cin <= 32 (strided reads of 64 channels lost on every plane measured); Cout at most 2 Cin
// (the measured layers' Cout = Cin at stride 1, 2 Cin at stride 2). Within these bounds the
// operands never outgrow the scratch buffer; the shifted rows (stems) may.
constexpr int64_t kMostUnitStrideWork = 102400;
constexpr int64_t kMostWideWork = 12800;
constexpr int64_t kMostStridedWork = 409600;

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
  const int64_t in_channels = input.size(1);
  if (in_channels > kMostInputChannels || weight.size(2) * weight.size(3) == 1) {
    return Form::kAten;
  }
  if (in_channels % kVector == 0) {
    const int64_t positions = output.size(0) * output.size(2) * output.size(3);
    const int64_t channels = output.size(1);
    const bool fits =
        channels <= 2 * in_channels &&
        (all_one(stride) ? in_channels * positions <= (in_channels <= 32 ? kMostUnitStrideWork : kMostWideWork)
                         : in_channels <= 32 && in_channels * channels * positions <= kMostStridedWork);
    return fits ? Form::kChannelVectors : Form::kAten;
  }
  return all_one(stride) && all_one(dilation) ? Form::kShiftedRows : Form::kAten;
}

// Whether the ATen form of a producer takes the mean patch from mean_patches' window sums beside a
// weight gradient of C rows, instead of a weight gradient of C + 1 rows whose last grad_output
// channel is uniform: 2-D host producers of a floating dtype. oneDNN blocks a weight gradient's
// output channels in sixteens, so C + 1 rows cost a block more than C (measured against the C rows
// alone, resnet18 at 160 px and batch 2: 5-11 % on 128-256 channels), where the window sums
// add about the input's values once per kernel row.
bool takes_mean_patches(const Tensor& input) {
  return input.dim() == 4 && input.is_cpu() &&
         (input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble);
}

constexpr int64_t kLine = 16;                // floats per 64-byte line
constexpr int64_t kScratchFloats = 1 << 20;  // 4 MiB

// Scratch memory of the calling thread for `needed` floats, kept between calls up to kScratchFloats
// (a model's layers reuse it: fresh buffers cost the allocator at every layer, and page faults
// where it hands out memory it has just returned to the system), or nullptr for more. It starts
// on a 64-byte line, as ATen's allocations do, so that the direct loops' 32-byte loads of
// channels-last rows never straddle two lines (measured: 15-20 % slower at batch 1 on
// 16-byte-aligned memory). Its contents are left as the last user left them.
float* scratch_floats(int64_t needed) {
  if (needed > kScratchFloats) {
    return nullptr;
  }
  thread_local std::vector<float> scratch;
  if (static_cast<int64_t>(scratch.size()) < needed + kLine) {
    scratch.resize(needed + kLine);
  }
  const auto address = reinterpret_cast<std::uintptr_t>(scratch.data());
  return scratch.data() + ((64 - address % 64) % 64) / sizeof(float);
}

// (y - mu) s for an (N, C, H, W) output and its channel means, in one pass: the values of ATen's
// subtraction then multiplication (s = 1: the subtraction alone), each rounded once as there. A
// float32 result that fits lives in the thread's scratch memory, valid until its next use.
Tensor centred_output(const Tensor& output, const Tensor& mean, double scale) {
  const Tensor values = output.contiguous();
  const Tensor means = mean.to(values.scalar_type()).contiguous();
  float* scratch = values.scalar_type() == at::kFloat ? scratch_floats(values.numel()) : nullptr;
  Tensor centred = scratch != nullptr ? at::from_blob(scratch, values.sizes(), values.options())
                                      : at::empty_like(values);
  const int64_t planes = values.size(0) * values.size(1), channels = values.size(1);
  const int64_t plane = values.numel() / std::max<int64_t>(1, planes);
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "cbn_centred_output", [&] {
    const scalar_t* y = values.const_data_ptr<scalar_t>();
    const scalar_t* mu = means.const_data_ptr<scalar_t>();
    scalar_t* out = centred.mutable_data_ptr<scalar_t>();
    const auto s = static_cast<scalar_t>(scale);
    const bool scaled = scale != 1.0;
    simd::parallel_for(planes, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const scalar_t m = mu[p % channels];
        const scalar_t* from = y + p * plane;
        scalar_t* to = out + p * plane;
        if (scaled) {
          for (int64_t i = 0; i < plane; ++i) to[i] = (from[i] - m) * s;
        } else {
          for (int64_t i = 0; i < plane; ++i) to[i] = from[i] - m;
        }
      }
    });
  });
  return centred;
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

  const int64_t planes_size = (images * (by_channels ? 1 : in_channels) * plane_step + kLine - 1) / kLine * kLine;
  const int64_t needed = planes_size + images * rows * length;
  Tensor own;
  float* aligned = scratch_floats(needed);
  if (aligned == nullptr) {
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
// variance gradients (C, 1, fan_in): views of one (C + 1, 1, fan_in) tensor, or two tensors where
// the mean patch comes from window sums (takes_mean_patches).
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
    // ATen's weight gradient of `rows` rows for grad_output, scaled by 2/m unless grad_output was.
    const auto weight_gradient = [&](const Tensor& grad_output, int64_t rows) {
      std::vector<int64_t> weight_shape = weights[l].sizes().vec();
      weight_shape[0] = rows;
      const Tensor placeholder =
          at::empty(weight_shape, output.options().memory_format(input.suggest_memory_format()));
      const std::vector<int64_t> no_output_padding(spatial, 0);
      Tensor gradient = std::get<1>(at::convolution_backward(grad_output, input, placeholder, std::nullopt, stride,
                                                             padding, dilation, false, no_output_padding, 1,
                                                             {false, true, false}));
      if (!scale_first) {
        gradient.mul_(scale);
      }
      return gradient.reshape({rows, 1, fan_in});
    };
    if (takes_mean_patches(input)) {
      var_grads.push_back(weight_gradient(centred_output(output, means[l], scale_first ? scale : 1.0), channels));
      mean_grads.push_back(mean_patches(input, weights[l].sizes().slice(2), stride, padding, dilation,
                                        output.sizes().slice(2), samples)
                               .view({1, 1, fan_in}));
      continue;
    }
    std::vector<int64_t> grad_shape = output.sizes().vec();
    grad_shape[1] = channels + 1;
    Tensor grad_output = at::empty(grad_shape, output.options());
    grad_output.narrow(1, channels, 1).fill_(scale_first ? 0.5 * scale : 0.5);
    Tensor centred = grad_output.narrow(1, 0, channels);
    std::vector<int64_t> mean_shape(output.dim(), 1);
    mean_shape[1] = channels;
    at::sub_out(centred, output, means[l].view(mean_shape));
    if (scale_first) {
      centred.mul_(scale);
    }
    const Tensor both = weight_gradient(grad_output, channels + 1);
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
