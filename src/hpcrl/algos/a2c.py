"""A2C: the synchronous advantage actor-critic (Mnih et al. 2016, "Asynchronous Methods for
Deep Reinforcement Learning", Algorithm S3, run synchronously as in OpenAI Baselines' A2C),
data-parallel: every rank steps its own env copies for T steps, computes the actor-critic
gradient of its rollout, and the gradients are averaged over the ranks
(`DataParallel.average_gradients`) before one identical optimizer step on every rank.

Per update, over the global batch of T × B × world_size steps:

    R_t  = n-step return bootstrapped with V(s_{t+k}) at the rollout's end (gae_lambda = 1),
           or the GAE(λ) return (Schulman et al. 2016) with gae_lambda < 1
    A_t  = R_t − V(s_t)                       (held constant in the policy term)
    loss = −E[A_t log π(a_t|s_t)] + c_v E[(R_t − V(s_t))²] − c_e E[H(π(·|s_t))]

One gradient step per rollout with RMSprop (the paper's, α = 0.99, shared statistics being
simply the averaged gradient here) or Adam. Hyperparameter defaults are Stable-Baselines3's
A2C (lr 7e-4, n_steps 5, vf_coef 0.5, max_grad_norm 0.5, RMSprop eps 1e-5).

This module holds the math; the loop lives in `hpcrl.topologies.data_parallel`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hpcrl.algos.network import NetworkConfig
from hpcrl.algos.rollout import (
    ActorCriticLearner,
    advantages_and_returns,
    check_actor_critic_spaces,
)
from hpcrl.contracts import Algorithm
from hpcrl.errors import ConfigError
from hpcrl.models import actor_critic
from hpcrl.schedules import set_learning_rate

OPTIMIZERS = ("rmsprop", "adam")


@dataclass
class A2CConfig(NetworkConfig):
    """A2C hyperparameters. `env_steps_per_update` is global: env steps per update, all ranks."""

    env_steps_per_update: int = 40  # SB3: 8 env copies x n_steps 5
    learning_rate: float = 7e-4
    anneal_lr: bool = False  # linearly to 0 over the budget
    optimizer: str = "rmsprop"  # or adam
    rmsprop_alpha: float = 0.99
    optimizer_eps: float = 1e-5
    gamma: float = 0.99
    gae_lambda: float = 1.0  # 1: n-step returns (the paper); < 1: GAE(λ)
    ent_coef: float = 0.0
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5  # on the rank-averaged gradient
    norm_adv: bool = False  # with the global batch's mean and std
    normalize_obs: bool = False  # running mean/std over all ranks (hpcrl.normalization)

    def validate(self) -> None:
        def check(ok: bool, key: str, expected: str) -> None:
            if not ok:
                raise ConfigError(
                    f"config key '{key}': got {getattr(self, key)!r}, expected {expected}"
                )

        check(self.env_steps_per_update >= 1, "env_steps_per_update", "an integer >= 1")
        check(self.learning_rate > 0, "learning_rate", "a number > 0")
        check(self.optimizer in OPTIMIZERS, "optimizer", f"one of {list(OPTIMIZERS)}")
        check(0.0 <= self.rmsprop_alpha < 1.0, "rmsprop_alpha", "a decay in [0, 1)")
        check(self.optimizer_eps > 0, "optimizer_eps", "a number > 0")
        check(0.0 <= self.gamma <= 1.0, "gamma", "a discount γ in [0, 1]")
        check(0.0 <= self.gae_lambda <= 1.0, "gae_lambda", "λ in [0, 1]")
        check(self.max_grad_norm > 0, "max_grad_norm", "a number > 0")
        self.validate_network()

    def check_spaces(self, observation_space, action_space) -> None:
        """Raises UserError unless the action space is `Discrete` or `Box` (and, with
        `normalize_obs`, the observations a float `Box`)."""
        check_actor_critic_spaces("a2c", self.normalize_obs, observation_space, action_space)

    def rollout_steps(self, world_size: int, num_envs: int) -> int:
        """Vector steps per rollout on each rank (n of the n-step return):
        env_steps_per_update / (world_size × num_envs).

        Raises:
            ConfigError: the global batch does not split into whole rollouts.
        """
        share = world_size * num_envs
        if self.env_steps_per_update % share:
            raise ConfigError(
                f"env_steps_per_update {self.env_steps_per_update} must split over "
                f"{world_size} ranks x {num_envs} env copies (num_envs): "
                f"{self.env_steps_per_update} % {share} = {self.env_steps_per_update % share}"
            )
        return self.env_steps_per_update // share

    def first_update_env_steps(self, world_size: int, num_envs: int) -> int:
        """Env steps, all ranks together, before the first update: one update's batch."""
        return self.rollout_steps(world_size, num_envs) * num_envs * world_size


class A2C(ActorCriticLearner):
    """One rank's A2C learner: acts, stores its rollout, one averaged gradient step per
    rollout.

    Call sequence (by the topology, on every rank in lockstep):
        for each vector step: actions = act(obs, progress); observe(step outcome)
        every `rollout_steps` vector steps: update(dp, progress)
    """

    def __init__(
        self,
        cfg: A2CConfig,
        observation_space,
        action_space,
        num_envs: int,
        world_size: int,
        seed: int,
    ):
        super().__init__(observation_space, cfg.normalize_obs)
        self.cfg = cfg
        self.num_envs = num_envs
        self.rollout_steps = cfg.rollout_steps(world_size, num_envs)
        self.model = actor_critic(cfg, observation_space, action_space)
        params = self.model.parameters()
        if cfg.optimizer == "rmsprop":
            self.optimizer = torch.optim.RMSprop(
                params, lr=cfg.learning_rate, alpha=cfg.rmsprop_alpha, eps=cfg.optimizer_eps
            )
        else:
            self.optimizer = torch.optim.Adam(
                params, lr=cfg.learning_rate, eps=cfg.optimizer_eps, fused=True
            )

    def update(self, dp, progress: float) -> dict[str, float]:
        """One A2C gradient step on this rank's rollout, averaged over the ranks by `dp`.

        Args:
            dp: the data-parallel collectives (`average_gradients`, `mean_std`).
            progress: fraction of the run's budget done, in [0, 1] (annealing).

        Returns:
            This rank's losses.
        """
        cfg = self.cfg
        steps = self.rollout.take(self.device)
        T, B = steps["rewards"].shape
        advantages, returns = advantages_and_returns(self.model, steps, cfg.gamma, cfg.gae_lambda)
        if cfg.norm_adv:
            mean, std = dp.mean_std(advantages.cpu().numpy())
            advantages = (advantages - mean) / (std + 1e-8)
        obs = steps["obs"].reshape(T * B, *steps["obs"].shape[2:])
        actions = steps["actions"].reshape(T * B, *steps["actions"].shape[2:])
        log_probs, entropy, values = self.model.evaluate_actions(obs, actions)
        pg_loss = -(advantages.reshape(-1) * log_probs).mean()
        v_loss = ((returns.reshape(-1) - values) ** 2).mean()
        entropy_loss = entropy.mean()
        loss = pg_loss + cfg.vf_coef * v_loss - cfg.ent_coef * entropy_loss
        lr = set_learning_rate(self.optimizer, cfg.learning_rate, cfg.anneal_lr, progress)
        self.optimizer.zero_grad(set_to_none=False)  # keeps `dp`'s flat gradient views
        loss.backward()
        dp.average_gradients()
        dp.clip_gradients(cfg.max_grad_norm)
        self.optimizer.step()
        self.learner_updates += 1
        self.merge_statistics(dp)
        return {
            "losses/policy": pg_loss.item(),
            "losses/value": v_loss.item(),
            "losses/entropy": entropy_loss.item(),
            "learning_rate": lr,
        }


# A2C is synchronous by definition: no straggler cut-off unless `sync_frac` is set. Two env
# copies per rank, so the 40 env steps of an update split over 1, 2 and 4 ranks (4 ranks:
# SB3's n_steps 5 over 8 copies).
ALGORITHM = Algorithm(
    "a2c",
    A2CConfig,
    ("data_parallel",),
    A2C,
    run_defaults={"num_envs": 2},
    renamed_keys={"batch_size": "env_steps_per_update"},
)
