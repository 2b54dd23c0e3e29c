"""Asynchronous n-step Q-learning (Mnih et al. 2016, Algorithm S2): `hpcrl.algos.async_q`
with n-step targets over each unroll (`n_step: true`)."""

from __future__ import annotations

from dataclasses import dataclass

from hpcrl.algos.async_q import AsyncQ
from hpcrl.algos.async_q import Config as _OneStepConfig

LEARNER = "AsyncQ"
__all__ = ["AsyncQ", "Config", "LEARNER"]


@dataclass
class Config(_OneStepConfig):
    """As `hpcrl.algos.async_q.Config`, with n-step targets."""

    n_step: bool = True
