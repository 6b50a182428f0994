// A number that changes when a producer's weight or bias changes (cbn.producer_call.producer_fingerprint):
// sum_i x[i] h(i) over the values of each tensor in their logical order, with the pseudo-random
// weights h(i) = 0.5 + (((i * 2654435761) mod 2^32) >> 8) / 2^24 in [0.5, 1.5) made in registers,
// so the weight is read once and nothing else (the Python form reads a probe as large as the
// weight beside it). Summed in double in a fixed order: unchanged values give the same number.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cstdint>

namespace cbn {
namespace {

using at::Tensor;

inline double probe(uint64_t i) {
  const uint32_t hashed = static_cast<uint32_t>(i * 2654435761u);
  return 0.5 + static_cast<double>(hashed >> 8) * (1.0 / 16777216.0);
}

double weight_fingerprint(at::TensorList tensors) {
  double total = 0;
  for (const Tensor& tensor : tensors) {
    if (!tensor.defined() || tensor.numel() == 0) continue;
    TORCH_CHECK(tensor.is_cpu(), "cbn.weight_fingerprint: CPU tensors only (got ", tensor.device(), ")");
    const Tensor values = tensor.contiguous();
    const int64_t n = values.numel();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "cbn_weight_fingerprint", [&] {
      const scalar_t* x = values.const_data_ptr<scalar_t>();
      constexpr int kLanes = 8;
      double lanes[kLanes] = {};
      int64_t i = 0;
      for (; i + kLanes <= n; i += kLanes) {
        for (int k = 0; k < kLanes; ++k) lanes[k] += static_cast<double>(x[i + k]) * probe(i + k);
      }
      for (; i < n; ++i) total += static_cast<double>(x[i]) * probe(i);
      for (int k = 0; k < kLanes; ++k) total += lanes[k];
    });
  }
  return total;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cbn, m) {
  m.def("weight_fingerprint(Tensor[] tensors) -> float");
  m.impl("weight_fingerprint", c10::DispatchKey::CompositeImplicitAutograd, &weight_fingerprint);
}

}  // namespace cbn
