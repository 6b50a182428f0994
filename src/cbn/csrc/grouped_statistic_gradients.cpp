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
//   channel per output channel), centred once per channel and sample, one dot product per kernel
//   offset over the input's phase planes (below).
//
// Both are float sums in another order than the convolutions': they agree to rounding (tested
// against float64 sums and the dense Jacobian).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu_simd.h"
#include "mean_patches.h"

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

}  // namespace

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

namespace {

// The variance gradients of a depthwise convolution's output (one input channel per output
// channel), the weight gradient of the convolution for the gradient 2 (y - mu) / m, centred inline
// instead of in an output-sized temporary:
//
//   var[c, a, b] = (2/m) sum_n sum_{p, q} (y[n, c, p, q] - mu[c]) x[n, c, p s_h + a d_h - pad_h, q s_w + b d_w - pad_w]
//
// Each term of one kernel offset as one long dot product (output rows are 5-80 values: a loop per
// row and offset spent more time on its ends than on its values). Writing the offset a d_h =
// alpha s_h + rho and b d_w = beta s_w + sigma, the input read is
//   x[s_h (p + alpha) + rho - pad_h, s_w (q + beta) + sigma - pad_w] = phase[rho, sigma][p + alpha, q + beta]
// on the phase plane phase[rho, sigma][i, j] = x[s_h i + rho - pad_h, s_w j + sigma - pad_w] (zero
// outside the input; one plane for stride 1). With the centred output laid out in rows of the
// phase planes' width R (zeros after its W_out values), the sum over p, q for one offset is the
// dot product of that buffer with the phase plane from (alpha, beta) on, out_h R values long: the
// reads that run past a row's end meet the zeros. Per channel and sample the phase planes and the
// centred rows are built once (about the input's and the output's size) and stay in the cache.
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
  const int64_t step_h = stride[0], step_w = stride[1];
  // Phase planes: rows and columns reach out_h - 1 + alpha_max and out_w - 1 + beta_max, plus one
  // row for the reads of the last offset that run past the last row (they meet zeros of the buffer).
  const int64_t alpha_max = (kernel_h - 1) * dilation[0] / step_h, beta_max = (kernel_w - 1) * dilation[1] / step_w;
  const int64_t row_width = out_w + beta_max, phase_rows = out_h + alpha_max + 1;
  const int64_t phase_size = phase_rows * row_width, length = out_h * row_width;
  Tensor out = at::empty({channels, kernel_h, kernel_w}, values.options());
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "cbn_depthwise_variance_gradients", [&] {
    const scalar_t *x = values.const_data_ptr<scalar_t>(), *y = outputs.const_data_ptr<scalar_t>();
    const scalar_t* mu = means.const_data_ptr<scalar_t>();
    scalar_t* gradients = out.mutable_data_ptr<scalar_t>();
    const double scale = 2.0 / static_cast<double>(batch * out_h * out_w);
    const auto channel_loop = [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> phases(step_h * step_w * phase_size), centred(length, scalar_t(0));
      std::vector<double> totals(kernel_h * kernel_w);
      for (int64_t c = begin; c < end; ++c) {
        std::fill(totals.begin(), totals.end(), 0.0);
        for (int64_t n = 0; n < batch; ++n) {
          const scalar_t* plane = x + (n * channels + c) * height * width;
          const scalar_t* out_plane = y + (n * channels + c) * out_h * out_w;
          for (int64_t rho = 0; rho < step_h; ++rho) {
            for (int64_t sigma = 0; sigma < step_w; ++sigma) {
              scalar_t* phase = phases.data() + (rho * step_w + sigma) * phase_size;
              // The columns j of a phase row that read inside the input: [first, last).
              const int64_t offset = sigma - padding[1];
              const int64_t first = std::min(row_width, offset >= 0 ? 0 : (-offset + step_w - 1) / step_w);
              const int64_t reach = offset >= width ? 0 : (width - 1 - offset) / step_w + 1;
              const int64_t last = std::max(first, std::min(row_width, reach));
              for (int64_t i = 0; i < phase_rows; ++i) {
                scalar_t* phase_row = phase + i * row_width;
                const int64_t row = step_h * i + rho - padding[0];
                if (row < 0 || row >= height) {
                  std::fill(phase_row, phase_row + row_width, scalar_t(0));
                  continue;
                }
                const scalar_t* input_row = plane + row * width;
                std::fill(phase_row, phase_row + first, scalar_t(0));
                for (int64_t j = first; j < last; ++j) phase_row[j] = input_row[step_w * j + offset];
                std::fill(phase_row + last, phase_row + row_width, scalar_t(0));
              }
            }
          }
          for (int64_t p = 0; p < out_h; ++p) {
            for (int64_t q = 0; q < out_w; ++q) centred[p * row_width + q] = out_plane[p * out_w + q] - mu[c];
          }
          for (int64_t a = 0; a < kernel_h; ++a) {
            const int64_t alpha = a * dilation[0] / step_h, rho = a * dilation[0] % step_h;
            for (int64_t b = 0; b < kernel_w; ++b) {
              const int64_t beta = b * dilation[1] / step_w, sigma = b * dilation[1] % step_w;
              const scalar_t* phase = phases.data() + (rho * step_w + sigma) * phase_size;
              totals[a * kernel_w + b] += static_cast<double>(
                  simd::dot(centred.data(), phase + alpha * row_width + beta, length));
            }
          }
        }
        for (int64_t k = 0; k < kernel_h * kernel_w; ++k) {
          gradients[c * kernel_h * kernel_w + k] = static_cast<scalar_t>(totals[k] * scale);
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
