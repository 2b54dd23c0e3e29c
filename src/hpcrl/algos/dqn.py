"""DQN (Mnih et al. 2015, "Human-level control through deep reinforcement learning",
Algorithm 1), run data-parallel: each rank keeps its own replay memory and ε-greedy
actors; every gradient step averages the gradients of all ranks' minibatches
(`DataParallel.average_gradients`), so the online and target networks stay identical on
every rank. Options: double DQN (van Hasselt et al. 2016, Eq. 4) and the dueling head
(Wang et al. 2016, Eq. 9, in `hpcrl.models.QNetwork`).

Target for a transition (s, a, r, s'), no bootstrap past `terminated` (bootstrap past
`truncated`: s' is then the episode's final observation):

    y = r + γ (1 − terminated) max_a' Q_target(s', a')          (DQN)
    y = r + γ (1 − terminated) Q_target(s', argmax_a' Q(s', a'))  (double DQN)

loss = Huber(Q(s, a) − y) (the paper's error clipping to [−1, 1]). Every
`target_update_interval` gradient steps the target network θ' ← τθ + (1 − τ)θ' (τ = 1: the
paper's copy; τ < 1: Polyak averaging, as in SB3's `tau`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hpcrl.algos.network import NetworkConfig
from hpcrl.contracts import Algorithm
from hpcrl.errors import ConfigError, UserError
from hpcrl.models import q_network
from hpcrl.schedules import linear_schedule, set_learning_rate
from hpcrl.state import (
    generator_state,
    load_module_arrays,
    load_optimizer_arrays,
    module_arrays,
    optimizer_arrays,
    set_generator_state,
)


@dataclass
class DQNConfig(NetworkConfig):
    """DQN hyperparameters. Sizes and intervals in env steps are global (all ranks)."""

    # Defaults: Stable-Baselines3's DQN (its Atari-style settings), except that intervals
    # count gradient steps here: SB3's 10,000 env steps at train_freq 4 = 2,500.
    learning_rate: float = 1e-4
    anneal_lr: bool = False  # linearly to 0 over the budget
    buffer_size: int = 1_000_000  # transitions, all ranks together (each keeps its share)
    minibatch_size: int = 32  # samples per gradient step, all ranks together
    learning_starts: int = 100  # env steps (all ranks) before the first gradient step
    train_frequency: int = 4  # env steps (all ranks) between updates
    gradient_steps: int = 1  # gradient steps per update
    target_update_interval: int = 2_500  # gradient steps between target updates
    tau: float = 1.0  # target update θ' ← τθ + (1 − τ)θ' (1: copy; < 1: Polyak averaging)
    gamma: float = 0.99
    epsilon_start: float = 1.0
    epsilon_end: float = 0.05
    exploration_fraction: float = 0.1  # of the budget over which ε decays linearly
    double_dqn: bool = False
    dueling: bool = False
    max_grad_norm: float = 10.0  # on the rank-averaged gradient
    activation: str = "relu"  # CleanRL's and SB3's DQN

    def validate(self) -> None:
        def check(ok: bool, key: str, expected: str) -> None:
            if not ok:
                raise ConfigError(
                    f"config key '{key}': got {getattr(self, key)!r}, expected {expected}"
                )

        check(self.learning_rate > 0, "learning_rate", "a number > 0")
        check(self.buffer_size >= 1, "buffer_size", "an integer >= 1")
        check(self.minibatch_size >= 1, "minibatch_size", "an integer >= 1")
        check(self.learning_starts >= 0, "learning_starts", "an integer >= 0")
        check(self.train_frequency >= 1, "train_frequency", "an integer >= 1")
        check(self.gradient_steps >= 1, "gradient_steps", "an integer >= 1")
        check(self.target_update_interval >= 1, "target_update_interval", "an integer >= 1")
        check(0.0 < self.tau <= 1.0, "tau", "a coefficient τ in (0, 1]")
        check(0.0 <= self.gamma <= 1.0, "gamma", "a discount γ in [0, 1]")
        check(0.0 <= self.epsilon_start <= 1.0, "epsilon_start", "a probability in [0, 1]")
        check(0.0 <= self.epsilon_end <= 1.0, "epsilon_end", "a probability in [0, 1]")
        check(0.0 <= self.exploration_fraction <= 1.0, "exploration_fraction", "in [0, 1]")
        check(self.max_grad_norm > 0, "max_grad_norm", "a number > 0")
        self.validate_network()

    def check_spaces(self, observation_space, action_space) -> None:
        """Raises UserError unless the action space is `Discrete`."""
        import gymnasium as gym

        if not isinstance(action_space, gym.spaces.Discrete):
            raise UserError(f"dqn needs a Discrete action space, got {action_space}")

    def rollout_steps(self, world_size: int, num_envs: int) -> int:
        """Vector steps per rank between updates: train_frequency / (world_size × num_envs).

        Raises:
            ConfigError: train_frequency, minibatch_size or buffer_size do not split.
        """
        share = world_size * num_envs
        if self.train_frequency % share or self.minibatch_size % world_size:
            raise ConfigError(
                f"train_frequency {self.train_frequency} must split over {world_size} ranks "
                f"x {num_envs} env copies (num_envs) and minibatch_size {self.minibatch_size} over "
                f"{world_size} ranks: train_frequency % {share} = "
                f"{self.train_frequency % share}, minibatch_size % {world_size} = "
                f"{self.minibatch_size % world_size}"
            )
        return self.train_frequency // share

    def first_update_env_steps(self, world_size: int, num_envs: int) -> int:
        """Env steps, all ranks together, before the first update: one update's batch after
        `learning_starts`."""
        return (
            self.learning_starts + self.rollout_steps(world_size, num_envs) * num_envs * world_size
        )


class DQN:
    """One rank's DQN learner: ε-greedy actor, replay memory, averaged gradient steps.

    Call sequence (by the topology, on every rank in lockstep):
        for each vector step: actions = act(obs, progress); observe(step outcome)
        every `rollout_steps` vector steps: update(dp, progress)
    """

    def __init__(
        self,
        cfg: DQNConfig,
        observation_space,
        action_space,
        num_envs: int,
        world_size: int,
        seed: int,
    ):
        self.cfg = cfg
        self.world_size = world_size
        self.num_envs = num_envs
        self.rollout_steps = cfg.rollout_steps(world_size, num_envs)
        self.rank_minibatch_size = cfg.minibatch_size // world_size
        self.capacity = max(1, cfg.buffer_size // world_size)
        self.n_actions = int(action_space.n)
        self.model = q_network(cfg, observation_space, action_space, dueling=cfg.dueling)
        self.target = q_network(cfg, observation_space, action_space, dueling=cfg.dueling)
        self.target.load_state_dict(self.model.state_dict())
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.learning_rate, fused=True)
        self.device = torch.device("cpu")
        self.rng = np.random.default_rng(seed)  # exploration and replay sampling
        obs_shape = observation_space.shape or ()
        obs_dtype = observation_space.dtype if observation_space.shape else np.int64
        self.replay = {
            "obs": np.zeros((self.capacity, *obs_shape), dtype=obs_dtype),
            "next_obs": np.zeros((self.capacity, *obs_shape), dtype=obs_dtype),
            "action": np.zeros(self.capacity, dtype=np.int64),
            "reward": np.zeros(self.capacity, dtype=np.float32),
            "terminated": np.zeros(self.capacity, dtype=np.float32),
        }
        self.size = 0  # transitions stored
        self.cursor = 0  # where the next one goes
        self.env_steps = 0  # this rank's
        self.gradient_steps = 0
        self.learner_updates = 0
        self._last_obs = None
        self._last_actions = None

    def epsilon(self, progress: float) -> float:
        c = self.cfg
        return linear_schedule(c.epsilon_start, c.epsilon_end, c.exploration_fraction, progress)

    def act(self, obs: np.ndarray, progress: float = 0.0) -> np.ndarray:
        """ε-greedy actions.

        Args:
            obs: (B, *obs_shape) observations.
            progress: fraction of the budget done (the ε schedule).

        Returns:
            (B,) int64 actions.
        """
        with torch.no_grad():
            greedy = self.model(torch.as_tensor(obs)).argmax(dim=1).cpu().numpy()
        explore = self.rng.random(len(obs)) < self.epsilon(progress)
        actions = np.where(explore, self.rng.integers(0, self.n_actions, len(obs)), greedy)
        self._last_obs, self._last_actions = np.asarray(obs), actions
        return actions

    def observe(self, rewards, terminated, truncated, next_obs) -> None:
        """Store the step's B transitions (next_obs: the final observation at an end)."""
        for i in range(len(rewards)):
            k = self.cursor
            self.replay["obs"][k] = self._last_obs[i]
            self.replay["next_obs"][k] = next_obs[i]
            self.replay["action"][k] = self._last_actions[i]
            self.replay["reward"][k] = rewards[i]
            self.replay["terminated"][k] = float(terminated[i])
            self.cursor = (k + 1) % self.capacity
            self.size = min(self.size + 1, self.capacity)
        self.env_steps += len(rewards)

    def update(self, dp, progress: float) -> dict[str, float]:
        """`gradient_steps` averaged gradient steps, once `learning_starts` global env steps
        are in (every rank decides alike: ranks step in lockstep)."""
        self.learner_updates += 1
        if self.env_steps * self.world_size < self.cfg.learning_starts:
            return {"exploration": self.epsilon(progress)}
        lr = set_learning_rate(self.optimizer, self.cfg.learning_rate, self.cfg.anneal_lr, progress)
        if self.gradient_steps == 0:
            # The target starts as the online network as it is now: after the topology's
            # broadcast from rank 0, so it is the same on every rank (a copy taken at
            # construction would keep each rank's own random init under Polyak averaging).
            self.target.load_state_dict(self.model.state_dict())
        losses = []
        for _ in range(self.cfg.gradient_steps):
            losses.append(self._gradient_step(dp))
        return {
            "losses/td": float(np.mean(losses)),
            "exploration": self.epsilon(progress),
            "learning_rate": lr,
        }

    def _gradient_step(self, dp) -> float:
        cfg = self.cfg
        index = self.rng.integers(0, self.size, self.rank_minibatch_size)
        batch = {k: torch.as_tensor(v[index], device=self.device) for k, v in self.replay.items()}
        with torch.no_grad():
            next_q = self.target(batch["next_obs"])
            if cfg.double_dqn:
                choice = self.model(batch["next_obs"]).argmax(dim=1, keepdim=True)
                next_value = next_q.gather(1, choice).squeeze(1)
            else:
                next_value = next_q.max(dim=1).values
            target = batch["reward"] + cfg.gamma * (1.0 - batch["terminated"]) * next_value
        q = self.model(batch["obs"]).gather(1, batch["action"].unsqueeze(1)).squeeze(1)
        loss = F.smooth_l1_loss(q, target)
        self.optimizer.zero_grad(set_to_none=False)  # keeps `dp`'s flat gradient views
        loss.backward()
        dp.average_gradients()
        dp.clip_gradients(cfg.max_grad_norm)
        self.optimizer.step()
        self.gradient_steps += 1
        if self.gradient_steps % cfg.target_update_interval == 0:
            self._update_target()
        return float(loss.item())

    def _update_target(self) -> None:
        """θ' ← τθ + (1 − τ)θ' (a copy when τ = 1, as in Mnih et al. 2015)."""
        if self.cfg.tau >= 1.0:
            self.target.load_state_dict(self.model.state_dict())
            return
        with torch.no_grad():
            pairs = zip(self.model.parameters(), self.target.parameters(), strict=True)
            for online, target in pairs:
                target.mul_(1.0 - self.cfg.tau).add_(online, alpha=self.cfg.tau)

    def greedy_actions(self, obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.model(torch.as_tensor(obs)).argmax(dim=1).cpu().numpy()

    def synced_modules(self) -> list[torch.nn.Module]:
        """The networks every rank holds identically: the online and target networks."""
        return [self.model, self.target]

    def to(self, device: torch.device) -> DQN:
        """Put the online and target networks on `device` (the replay memory stays in host
        memory; each gradient step moves its minibatch over)."""
        self.device = device
        self.model.to(device)
        self.target.to(device)
        return self

    def shared_arrays(self) -> dict[str, np.ndarray]:
        """Identical on every rank: online and target networks, optimizer state."""
        return (
            module_arrays(self.model)
            | module_arrays(self.target, "target")
            | optimizer_arrays(self.optimizer)
            | {"gradient_steps": np.array([self.gradient_steps], dtype=np.int64)}
        )

    def load_shared(self, arrays: dict[str, np.ndarray]) -> None:
        load_module_arrays(self.model, arrays)
        load_module_arrays(self.target, arrays, "target")
        load_optimizer_arrays(self.optimizer, arrays)
        self.gradient_steps = int(arrays["gradient_steps"][0])

    def rank_arrays(self) -> dict[str, np.ndarray]:
        """This rank's own: its replay memory, generator and counters."""
        out = {f"replay_{k}": v[: self.size].copy() for k, v in self.replay.items()}
        out["replay_counters"] = np.array([self.size, self.cursor, self.env_steps], np.int64)
        out["dqn_rng"] = generator_state(self.rng)
        return out

    def load_rank(self, arrays: dict[str, np.ndarray]) -> None:
        self.size, self.cursor, self.env_steps = (int(x) for x in arrays["replay_counters"])
        for k, v in self.replay.items():
            v[: self.size] = arrays[f"replay_{k}"]
        set_generator_state(self.rng, arrays["dqn_rng"])


# One env copy per rank (SB3's default), so `train_frequency` 4 splits over 1, 2 and 4 ranks.
ALGORITHM = Algorithm(
    "dqn",
    DQNConfig,
    ("data_parallel",),
    DQN,
    run_defaults={"num_envs": 1},
    renamed_keys={"batch_size": "minibatch_size"},
)
