"""The parameters' space in one process: what is refused, and the pieces that must equal the unsharded ones.

The 2-process FSDP2 runs are in test_fsdp.py; these need no process group.
"""

import numpy as np
import pytest
import torch

from eos_core import CDAT
from eos_core.adapters.torch import CurvatureTuner, ParameterSpace
from eos_core.adapters.torch import sharding as sharding_module
from eos_core.spectral import random_start


class DTensor(torch.Tensor):
    """Stands in for torch.distributed.tensor.DTensor: the space recognises DTensors by class name."""


def fake_dtensor(*shape):
    return torch.zeros(*shape).as_subclass(DTensor).requires_grad_()


def test_fsdp1_parameters_are_refused_with_the_way_out():
    flat = torch.nn.Parameter(torch.zeros(10))
    flat._fsdp_flattened = True  # what FSDP1 (FullyShardedDataParallel) marks its flat parameters with
    with pytest.raises(ValueError, match="FSDP1.*fully_shard"):
        CurvatureTuner(torch.optim.SGD([flat], lr=0.1), CDAT())


def test_sharded_and_plain_parameters_together_are_refused():
    plain = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="mixes sharded .* and plain parameters"):
        ParameterSpace([plain, fake_dtensor(2)])


def test_sharded_parameters_on_a_torch_older_than_2_7_fail_clearly(monkeypatch):
    monkeypatch.setattr(sharding_module, "torch_version", lambda: (2, 6))
    with pytest.raises(RuntimeError, match=r"needs torch >= 2\.7; this is torch"):
        ParameterSpace([fake_dtensor(2), fake_dtensor(3)])


def test_the_torch_version_is_read_from_release_and_local_builds(monkeypatch):
    for version, expected in (("2.13.0+cpu", (2, 13)), ("2.7.1", (2, 7)), ("2.8.0a0+git1234", (2, 8))):
        monkeypatch.setattr(torch, "__version__", version)
        assert sharding_module.torch_version() == expected


def test_whole_parameters_start_from_random_start_exactly():
    params = [torch.zeros(4, 3, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)]
    space = ParameterSpace(params)
    assert not space.sharded
    for got, want in zip(space.random_start(7, params), random_start([(4, 3), (5,)], 7), strict=True):
        np.testing.assert_array_equal(got.numpy(), want)


def test_a_saved_vector_of_other_shapes_is_refused_with_the_shapes():
    params = [torch.zeros(4, 3), torch.zeros(5)]
    space = ParameterSpace(params)
    restored = space.restored("eigenvector", [torch.ones(4, 3, dtype=torch.float64), torch.ones(5)], params)
    assert [t.dtype for t in restored] == [torch.float32, torch.float32]  # in the parameters' dtype
    with pytest.raises(ValueError, match=r"eigenvector shaped \[\(3, 4\), \(5,\)\]"):
        space.restored("eigenvector", [torch.ones(3, 4), torch.ones(5)], params)
    with pytest.raises(ValueError, match="eigenvector shaped"):
        space.restored("eigenvector", [torch.ones(4, 3)], params)


def test_a_step_at_lr_0_without_closure_is_still_a_training_step():
    """Only torch.distributed.checkpoint's state initialisation (zero gradients, lr 0, called from its
    _init_optim_state) passes through the tuner; a warm-up step from lr 0 is tuned and counted."""
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    optimizer = torch.optim.SGD([w], lr=0.0)
    tuner = CurvatureTuner(optimizer, CDAT(scale=1.0), reference_lr=0.1)
    tuner.set_objective(lambda: (w ** 2).sum())
    optimizer.zero_grad()
    (w ** 2).sum().backward()
    optimizer.step()
    assert tuner.calls == 1 and tuner.diagnostics["step"] == 0 and tuner.diagnostics["lr"] > 0
