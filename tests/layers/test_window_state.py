"""The window keeps each entry's statistic gradients as tensors of their own and never writes them.

What a summary's backward reads must be what its forward pooled: these tests hold the slots'
tensors themselves (identity and values) across every write the window makes.
"""

import copy

import pytest
import torch

from cbn.layers.window_state import CrossIterationWindow, PositionWindow, write_gradient_slots


def _position(channels=4, past=3, groups=1, fan_in=5):
    position = PositionWindow(channels, past, torch.float32, None)
    position.ensure_gradients(groups, fan_in)
    return position


def _entry(channels=4, groups=1, fan_in=5, value=1.0):
    return torch.full((groups, fan_in), value), torch.full((channels, fan_in), value)


def test_a_new_entry_becomes_its_slots_tensors_and_a_summary_keeps_the_ones_it_pooled():
    position = _position()
    mean, var = _entry(value=2.0)
    write_gradient_slots([(position, 1, (mean, var))], finite=True)
    assert position.mean_slots[1] is mean and position.var_slots[1] is var  # kept, not copied
    pooled = position.reader()
    newer = _entry(value=3.0)
    write_gradient_slots([(position, 1, newer)], finite=True)
    assert position.var_slots[1] is newer[1]
    # The summary still reads the entry it pooled, unchanged.
    assert pooled.var_slots[1] is var and torch.equal(var, torch.full((4, 5), 2.0))
    assert torch.equal(pooled.var[:, 1], var) and pooled.var.shape == (4, 3, 5)


def test_clearing_emptying_and_non_finite_entries_replace_tensors_never_write_them():
    position = _position()
    mean, var = _entry(value=2.0)
    write_gradient_slots([(position, 0, (mean, var))], finite=True)
    pooled = position.reader()
    write_gradient_slots([(position, 0, None)], finite=True)  # an entry stored without gradients
    assert torch.equal(position.var_slots[0], torch.zeros(4, 5))
    bad_mean, bad_var = _entry(value=2.0)
    bad_var[0, 0] = float("nan")
    write_gradient_slots([(position, 2, (bad_mean, bad_var))], finite=False)
    assert torch.isfinite(position.var_slots[2]).all() and position.var_slots[2][0, 0] == 0
    assert torch.isnan(bad_var[0, 0])  # the caller's tensor is left as it was
    position.empty()
    assert all(torch.equal(t, torch.zeros(4, 5)) for t in position.var_slots)
    assert torch.equal(pooled.var_slots[0], torch.full((4, 5), 2.0)) and pooled.var_slots[0] is var


def test_copies_state_dicts_and_casts_take_their_own_tensors():
    window = CrossIterationWindow(4, 4, torch.float32)
    position = window.positions[0]
    position.ensure_gradients(2, 5)
    write_gradient_slots([(position, t, _entry(groups=2, value=float(t + 1))) for t in range(3)], finite=True)
    clone = copy.deepcopy(window)
    assert all(a is not b and torch.equal(a, b) for a, b in zip(clone.positions[0].var_slots, position.var_slots))
    restored = CrossIterationWindow(4, 4, torch.float32)
    restored.load_state_dict(window.state_dict())
    assert torch.equal(restored.positions[0].var_grad, position.var_grad)
    assert restored.positions[0].mean_grad.shape == (2, 3, 5)
    window.apply(lambda t: t.double())
    assert all(t.dtype == torch.float64 for t in window.positions[0].var_slots)
    window.apply(lambda t: t.half())  # statistics and gradients stay float32 or wider
    assert all(t.dtype == torch.float32 for t in window.positions[0].var_slots + window.positions[0].mean_slots)


def test_bytes_count_a_tensor_shared_by_empty_slots_once():
    position_bytes = 3 * 5 * 4 * 4  # stats (past, 5, C) in float32
    window = CrossIterationWindow(4, 4, torch.float32)
    window.positions[0].ensure_gradients(1, 5)
    zeros = (1 * 5 + 4 * 5) * 4  # one zero tensor each for the mean and the variance slots
    assert window.nbytes() == position_bytes + zeros
    write_gradient_slots([(window.positions[0], 0, _entry())], finite=True)
    assert window.nbytes() == position_bytes + 2 * zeros


@pytest.mark.parametrize("layout", ["window views", "own tensors"])
def test_the_kernels_read_a_window_from_its_slots_in_either_layout(layout):
    import cbn.kernels
    from cbn.functional.statistic_gradients import StatisticGradients, statistic_shifts, statistic_shifts_of_layers

    assert cbn.kernels.active()
    torch.manual_seed(0)
    gradients = StatisticGradients(torch.randn(1, 3, 7), torch.randn(4, 3, 7))
    slots = [t.unbind(1) for t in gradients]
    if layout == "own tensors":
        slots = [[s.clone() for s in pieces] for pieces in slots]
    weight, bias = torch.randn(4, 7), torch.randn(4)
    with torch.no_grad():
        mean, var = statistic_shifts_of_layers([(*slots, weight, bias)])
        with cbn.kernels.use_kernels(False):
            mean_python, var_python = statistic_shifts_of_layers([(*slots, weight, bias)])
    exact = statistic_shifts(StatisticGradients(gradients.mean.double(), gradients.var.double()), weight.double(),
                             bias.double())
    for fast, python, reference in ((mean, mean_python, exact[0]), (var, var_python, exact[1])):
        torch.testing.assert_close(fast.double(), reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(python.double(), reference, rtol=1e-5, atol=1e-5)
