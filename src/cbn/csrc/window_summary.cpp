// The summary of many layers' windows, moved to the current weights, in one call: per channel the
// chain of cbn.functional.window.pool_window (Taylor step, clamp, centre, spread, pooling weights)
// and, for differentiable compensation, the coefficients of its derivatives
// (cbn.functional.differentiable_compensation.compensation_coefficients). The Python forms run
// some thirty ATen operations on (k, C) tensors, each a dispatch that costs more than its values
// at batch 1-2; here it is one loop over the channels of the concatenated windows.
//
// Per channel, over the entries t of the window (valid_t = samples_t > 0):
//   delta_t = S_mu,t - s_mu,t,   mu'_t = mu_t + delta_t,
//   var'_t = max(var_t + (S_var,t - s_var,t) - delta_t^2, 0)
//   count = sum valid,   c = sum valid mu' / max(count, 1),   P = sum valid (var' + (mu' - c)^2)
//   1/n = 1 / (count + 1),   P/n,   (n - 1)/n^2 = count (1/n)^2
//   w_t = valid_t / max(count, 1),   q_t = valid_t [var'_t > 0],
//   p_t = 2 (valid_t (mu'_t - c) - q_t delta_t)
// without shifts (naive averaging) mu' = mu and var' = var (no step, no clamp). The same float
// operations in the same order as the Python forms, in the statistics' dtype; the sums over the
// entries run in entry order. The loop is scalar and not run through simd::run (no FMA), so it
// rounds as the Python forms do: the tests hold it to them bit for bit.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace cbn {
namespace {

using at::Tensor;

constexpr int64_t kMean = 0, kVar = 1, kMeanShift = 2, kVarShift = 3, kSamples = 4;
constexpr int64_t kSummaryFields = 7;  // center, spread, count, samples, 1/n, P/n, (n - 1)/n^2

// stats (k, 5, C); mean_shift_now, var_shift_now (k, C) or undefined (naive); sizes: the channels of
// each layer in the concatenation. Returns per layer its summary fields (C_l,) and, with
// `coefficients`, its (C_l, 3, k) rows w, p, q.
std::vector<Tensor> window_summary(const Tensor& stats_in, const std::optional<Tensor>& mean_shift_now_in,
                                   const std::optional<Tensor>& var_shift_now_in, at::IntArrayRef sizes,
                                   bool coefficients) {
  TORCH_CHECK(stats_in.dim() == 3 && stats_in.size(1) == 5, "cbn.window_summary: stats must be (k, 5, C), got ",
              stats_in.sizes());
  const int64_t entries = stats_in.size(0), channels = stats_in.size(2);
  const bool moved = mean_shift_now_in.has_value() && mean_shift_now_in->defined();
  TORCH_CHECK(moved == (var_shift_now_in.has_value() && var_shift_now_in->defined()),
              "cbn.window_summary: both shifts or neither");
  TORCH_CHECK(!coefficients || moved, "cbn.window_summary: coefficients need the shifts");
  int64_t total = 0;
  for (const int64_t size : sizes) total += size;
  TORCH_CHECK(total == channels, "cbn.window_summary: sizes sum to ", total, ", not the ", channels, " channels");
  const Tensor stats = stats_in.contiguous();
  const auto dtype = stats.scalar_type();
  TORCH_CHECK(stats.is_cpu() && (dtype == at::kFloat || dtype == at::kDouble),
              "cbn.window_summary: float or double statistics on the CPU");
  Tensor mean_shift_now, var_shift_now;
  if (moved) {
    mean_shift_now = mean_shift_now_in->contiguous();
    var_shift_now = var_shift_now_in->contiguous();
    for (const Tensor* shift : {&mean_shift_now, &var_shift_now}) {
      TORCH_CHECK(shift->is_cpu() && shift->scalar_type() == dtype && shift->dim() == 2 &&
                      shift->size(0) == entries && shift->size(1) == channels,
                  "cbn.window_summary: shifts must be (k, C) of the statistics' dtype, got ", shift->sizes());
    }
  }
  // Each output its own tensor, made without the dispatcher (views of one block would cost a
  // dispatched slice each: more than the whole loop at a model's 20-50 layers).
  const auto layers = static_cast<int64_t>(sizes.size());
  std::vector<Tensor> pieces;
  pieces.reserve(layers * (kSummaryFields + 1));
  for (const int64_t size : sizes) {
    for (int64_t field = 0; field < kSummaryFields; ++field) {
      pieces.push_back(at::detail::empty_cpu({size}, dtype, false, at::MemoryFormat::Contiguous));
    }
    if (coefficients) {
      pieces.push_back(at::detail::empty_cpu({size, 3, entries}, dtype, false, at::MemoryFormat::Contiguous));
    }
  }
  AT_DISPATCH_FLOATING_TYPES(dtype, "cbn_window_summary", [&] {
    const scalar_t* s = stats.const_data_ptr<scalar_t>();
    const scalar_t* mean_now = moved ? mean_shift_now.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* var_now = moved ? var_shift_now.const_data_ptr<scalar_t>() : nullptr;
    std::vector<scalar_t> moved_mean(entries), moved_var(entries), delta(entries), valid(entries);
    const auto at = [&](int64_t t, int64_t row, int64_t c) { return s[(t * 5 + row) * channels + c]; };
    const int64_t per_layer = kSummaryFields + (coefficients ? 1 : 0);
    int64_t c = 0;
    for (int64_t l = 0; l < layers; ++l) {
      scalar_t* out[kSummaryFields];
      for (int64_t field = 0; field < kSummaryFields; ++field) {
        out[field] = pieces[l * per_layer + field].mutable_data_ptr<scalar_t>();
      }
      scalar_t* coefficient =
          coefficients ? pieces[l * per_layer + kSummaryFields].mutable_data_ptr<scalar_t>() : nullptr;
      for (int64_t local = 0; local < sizes[l]; ++local, ++c) {
        scalar_t count = 0, samples = 0;
        for (int64_t t = 0; t < entries; ++t) {
          valid[t] = at(t, kSamples, c) > 0 ? scalar_t(1) : scalar_t(0);
          if (moved) {
            delta[t] = mean_now[t * channels + c] - at(t, kMeanShift, c);
            moved_mean[t] = at(t, kMean, c) + delta[t];
            moved_var[t] = std::max(at(t, kVar, c) + (var_now[t * channels + c] - at(t, kVarShift, c)) -
                                        delta[t] * delta[t], scalar_t(0));
          } else {
            moved_mean[t] = at(t, kMean, c);
            moved_var[t] = at(t, kVar, c);
          }
          count += valid[t];
          samples += at(t, kSamples, c);
        }
        const scalar_t divisor = std::max(count, scalar_t(1));
        scalar_t center = 0;
        for (int64_t t = 0; t < entries; ++t) center += valid[t] * moved_mean[t];
        center /= divisor;
        scalar_t spread = 0;
        for (int64_t t = 0; t < entries; ++t) {
          const scalar_t offset = moved_mean[t] - center;
          spread += valid[t] * (moved_var[t] + offset * offset);
        }
        const scalar_t inv_entries = scalar_t(1) / (count + scalar_t(1));
        const scalar_t values[kSummaryFields] = {center, spread, count, samples, inv_entries, spread * inv_entries,
                                                 count * (inv_entries * inv_entries)};
        for (int64_t field = 0; field < kSummaryFields; ++field) out[field][local] = values[field];
        if (coefficient == nullptr) continue;
        scalar_t* w = coefficient + local * 3 * entries;
        for (int64_t t = 0; t < entries; ++t) {
          const scalar_t unclamped = valid[t] * (moved_var[t] > 0 ? scalar_t(1) : scalar_t(0));
          w[t] = valid[t] / divisor;
          w[entries + t] = scalar_t(2) * (valid[t] * (moved_mean[t] - center) - unclamped * delta[t]);
          w[2 * entries + t] = unclamped;
        }
      }
    }
  });
  return pieces;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cbn, m) {
  m.def("window_summary(Tensor stats, Tensor? mean_shift_now, Tensor? var_shift_now, int[] sizes, "
        "bool coefficients) -> Tensor[]");
  m.impl("window_summary", c10::DispatchKey::CompositeImplicitAutograd, &window_summary);
}

}  // namespace cbn
