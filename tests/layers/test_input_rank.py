import pytest
import torch

import cbn

FAMILIES = [
    (cbn.CrossIterationBatchNorm1d, cbn.CrossIterationBatchNorm2d, cbn.CrossIterationBatchNorm3d),
    (cbn.BatchRenorm1d, cbn.BatchRenorm2d, cbn.BatchRenorm3d),
    (cbn.SyncBatchNorm1d, cbn.SyncBatchNorm2d, cbn.SyncBatchNorm3d),
]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f[0].__name__[:-2])
def test_wrong_rank_names_the_expected_shapes(family):
    layer_1d, layer_2d, layer_3d = (cls(3) for cls in family)
    with pytest.raises(ValueError, match=r"2D \(N, C\) or 3D \(N, C, L\) input, got 4D"):
        layer_1d(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"4D \(N, C, H, W\) input, got 3D"):
        layer_2d(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"5D \(N, C, D, H, W\) input, got 4D"):
        layer_3d(torch.randn(2, 3, 4, 4))
