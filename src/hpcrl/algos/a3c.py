"""A3C: asynchronous advantage actor-critic (Mnih et al. 2016, "Asynchronous Methods for
Deep Reinforcement Learning", Algorithm S3), with MPI ranks for the paper's threads and a
parameter server for its shared memory.

Each actor acts with its own copy θ' of the parameters for t_max = `unroll_length` steps of
its `num_envs` env copies, computes the actor-critic gradient of that unroll on θ',

    R_t  = r_t + γ R_{t+1} inside an episode, R = 0 after a terminal step, V(x_T) at the
           unroll's end (and γ·V(final obs) folded into r_t at a time limit),
    loss = −Σ log π(a_t|x_t; θ') (R_t − V(x_t)) + c_v (R_t − V(x_t))² − c_e H(π(·|x_t))
           (means over the unroll's steps),

and sends it (`Isend`, `SendsGradients`); the learner applies each gradient (or the mean
of `unrolls_per_update` of them) with one optimizer step, by default RMSprop, whose statistics
live on the learner and are therefore shared by all actors (the paper's "shared RMSProp",
§4 and Supplementary §7), and publishes fresh parameters, which each actor loads when they
arrive (the paper's θ' ← θ). Gradients older than `max_policy_lag` updates are dropped.
Defaults: the paper's t_max 5, entropy 0.01, RMSprop α 0.99; lr 7e-4, value
coefficient 0.5 and gradient-norm clip 0.5 from Stable-Baselines3's A2C.

This module holds the math; the loop is `hpcrl.topologies.actor_learner`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hpcrl.algos.async_base import AsyncConfig
from hpcrl.algos.async_learner import SendsGradients, unroll_targets
from hpcrl.algos.impala_learner import ActorCriticAsync
from hpcrl.algos.rollout import check_actor_critic_spaces
from hpcrl.contracts import Algorithm
from hpcrl.returns import n_step_returns


@dataclass
class A3CConfig(AsyncConfig):
    """A3C hyperparameters (the layout keys are `AsyncConfig`'s); `unrolls_per_update` counts
    actor gradients per update."""

    unroll_length: int = 5  # t_max
    unrolls_per_update: int = 1
    learning_rate: float = 7e-4
    optimizer: str = "rmsprop"
    max_grad_norm: float = 0.5
    ent_coef: float = 0.01
    vf_coef: float = 0.5

    def check_spaces(self, observation_space, action_space) -> None:
        """Raises UserError unless the action space is `Discrete` or `Box`."""
        check_actor_critic_spaces("a3c", False, observation_space, action_space)


class A3C(SendsGradients, ActorCriticAsync):
    """One rank's A3C: actors call `act` and `gradient`; learners `update` with the mean
    of the gradients they received."""

    def loss(self, unroll: dict[str, np.ndarray]) -> tuple[torch.Tensor, dict[str, float]]:
        """The actor-critic loss of one unroll (see the module doc).

        Args:
            unroll: time-major arrays: obs (T + 1, B, ...), actions (T, B, ...), rewards,
                terminated, truncated, truncation_values (T, B) float32.
        """
        cfg = self.cfg
        log_probs, entropy, values, bootstrap = self._evaluate(unroll)
        discounts, rewards = unroll_targets(unroll, cfg.gamma)
        next_values = torch.cat([values.detach()[1:], bootstrap[None]]).cpu().numpy()
        returns = n_step_returns(
            rewards, next_values, discounts == 0, np.zeros_like(discounts), cfg.gamma
        )
        returns = torch.as_tensor(returns, dtype=torch.float32, device=self.device)
        advantages = returns - values.detach()
        pg_loss = -(advantages * log_probs).mean()
        v_loss = ((returns - values) ** 2).mean()
        entropy_mean = entropy.mean()
        loss = pg_loss + cfg.vf_coef * v_loss - cfg.ent_coef * entropy_mean
        return loss, {
            "losses/policy": pg_loss.item(),
            "losses/value": v_loss.item(),
            "losses/entropy": entropy_mean.item(),
        }


ALGORITHM = Algorithm(
    "a3c",
    A3CConfig,
    ("actor_learner",),
    A3C,
    renamed_keys={"batch_size": "unrolls_per_update"},
)
