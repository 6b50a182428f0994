// The mean input patch of a 2-D convolution, per input channel (the mean gradient of a grouped
// convolution's output statistics; cbn.functional.statistic_gradients._mean_patches is the
// Python form, a depthwise convolution of the batch sum with an output-sized kernel):
//
//   patch[c, a, b] = (1/m) sum_n sum_{p < H_out} sum_{q < W_out} x[n, c, p s_h + a d_h - pad_h, q s_w + b d_w - pad_w]
//
// with zeros outside the input, m = N H_out W_out. The window sum is separable: per channel, the
// rows of every sample are added into k_h row sums (one for each kernel row a), then each row sum
// is added along the columns at the k_w kernel columns b. About k_h times the input's values are
// added, against one multiply-add per input value and output-sized kernel position for the
// convolution (oneDNN has no fast path for kernels that large: 19 ms of an EfficientNet-B0 step at
// 160x160, batch 2). The sums are float sums in another order than the convolution's: they agree
// to rounding (tested against the float64 dense Jacobian).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "cpu_simd.h"

namespace cbn {
namespace {

using at::Tensor;

Tensor mean_patches(const Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                    at::IntArrayRef dilation, at::IntArrayRef output_size, int64_t samples) {
  TORCH_CHECK(input.dim() == 4 && kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 &&
                  dilation.size() == 2 && output_size.size() == 2,
              "cbn.mean_patches: a 4-D input and two values per setting, got an input of shape ", input.sizes());
  TORCH_CHECK(input.is_cpu() && (input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble),
              "cbn.mean_patches: a float or double CPU input, got ", input.scalar_type(), " on ", input.device());
  TORCH_CHECK(samples > 0, "cbn.mean_patches: samples must be positive, got ", samples);
  const Tensor values = input.contiguous();
  const int64_t batch = values.size(0), channels = values.size(1), height = values.size(2), width = values.size(3);
  const int64_t kernel_h = kernel_size[0], kernel_w = kernel_size[1];
  const int64_t out_h = output_size[0], out_w = output_size[1];
  // Per kernel row a (column b): the first input row (column) inside the input that the window
  // reads, and how many it reads, every stride-th one (padding contributes zeros).
  const auto inside = [](int64_t kernel, int64_t outputs, int64_t step, int64_t spacing, int64_t pad, int64_t size) {
    std::vector<std::pair<int64_t, int64_t>> ranges(kernel);
    for (int64_t a = 0; a < kernel; ++a) {
      const int64_t offset = a * spacing - pad;  // input index of output 0
      const int64_t lowest = offset >= 0 ? 0 : (-offset + step - 1) / step;
      const int64_t highest = offset >= size ? -1 : std::min(outputs - 1, (size - 1 - offset) / step);
      ranges[a] = {offset + lowest * step, std::max<int64_t>(0, highest - lowest + 1)};
    }
    return ranges;
  };
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
            const auto [first, count] = rows[a];
            for (int64_t t = 0; t < count; ++t) {
              const scalar_t* row = plane + (first + t * stride[0]) * width;
              for (int64_t j = 0; j < width; ++j) row_sum[j] += row[j];
            }
          }
        }
        for (int64_t a = 0; a < kernel_h; ++a) {
          const scalar_t* row_sum = row_sums.data() + a * width;
          for (int64_t b = 0; b < kernel_w; ++b) {
            const auto [first, count] = columns[b];
            double total = 0;
            for (int64_t t = 0; t < count; ++t) total += static_cast<double>(row_sum[first + t * stride[1]]);
            patches[(c * kernel_h + a) * kernel_w + b] = static_cast<scalar_t>(total * inv_samples);
          }
        }
      }
    };
    at::parallel_for(0, channels, 1, [&](int64_t begin, int64_t end) { simd::run(channel_loop, begin, end); });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cbn, m) {
  m.def("mean_patches(Tensor input, int[] kernel_size, int[] stride, int[] padding, int[] dilation, "
        "int[] output_size, int samples) -> Tensor");
  m.impl("mean_patches", c10::DispatchKey::CompositeImplicitAutograd, &mean_patches);
}

}  // namespace cbn
