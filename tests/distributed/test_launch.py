"""``cbn.distributed.launch``: what a failing worker leaves for the person reading the test log."""

import pytest
from torch.multiprocessing import ProcessExitedException

from cbn.distributed import launch
from distributed import workers


def test_a_native_abort_in_a_worker_raises_and_prints_the_workers_python_stack(capfd):
    with pytest.raises(ProcessExitedException, match="SIGABRT"):
        launch(workers.abort_natively, 1, timeout_s=60)
    err = capfd.readouterr().err
    assert "Fatal Python error: Aborted" in err, err
    assert "in abort_natively" in err, err
