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

This module holds the math; the actor-learner loop is `hpcrl.topologies.async_actor_learner`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hpcrl.algos.rollout import check_actor_critic_spaces
from hpcrl.errors import ConfigError
from hpcrl.models import ActorCritic
from hpcrl.returns import vtrace
from hpcrl.schedules import set_learning_rate
from hpcrl.state import load_module_arrays, load_optimizer_arrays, module_arrays, optimizer_arrays

LEARNER = "Impala"
OPTIMIZERS = ("adam", "rmsprop")


@dataclass
class Config:
    """IMPALA hyperparameters. `batch_size` counts unrolls (actor messages of
    `unroll_length` × `num_envs` env steps) per update, over the whole learner group."""

    layout: str = "actor_learner"
    unroll_length: int = 20  # T, vector steps per unroll
    batch_size: int = 2  # unrolls per learner update, all learner ranks together
    learner_ranks: int = 1  # learner group size (IMPALA §5.3.1): ranks 0..k-1
    learning_rate: float = 1e-3
    anneal_lr: bool = True  # linearly to 0 over the budget
    optimizer: str = "adam"  # or rmsprop (the paper's)
    rmsprop_alpha: float = 0.99
    optimizer_eps: float = 1e-5
    gamma: float = 0.99
    clip_rho_threshold: float | None = 1.0  # ρ̄ (null: no clipping)
    clip_pg_rho_threshold: float | None = 1.0  # ρ̄ of the policy-gradient term
    clip_c_threshold: float | None = 1.0  # c̄
    vtrace_lambda: float = 1.0
    ent_coef: float = 0.01
    vf_coef: float = 0.5  # the paper's baseline cost
    max_grad_norm: float = 40.0  # on the learner group's averaged gradient
    hidden_size: int = 64
    publish_interval: int = 1  # learner updates between parameter publications
    max_policy_lag: int = 20  # unrolls older than this many updates are dropped (counted)

    def validate(self) -> None:
        def check(ok: bool, key: str, expected: str) -> None:
            if not ok:
                raise ConfigError(
                    f"config key '{key}': got {getattr(self, key)!r}, expected {expected}"
                )

        check(self.layout == "actor_learner", "layout", "'actor_learner'")
        check(self.unroll_length >= 1, "unroll_length", "an integer >= 1")
        check(self.batch_size >= 1, "batch_size", "an integer >= 1 (unrolls per update)")
        check(self.learner_ranks >= 1, "learner_ranks", "an integer >= 1")
        check(self.learning_rate > 0, "learning_rate", "a number > 0")
        check(self.optimizer in OPTIMIZERS, "optimizer", f"one of {list(OPTIMIZERS)}")
        check(0.0 <= self.rmsprop_alpha < 1.0, "rmsprop_alpha", "a decay in [0, 1)")
        check(self.optimizer_eps > 0, "optimizer_eps", "a number > 0")
        check(0.0 <= self.gamma <= 1.0, "gamma", "a discount γ in [0, 1]")
        for key in ("clip_rho_threshold", "clip_pg_rho_threshold", "clip_c_threshold"):
            value = getattr(self, key)
            check(value is None or value > 0, key, "a number > 0, or null for no clipping")
        check(0.0 <= self.vtrace_lambda <= 1.0, "vtrace_lambda", "λ in [0, 1]")
        check(self.max_grad_norm > 0, "max_grad_norm", "a number > 0")
        check(self.hidden_size >= 1, "hidden_size", "an integer >= 1")
        check(self.publish_interval >= 1, "publish_interval", "an integer >= 1")
        check(self.max_policy_lag >= 0, "max_policy_lag", "an integer >= 0 (learner updates)")

    def check_spaces(self, observation_space, action_space) -> None:
        """Raises UserError unless the action space is `Discrete` or `Box`."""
        check_actor_critic_spaces("impala", False, observation_space, action_space)

    def rollout_steps(self, world_size: int, num_envs: int) -> int:
        """Vector steps per unroll (T), after checking the layout fits the world.

        Raises:
            ConfigError: `learner_ranks` leaves no actor, or `batch_size` does not split
                over the learner ranks.
        """
        k = self.learner_ranks
        if world_size > 1 and k >= world_size:
            raise ConfigError(
                f"config key 'learner_ranks': got {k}, expected fewer than the world size "
                f"{world_size} (ranks 0-{k - 1} learn, the others act)"
            )
        if world_size == 1 and k != 1:
            raise ConfigError(
                f"config key 'learner_ranks': got {k} in a one-process run, expected 1"
            )
        if self.batch_size % k:
            raise ConfigError(
                f"batch_size {self.batch_size} must split over {k} learner ranks "
                f"(learner_ranks): {self.batch_size} % {k} = {self.batch_size % k}"
            )
        return self.unroll_length


class Impala:
    """One learner rank's IMPALA: the `ActorCritic` model and its optimizer; `update`
    takes a batch of unrolls. Actors build the same model and call `act`."""

    def __init__(
        self,
        cfg: Config,
        observation_space,
        action_space,
        num_envs: int = 1,
        world_size: int = 1,
        seed: int = 0,
    ):
        """The arguments after `action_space` are those every learner class takes; IMPALA
        needs none of them (the topology seeds torch)."""
        self.cfg = cfg
        self.learner_updates = 0
        self.device = torch.device("cpu")
        self.model = ActorCritic(observation_space, action_space, hidden=(cfg.hidden_size,) * 2)
        params = self.model.parameters()
        if cfg.optimizer == "rmsprop":
            self.optimizer = torch.optim.RMSprop(
                params, lr=cfg.learning_rate, alpha=cfg.rmsprop_alpha, eps=cfg.optimizer_eps
            )
        else:
            self.optimizer = torch.optim.Adam(params, lr=cfg.learning_rate, eps=cfg.optimizer_eps)

    def to(self, device: torch.device) -> Impala:
        self.device = device
        self.model.to(device)
        return self

    def act(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
        obs = torch.as_tensor(batch["obs"], device=dev)
        T, N = batch["rewards"].shape
        flat_obs = obs[:T].reshape(T * N, *obs.shape[2:])
        actions = torch.as_tensor(batch["actions"], device=dev)
        log_probs, entropy, values = self.model.evaluate_actions(
            flat_obs, actions.reshape(T * N, *actions.shape[2:])
        )
        log_probs, entropy, values = (x.reshape(T, N) for x in (log_probs, entropy, values))
        with torch.no_grad():
            bootstrap = self.model.value(obs[T])
        truncated = batch["truncated"] != 0
        discounts = cfg.gamma * (1.0 - batch["terminated"]) * ~truncated
        rewards = batch["rewards"] + cfg.gamma * truncated * batch["truncation_values"]
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

    def update(self, batch: dict[str, np.ndarray] | None, group, progress: float) -> dict:
        """One optimizer step on the learner group's averaged gradient.

        Args:
            batch: this learner's unrolls (see `loss`), or None when it has none this round
                (it contributes zeros; `group` divides by the learners that had one).
            group: the learner group's collectives (`average_gradients()`).
            progress: fraction of the run's budget done, in [0, 1] (annealing).

        Returns:
            This learner's losses ({} without a batch) and the learning rate.
        """
        metrics: dict[str, float] = {}
        self.optimizer.zero_grad(set_to_none=True)
        if batch is not None:
            loss, metrics = self.loss(batch)
            loss.backward()
        group.average_gradients()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        metrics["learning_rate"] = set_learning_rate(
            self.optimizer, self.cfg.learning_rate, self.cfg.anneal_lr, progress
        )
        self.optimizer.step()
        self.learner_updates += 1
        return metrics

    def shared_arrays(self) -> dict[str, np.ndarray]:
        """What every learner rank holds identically: parameters and optimizer state."""
        return module_arrays(self.model) | optimizer_arrays(self.optimizer)

    def load_shared(self, arrays: dict[str, np.ndarray]) -> None:
        load_module_arrays(self.model, arrays)
        load_optimizer_arrays(self.optimizer, arrays)
