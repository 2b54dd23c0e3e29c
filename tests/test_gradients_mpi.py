"""The data-parallel collectives (`hpcrl.comm.gradients`) on COMM_WORLD and COMM_SELF:
one flat-gradient Allreduce equals per-parameter averaging, pooled mean/std equals numpy on
the concatenation, and the consistency check names the rank that drifted."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.mpi(min_size=2)


def _comms():
    from mpi4py import MPI

    return [MPI.COMM_SELF, MPI.COMM_WORLD]


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


@pytest.mark.parametrize("which", [0, 1], ids=["COMM_SELF", "COMM_WORLD"])
def test_flat_allreduce_equals_per_parameter_average(which):
    from hpcrl.comm.gradients import FlatGradients

    comm = _comms()[which]
    model = _model(0)
    torch.manual_seed(100 + comm.rank)  # each rank its own data, so its own gradient
    loss = model(torch.randn(11, 5)).pow(2).sum()
    loss.backward()
    local = [p.grad.detach().numpy().copy() for p in model.parameters()]
    everyone = comm.allgather(local)  # the reference: plain per-parameter averages
    expected = [np.mean([grads[i] for grads in everyone], axis=0) for i in range(len(local))]
    FlatGradients(list(model.parameters())).average(comm, watchdog_s=60)
    for p, want in zip(model.parameters(), expected, strict=True):
        np.testing.assert_allclose(p.grad.numpy(), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("which", [0, 1], ids=["COMM_SELF", "COMM_WORLD"])
def test_global_mean_std_pools_every_rank(which):
    from hpcrl.comm.gradients import global_mean_std

    comm = _comms()[which]
    rng = np.random.default_rng(comm.rank)
    values = rng.normal(comm.rank, 1.0 + comm.rank, size=(3 + comm.rank, 4))
    mean, std = global_mean_std(comm, values, watchdog_s=60)
    pooled = np.concatenate([v.reshape(-1) for v in comm.allgather(values)])
    assert mean == pytest.approx(pooled.mean(), rel=1e-12, abs=1e-12)
    assert std == pytest.approx(pooled.std(), rel=1e-9)


def test_parameters_checked_in_sync_and_drift_named():
    from mpi4py import MPI

    from hpcrl.comm.gradients import (
        ParametersOutOfSync,
        broadcast_parameters,
        check_parameters_in_sync,
    )

    comm = MPI.COMM_WORLD
    model = _model(comm.rank)  # different on every rank
    broadcast_parameters(comm, model, watchdog_s=60)
    digest = check_parameters_in_sync(comm, model, watchdog_s=60)
    assert comm.allgather(digest) == [digest] * comm.size
    last = comm.size - 1
    if comm.rank == last:
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] += 1e-7  # one ulp-scale drift
    with pytest.raises(ParametersOutOfSync, match=rf"ranks \[{last}\]"):
        check_parameters_in_sync(comm, model, watchdog_s=60)
