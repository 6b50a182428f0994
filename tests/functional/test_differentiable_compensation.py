"""Differentiable compensation against autograd of the explicit pooled formula (float64 oracle)."""

import copy

import pytest
import torch
from torch import nn

import cbn
from cbn import kernels
from cbn.functional import PastStatistics, cross_iteration_batch_norm
from cbn.functional.differentiable_compensation import differentiable_past
from cbn.functional.normalization import traceable_cross_iteration_batch_norm
from cbn.functional.statistic_gradients import StatisticGradients, statistic_shifts
from oracle import DenseJacobianCBN, train_beside_oracle

CASES = {
    "conv2d_stride_groups": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (3, 4, 9, 9)),
    "conv2d_no_bias": (lambda: nn.Conv2d(3, 4, 3, padding=1, bias=False), (2, 3, 6, 6)),
    "linear": (lambda: nn.Linear(6, 5), (4, 6)),
    "conv_transpose2d_groups": (
        lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), (3, 4, 4, 4)),
    "conv1d_batch8": (lambda: nn.Conv1d(3, 5, 3, stride=2), (8, 3, 9)),  # the split mean-patch form
}


def _out_channels(producer):
    return producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels


def _against_oracle(make_producer, input_shape, steps=7, lr=0.2, burnin=0, window=4, use_kernels=True, seed=0,
                    device="cpu"):
    """Trains a converted producer + CBN(differentiable) and the oracle side by side, comparing the
    output and every gradient at every step; returns the number of steps that pooled a clamped entry."""
    torch.manual_seed(seed)
    producer = make_producer().double().to(device)
    norm = cbn.CrossIterationBatchNorm(_out_channels(producer), window=window, burnin=burnin,
                                       differentiable_compensation=True, dtype=torch.float64, device=device)
    oracle = DenseJacobianCBN(producer, window=window, compensate=True, differentiable=True)
    clamped_steps = 0

    def count_clamped(step):
        nonlocal clamped_steps
        if step > burnin:
            clamped_steps += int(bool((norm.window_statistics()["var_compensated"] == 0).any()))

    with kernels.use_kernels(use_kernels):
        train_beside_oracle(producer, norm, oracle, input_shape, steps, lr=lr, burnin=burnin, on_step=count_clamped)
    return clamped_steps


@pytest.mark.parametrize("use_kernels", [True, False], ids=["cpp", "python"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_autograd_of_the_explicit_pooled_formula(case, use_kernels):
    # Seven steps of window 4: fillings 1, 2, 3 and then a full ring that overwrites its oldest slot
    # after each forward (before the backward reads what it needs).
    make_producer, shape = CASES[case]
    _against_oracle(make_producer, shape, use_kernels=use_kernels)


@pytest.mark.parametrize("use_kernels", [True, False], ids=["cpp", "python"])
def test_two_layers_prepared_together_match_the_chained_oracles(use_kernels):
    # In a model, the layers' summaries and Jacobians are prepared together before the forward
    # (concatenated windows): two convolutions of different widths, each checked by its oracle.
    torch.manual_seed(1)
    conv1, conv2 = nn.Conv2d(3, 4, 3, padding=1).double(), nn.Conv2d(4, 6, 3, stride=2, groups=2).double()
    model = cbn.convert_model(nn.Sequential(conv1, nn.BatchNorm2d(4), nn.ReLU(), conv2, nn.BatchNorm2d(6)).double(),
                              window=3, differentiable_compensation=True)
    norms = (model[1], model[4])
    with torch.no_grad():
        for norm in norms:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    oracles = [DenseJacobianCBN(conv, window=3, compensate=True, differentiable=True) for conv in (conv1, conv2)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    with kernels.use_kernels(use_kernels):
        for _ in range(5):
            x = torch.randn(2, 3, 7, 7, dtype=torch.float64) * 2 + 0.5
            out = model(x)
            projection = torch.randn_like(out)
            (out * projection).sum().backward()
            affine = [p.detach().clone().requires_grad_() for norm in norms for p in (norm.weight, norm.bias)]
            hidden, _, _ = oracles[0](x, *affine[:2])
            expected, _, _ = oracles[1](torch.relu(hidden), *affine[2:])
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)
            leaves = [conv1.weight, conv1.bias, conv2.weight, conv2.bias]
            expected_grads = torch.autograd.grad((expected * projection).sum(), leaves + affine)
            actual = [conv1.weight.grad, conv1.bias.grad, conv2.weight.grad, conv2.bias.grad,
                      *(p.grad for norm in norms for p in (norm.weight, norm.bias))]
            for a, b in zip(actual, expected_grads):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
            optimizer.step()
            optimizer.zero_grad()
    assert norms[1].window_state.positions[0].var_grad.abs().sum() > 0


def test_matches_oracle_across_burnin_and_window_two():
    make_producer, shape = CASES["conv2d_stride_groups"]
    _against_oracle(make_producer, shape, steps=6, burnin=3)
    _against_oracle(make_producer, shape, steps=4, window=2)


def test_matches_oracle_where_the_clamp_acts():
    # A large step moves second moments below mu^2: those entries are clamped (the clamp's
    # gradient is zero there, as autograd of max(nu, mu^2) gives), and the gradients still match.
    clamped = _against_oracle(lambda: nn.Linear(3, 4), (3, 3), steps=8, lr=1.5, seed=3)
    assert clamped > 0


def test_input_gradients_equal_the_paper_variant_and_weight_gradients_do_not():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).double()
    paper = cbn.convert_model(copy.deepcopy(base), window=3, differentiable_compensation=False)
    differentiable = cbn.convert_model(copy.deepcopy(base), window=3, differentiable_compensation=True)
    optimizer = torch.optim.SGD(paper.parameters(), lr=0.3)
    for step in range(4):
        x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
        projection = torch.randn(2, 4, 5, 5, dtype=torch.float64)
        results = []
        for model in (paper, differentiable):
            x_leaf = x.clone().requires_grad_()
            out = model(x_leaf)
            (out * projection).sum().backward()
            results.append((out.detach(), x_leaf.grad, model[0].weight.grad, model[0].bias.grad))
        (out_p, dx_p, dw_p, db_p), (out_d, dx_d, dw_d, db_d) = results
        torch.testing.assert_close(out_d, out_p, rtol=0, atol=1e-12)
        torch.testing.assert_close(dx_d, dx_p, rtol=0, atol=1e-12)
        if step > 0:  # past entries are pooled: the producer's gradients differ
            assert (dw_d - dw_p).abs().max() > 1e-3
            assert (db_d - db_p).abs().max() > 1e-3
        # Both models take the paper model's step, so that they see the same weights.
        optimizer.step()
        with torch.no_grad():
            for p_paper, p in zip(paper.parameters(), differentiable.parameters()):
                p.copy_(p_paper)
        paper.zero_grad()
        differentiable.zero_grad()


def _random_window(channels=4, entries=3, fan_in=5, groups=1, dtype=torch.float64):
    generator = torch.Generator().manual_seed(11)
    stats = torch.randn(entries, 5, channels, generator=generator, dtype=dtype)
    stats[:, 1] = stats[:, 1].abs() + 0.5  # variances
    stats[:, 4] = 10.0
    stats[-1, :] = 0.0  # an empty slot
    mean_grad = torch.randn(groups, entries, fan_in, generator=generator, dtype=dtype)
    var_grad = torch.randn(channels, entries, fan_in, generator=generator, dtype=dtype)
    mean_grad[:, -1] = var_grad[:, -1] = 0.0
    return stats, mean_grad, var_grad


@pytest.mark.parametrize("groups", [1, 2])
def test_hand_written_backward_equals_autograd_of_the_plain_operations(groups):
    stats, mean_grad, var_grad = _random_window(groups=groups)
    weight = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 4, 2, dtype=torch.float64)
    projection = torch.randn(3, 4, 2, dtype=torch.float64)
    with torch.no_grad():
        shifts = statistic_shifts(StatisticGradients(mean_grad, var_grad), weight, bias)
    results = []
    for past in (differentiable_past(stats, mean_grad, var_grad, weight, bias, *shifts),
                 plain_differentiable_past(stats, mean_grad, var_grad, weight, bias)):
        out, _ = traceable_cross_iteration_batch_norm(x, past, None, None, 1e-5, torch.float64)
        results.append([out, *torch.autograd.grad((out * projection).sum(), (weight, bias))])
    for hand, plain in zip(*results):
        torch.testing.assert_close(hand, plain, rtol=0, atol=1e-12)
    assert results[0][1].abs().max() > 0


def plain_differentiable_past(stats, mean_grad, var_grad, weight, bias):
    # Autograd through the first-order terms and the library's move and summary.
    from cbn.functional.window import pool_window

    shifts = statistic_shifts(StatisticGradients(mean_grad, var_grad), weight, bias)
    return pool_window(stats, *shifts)


def test_gradcheck_through_the_past_summary():
    stats, mean_grad, var_grad = _random_window(groups=2)
    x = torch.randn(3, 4, 2, dtype=torch.float64)

    def forward(weight, bias):
        with torch.no_grad():
            shifts = statistic_shifts(StatisticGradients(mean_grad, var_grad), weight, bias)
        past = differentiable_past(stats, mean_grad, var_grad, weight, bias, *shifts)
        return cross_iteration_batch_norm(x, past, None, None, 1e-5, torch.float64)[0]

    weight = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    with kernels.use_kernels(False):
        assert torch.autograd.gradcheck(forward, (weight, bias))


@pytest.mark.parametrize("form", ["python", "cpp_fused", "cpp_other"])
def test_normalization_gradients_of_the_past_summary(form):
    # dL/dc and dL/d(P/n) from the hand-written backwards against autograd of the plain formula.
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, dtype=torch.float64) * 2 + 1
    if form == "cpp_other":
        x = x.transpose(0, 2).contiguous().transpose(0, 2)  # not contiguous: the unfused C++ form
    gamma, beta = torch.rand(4, dtype=torch.float64) + 0.5, torch.randn(4, dtype=torch.float64)
    center = torch.randn(4, dtype=torch.float64)
    spread = torch.rand(4, dtype=torch.float64) * 3
    count = torch.tensor([2.0, 2.0, 1.0, 2.0], dtype=torch.float64)
    projection = torch.randn_like(x)
    results = []
    for function, active in ((cross_iteration_batch_norm, form != "python"), (traceable_cross_iteration_batch_norm, False)):
        leaves = [t.clone().requires_grad_() for t in (x, gamma, beta, center, spread)]
        past = PastStatistics(leaves[3], leaves[4], count)
        with kernels.use_kernels(active):
            out, _ = function(leaves[0], past, leaves[1], leaves[2], 1e-5, torch.float64)
            results.append(torch.autograd.grad((out * projection).sum(), leaves))
    for hand, plain in zip(*results):
        torch.testing.assert_close(hand, plain, rtol=0, atol=1e-12)


def test_naive_averaging_refuses_the_option():
    with pytest.raises(ValueError, match="compensate=True"):
        cbn.CrossIterationBatchNorm2d(4, compensate=False, differentiable_compensation=True)


def test_the_default_is_differentiable_wherever_compensation_is_on():
    assert cbn.CrossIterationBatchNorm2d(4).differentiable_compensation is True
    assert cbn.CrossIterationBatchNorm2d(4, compensate=False).differentiable_compensation is False
    paper = cbn.CrossIterationBatchNorm2d(4, differentiable_compensation=False)
    assert paper.differentiable_compensation is False and "differentiable_compensation=False" in repr(paper)
    converted = cbn.convert_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), window=3)
    assert converted[1].differentiable_compensation is True
    naive = cbn.convert_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), window=3, compensate=False)
    assert naive[1].differentiable_compensation is False


def _small_model(dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.ConvTranspose2d(4, 4, 3, padding=1, groups=2), nn.BatchNorm2d(4),
                          nn.Flatten(), nn.Linear(4 * 36, 6), nn.BatchNorm1d(6))
    return cbn.convert_model(model.to(dtype), window=3, differentiable_compensation=True, **kwargs)


def _train_with_gradients(model, batches, autocast=False):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trace = []
    for x in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        loss = (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().to(x.dtype)
        optimizer.zero_grad()
        loss.backward()
        trace.append([out.detach().to(x.dtype)] + [p.grad.clone() for p in model.parameters()])
        optimizer.step()
    return trace


def test_bf16_autocast_gives_the_float32_gradients_to_bf16_precision():
    # At every step, a copy of the float32 model (weights and window) runs the same batch under
    # autocast: the layer keeps its statistics and window in float32, the producers run in
    # bfloat16, so one step's gradients follow float32's to bfloat16's precision.
    generator = torch.Generator().manual_seed(4)
    batches = [torch.randn(4, 3, 6, 6, generator=generator) * 2 + 0.5 for _ in range(4)]
    reference = _small_model()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for x in batches:
        amp = copy.deepcopy(reference)
        (out, *grads), = _train_with_gradients(amp, [x], autocast=True)
        (out_expected, *grads_expected), = _train_with_gradients(copy.deepcopy(reference), [x])
        assert amp[1].window_state.positions[0].stats.dtype == torch.float32
        # bf16: 8-bit mantissa, relative step 3.9e-3, over three layers; measured: outputs 0.4-0.9 %,
        # gradients 0.7-1.8 %, the same as the paper variant's (1.7 % at the first step, which has
        # no past). Gradients compared as one vector: a producer's bias gradient is a
        # near-cancellation (the current batch's term, which arrives in bf16, against the past's).
        assert (out - out_expected).norm() <= 2e-2 * out_expected.norm()
        flat, flat_expected = (torch.cat([g.flatten() for g in gs]) for gs in (grads, grads_expected))
        assert torch.isfinite(flat).all() and (flat - flat_expected).norm() <= 4e-2 * flat_expected.norm()
        reference(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert reference[1].window_state.positions[0].var_grad.abs().sum() > 0


def test_resume_from_state_dict_gives_the_same_gradients():
    generator = torch.Generator().manual_seed(5)
    batches = [torch.randn(2, 3, 6, 6, generator=generator) for _ in range(6)]
    model = _small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for x in batches[:3]:
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    resumed = _small_model()
    resumed.load_state_dict(copy.deepcopy(model.state_dict()))
    cbn.load_window_state_dict(resumed, copy.deepcopy(cbn.window_state_dict(model)))
    for x in batches[3:]:
        grads = []
        for m in (model, resumed):
            m(x).square().mean().backward()
            grads.append([p.grad.clone() for p in m.parameters()])
            m.zero_grad()
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        with torch.no_grad():
            for p, q in zip(model.parameters(), resumed.parameters()):
                p.sub_(0.1 * torch.ones_like(p))
                q.sub_(0.1 * torch.ones_like(q))


def cross_process_worker(rank, world_size, out_dir, steps=4):
    """In each of two gloo ranks: DDP + ``process_group`` with the option, against one process on
    the concatenated batches (validated against the oracle above); errors to ``out_dir/rank.json``.
    Nothing asserts between collectives, so a wrong result cannot leave the other rank waiting."""
    import json
    import os
    import warnings

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    batch = (2, 3)  # unequal counts exercise the pooling weights

    def make(**kwargs):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
        return cbn.convert_model(model.double(), window=3, differentiable_compensation=True, **kwargs)

    reference, model = make(), make(process_group=dist.group.WORLD)
    ddp = DistributedDataParallel(model)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9) for m in (model, reference)]
    rows = slice(sum(batch[:rank]), sum(batch[: rank + 1]))
    errors = dict(output=0.0, input_grad=0.0, param_grad=0.0)
    for step in range(steps):
        generator = torch.Generator().manual_seed(100 + step)
        xs = [torch.randn(b, 3, 5, 5, generator=generator, dtype=torch.float64) * 2 + 1 for b in batch]
        projections = [torch.randn(b, 2, 5, 5, generator=generator, dtype=torch.float64) for b in batch]
        x = xs[rank].clone().requires_grad_()
        out = ddp(x)
        (out * projections[rank]).sum().backward()
        x_cat = torch.cat(xs).requires_grad_()
        out_cat = reference(x_cat)
        # DDP averages the ranks' gradients: the reference loss is the mean of the ranks' losses.
        ((out_cat * torch.cat(projections)).sum() / world_size).backward()
        errors["output"] = max(errors["output"], float((out - out_cat[rows]).abs().max()))
        errors["input_grad"] = max(errors["input_grad"],
                                   float((x.grad - x_cat.grad[rows] * world_size).abs().max()))
        for p, q in zip(model.parameters(), reference.parameters()):
            errors["param_grad"] = max(errors["param_grad"], float((p.grad - q.grad).abs().max()))
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump(errors, f)


def test_cross_process_pooling_equals_one_process_on_the_concatenated_batches(tmp_path):
    import json

    from cbn.distributed import launch

    launch(cross_process_worker, 2, str(tmp_path), timeout_s=90)
    for rank in range(2):
        errors = json.loads((tmp_path / f"{rank}.json").read_text())
        for key, error in errors.items():
            assert error < 1e-9, (rank, key, errors)


@pytest.mark.parametrize("case", ["weight_standardized", "weight_norm_parametrization"])
def test_custom_producers_match_the_oracle(case):
    # The gradient reaches the producer's raw parameters through the weight its convolution really
    # used (a standardized weight, a weight_norm parametrization).
    from test_producer_call import CASES as PRODUCERS

    make_producer, description, shape = PRODUCERS[case]
    torch.manual_seed(0)
    producer = make_producer().double()
    norm = cbn.CrossIterationBatchNorm2d(4, window=4, differentiable_compensation=True, dtype=torch.float64)
    model = cbn.convert_model(nn.Sequential(producer, norm))
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    oracle = DenseJacobianCBN(producer, window=4, compensate=True, differentiable=True, **description)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    producer_params = list(producer.parameters())
    for _ in range(6):
        x = torch.randn(shape, dtype=torch.float64) * 2 + 0.5
        out = model(x)
        projection = torch.randn_like(out)
        (out * projection).sum().backward()
        gamma = norm.weight.detach().clone().requires_grad_()
        beta = norm.bias.detach().clone().requires_grad_()
        expected, _, _ = oracle(x, gamma, beta)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)
        expected_grads = torch.autograd.grad((expected * projection).sum(), producer_params + [gamma, beta])
        for got, want in zip([p.grad for p in producer_params] + [norm.weight.grad, norm.bias.grad], expected_grads):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
        optimizer.step()
        optimizer.zero_grad()


def test_training_forward_without_autograd_equals_the_paper_variant():
    # Under torch.no_grad() the option changes nothing: the same values as the paper's rule.
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
                         nn.BatchNorm2d(4)).double()
    paper = cbn.convert_model(copy.deepcopy(base), window=3, differentiable_compensation=False)
    differentiable = cbn.convert_model(copy.deepcopy(base), window=3, differentiable_compensation=True)
    for step in range(4):
        x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(differentiable(x), paper(x), rtol=0, atol=1e-12)
            for model in (paper, differentiable):
                for p in model.parameters():
                    p.add_(0.05 * (step + 1))


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_gives_the_gradients_of_the_plain_model(use_reentrant):
    # The recompute normalizes with the original forward's summary; with use_reentrant=True the
    # original forward ran without autograd, and the recompute attaches the kept Jacobians.
    from torch.utils.checkpoint import checkpoint

    def train(model, forward):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        generator = torch.Generator().manual_seed(1)
        gradients = []
        for _ in range(5):
            x = torch.randn(2, 3, 6, 6, generator=generator)
            forward(model, x).square().mean().backward()
            gradients.append([p.grad.clone() for p in model.parameters()])
            optimizer.step()
            optimizer.zero_grad()
        return gradients

    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.ConvTranspose2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
    model = cbn.convert_model(block, window=3, differentiable_compensation=True)
    checkpointed = copy.deepcopy(model)
    plain = train(model, lambda m, x: m(x))
    recomputed = train(checkpointed, lambda m, x: checkpoint(m, x.requires_grad_(use_reentrant),
                                                             use_reentrant=use_reentrant))
    paper = train(cbn.convert_model(copy.deepcopy(block), window=3, differentiable_compensation=False),
                  lambda m, x: m(x))
    for step_plain, step_recomputed in zip(plain, recomputed):
        for a, b in zip(step_plain, step_recomputed):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    assert (plain[-1][0] - paper[-1][0]).abs().max() > 1e-4  # the option was at work


def test_a_norm_shared_over_levels_matches_one_oracle_per_level():
    # One convolution and one norm applied to three feature-pyramid levels: each call position
    # keeps its own window, and the producer's gradient sums the levels' (each level's oracle).
    from test_shared_norms import LEVEL_SIZES, _levels, _SharedHead

    model = cbn.convert_model(_SharedHead(nn.BatchNorm2d(4)).double(), window=3, differentiable_compensation=True)
    oracles = [DenseJacobianCBN(model.conv, window=3, compensate=True, differentiable=True) for _ in LEVEL_SIZES]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    generator = torch.Generator().manual_seed(2)
    for _ in range(5):
        levels = _levels(generator)
        gamma = model.norm.weight.detach().clone().requires_grad_()
        beta = model.norm.bias.detach().clone().requires_grad_()
        expected = [oracle(x, gamma, beta)[0] for oracle, x in zip(oracles, levels)]
        projections = [torch.linspace(-1, 1, e.numel(), dtype=e.dtype).view_as(e) for e in expected]
        leaves = [model.conv.weight, model.conv.bias, gamma, beta]
        expected_grads = torch.autograd.grad(sum((e * p).sum() for e, p in zip(expected, projections)), leaves)
        outputs = model(levels)
        sum((out * p).sum() for out, p in zip(outputs, projections)).backward()
        for out, reference in zip(outputs, expected):
            torch.testing.assert_close(out, reference, rtol=0, atol=1e-9)
        actual = [model.conv.weight.grad, model.conv.bias.grad, model.norm.weight.grad, model.norm.bias.grad]
        for a, b in zip(actual, expected_grads):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
        optimizer.step()
        optimizer.zero_grad()
