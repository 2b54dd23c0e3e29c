"""An actor's policy in numpy: the forward pass of `hpcrl.models.ActorCritic` (vector
observations, separate MLP trunks with tanh, ReLU, ELU or SiLU) on the flat float32
parameter vector its learner publishes, without importing torch.

Why: an actor rank only runs the forward pass of a small MLP, and torch costs ~1 s of import
and ~190 MB of resident memory per process (measured here), which at 64 ranks on one node
is most of the job's start-up and memory; and `torch.distributions.Categorical` sampling
costs ~10x the arithmetic for a batch of 8 CartPole observations. Sampling is Gumbel-max
(Gumbel 1954; Maddison et al. 2014, "A* Sampling", §2): a = argmax_i (logits_i + g_i) with
g_i ~ Gumbel(0, 1) i.i.d. is an exact draw from softmax(logits), one vectorized argmax
for the whole batch. Box actions are drawn from the diagonal Gaussian N(mean, exp(log_std)²)
as `ActorCritic` defines it.

The parameter layout is `ActorCritic.parameters()`'s order, each weight (out, in) row-major
as torch stores it: `log_std` first for Box actions (a module's own parameters come before
its submodules'), then the actor trunk (W, b per hidden layer), the critic trunk (the same),
the actor head (W, b) and the critic head (W, b). `tests/test_numpy_policy.py`
checks them against the torch model: probabilities to 1e-6, values and log-probabilities
to 1e-5.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import gymnasium as gym
import numpy as np

from hpcrl.algos.async_base import SendsUnrolls

# `NetworkConfig.activation` values the numpy forward pass computes exactly as torch does
# (GELU's erf is not in numpy: its actors keep the torch model).
ACTIVATIONS = {
    "tanh": np.tanh,
    "relu": lambda x: np.maximum(x, 0.0, dtype=x.dtype),
    "elu": lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0.0))).astype(x.dtype),
    "silu": lambda x: (x / (1.0 + np.exp(-x))).astype(x.dtype),
}


class NumpyActorCritic(SendsUnrolls):
    """`ActorCritic`'s policy and value function for an actor rank (`contracts.AsyncActor`).

    Observations: (B, *observation_space.shape) of a `Box` (flattened to (B, obs_dim)
    float32) or (B,) integers of a `Discrete(n, start)` (one-hot). Actions: (B,) int64 for
    `Discrete(n)`, (B, action_dim) float32 for a 1-D `Box`. Log-probabilities and values:
    (B,) float32.

    Args:
        hidden: the trunks' layer widths (`ActorCritic`'s `hidden`).
        activation: after each hidden layer, a key of `ACTIVATIONS` (`ActorCritic`'s).
        seed: of this actor's sampling generator (numpy `PCG64`).
    """

    def __init__(
        self,
        observation_space: gym.Space,
        action_space: gym.Space,
        hidden: Sequence[int],
        seed: int,
        activation: str = "tanh",
    ):
        if not self.supports(observation_space, action_space, activation):
            raise ValueError(
                f"no numpy policy for {observation_space} -> {action_space} ({activation})"
            )
        self.activation = ACTIVATIONS[activation]
        self.rng = np.random.default_rng(seed)
        self.one_hot_start: int | None = None
        if isinstance(observation_space, gym.spaces.Discrete):
            obs_dim = int(observation_space.n)
            self.one_hot_start = int(observation_space.start)
        else:
            obs_dim = int(np.prod(observation_space.shape))
        self.obs_dim = obs_dim
        self.continuous = isinstance(action_space, gym.spaces.Box)
        n_out = action_space.shape[0] if self.continuous else int(action_space.n)
        shapes: list[tuple[int, ...]] = [(n_out,)] if self.continuous else []
        for _trunk in ("actor", "critic"):
            width = obs_dim
            for h in hidden:
                shapes += [(h, width), (h,)]
                width = h
        shapes += [(n_out, width), (n_out,), (1, width), (1,)]
        self.size = sum(math.prod(s) for s in shapes)
        self.flat = np.zeros(self.size, dtype=np.float32)
        views, offset = [], 0
        for shape in shapes:
            n = math.prod(shape)
            views.append(self.flat[offset : offset + n].reshape(shape))
            offset += n
        self.log_std = views.pop(0) if self.continuous else None
        layers = 2 * len(hidden)
        self.actor_trunk = [(views[i], views[i + 1]) for i in range(0, layers, 2)]
        self.critic_trunk = [(views[i], views[i + 1]) for i in range(layers, 2 * layers, 2)]
        self.actor_head = (views[2 * layers], views[2 * layers + 1])
        self.critic_head = (views[2 * layers + 2], views[2 * layers + 3])

    @staticmethod
    def supports(
        observation_space: gym.Space, action_space: gym.Space, activation: str = "tanh"
    ) -> bool:
        """Vector (not image) or Discrete observations, Discrete(n) or 1-D Box actions (the
        spaces `ActorCritic` gives separate MLP trunks) and an activation in `ACTIVATIONS`."""
        image = (
            isinstance(observation_space, gym.spaces.Box)
            and observation_space.dtype == np.uint8
            and len(observation_space.shape) >= 2
        )
        obs_ok = isinstance(observation_space, gym.spaces.Discrete) or (
            isinstance(observation_space, gym.spaces.Box) and not image
        )
        act_ok = (
            isinstance(action_space, gym.spaces.Discrete) and int(action_space.start) == 0
        ) or (isinstance(action_space, gym.spaces.Box) and len(action_space.shape) == 1)
        return obs_ok and act_ok and activation in ACTIVATIONS

    # -- parameters -------------------------------------------------------------------

    def published(self) -> np.ndarray:
        """The flat float32 parameter vector (a copy), `(size,)`."""
        return self.flat.copy()

    def load_published(self, flat: np.ndarray) -> None:
        """Copy a learner's `published()` vector in (nothing aliases `flat` afterwards)."""
        self.flat[:] = flat

    # -- forward pass -----------------------------------------------------------------

    def _features(self, obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs)
        if self.one_hot_start is not None:
            index = obs.reshape(-1).astype(np.int64) - self.one_hot_start
            x = np.zeros((index.size, self.obs_dim), dtype=np.float32)
            x[np.arange(index.size), index] = 1.0
            return x
        return obs.reshape(obs.shape[0], -1).astype(np.float32, copy=False)

    def _mlp(self, x: np.ndarray, trunk, head) -> np.ndarray:
        for weight, bias in trunk:
            x = self.activation(x @ weight.T + bias)
        weight, bias = head
        return x @ weight.T + bias

    def _policy_out(self, obs: np.ndarray) -> np.ndarray:
        """Logits (B, n), or the Gaussian mean (B, action_dim)."""
        return self._mlp(self._features(obs), self.actor_trunk, self.actor_head)

    def log_probabilities(self, obs: np.ndarray) -> np.ndarray:
        """log π(·|s), (B, n) float32 (Discrete actions)."""
        logits = self._policy_out(obs)
        top = logits.max(axis=1, keepdims=True)
        shifted = logits - top
        return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))

    def values(self, obs: np.ndarray) -> np.ndarray:
        """V(s): (B,) float32."""
        return self._mlp(self._features(obs), self.critic_trunk, self.critic_head)[:, 0]

    def act(self, obs: np.ndarray, progress: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """The behaviour policy μ: sampled actions and their log μ(a|s), (B,) float32."""
        if self.continuous:
            mean = self._policy_out(obs)
            std = np.exp(self.log_std)
            noise = self.rng.standard_normal(mean.shape).astype(np.float32)
            actions = mean + std * noise
            log_probs = (-0.5 * noise**2 - self.log_std - 0.5 * math.log(2 * math.pi)).sum(1)
            return actions.astype(np.float32), log_probs.astype(np.float32)
        log_pi = self.log_probabilities(obs)
        actions = np.argmax(log_pi + self.rng.gumbel(size=log_pi.shape), axis=1)
        log_probs = np.take_along_axis(log_pi, actions[:, None], axis=1)[:, 0]
        return actions.astype(np.int64), log_probs.astype(np.float32)

    def greedy_actions(self, obs: np.ndarray) -> np.ndarray:
        """The mode: argmax of the logits ((B,) int64) or the Gaussian mean."""
        out = self._policy_out(obs)
        return out.astype(np.float32) if self.continuous else np.argmax(out, axis=1)
