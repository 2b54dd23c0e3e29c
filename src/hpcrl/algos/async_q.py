"""Asynchronous one-step Q-learning (Mnih et al. 2016, "Asynchronous Methods for Deep
Reinforcement Learning", Algorithm 1) with function approximation; `async_nstep_q` is the
n-step variant (Algorithm S2). MPI ranks play the paper's threads, a parameter server its
shared memory.

Each actor acts ε-greedily on its copy θ' of the parameters for `unroll_length` steps of
its `num_envs` env copies and sends the gradient of

    L = mean_t Huber(y_t − Q(x_t, a_t; θ'))     (the paper: squared error; Huber, as
                                                 in DQN, was steadier on CartPole here)
    one-step:  y_t = r_t + γ_t max_a Q(x_{t+1}, a; θ⁻)
    n-step:    y_t = r_t + γ_t y_{t+1} inside the unroll, y_T = max_a Q(x_T, a; θ⁻)

(γ_t = 0 after a terminal step; a time limit bootstraps from max_a Q(final obs; θ⁻)),
the paper's gradient accumulated over I_AsyncUpdate = `unroll_length` steps. Two options
the paper lacks: `double_q` bootstraps Q(x, argmax_a Q(x, a; θ'); θ⁻) instead of the max
(van Hasselt et al. 2016, "Deep Reinforcement Learning with Double Q-learning", Eq. 4), and
`reward_scale` multiplies r_t in the targets (Q then estimates scaled returns; episode
returns are reported unscaled). On CartPole the two together made the greedy policy's fall
back to one action rare (benchmarks/RESULTS.md). The learner applies the gradient (shared
RMSprop by default), holds the target network θ⁻ and copies θ into it every
`target_update_interval` updates (the paper's I_target, counted in updates here), and
publishes θ and θ⁻ together. Each actor anneals its own ε from 1 to a final value drawn once
from {0.1, 0.01, 0.5} with probabilities {0.4, 0.3, 0.3} (the paper's §5.1), or to
`epsilon_end` when set, over the first `exploration_fraction` of its budget.

This module holds the math; the loop is `hpcrl.topologies.actor_learner`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from hpcrl.algos.async_base import AsyncConfig
from hpcrl.algos.async_learner import (
    AsyncLearnerBase,
    SendsGradients,
    copy_into,
    unroll_targets,
)
from hpcrl.contracts import Algorithm
from hpcrl.errors import UserError
from hpcrl.models import q_network
from hpcrl.schedules import linear_schedule
from hpcrl.state import load_module_arrays, module_arrays

FINAL_EPSILONS = (0.1, 0.01, 0.5)  # Mnih et al. 2016, §5.1
FINAL_EPSILON_PROBS = (0.4, 0.3, 0.3)


@dataclass
class AsyncQConfig(AsyncConfig):
    """Asynchronous Q-learning hyperparameters (the layout keys are `AsyncConfig`'s);
    `unrolls_per_update` counts actor gradients per update."""

    n_step: bool = False  # False: one-step targets (Algorithm 1); True: n-step (S2)
    unroll_length: int = 5  # I_AsyncUpdate, vector steps per gradient
    unrolls_per_update: int = 1
    learning_rate: float = 7e-4
    optimizer: str = "rmsprop"
    max_grad_norm: float = 10.0
    target_update_interval: int = 100  # learner updates between copies θ⁻ ← θ
    exploration_fraction: float = 0.3  # of each actor's budget, ε annealed from 1
    epsilon_end: float = -1.0  # final ε of every actor; -1: each draws the paper's (§5.1)
    activation: str = "relu"  # the Q-network's (as DQN's)
    reward_scale: float = 1.0  # r_t is multiplied by this in the targets
    double_q: bool = False  # bootstrap Q(x, argmax_a Q(x, a; θ'); θ⁻), not max_a Q(x, a; θ⁻)

    def validate(self) -> None:
        super().validate()
        self.check(self.target_update_interval >= 1, "target_update_interval", "an integer >= 1")
        self.check(self.reward_scale > 0, "reward_scale", "a number > 0")
        self.check(
            0.0 <= self.exploration_fraction <= 1.0,
            "exploration_fraction",
            "a fraction of the budget in [0, 1]",
        )
        self.check(
            self.epsilon_end == -1.0 or 0.0 <= self.epsilon_end <= 1.0,
            "epsilon_end",
            "a probability in [0, 1], or -1 to draw it per actor",
        )

    def check_spaces(self, observation_space, action_space) -> None:
        """Raises UserError unless the action space is `Discrete`."""
        import gymnasium as gym

        if not isinstance(action_space, gym.spaces.Discrete):
            raise UserError(f"async Q-learning needs a Discrete action space, got {action_space}")


class AsyncQ(SendsGradients, AsyncLearnerBase):
    """One rank's asynchronous Q-learner: actors call `act` and `gradient`; learners
    `update` with the mean of the gradients they received and keep the target network."""

    def __init__(
        self,
        cfg: AsyncQConfig,
        observation_space,
        action_space,
        num_envs: int = 1,
        world_size: int = 1,
        seed: int = 0,
    ):
        super().__init__(cfg)
        self.model = q_network(cfg, observation_space, action_space)
        self.target = copy.deepcopy(self.model)
        self.target.requires_grad_(False)
        self.rng = np.random.default_rng(seed)
        self.n_actions = int(action_space.n)
        self.epsilon_end = cfg.epsilon_end
        if cfg.epsilon_end < 0:
            self.epsilon_end = float(self.rng.choice(FINAL_EPSILONS, p=FINAL_EPSILON_PROBS))

    def to(self, device: torch.device) -> AsyncQ:
        super().to(device)
        self.target.to(device)
        return self

    def epsilon(self, progress: float) -> float:
        """This actor's ε at `progress` (its fraction of its budget done)."""
        return linear_schedule(1.0, self.epsilon_end, self.cfg.exploration_fraction, progress)

    def act(self, obs: np.ndarray, progress: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """ε-greedy actions ((B,) int64) on Q(·; θ'), and (B,) zeros for the
        log-probabilities (Q-learning is off-policy and needs none)."""
        greedy = self.greedy_actions(obs)
        explore = self.rng.random(len(greedy)) < self.epsilon(progress)
        random = self.rng.integers(self.n_actions, size=len(greedy))
        return np.where(explore, random, greedy), np.zeros(len(greedy), dtype=np.float32)

    def greedy_actions(self, obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            q = self.model(torch.as_tensor(obs, device=self.device))
        return q.argmax(-1).cpu().numpy()

    def values(self, obs: np.ndarray) -> np.ndarray:
        """The bootstrap of a time-limit cut: (B,) float32, max_a Q(x, a; θ⁻), or with
        `double_q` Q(x, argmax_a Q(x, a; θ'); θ⁻)."""
        with torch.no_grad():
            return self._bootstrap(torch.as_tensor(obs, device=self.device)).cpu().numpy()

    def _bootstrap(self, obs: torch.Tensor) -> torch.Tensor:
        """(N,) target-network values of (N, ...) observations, as in `values`."""
        q_next = self.target(obs)
        if self.cfg.double_q:
            return q_next.gather(1, self.model(obs).argmax(-1, keepdim=True)).squeeze(1)
        return q_next.max(-1).values

    def loss(self, unroll: dict[str, np.ndarray]) -> tuple[torch.Tensor, dict[str, float]]:
        """The Huber TD loss of one unroll against one-step or n-step targets (see the
        module doc); `unroll` as for `hpcrl.algos.a3c.A3C.loss`."""
        obs = torch.as_tensor(unroll["obs"], device=self.device)
        T, B = unroll["rewards"].shape
        scaled = unroll["rewards"] * np.float32(self.cfg.reward_scale)
        discounts, rewards = unroll_targets(unroll | {"rewards": scaled}, self.cfg.gamma)
        # One-step targets bootstrap from every next observation, n-step ones only from
        # the observation after the unroll.
        nexts = obs[1:] if not self.cfg.n_step else obs[T:]
        with torch.no_grad():
            next_max = self._bootstrap(nexts.reshape(-1, *obs.shape[2:]))
        next_max = next_max.reshape(len(nexts), B).cpu().numpy()
        if self.cfg.n_step:
            targets = np.empty_like(rewards)
            future = next_max[0]
            for t in reversed(range(T)):
                future = rewards[t] + discounts[t] * future
                targets[t] = future
        else:
            targets = rewards + discounts * next_max
        actions = torch.as_tensor(unroll["actions"], device=self.device).reshape(T * B, 1)
        q = self.model(obs[:T].reshape(T * B, *obs.shape[2:])).gather(1, actions.long())
        y = torch.as_tensor(targets, dtype=torch.float32, device=self.device).reshape(T * B, 1)
        loss = torch.nn.functional.smooth_l1_loss(q, y)
        return loss, {"losses/td": loss.item(), "q_mean": q.mean().item()}

    def _after_update(self) -> None:
        if self.learner_updates % self.cfg.target_update_interval == 0:
            self.target.load_state_dict(self.model.state_dict())

    def published(self) -> np.ndarray:
        """θ then θ⁻, flat float32."""
        vec = torch.nn.utils.parameters_to_vector
        both = torch.cat([vec(self.model.parameters()), vec(self.target.parameters())])
        return both.detach().cpu().numpy()

    def load_published(self, flat: np.ndarray) -> None:
        """Copy θ and θ⁻ out of a `published()` vector."""
        n = copy_into(self.model.parameters(), flat)
        copy_into(self.target.parameters(), flat[n:])

    def shared_arrays(self) -> dict[str, np.ndarray]:
        return super().shared_arrays() | module_arrays(self.target, "target")

    def load_shared(self, arrays: dict[str, np.ndarray]) -> None:
        super().load_shared(arrays)
        load_module_arrays(self.target, arrays, "target")


ALGORITHM = Algorithm(
    "async_q",
    AsyncQConfig,
    ("actor_learner",),
    AsyncQ,
    renamed_keys={"batch_size": "unrolls_per_update"},
)
