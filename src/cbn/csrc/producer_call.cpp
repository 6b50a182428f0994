// Pairing and the producer's fingerprint in one call: the C++ form of the common case of
// cbn.producer_call.find_producer_call and producer_fingerprint, read at every training call of a
// norm layer.
//
// At batch 1-2 a norm's call costs more in Python than in arithmetic, and more right after its
// producer's convolution, which has evicted the interpreter's data from the caches: reading
// autograd's record through Python attributes (the node's type name, its saved tensors and
// settings, the leaves behind its next functions) and then dispatching the fingerprint cost some
// 45 us per layer in a ResNet-20 step, against under 10 us hot. Here the record is read as the
// structs autograd keeps, and the fingerprint taken from the weight just found.
//
// Only the plain case is taken: the norm's input is the output of a convolution
// (ConvolutionBackward0, no view between them), whose weight is a trainable leaf (its
// AccumulateGrad), whose bias is absent, frozen or a leaf, with no saved-tensor hooks anywhere
// (activation checkpointing), on host tensors of the probes' dtype. Everything else (views, linear
// maps, casts, computed weights, checkpointing, other devices, the refusals and their words)
// returns no weight, and Python reads the record as before: one code path per producer, so its
// fingerprint is always taken by the same function with the same probes.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/SavedTensorHooks.h>
#include <torch/csrc/autograd/functions/accumulate_grad.h>
#include <torch/csrc/autograd/generated/Functions.h>
#include <torch/library.h>

#include "cpu_simd.h"

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

namespace cbn {
namespace {

using at::Tensor;
using torch::autograd::Node;

// sum_j values[j] (lanes[j % L] + blocks[(j / L) % B]) for the L values of the lane probe and the
// B values of the block probe: per block of L values, the dot product with the lane probe shifted
// by the block's value. Only the values stream from memory; the lane probe (L values) stays in the
// L1 cache beside them and the block probe is read once per L values.
template <typename scalar_t>
double probed_dot(const scalar_t* values, int64_t n, const scalar_t* lanes, int64_t lane_count,
                  const scalar_t* blocks, int64_t block_count) {
  double total = 0;
  for (int64_t j = 0, block = 0; j < n; j += lane_count, block = (block + 1) % block_count) {
    total += static_cast<double>(simd::dot_with_shift(values + j, lanes, blocks[block], std::min(lane_count, n - j)));
  }
  return total;
}

// The number by which a layer sees its producer's weights change
// (cbn.producer_call.producer_fingerprint): sum over tensors of the dot product of their values,
// in memory order, with the probe lanes[j % L] + blocks[(j / L) % B], in one call instead of
// several ATen operations and a read-back per tensor (at batch 1-2 each is a dispatch that costs
// more than the values). Two positions get the same pair of probe values only L B values apart, so
// any single change, and any exchange of two values closer than that, changes the number.
// Contiguous float CPU tensors take the loop above; other ones an ATen dot product with the whole
// probe. Unchanged values give the same number.
double weight_fingerprint(at::TensorList tensors, const Tensor& lanes, const Tensor& blocks) {
  TORCH_CHECK(lanes.dim() == 1 && blocks.dim() == 1 && lanes.numel() > 0 && blocks.numel() > 0 &&
                  lanes.scalar_type() == blocks.scalar_type(),
              "cbn.weight_fingerprint: two 1-D probes of one dtype");
  const at::NoGradGuard no_grad;  // (the ATen form's products: a number, nothing for autograd to record)
  double total = 0;
  for (const Tensor& values : tensors) {
    const auto dtype = values.scalar_type();
    const int64_t n = values.numel();
    if (n == 0) {
      continue;
    }
    if (!values.is_cpu() || !values.is_contiguous() || lanes.scalar_type() != dtype || !lanes.is_cpu() ||
        !blocks.is_cpu() || (dtype != at::kFloat && dtype != at::kDouble)) {
      const int64_t lane_count = lanes.numel(), block_count = blocks.numel();
      const Tensor lane_part = lanes.repeat({(n + lane_count - 1) / lane_count}).narrow(0, 0, n);
      const Tensor block_index = at::arange(n, lanes.options().dtype(at::kLong)).div_(lane_count, "floor")
                                     .remainder_(block_count);
      const Tensor probe = (lane_part + blocks.index_select(0, block_index)).to(values.options());
      total += at::dot(values.reshape({-1}), probe).item<double>();
      continue;
    }
    const Tensor l = lanes.contiguous(), b = blocks.contiguous();
    AT_DISPATCH_FLOATING_TYPES(dtype, "cbn_weight_fingerprint", [&] {
      simd::run([&] {
        total += probed_dot(values.const_data_ptr<scalar_t>(), n, l.const_data_ptr<scalar_t>(), l.numel(),
                            b.const_data_ptr<scalar_t>(), b.numel());
      });
    });
  }
  return total;
}

// The parameter behind an input edge of a node when it is that parameter's AccumulateGrad.
// (A template: autograd's pointer to a node is a std::shared_ptr in some torch releases and a
// c10::intrusive_ptr in others.)
template <typename NodePointer>
std::optional<Tensor> leaf_of(const NodePointer& function) {
  if (!function || function->name() != "torch::autograd::AccumulateGrad") {
    return std::nullopt;
  }
  return static_cast<const torch::autograd::AccumulateGrad*>(function.get())->variable;
}

// A plain host tensor of the probes' dtype (no subclass, storage present: not resharded).
bool plain(const Tensor& tensor, at::ScalarType dtype) {
  const auto* impl = tensor.unsafeGetTensorImpl();
  return tensor.is_cpu() && tensor.scalar_type() == dtype && !impl->is_python_dispatch() && impl->has_storage() &&
         (tensor.numel() == 0 || tensor.storage().nbytes() > 0);
}

using Found = std::tuple<std::optional<Tensor>, std::optional<Tensor>, std::optional<Tensor>, std::vector<int64_t>,
                         double>;

// (weight, bias, producer input, settings, fingerprint) of the convolution that produced `input`,
// settings = [transposed, groups, bias kind (0 none, 1 frozen, 2 parameter), stride..., padding...,
// dilation..., output padding...]; no weight where the case is not the plain one (see the top).
Found convolution_producer(const Tensor& input, int64_t num_features, const Tensor& lanes, const Tensor& blocks) {
  const Found not_taken{std::nullopt, std::nullopt, std::nullopt, {}, 0.0};
  const auto& node = input.grad_fn();
  if (!node || node->name() != "ConvolutionBackward0" || at::SavedTensorDefaultHooks::get_hooks().has_value()) {
    return not_taken;
  }
  const auto* convolution = static_cast<const torch::autograd::generated::ConvolutionBackward0*>(node.get());
  if (convolution->input_.has_hooks() || convolution->weight_.has_hooks() || node->num_outputs() < 3) {
    return not_taken;
  }
  const std::optional<Tensor> weight = leaf_of(node->next_edge(1).function);
  const auto dtype = lanes.scalar_type();
  if (!weight || !weight->requires_grad() || !plain(*weight, dtype)) {
    return not_taken;
  }
  const int64_t groups = convolution->groups.expect_int();
  const bool transposed = convolution->transposed;
  const int64_t channels = transposed ? weight->size(1) * groups : weight->size(0);
  if (channels != num_features || input.dim() < 2 || input.size(1) != num_features) {
    return not_taken;
  }
  int64_t bias_kind = 0;
  std::optional<Tensor> bias;
  if (convolution->bias_sym_sizes_opt.list.has_value()) {
    const auto& function = node->next_edge(2).function;
    if (!function) {
      bias_kind = 1;  // no gradient: a constant, which the Taylor step cancels
    } else {
      bias = leaf_of(function);
      if (!bias || !plain(*bias, dtype)) {
        return not_taken;
      }
      bias_kind = 2;
    }
  }
  std::vector<int64_t> settings{transposed, groups, bias_kind};
  for (const auto* values : {&convolution->stride, &convolution->padding, &convolution->dilation,
                             &convolution->output_padding}) {
    for (const c10::SymInt& value : *values) {
      settings.push_back(value.expect_int());
    }
  }
  std::vector<Tensor> probed{*weight};
  if (bias) {
    probed.push_back(*bias);
  }
  const double fingerprint = weight_fingerprint(probed, lanes, blocks);
  return Found{weight, bias, convolution->input_.unpack(), std::move(settings), fingerprint};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cbn, m) {
  m.def("weight_fingerprint(Tensor[] tensors, Tensor lanes, Tensor blocks) -> float");
  m.impl("weight_fingerprint", c10::DispatchKey::CompositeImplicitAutograd, &weight_fingerprint);
  m.def("convolution_producer(Tensor input, int num_features, Tensor lanes, Tensor blocks) -> "
        "(Tensor? weight, Tensor? bias, Tensor? producer_input, int[] settings, float fingerprint)");
  m.impl("convolution_producer", c10::DispatchKey::CompositeImplicitAutograd, &convolution_producer);
}

}  // namespace cbn
