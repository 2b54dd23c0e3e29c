"""On-policy rollout storage and the acting half shared by the actor-critic learners
(PPO, A2C).

A rollout is T vector steps of B env copies, stored time-major: after `take()` every array
is a torch tensor of shape (T, B, ...). Convention (as in `hpcrl.returns`): `next_obs[t]` is
the observation after step t, which is the episode's final observation where step t ended
an episode (gymnasium's `info["final_obs"]`), so a truncated episode can be bootstrapped.
"""

from __future__ import annotations

import numpy as np
import torch

from hpcrl.errors import UserError
from hpcrl.normalization import ObservationNormalizer
from hpcrl.returns import gae
from hpcrl.state import load_module_arrays, load_optimizer_arrays, module_arrays, optimizer_arrays

_FIELDS = (
    "obs",
    "actions",
    "log_probs",
    "values",
    "rewards",
    "terminated",
    "truncated",
    "next_obs",
)


class Rollout:
    """T vector steps of one rank's env copies, filled step by step and taken at once."""

    def __init__(self) -> None:
        self._steps: dict[str, list[torch.Tensor]] = {k: [] for k in _FIELDS}

    def __len__(self) -> int:
        return len(self._steps["rewards"])

    def add_action(self, obs, actions, log_probs, values) -> None:
        """What the policy saw and did at step t: (B, ...) obs and actions, (B,) log π(a|s)
        and V(s)."""
        for key, value in (
            ("obs", obs),
            ("actions", actions),
            ("log_probs", log_probs),
            ("values", values),
        ):
            self._steps[key].append(torch.as_tensor(value))

    def add_outcome(self, rewards, terminated, truncated, next_obs) -> None:
        """The step's outcome: (B,) rewards, terminated and truncated flags, and (B, ...)
        next observations (the final observation where an episode ended)."""
        for key, value in (
            ("rewards", rewards),
            ("terminated", terminated),
            ("truncated", truncated),
        ):
            self._steps[key].append(torch.as_tensor(np.asarray(value), dtype=torch.float32))
        self._steps["next_obs"].append(torch.as_tensor(next_obs))

    def take(self, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """Every field stacked time-major ((T, B, ...)) on `device` (default: host memory);
        the storage is emptied."""
        out = {k: torch.stack(v) for k, v in self._steps.items()}
        if device is not None:
            out = {k: v.to(device) for k, v in out.items()}
        for v in self._steps.values():
            v.clear()
        return out


def check_actor_critic_spaces(
    algo: str, normalize_obs: bool, observation_space, action_space
) -> None:
    """What PPO and A2C accept: `Discrete` or `Box` actions; `normalize_obs` only for float
    `Box` observations (not images, whose pixels the CNN scales itself).

    Raises:
        UserError: naming the space and what was expected.
    """
    import gymnasium as gym

    if not isinstance(action_space, (gym.spaces.Discrete, gym.spaces.Box)):
        raise UserError(f"{algo} needs a Discrete or Box action space, got {action_space}")
    float_box = isinstance(observation_space, gym.spaces.Box) and np.issubdtype(
        observation_space.dtype, np.floating
    )
    if normalize_obs and not float_box:
        raise UserError(
            f"normalize_obs needs a float Box observation space, got {observation_space}: "
            "set normalize_obs=false"
        )


class ActorCriticLearner:
    """What PPO and A2C share: an `ActorCritic` `model` and its `optimizer` (set by the
    subclass), sampling actions into a `Rollout`, and the state every rank holds alike.
    Subclasses add `update(dp, progress)` and, if they have any, their own rank state."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer

    def __init__(self, observation_space=None, normalize_obs: bool = False) -> None:
        """`normalize_obs`: normalize observations with running statistics merged over the
        ranks (`hpcrl.normalization`); needs a float `Box` `observation_space`."""
        self.learner_updates = 0
        self.rollout = Rollout()
        self.device = torch.device("cpu")
        self.normalizer = None
        if normalize_obs:
            self.normalizer = ObservationNormalizer(observation_space.shape)

    def synced_modules(self) -> list[torch.nn.Module]:
        """The networks every rank holds identically: the model."""
        return [self.model]

    def to(self, device: torch.device) -> ActorCriticLearner:
        """Put the model on `device` (rollouts stay in host memory; each update moves its
        batch over once)."""
        self.device = device
        self.model.to(device)
        return self

    def shared_arrays(self) -> dict[str, np.ndarray]:
        """What every rank holds identically: parameters, optimizer state and the
        observation statistics."""
        arrays = module_arrays(self.model) | optimizer_arrays(self.optimizer)
        if self.normalizer is not None:
            arrays |= self.normalizer.arrays()
        return arrays

    def load_shared(self, arrays: dict[str, np.ndarray]) -> None:
        load_module_arrays(self.model, arrays)
        load_optimizer_arrays(self.optimizer, arrays)
        if self.normalizer is not None:
            self.normalizer.load(arrays)

    def merge_statistics(self, dp) -> None:
        """Collective, at the end of every update: pool the rollout's observation sums of
        every rank into the normalizer's statistics (a no-op without normalization)."""
        if self.normalizer is not None:
            self.normalizer.merge(dp.sum)

    def _input(self, obs: np.ndarray, accumulate: bool = False) -> torch.Tensor:
        """Observations as the model sees them (normalized when asked)."""
        if self.normalizer is None:
            return torch.as_tensor(obs)
        if accumulate:
            self.normalizer.accumulate(obs)
        return torch.from_numpy(self.normalizer(obs))

    def rank_arrays(self) -> dict[str, np.ndarray]:
        """This rank's own state between updates: none here (sampling uses the rank's
        torch RNG, which the topology checkpoints)."""
        return {}

    def load_rank(self, arrays: dict[str, np.ndarray]) -> None:
        pass

    def act(self, obs: np.ndarray, progress: float = 0.0) -> np.ndarray:
        """Sample actions for a batch of observations and remember what the loss needs.

        Args:
            obs: (B, *obs_shape) observations of this rank's env copies.
            progress: fraction of the budget done (unused: the policy is sampled).

        Returns:
            (B, *action_shape) actions (int64 for Discrete, float32 for Box).
        """
        obs_t = self._input(obs, accumulate=True)
        with torch.no_grad():
            actions, log_probs, values = (x.cpu() for x in self.model.act(obs_t))
        self.rollout.add_action(obs_t, actions, log_probs, values)
        return actions.numpy()

    def observe(self, rewards, terminated, truncated, next_obs) -> None:
        """The step's outcome: (B,) rewards, terminated, truncated and (B, ...) next
        observations (the final observation where an episode ended)."""
        self.rollout.add_outcome(rewards, terminated, truncated, self._input(next_obs))

    def greedy_actions(self, obs: np.ndarray) -> np.ndarray:
        """Deterministic actions (mode of the policy) for evaluation."""
        with torch.no_grad():
            actions, _, _ = self.model.act(self._input(obs), deterministic=True)
        return actions.cpu().numpy()

    def sample_actions(self, obs: np.ndarray) -> np.ndarray:
        """Actions sampled from the policy (torch's global RNG), recording nothing."""
        with torch.no_grad():
            actions, _, _ = self.model.act(self._input(obs))
        return actions.cpu().numpy()


def advantages_and_returns(
    model, steps: dict[str, torch.Tensor], gamma: float, gae_lambda: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(λ) advantages and λ-returns (each (T, B) float32) for a taken rollout, with
    V(next_obs) from `model.value` for bootstrapping (`hpcrl.returns.gae`: no bootstrap past
    `terminated`, bootstrap from the final observation past `truncated`). With λ = 1 these
    are the n-step returns of A3C/A2C (Mnih et al. 2016, Algorithm S3), n up to T."""
    next_obs = steps["next_obs"]
    T, B = steps["rewards"].shape
    with torch.no_grad():
        next_values = model.value(next_obs.reshape(T * B, *next_obs.shape[2:])).reshape(T, B)
    return gae(
        steps["rewards"],
        steps["values"],
        next_values,
        steps["terminated"],
        steps["truncated"],
        gamma,
        gae_lambda,
    )
