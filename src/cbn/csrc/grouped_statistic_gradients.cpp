// Statistic gradients of grouped 2-D convolution producers, where ATen's forms are slow on the CPU
// (cbn.functional.statistic_gradients has the Python forms):
//
// - mean_patches: the mean input patch per input channel (the mean gradients of a grouped
//   convolution's output statistics; in Python a depthwise convolution of the batch sum with an
//   output-sized kernel),
//
//     patch[c, a, b] = (1/m) sum_n sum_{p < H_out} sum_{q < W_out} x[n, c, p s_h + a d_h - pad_h, q s_w + b d_w - pad_w]
//
//   with zeros outside the input, m = N H_out W_out. The window sum is separable: per channel, the
//   rows of every sample are added into k_h row sums (one for each kernel row a), then each row
//   sum is added along the columns at the k_w kernel columns b. About k_h times the input's values
//   are added, against one multiply-add per input value and output-sized kernel position for the
//   convolution (oneDNN has no fast path for kernels that large: 19 ms of an EfficientNet-B0 step
//   at 160x160, batch 2).
// - depthwise_variance_gradients: the variance gradients of a depthwise convolution (one input
//   channel per output channel), centred inline (below).
//
// Both are float sums in another order than the convolutions': they agree to rounding (tested
// against float64 sums and the dense Jacobian).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu_simd.h"

namespace cbn {
namespace {

using at::Tensor;

// The outputs whose window reads inside the input, per kernel offset along one axis.
struct Reach {
  int64_t input;   // the first input index read (every stride-th one after it)
  int64_t output;  // the output index that reads it
  int64_t count;   // how many outputs read inside the input (padding contributes zeros)
};

std::vector<Reach> inside(int64_t kernel, int64_t outputs, int64_t step, int64_t spacing, int64_t pad, int64_t size) {
  std::vector<Reach> reaches(kernel);
  for (int64_t a = 0; a < kernel; ++a) {
    const int64_t offset = a * spacing - pad;  // input index read by output 0
    const int64_t lowest = offset >= 0 ? 0 : (-offset + step - 1) / step;
    const int64_t highest = offset >= size ? -1 : std::min(outputs - 1, (size - 1 - offset) / step);
    reaches[a] = {offset + lowest * step, lowest, std::max<int64_t>(0, highest - lowest + 1)};
  }
  return reaches;
}

void check_settings(const char* name, const Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                    at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(input.dim() == 4 && kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 &&
                  dilation.size() == 2,
              "cbn.", name, ": a 4-D input and two values per setting, got an input of shape ", input.sizes());
  TORCH_CHECK(input.is_cpu() && (input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble),
              "cbn.", name, ": a float or double CPU input, got ", input.scalar_type(), " on ", input.device());
}

Tensor mean_patches(const Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                    at::IntArrayRef dilation, at::IntArrayRef output_size, int64_t samples) {
  check_settings("mean_patches", input, kernel_size, stride, padding, dilation);
  TORCH_CHECK(output_size.size() == 2, "cbn.mean_patches: two output sizes, got ", output_size);
  TORCH_CHECK(samples > 0, "cbn.mean_patches: samples must be positive, got ", samples);
  const Tensor values = input.contiguous();
  const int64_t batch = values.size(0), channels = values.size(1), height = values.size(2), width = values.size(3);
  const int64_t kernel_h = kernel_size[0], kernel_w = kernel_size[1];
  const int64_t out_h = output_size[0], out_w = output_size[1];
  const auto rows = inside(kernel_h, out_h, stride[0], dilation[0], padding[0], height);
  const auto columns = inside(kernel_w, out_w, stride[1], dilation[1], padding[1], width);
  Tensor out = at::empty({channels, kernel_h, kernel_w}, values.options());
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "cbn_mean_patches", [&] {
    const scalar_t* x = values.const_data_ptr<scalar_t>();
    scalar_t* patches = out.mutable_data_ptr<scalar_t>();
    const double inv_samples = 1.0 / static_cast<double>(samples);
    const auto channel_loop = [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> row_sums(kernel_h * width);
      for (int64_t c = begin; c < end; ++c) {
        std::fill(row_sums.begin(), row_sums.end(), scalar_t(0));
        for (int64_t n = 0; n < batch; ++n) {
          const scalar_t* plane = x + (n * channels + c) * height * width;
          for (int64_t a = 0; a < kernel_h; ++a) {
            scalar_t* row_sum = row_sums.data() + a * width;
            for (int64_t t = 0; t < rows[a].count; ++t) {
              const scalar_t* row = plane + (rows[a].input + t * stride[0]) * width;
              for (int64_t j = 0; j < width; ++j) row_sum[j] += row[j];
            }
          }
        }
        for (int64_t a = 0; a < kernel_h; ++a) {
          const scalar_t* row_sum = row_sums.data() + a * width;
          for (int64_t b = 0; b < kernel_w; ++b) {
            double total = 0;
            for (int64_t t = 0; t < columns[b].count; ++t) {
              total += static_cast<double>(row_sum[columns[b].input + t * stride[1]]);
            }
            patches[(c * kernel_h + a) * kernel_w + b] = static_cast<scalar_t>(total * inv_samples);
          }
        }
      }
    };
    simd::parallel_for(channels, 1, channel_loop);
  });
  return out;
}

// sum_u (y[u] - mean) x[u * step]: independent partial sums in kLanes lanes (vector registers).
template <typename scalar_t>
double centred_dot(const scalar_t* y, const scalar_t* x, int64_t count, int64_t step, scalar_t mean) {
  constexpr int kLanes = 8;
  scalar_t lanes[kLanes] = {};
  int64_t u = 0;
  if (step == 1) {
    for (; u + kLanes <= count; u += kLanes) {
      for (int k = 0; k < kLanes; ++k) lanes[k] += (y[u + k] - mean) * x[u + k];
    }
  } else {
    for (; u + kLanes <= count; u += kLanes) {
      for (int k = 0; k < kLanes; ++k) lanes[k] += (y[u + k] - mean) * x[(u + k) * step];
    }
  }
  double total = 0;
  for (; u < count; ++u) total += static_cast<double>((y[u] - mean) * x[u * step]);
  for (int k = 0; k < kLanes; ++k) total += static_cast<double>(lanes[k]);
  return total;
}

// The variance gradients of a depthwise convolution's output (one input channel per output
// channel), the weight gradient of the convolution for the gradient 2 (y - mu) / m, centred inline
// instead of in an output-sized temporary:
//
//   var[c, a, b] = (2/m) sum_n sum_{p, q} (y[n, c, p, q] - mu[c]) x[n, c, p s_h + a d_h - pad_h, q s_w + b d_w - pad_w]
//
// Returns (C, k_h, k_w), the weight rows' layout.
Tensor depthwise_variance_gradients(const Tensor& input, const Tensor& output, const Tensor& mean,
                                    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation) {
  check_settings("depthwise_variance_gradients", input, kernel_size, stride, padding, dilation);
  TORCH_CHECK(output.dim() == 4 && output.size(0) == input.size(0) && output.size(1) == input.size(1) &&
                  output.scalar_type() == input.scalar_type() && mean.numel() == input.size(1),
              "cbn.depthwise_variance_gradients: an output of shape ", output.sizes(), " and a mean of ",
              mean.numel(), " values for an input of shape ", input.sizes());
  const Tensor values = input.contiguous(), outputs = output.contiguous();
  const Tensor means = mean.to(input.scalar_type()).contiguous();
  const int64_t batch = values.size(0), channels = values.size(1), height = values.size(2), width = values.size(3);
  const int64_t out_h = outputs.size(2), out_w = outputs.size(3);
  const int64_t kernel_h = kernel_size[0], kernel_w = kernel_size[1];
  const auto rows = inside(kernel_h, out_h, stride[0], dilation[0], padding[0], height);
  const auto columns = inside(kernel_w, out_w, stride[1], dilation[1], padding[1], width);
  Tensor out = at::empty({channels, kernel_h, kernel_w}, values.options());
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "cbn_depthwise_variance_gradients", [&] {
    const scalar_t *x = values.const_data_ptr<scalar_t>(), *y = outputs.const_data_ptr<scalar_t>();
    const scalar_t* mu = means.const_data_ptr<scalar_t>();
    scalar_t* gradients = out.mutable_data_ptr<scalar_t>();
    const double scale = 2.0 / static_cast<double>(batch * out_h * out_w);
    const auto channel_loop = [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        for (int64_t a = 0; a < kernel_h; ++a) {
          for (int64_t b = 0; b < kernel_w; ++b) {
            double total = 0;
            for (int64_t n = 0; n < batch; ++n) {
              const scalar_t* plane = x + (n * channels + c) * height * width;
              const scalar_t* out_plane = y + (n * channels + c) * out_h * out_w;
              for (int64_t t = 0; t < rows[a].count; ++t) {
                const scalar_t* x_row = plane + (rows[a].input + t * stride[0]) * width + columns[b].input;
                const scalar_t* y_row = out_plane + (rows[a].output + t) * out_w + columns[b].output;
                total += centred_dot(y_row, x_row, columns[b].count, stride[1], mu[c]);
              }
            }
            gradients[(c * kernel_h + a) * kernel_w + b] = static_cast<scalar_t>(total * scale);
          }
        }
      }
    };
    simd::parallel_for(channels, 1, channel_loop);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cbn, m) {
  m.def("mean_patches(Tensor input, int[] kernel_size, int[] stride, int[] padding, int[] dilation, "
        "int[] output_size, int samples) -> Tensor");
  m.impl("mean_patches", c10::DispatchKey::CompositeImplicitAutograd, &mean_patches);
  m.def("depthwise_variance_gradients(Tensor input, Tensor output, Tensor mean, int[] kernel_size, int[] stride, "
        "int[] padding, int[] dilation) -> Tensor");
  m.impl("depthwise_variance_gradients", c10::DispatchKey::CompositeImplicitAutograd, &depthwise_variance_gradients);
}

}  // namespace cbn
