"""Asynchronous n-step Q-learning (Mnih et al. 2016, Algorithm S2): `hpcrl.algos.async_q`
with n-step targets over each unroll (`n_step: true`)."""

from __future__ import annotations

from dataclasses import dataclass

from hpcrl.algos.async_q import AsyncQ, AsyncQConfig
from hpcrl.contracts import Algorithm


@dataclass
class AsyncNStepQConfig(AsyncQConfig):
    """As `hpcrl.algos.async_q.AsyncQConfig`, with n-step targets."""

    n_step: bool = True


ALGORITHM = Algorithm(
    "async_nstep_q",
    AsyncNStepQConfig,
    ("actor_learner",),
    AsyncQ,
    renamed_keys={"batch_size": "unrolls_per_update"},
)
