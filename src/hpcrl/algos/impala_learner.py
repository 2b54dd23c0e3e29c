"""IMPALA: importance-weighted actor-learner with V-trace (Espeholt et al. 2018, "IMPALA:
Scalable Distributed Deep-RL with Importance Weighted Actor-Learner Architectures").

Actors act with the parameters they last received (the behaviour policy μ) and send
unrolls of T steps with log μ(a_t|x_t); the learner, whose policy π has moved on since,
corrects for the lag with V-trace (§4.1, Eq. 1, `hpcrl.returns.vtrace`). Per update, over
a batch of unrolls (T × N steps, time-major):

    ρ_t  = π(a_t|x_t) / μ(a_t|x_t)
    v_s  = V-trace targets (truncation levels ρ̄ = clip_rho_threshold, c̄ = clip_c_threshold)
    L_π  = −E[ min(ρ̄_pg, ρ_s) (r_s + γ_s v_{s+1} − V(x_s)) log π(a_s|x_s) ]     (§4.2)
    L_V  = ½ E[ (v_s − V(x_s))² ]
    loss = L_π + c_v L_V − c_e E[H(π(·|x_s))]

with γ_s = γ (1 − terminated_s). A time-limit truncation at step s is bootstrapped: the
actor sends V(final obs) under its parameters, the learner adds γ·V to r_s and cuts the
trace there (γ_s = 0). Defaults follow the paper's Table G.1 where CartPole allows
(unroll 20, entropy 0.01, baseline cost 0.5, gradient-norm clip 40, ρ̄ = c̄ = 1), with Adam
instead of RMSprop and a smaller network (RMSprop is `optimizer: rmsprop`).

This module holds the math (the torch learner); the hyperparameters (`ImpalaConfig`) and the
registry entry are `hpcrl.algos.impala`, the actors' torch-free policy is
`hpcrl.numpy_policy`, and the actor-learner loop is `hpcrl.topologies.actor_learner`.
"""

from __future__ import annotations

import numpy as np
import torch

from hpcrl.algos.async_base import SendsUnrolls
from hpcrl.algos.async_learner import AsyncLearnerBase, unroll_targets
from hpcrl.models import actor_critic
from hpcrl.returns import vtrace


class ActorCriticAsync(AsyncLearnerBase):
    """An `ActorCritic` model for the actor-learner layout (IMPALA, A3C): sampling for the
    actors, the critic for time-limit bootstraps, the mode for evaluation."""

    def __init__(
        self,
        cfg,
        observation_space,
        action_space,
        num_envs: int = 1,
        world_size: int = 1,
        seed: int = 0,
    ):
        """The arguments after `action_space` are those every learner class takes; these
        need none of them (the topology seeds torch)."""
        super().__init__(cfg)
        self.model = actor_critic(cfg, observation_space, action_space)

    def act(self, obs: np.ndarray, progress: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """The behaviour policy μ: sampled actions ((B, *action_shape)) and their (B,)
        float32 log-probabilities for (B, *obs_shape) observations."""
        obs_t = torch.as_tensor(obs, device=self.device)
        actions, log_probs, _ = self.model.act(obs_t)
        return actions.cpu().numpy(), log_probs.cpu().numpy()

    def values(self, obs: np.ndarray) -> np.ndarray:
        """V(x): (B,) float32 for (B, *obs_shape) observations (no gradient)."""
        with torch.no_grad():
            return self.model.value(torch.as_tensor(obs, device=self.device)).cpu().numpy()

    def greedy_actions(self, obs: np.ndarray) -> np.ndarray:
        """Deterministic actions (mode of the policy) for evaluation."""
        obs_t = torch.as_tensor(obs, device=self.device)
        actions, _, _ = self.model.act(obs_t, deterministic=True)
        return actions.cpu().numpy()

    def sample_actions(self, obs: np.ndarray) -> np.ndarray:
        """Actions sampled from the policy (torch's global RNG)."""
        return self.act(obs)[0]

    def _evaluate(self, batch: dict[str, np.ndarray]):
        """log π(a_t|x_t), entropy and V(x_t), each (T, N) with gradients, and V(x_T) (N,)
        without, for a batch of unrolls."""
        obs = torch.as_tensor(batch["obs"], device=self.device)
        T, N = batch["rewards"].shape
        actions = torch.as_tensor(batch["actions"], device=self.device)
        out = self.model.evaluate_actions(
            obs[:T].reshape(T * N, *obs.shape[2:]), actions.reshape(T * N, *actions.shape[2:])
        )
        with torch.no_grad():
            bootstrap = self.model.value(obs[T])
        return (*(x.reshape(T, N) for x in out), bootstrap)


class Impala(SendsUnrolls, ActorCriticAsync):
    """One rank's IMPALA: learners call `update` on batches of unrolls; actors `act`."""

    def loss(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, dict[str, float]]:
        """The IMPALA loss of a batch of unrolls (see the module doc).

        Args:
            batch: time-major numpy arrays, N unrolls side by side: obs (T + 1, N, ...),
                actions (T, N, ...), behaviour_log_probs, rewards, terminated, truncated,
                truncation_values (T, N) float32.

        Returns:
            The scalar loss (with gradients) and its parts as floats.
        """
        cfg = self.cfg
        dev = self.device
        log_probs, entropy, values, bootstrap = self._evaluate(batch)
        discounts, rewards = unroll_targets(batch, cfg.gamma)
        log_rhos = log_probs.detach().cpu().numpy() - batch["behaviour_log_probs"]
        vs, pg_advantages = vtrace(
            log_rhos,
            discounts,
            rewards,
            values.detach().cpu().numpy(),
            bootstrap.cpu().numpy(),
            cfg.clip_rho_threshold,
            cfg.clip_pg_rho_threshold,
            cfg.clip_c_threshold,
            cfg.vtrace_lambda,
        )
        vs = torch.as_tensor(vs, dtype=torch.float32, device=dev)
        pg_advantages = torch.as_tensor(pg_advantages, dtype=torch.float32, device=dev)
        pg_loss = -(pg_advantages * log_probs).mean()
        v_loss = 0.5 * ((vs - values) ** 2).mean()
        entropy_mean = entropy.mean()
        loss = pg_loss + cfg.vf_coef * v_loss - cfg.ent_coef * entropy_mean
        rhos = np.exp(log_rhos)
        return loss, {
            "losses/policy": pg_loss.item(),
            "losses/value": v_loss.item(),
            "losses/entropy": entropy_mean.item(),
            "rho_mean": float(rhos.mean()),
            "rho_clipped_frac": float(np.mean(rhos > (cfg.clip_rho_threshold or np.inf))),
        }

    def _backward(self, batch: dict[str, np.ndarray]) -> dict[str, float]:
        loss, metrics = self.loss(batch)
        loss.backward()
        return metrics
