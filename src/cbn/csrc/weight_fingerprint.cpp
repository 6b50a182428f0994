// The number by which a layer sees its producer's weights change
// (cbn.producer_call.producer_fingerprint): sum over tensors of tensors[i] . probes[i], summed
// here in one call instead of a view, a dot product and a read-back per tensor (at batch 1-2
// each ATen operation is a dispatch that costs more than the values). Contiguous float CPU
// tensors; other ones take ATen's dot. Summed in double in a fixed order: unchanged values give
// the same number.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

namespace cbn {
namespace {

using at::Tensor;

template <typename scalar_t>
double probed_sum(const scalar_t* x, const scalar_t* probe, int64_t n) {
  constexpr int kLanes = 16;
  scalar_t lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int k = 0; k < kLanes; ++k) lanes[k] += x[j + k] * probe[j + k];
  }
  double total = 0;
  for (; j < n; ++j) total += static_cast<double>(x[j]) * static_cast<double>(probe[j]);
  for (int k = 0; k < kLanes; ++k) total += static_cast<double>(lanes[k]);
  return total;
}

double weight_fingerprint(at::TensorList tensors, at::TensorList probes) {
  TORCH_CHECK(tensors.size() == probes.size(), "cbn.weight_fingerprint: one probe per tensor");
  double total = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const Tensor& values = tensors[i];
    const Tensor& probe = probes[i];
    TORCH_CHECK(values.numel() == probe.numel(), "cbn.weight_fingerprint: a probe of ", probe.numel(),
                " values for a tensor of ", values.numel());
    const auto dtype = values.scalar_type();
    if (!values.is_cpu() || !values.is_contiguous() || !probe.is_contiguous() || probe.scalar_type() != dtype ||
        (dtype != at::kFloat && dtype != at::kDouble)) {
      total += at::dot(values.reshape({-1}), probe.reshape({-1}).to(values.options())).item<double>();
      continue;
    }
    AT_DISPATCH_FLOATING_TYPES(dtype, "cbn_weight_fingerprint", [&] {
      total += probed_sum(values.const_data_ptr<scalar_t>(), probe.const_data_ptr<scalar_t>(), values.numel());
    });
  }
  return total;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cbn, m) {
  m.def("weight_fingerprint(Tensor[] tensors, Tensor[] probes) -> float");
  m.impl("weight_fingerprint", c10::DispatchKey::CompositeImplicitAutograd, &weight_fingerprint);
}

}  // namespace cbn
