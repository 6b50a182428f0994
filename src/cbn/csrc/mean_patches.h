// The mean input patch of a 2-D convolution per input channel, shared by the grouped producers'
// statistic gradients (cbn::mean_patches) and the one-call form of plain ones
// (cbn::convolution_statistic_gradients). Defined in grouped_statistic_gradients.cpp.
#pragma once

#include <ATen/ATen.h>

namespace cbn {

// patch[c, a, b] = (1/samples) sum_n sum_{p < H_out} sum_{q < W_out} x[n, c, p s_h + a d_h - pad_h, q s_w + b d_w - pad_w]
// (zeros outside the input), (C, k_h, k_w), for a 4-D float or double CPU input.
at::Tensor mean_patches(const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, at::IntArrayRef output_size,
                        int64_t samples);

}  // namespace cbn
