"""Native vectorized environments (`vector_env: native`): gymnasium's own numpy vector
implementations (a registered env's `vector_entry_point`) in place of a `SyncVectorEnv`
of single-env copies, with hpcrl's episode semantics kept exactly.

gymnasium 1.4 ships one numpy implementation, `CartPoleVectorEnv` (CartPole-v0/v1): every
copy's physics in one set of array operations, with no per-copy wrapper stack
(`TimeLimit`, `OrderEnforcing`, `PassiveEnvChecker`). Through hpcrl's `EnvStepper`,
measured here at 1.06x a `SyncVectorEnv` with 4 copies, 1.7x with 8, 8.7x with 64 and 26x
with 256 (`benchmarks/vector_envs.py`, `benchmarks/RESULTS.md`). Its own
autoreset is `AutoresetMode.NEXT_STEP`: the step after an episode ends ignores that copy's
action, returns its reset observation with reward 0, and is no transition. hpcrl's
steppers and unrolls assume `SAME_STEP` (every call is one real transition per copy, the
final observation in `info["final_obs"]`), so `SameStepCartPoleVectorEnv` resets a finished
copy in the step that finished it. It draws the reset state from the same generator with
the same call as gymnasium's (uniform on [low, high)^4 for the copies that ended, in copy
order), and nothing else draws in between, so its observation stream is the native env's
with each copy's reset step left out (tested in `tests/test_native_vector.py`).

Differences from `SyncVectorEnv` of `gymnasium.make("CartPole-v1")` copies, none of which
changes the MDP:
- one generator for all copies (seeded once by `reset(seed=...)`), so the copies'
  initial states differ from the single-env copies' for the same seed;
- the time limit is the env's `steps >= max_episode_steps` (`truncated`), not a wrapper,
  and it takes precedence the same way: a copy that terminates on its last step reports
  both flags, as `TimeLimit` does;
- no `PassiveEnvChecker` or `OrderEnforcing`; an invalid action fails gymnasium's assert.

Exact resume: the whole vector env's state (the shared generator, the physical state and
step counts) is captured by `capture_state` and restored by `restore_state`.

Source: gymnasium's `gymnasium/envs/classic_control/cartpole.py` (Barto, Sutton and
Anderson 1983 dynamics), `gymnasium.vector.AutoresetMode`.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.envs.classic_control.cartpole import CartPoleVectorEnv
from gymnasium.vector import AutoresetMode, VectorEnv

from hpcrl.errors import UserError
from hpcrl.state import generator_state, set_generator_state


class SameStepCartPoleVectorEnv(CartPoleVectorEnv):
    """gymnasium's `CartPoleVectorEnv` with same-step autoreset.

    `step(actions)` with actions (B,) int in {0, 1} returns obs (B, 4) float32, rewards
    (B,) float32, terminated and truncated (B,) bool and, when any copy's episode ended,
    info {"final_obs": (B, 4) float32 (the ended copies' last observations; other rows
    are their reset-free current observations), "_final_obs": (B,) bool}. The returned
    obs of an ended copy is already its next episode's first observation.
    """

    metadata = {**CartPoleVectorEnv.metadata, "autoreset_mode": AutoresetMode.SAME_STEP}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        obs, info = super().reset(seed=seed, options=options)
        return np.ascontiguousarray(obs), info

    def step(self, action):
        obs, rewards, terminated, truncated, _ = super().step(action)
        done = self.prev_done  # terminated | truncated of this step
        info: dict[str, Any] = {}
        if done.any():
            info = {"final_obs": obs, "_final_obs": done.copy()}
            # gymnasium's own reset draw, one step earlier (cartpole.py, step()).
            self.state[:, done] = self.np_random.uniform(
                low=self.low, high=self.high, size=(4, int(done.sum()))
            )
            self.steps[done] = 0
            self.prev_done = np.zeros(self.num_envs, dtype=np.bool_)
            obs = self.state.T.astype(np.float32)
        # gymnasium's `state.T.astype` is Fortran-ordered; a resumed run's observations come
        # from a C-ordered copy, and torch's matmul rounds differently on the two layouts,
        # which broke bit-exact resume. Always C order.
        return np.ascontiguousarray(obs), rewards, terminated, truncated, info

    def capture_state(self) -> tuple[np.ndarray, np.ndarray]:
        """The whole vector env: (generator (6,) uint64 as `hpcrl.state.generator_state`,
        (B, 5) float64 of x, x_dot, theta, theta_dot and the episode's step count)."""
        values = np.concatenate([self.state.T, self.steps[:, None]], axis=1)
        return generator_state(self.np_random), values.astype(np.float64)

    def restore_state(self, rng: np.ndarray, values: np.ndarray) -> None:
        """Undo `capture_state` (after a `reset`)."""
        set_generator_state(self.np_random, rng)
        self.state = np.ascontiguousarray(values[:, :4].T, dtype=np.float64)
        self.steps = values[:, 4].astype(np.int32)
        self.prev_done = np.zeros(self.num_envs, dtype=np.bool_)


# gymnasium vector entry point -> hpcrl's same-step implementation.
_NATIVE = {
    "gymnasium.envs.classic_control.cartpole:CartPoleVectorEnv": SameStepCartPoleVectorEnv,
}


def native_env_ids() -> list[str]:
    """The registered env ids that have a native vector env here."""
    return sorted(k for k, s in gym.registry.items() if s.vector_entry_point in _NATIVE)


def make_native_vector_env(env_id: str, env_kwargs: dict | None, num_envs: int) -> VectorEnv:
    """`num_envs` copies of `env_id` in its native vector env, with same-step autoreset.

    Args:
        env_kwargs: the env's keyword arguments (`max_episode_steps` included, default the
            registered time limit).

    Raises:
        UserError: `env_id` has no native vector env (naming those that do), or the
            implementation rejects `env_kwargs`.
    """
    spec = gym.registry.get(env_id)
    cls = _NATIVE.get(spec.vector_entry_point) if spec is not None else None
    if cls is None:
        raise UserError(
            f"vector_env native: {env_id!r} has no native vector env (those that do: "
            f"{', '.join(native_env_ids())}); use vector_env sync or async"
        )
    kwargs = {**spec.kwargs, **(env_kwargs or {})}
    kwargs.setdefault("max_episode_steps", spec.max_episode_steps)
    try:
        return cls(num_envs=num_envs, **kwargs)
    except TypeError as e:
        raise UserError(f"vector_env native: env_kwargs {env_kwargs!r} for {env_id}: {e}") from e
