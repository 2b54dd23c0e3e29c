"""PPO with the clipped surrogate objective (Schulman et al. 2017, "Proximal Policy
Optimization Algorithms", Eq. 7 and 9) and GAE(λ) advantages (Schulman et al. 2016), run
data-parallel as DD-PPO (Wijmans et al. 2020): every rank collects its own rollout, the
advantages are normalized with the mean and std of the global batch, and every minibatch
gradient is averaged over the ranks (`DataParallel.average_gradients`) before one identical
optimizer step on every rank.

Per update, with ratio r_t(θ) = π_θ(a_t|s_t) / π_old(a_t|s_t) and normalized advantages Â_t:

    L_clip = E[ max(−Â_t r_t(θ), −Â_t clip(r_t(θ), 1 − ε, 1 + ε)) ]
    L_V    = E[ ½ max((V_θ(s_t) − R_t)², (V_old + clip(V_θ − V_old, −ε, ε) − R_t)²) ]
    loss   = L_clip + c_v L_V − c_e E[H(π_θ(·|s_t))]

This module holds the math and the rollout; the loop that steps envs and calls `update` on
every rank lives in `hpcrl.topologies.data_parallel`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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


@dataclass
class PPOConfig(NetworkConfig):
    """PPO hyperparameters. Batch sizes are global: summed over every rank."""

    env_steps_per_update: int = 2048  # env steps per update, all ranks together
    minibatch_size: int = 512  # samples per gradient step, all ranks together
    update_epochs: int = 10
    learning_rate: float = 3e-4
    anneal_lr: bool = True  # linearly to 0 over the budget
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_coef: float = 0.2  # ε
    anneal_clip: bool = False  # ε linearly to 0 over the budget
    clip_vloss: bool = True
    ent_coef: float = 0.0
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5  # on the rank-averaged gradient
    norm_adv: bool = True  # with the global batch's mean and std
    normalize_obs: bool = False  # running mean/std over all ranks (hpcrl.normalization)

    def validate(self) -> None:
        def check(ok: bool, key: str, expected: str) -> None:
            if not ok:
                raise ConfigError(
                    f"config key '{key}': got {getattr(self, key)!r}, expected {expected}"
                )

        check(self.env_steps_per_update >= 1, "env_steps_per_update", "an integer >= 1")
        check(
            1 <= self.minibatch_size <= self.env_steps_per_update
            and self.env_steps_per_update % self.minibatch_size == 0,
            "minibatch_size",
            f"a divisor of env_steps_per_update ({self.env_steps_per_update})",
        )
        check(self.update_epochs >= 1, "update_epochs", "an integer >= 1")
        check(self.learning_rate > 0, "learning_rate", "a number > 0")
        check(0.0 <= self.gamma <= 1.0, "gamma", "a discount γ in [0, 1]")
        check(0.0 <= self.gae_lambda <= 1.0, "gae_lambda", "λ in [0, 1]")
        check(self.clip_coef > 0, "clip_coef", "ε > 0")
        check(self.max_grad_norm > 0, "max_grad_norm", "a number > 0")
        self.validate_network()

    def check_spaces(self, observation_space, action_space) -> None:
        """Raises UserError unless the action space is `Discrete` or `Box` (and, with
        `normalize_obs`, the observations a float `Box`)."""
        check_actor_critic_spaces("ppo", self.normalize_obs, observation_space, action_space)

    def rollout_steps(self, world_size: int, num_envs: int) -> int:
        """Vector steps per rollout on each rank: env_steps_per_update / (world_size × num_envs).

        Raises:
            ConfigError: the global batch does not split into whole rollouts.
        """
        share = world_size * num_envs
        if self.env_steps_per_update % share or (self.minibatch_size % world_size):
            raise ConfigError(
                f"env_steps_per_update {self.env_steps_per_update} and minibatch_size "
                f"{self.minibatch_size} must split over {world_size} ranks x {num_envs} env "
                "copies (num_envs): "
                f"env_steps_per_update % {share} = {self.env_steps_per_update % share}, "
                f"minibatch_size % {world_size} = {self.minibatch_size % world_size}"
            )
        return self.env_steps_per_update // share

    def first_update_env_steps(self, world_size: int, num_envs: int) -> int:
        """Env steps, all ranks together, before the first update: one update's batch."""
        return self.rollout_steps(world_size, num_envs) * num_envs * world_size


class PPO(ActorCriticLearner):
    """One rank's PPO learner: acts, stores its rollout, updates with averaged gradients.

    Call sequence (by the topology, on every rank in lockstep):
        for each vector step: actions = act(obs); observe(step batch)
        every `rollout_steps` vector steps: update(dp, progress)
    """

    def __init__(
        self,
        cfg: PPOConfig,
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
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=cfg.learning_rate, eps=1e-5, fused=True
        )
        self.generator = torch.Generator().manual_seed(seed)  # minibatch shuffling

    def rank_arrays(self) -> dict[str, np.ndarray]:
        """This rank's own state between updates: the minibatch shuffling generator."""
        return {"shuffle_rng": self.generator.get_state().numpy().copy()}

    def load_rank(self, arrays: dict[str, np.ndarray]) -> None:
        self.generator.set_state(torch.from_numpy(arrays["shuffle_rng"].copy()))

    def update(self, dp, progress: float) -> dict[str, float]:
        """One PPO update on this rank's rollout, gradients averaged over the ranks by `dp`.

        Args:
            dp: the data-parallel collectives (`average_gradients`, `mean_std`).
            progress: fraction of the run's budget done, in [0, 1] (annealing).

        Returns:
            Loss metrics of the last epoch (this rank's minibatches).
        """
        cfg = self.cfg
        steps = self.rollout.take(self.device)  # (T, B, ...)
        T, B = steps["rewards"].shape
        advantages, returns = advantages_and_returns(self.model, steps, cfg.gamma, cfg.gae_lambda)
        if cfg.norm_adv:
            mean, std = dp.mean_std(advantages.cpu().numpy())
            advantages = (advantages - mean) / (std + 1e-8)
        flat = {
            "obs": steps["obs"].reshape(T * B, *steps["obs"].shape[2:]),
            "actions": steps["actions"].reshape(T * B, *steps["actions"].shape[2:]),
            "log_probs": steps["log_probs"].reshape(-1),
            "advantages": advantages.reshape(-1),
            "returns": returns.reshape(-1),
            "values": steps["values"].reshape(-1),
        }
        lr = set_learning_rate(self.optimizer, cfg.learning_rate, cfg.anneal_lr, progress)
        clip = cfg.clip_coef * (1.0 - progress) if cfg.anneal_clip else cfg.clip_coef
        clip = max(clip, 1e-8)
        metrics: dict[str, float] = {}
        # The same number of minibatches on every rank (one gradient Allreduce each), even
        # when a straggler's rollout was cut short: its minibatches are just smaller.
        num_minibatches = cfg.env_steps_per_update // cfg.minibatch_size
        for epoch in range(cfg.update_epochs):
            order = torch.randperm(T * B, generator=self.generator)
            for i, index in enumerate(torch.tensor_split(order, num_minibatches)):
                mb = {k: v[index] for k, v in flat.items()}
                last = epoch == cfg.update_epochs - 1 and i == num_minibatches - 1
                metrics = self._minibatch_step(dp, mb, clip, last) or metrics
        self.learner_updates += 1
        self.merge_statistics(dp)
        metrics["learning_rate"] = lr
        return metrics

    def _minibatch_step(
        self, dp, mb: dict[str, torch.Tensor], clip: float, with_metrics: bool = True
    ) -> dict[str, float]:
        """One gradient step, returning its losses if `with_metrics` (the update's last);
        an empty minibatch (a rollout cut very short) adds zero gradients to the average
        and returns no metrics."""
        cfg = self.cfg
        if len(mb["advantages"]) == 0:
            self.optimizer.zero_grad(set_to_none=False)  # zeros in the average
            dp.average_gradients()
            dp.clip_gradients(cfg.max_grad_norm)
            self.optimizer.step()
            return {}
        log_probs, entropy, new_values = self.model.evaluate_actions(mb["obs"], mb["actions"])
        log_ratio = log_probs - mb["log_probs"]
        ratio = log_ratio.exp()
        adv = mb["advantages"]
        pg_loss = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip, 1 + clip)).mean()
        if cfg.clip_vloss:
            clipped = mb["values"] + torch.clamp(new_values - mb["values"], -clip, clip)
            v_loss = (
                0.5
                * torch.max(
                    (new_values - mb["returns"]) ** 2, (clipped - mb["returns"]) ** 2
                ).mean()
            )
        else:
            v_loss = 0.5 * ((new_values - mb["returns"]) ** 2).mean()
        entropy_loss = entropy.mean()
        loss = pg_loss - cfg.ent_coef * entropy_loss + cfg.vf_coef * v_loss
        self.optimizer.zero_grad(set_to_none=False)  # keeps `dp`'s flat gradient views
        loss.backward()
        dp.average_gradients()
        dp.clip_gradients(cfg.max_grad_norm)
        self.optimizer.step()
        if not with_metrics:
            return {}
        with torch.no_grad():
            approx_kl = ((ratio - 1) - log_ratio).mean().item()  # Schulman's k3 estimator
        return {
            "losses/policy": pg_loss.item(),
            "losses/value": v_loss.item(),
            "losses/entropy": entropy_loss.item(),
            "losses/approx_kl": approx_kl,
        }


ALGORITHM = Algorithm(
    "ppo",
    PPOConfig,
    ("data_parallel",),
    PPO,
    # DD-PPO's preemption threshold (Wijmans et al. 2020, §3): once 60% of the ranks have
    # a full rollout, the others stop collecting.
    topology_defaults={"sync_frac": 0.6, "check_sync_every": 10},
    renamed_keys={"batch_size": "env_steps_per_update"},
)
