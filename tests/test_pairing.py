"""The pairing report names, per norm layer, its producer or why it is not compensated."""

import torch
from torch import nn

import cbn


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn_conv = nn.BatchNorm2d(4)
        self.bn_after_relu = nn.BatchNorm2d(4)
        self.frozen = nn.Conv2d(4, 4, 1)
        self.frozen.requires_grad_(False)
        self.bn_frozen = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)
        self.bn_fc = nn.BatchNorm1d(5)

    def forward(self, x):
        x = torch.relu(self.bn_conv(self.conv(x)))
        x = self.bn_after_relu(x)
        x = self.bn_frozen(self.frozen(x))
        return self.bn_fc(self.fc(x.mean((2, 3))))


def test_report_per_layer_and_summary(recwarn):
    model = cbn.convert_model(Mixed(), window=3)
    assert {r.reason for r in cbn.pairing_report(model)} == {"no training forward yet"}
    model(torch.randn(4, 3, 6, 6)).sum().backward()
    rows = {r.layer: r for r in cbn.pairing_report(model)}
    assert rows["bn_conv"] == cbn.Pairing("bn_conv", True, "conv", "")
    assert rows["bn_fc"] == cbn.Pairing("bn_fc", True, "fc", "")
    assert not rows["bn_after_relu"].compensated and "input is the result of relu" in rows["bn_after_relu"].reason
    assert not rows["bn_frozen"].compensated and rows["bn_frozen"].producer == "frozen"
    assert "frozen" in rows["bn_frozen"].reason
    text = cbn.format_pairing_report(list(rows.values()))
    assert text.splitlines()[-1].startswith("2 of 4 CBN layers compensated")
    assert "bn_after_relu" in text and "1 x producer frozen" in text
    # the one discovery warning points to the report
    assert sum("pairing_report" in str(w.message) for w in recwarn) == 1


def test_naive_and_window_one_are_reported_as_such():
    for kwargs, reason in (({"compensate": False}, "compensate=False"), ({"window": 1}, "window=1")):
        model = cbn.convert_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), **kwargs)
        model(torch.randn(2, 3, 5, 5))
        (row,) = cbn.pairing_report(model)
        assert not row.compensated and reason in row.reason
