// The record of one training forward for many layers on the CPU, in one call: each layer's new
// window entry (mean, var, s_mu, s_var, samples) into its slot, or an empty slot when the entry
// is not finite; its counters; and its running statistics, moved towards the pooled estimate
// with the variance unbiased over all pooled values (left unchanged when the entry is not
// finite). cbn.layers.window_step._record_group does the same with concatenated tensors and
// foreach kernels; the values are identical (the per-channel arithmetic is the same IEEE float
// operations, and the moving averages use ATen's lerp_ as there).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>

namespace cbn {
namespace {

using at::Tensor;

template <typename T>
bool all_finite(const T* values, int64_t count) {
  bool finite = true;
  for (int64_t i = 0; i < count; ++i) {
    finite &= std::isfinite(values[i]);
  }
  return finite;
}

// The values of a contiguous CPU tensor of the statistics dtype holding exactly `count` of them.
template <typename T>
const T* values_of(const Tensor& tensor, int64_t count) {
  TORCH_CHECK(tensor.is_cpu() && tensor.is_contiguous() && tensor.scalar_type() == c10::CppTypeToScalarType<T>::value &&
                  tensor.numel() == count,
              "cbn.write_entries: expected a contiguous CPU tensor of ", count, " ",
              c10::CppTypeToScalarType<T>::value, " values, got ", tensor.sizes(), " ", tensor.scalar_type());
  return tensor.const_data_ptr<T>();
}

// Returns the per-layer finite flags (bool). shifts: the concatenated first-order terms, or
// undefined for zeros. window_stats[l] undefined: a layer of window 1. running_means[l]
// undefined: a layer without running statistics. momenta[l] < 0: cumulative average.
Tensor write_entries(
    at::TensorList batch_means, at::TensorList batch_vars, const std::optional<Tensor>& mean_shifts,
    const std::optional<Tensor>& var_shifts, at::IntArrayRef samples, const c10::List<std::optional<Tensor>>& window_stats,
    at::IntArrayRef slots, const c10::List<std::optional<Tensor>>& running_means,
    const c10::List<std::optional<Tensor>>& running_vars, const c10::List<std::optional<Tensor>>& batches_tracked,
    at::ArrayRef<double> momenta, at::TensorList pooled_means, at::TensorList pooled_vars,
    const c10::List<std::optional<Tensor>>& window_samples) {
  TORCH_CHECK(!batch_means.empty(), "cbn.write_entries: no layer");
  Tensor finite;
  AT_DISPATCH_FLOATING_TYPES(batch_means[0].scalar_type(), "cbn_write_entries", [&] {
    using T = scalar_t;
    const int64_t layers = static_cast<int64_t>(batch_means.size());
    TORCH_CHECK(batch_vars.size() == batch_means.size() && samples.size() == batch_means.size() &&
                    window_stats.size() == batch_means.size() && slots.size() == batch_means.size() &&
                    running_means.size() == batch_means.size() && running_vars.size() == batch_means.size() &&
                    batches_tracked.size() == batch_means.size() && momenta.size() == batch_means.size() &&
                    pooled_means.size() == batch_means.size() && pooled_vars.size() == batch_means.size() &&
                    window_samples.size() == batch_means.size(),
                "cbn.write_entries: one value of every argument per layer");
    Tensor finite_flags = at::empty({layers}, at::kBool);
    bool* flags = finite_flags.mutable_data_ptr<bool>();
    int64_t total = 0;
    for (const Tensor& mean : batch_means) {
      total += mean.numel();
    }
    const T* mean_shift = mean_shifts.has_value() ? values_of<T>(*mean_shifts, total) : nullptr;
    const T* var_shift = var_shifts.has_value() ? values_of<T>(*var_shifts, total) : nullptr;
    // Every argument is checked before anything is written: no state is left half-updated.
    for (int64_t l = 0; l < layers; ++l) {
      const int64_t channels = batch_means[l].numel();
      values_of<T>(batch_vars[l], channels);
      values_of<T>(pooled_means[l], channels);
      values_of<T>(pooled_vars[l], channels);
      if (window_samples.get(l).has_value()) {
        values_of<T>(*window_samples.get(l), channels);
      }
      const std::optional<Tensor> window = window_stats.get(l);
      if (window.has_value()) {
        TORCH_CHECK(window->dim() == 3 && window->size(1) == 5 && window->size(2) == channels && slots[l] >= 0 &&
                        slots[l] < window->size(0),
                    "cbn.write_entries: window ", window->sizes(), " and slot ", slots[l], " do not fit ", channels,
                    " channels");
        values_of<T>(*window, window->numel());
      }
      const std::optional<Tensor> running_mean = running_means.get(l);
      if (running_mean.has_value()) {
        values_of<T>(*running_mean, channels);
        TORCH_CHECK(running_vars.get(l).has_value(), "cbn.write_entries: a running mean without a running variance");
        values_of<T>(*running_vars.get(l), channels);
        const std::optional<Tensor> tracked = batches_tracked.get(l);
        TORCH_CHECK(tracked.has_value() && tracked->is_cpu() && tracked->scalar_type() == at::kLong &&
                        tracked->numel() == 1,
                    "cbn.write_entries: a layer with running statistics needs its int64 num_batches_tracked");
      }
    }
    int64_t offset = 0;
    for (int64_t l = 0; l < layers; ++l) {
      const int64_t channels = batch_means[l].numel();
      const T* mean = values_of<T>(batch_means[l], channels);
      const T* var = values_of<T>(batch_vars[l], channels);
      const T count = static_cast<T>(samples[l]);
      bool finite = all_finite(mean, channels) && all_finite(var, channels) && std::isfinite(count);
      if (mean_shift != nullptr) {
        finite = finite && all_finite(mean_shift + offset, channels) && all_finite(var_shift + offset, channels);
      }
      flags[l] = finite;

      const std::optional<Tensor> window = window_stats.get(l);
      if (window.has_value()) {
        T* slot = window->mutable_data_ptr<T>() + slots[l] * 5 * channels;
        for (int64_t c = 0; c < channels; ++c) {
          slot[c] = finite ? mean[c] : T(0);
          slot[channels + c] = finite ? var[c] : T(0);
          slot[2 * channels + c] = finite && mean_shift != nullptr ? mean_shift[offset + c] : T(0);
          slot[3 * channels + c] = finite && var_shift != nullptr ? var_shift[offset + c] : T(0);
          slot[4 * channels + c] = finite ? count : T(0);
        }
      }

      const std::optional<Tensor> running_mean = running_means.get(l);
      if (running_mean.has_value()) {
        int64_t* tracked = batches_tracked.get(l)->mutable_data_ptr<int64_t>();
        *tracked += 1;
        if (finite) {
          const double factor = momenta[l] >= 0 ? momenta[l] : 1.0 / static_cast<double>(*tracked);
          const std::optional<Tensor> past = window_samples.get(l);
          const T* past_samples = past.has_value() ? past->const_data_ptr<T>() : nullptr;
          const T* pooled_var = pooled_vars[l].const_data_ptr<T>();
          Tensor unbiased = at::empty({channels}, pooled_vars[l].options());
          T* unbiased_var = unbiased.mutable_data_ptr<T>();
          for (int64_t c = 0; c < channels; ++c) {
            const T pooled = past_samples != nullptr ? count + past_samples[c] : count;
            const T value = pooled_var[c] * (pooled / (pooled - T(1)));
            unbiased_var[c] = std::isfinite(value) ? value : T(0);
          }
          Tensor estimate = pooled_means[l];
          if (!all_finite(estimate.const_data_ptr<T>(), channels)) {
            estimate = at::nan_to_num(estimate, 0.0, 0.0, 0.0);
          }
          running_mean->lerp_(estimate, factor);
          running_vars.get(l)->lerp_(unbiased, factor);
        }
      }
      offset += channels;
    }
    finite = finite_flags;
  });
  return finite;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cbn, m) {
  // The (a!) .. (d!) annotations declare the tensors written in place, so that functionalization
  // and torch.library.opcheck know of them.
  m.def("write_entries(Tensor[] batch_means, Tensor[] batch_vars, Tensor? mean_shifts, Tensor? var_shifts, "
        "int[] samples, Tensor(a!)?[] window_stats, int[] slots, Tensor(b!)?[] running_means, "
        "Tensor(c!)?[] running_vars, Tensor(d!)?[] batches_tracked, float[] momenta, Tensor[] pooled_means, "
        "Tensor[] pooled_vars, "
        "Tensor?[] window_samples) -> Tensor");
  m.impl("write_entries", c10::DispatchKey::CompositeExplicitAutograd, &write_entries);
}

}  // namespace cbn
