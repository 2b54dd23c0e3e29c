"""Tabular MDPs stepped from their transition table (`vector_env: table`, and what
`vector_env: auto`, the default, picks for the envs of `steps_exactly`): `num_envs`
copies of a gymnasium toy-text env (FrozenLake, CliffWalking, Taxi, FrozenLake with a
generated map) sampled together with numpy from `env.unwrapped.P`, with no per-copy
Python wrapper stack.

Exact mode (the only mode, hence the default: a faster mode that drew its random numbers
otherwise would change every run of these envs; the blocks below already make stepping
a few array operations): every copy keeps its own generator, seeded as gymnasium
seeds a copy (`gymnasium.utils.seeding.np_random(seed + i)`, PCG64 from a `SeedSequence`;
`hpcrl.seeding` makes the same generators for all copies at once),
and draws from it exactly what gymnasium's env draws: one uniform per reset and one per
step, turned into an outcome by gymnasium's rule (`toy_text.utils.categorical_sample`:
the first index whose cumulative probability exceeds the uniform, index 0 if none does).
The time limit is `TimeLimit`'s (`truncated` once a copy's step count reaches the spec's
`max_episode_steps`, together with `terminated` when both hold) and autoreset is
`AutoresetMode.SAME_STEP`, as hpcrl's `make_vector_env` builds it. So observations,
rewards, `terminated`, `truncated` and final observations are bit-identical to a
`SyncVectorEnv` of `gymnasium.make` copies reset with the same seed under the same actions
(`tests/test_table_vector.py`). Uniforms are drawn in blocks per copy (a PCG64 block is the
same stream as single draws), so a step is a few array operations.

Not covered: Taxi's `fickle_passenger` (it draws more than one uniform per step; rainy
Taxi's moves are in `P` and are covered), and envs without `P`.

Source: gymnasium 1.4 `gymnasium/envs/toy_text/{frozen_lake,cliffwalking,taxi,utils}.py`,
`gymnasium/utils/seeding.py`, `gymnasium/wrappers/common.py` (`TimeLimit`).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from hpcrl import frozen_lake  # noqa: F401 - registers hpcrl/FrozenLake-v0
from hpcrl.errors import UserError
from hpcrl.seeding import np_random_generators
from hpcrl.state import generator_state_before, set_generator_state

BLOCK = 256  # uniforms drawn per copy at a time


class PaddedTable:
    """A toy-text env's `P` as padded (S, A, W) arrays: cumulative probabilities (-inf
    padding: a padding entry never exceeds the uniform, so a row whose real cumulative
    probabilities all stay <= u gives index 0, as gymnasium's argmax of all-False), next
    states, rewards and terminal flags; and the initial distribution's cumulative sum."""

    def __init__(self, inner: gym.Env):
        n_states, n_actions = int(inner.observation_space.n), int(inner.action_space.n)
        width = max(len(inner.P[s][a]) for s in range(n_states) for a in range(n_actions))
        self.cum_prob = np.full((n_states, n_actions, width), -np.inf)
        self.next_state = np.zeros((n_states, n_actions, width), dtype=np.int64)
        self.reward = np.zeros((n_states, n_actions, width))
        self.terminal = np.zeros((n_states, n_actions, width), dtype=bool)
        for s in range(n_states):
            for a in range(n_actions):
                rows = inner.P[s][a]
                k = len(rows)
                self.cum_prob[s, a, :k] = np.cumsum([row[0] for row in rows])
                self.next_state[s, a, :k] = [row[1] for row in rows]
                self.reward[s, a, :k] = [row[2] for row in rows]
                self.terminal[s, a, :k] = [row[3] for row in rows]
        self.initial_cum = np.cumsum(np.asarray(inner.initial_state_distrib, dtype=np.float64))
        # each outcome's cumulative probabilities as a flat (S * A,) column: `sample` takes
        # them a column at a time (a (B, W) gather and an argmax along its short axis cost
        # 98 us at 8,192 copies, the columns 39 us)
        self._columns = [np.ascontiguousarray(self.cum_prob[:, :, j]).ravel() for j in range(width)]
        self._n_actions, self._width = n_actions, width

    def sample(self, states: np.ndarray, actions: np.ndarray, u: np.ndarray):
        """(B,) states, actions, uniforms -> (next_state, reward, terminated), (B,) each.
        The outcome is the first k whose cumulative probability exceeds u, 0 if none does
        (`(cum_prob[s, a] > u).argmax()`, gymnasium's `categorical_sample`): the columns
        from the last to the first, each one that exceeds u overwriting k."""
        pair = states * self._n_actions + actions
        k = np.zeros(len(pair), dtype=np.intp)
        for j in range(self._width - 1, -1, -1):
            np.copyto(k, j, where=np.take(self._columns[j], pair) > u)
        outcome = pair * self._width + k  # flat index of (s, a, k): one take per array
        return (
            np.take(self.next_state.ravel(), outcome),
            np.take(self.reward.ravel(), outcome),
            np.take(self.terminal.ravel(), outcome),
        )


def steps_exactly(env: gym.Env) -> bool:
    """Whether `TableVectorEnv` reproduces `env` bit for bit, so `vector_env: auto` may
    pick it: gymnasium's own FrozenLake (any map), CliffWalking and Taxi (not with its
    fickle passenger), and `hpcrl/FrozenLake-v0` (`hpcrl.frozen_lake`), the envs
    `tests/test_table_vector.py` checks. Another env with a
    `P` may draw its random numbers otherwise, so it keeps `sync` unless asked for."""
    from gymnasium.envs.toy_text import CliffWalkingEnv, FrozenLakeEnv, TaxiEnv

    from hpcrl.frozen_lake import GridFrozenLake

    inner = env.unwrapped
    exact = type(inner) in (FrozenLakeEnv, CliffWalkingEnv, TaxiEnv, GridFrozenLake)
    return exact and not getattr(inner, "fickle_passenger", False)


def check_table(env: gym.Env, env_id: str) -> None:
    """Raises UserError unless `env` can be stepped from its table: it has `P` and
    `initial_state_distrib`, or a `transition_model()` (`hpcrl.frozen_lake`), and is not
    Taxi with its fickle passenger (more than one draw per step)."""
    inner = env.unwrapped
    if getattr(inner, "transition_model", None) is None and (
        not hasattr(inner, "P") or not hasattr(inner, "initial_state_distrib")
    ):
        raise UserError(f"env {env_id!r} has no transition table P to step from")
    if getattr(inner, "fickle_passenger", False):
        raise UserError(f"env {env_id!r}: Taxi's fickle passenger draws more than once a step")


class TableModel:
    """What stepping an env from its table needs, read once from one `gymnasium.make`:
    the spaces, the spec and its `max_episode_steps` (None: no time limit), and the
    sampler (`PaddedTable`, or the env's own `transition_model()`, e.g.
    `hpcrl.frozen_lake.FrozenLakeGrid`, which needs no table).

    Raises:
        UserError: an env without a transition table `P`, or Taxi with its fickle
            passenger (more than one draw per step; rainy Taxi's moves are in `P`).
    """

    def __init__(self, env_id: str, env_kwargs: dict | None, env: gym.Env | None = None):
        """`env`: an env already made from `env_id` and `env_kwargs` to read (the caller
        closes it); None makes and closes one."""
        made = env is None
        if made:
            env = gym.make(env_id, **(env_kwargs or {}))
        try:
            check_table(env, env_id)
            inner = env.unwrapped
            model = getattr(inner, "transition_model", None)  # hpcrl.frozen_lake: no table
            self.observation_space, self.action_space = env.observation_space, env.action_space
            self.spec = env.spec
            self.max_episode_steps = env.spec.max_episode_steps if env.spec else None
            self.sampler = model() if model is not None else PaddedTable(inner)
        finally:
            if made:
                env.close()


class TableVectorEnv(VectorEnv):
    """`num_envs` copies of a toy-text env, stepped from its padded transition table.

    `step(actions)` with actions (B,) int returns obs (B,) int64, rewards (B,) float64,
    terminated and truncated (B,) bool and, when a copy's episode ended, info
    {"final_obs": (B,) int64, "_final_obs": (B,) bool}; the obs of an ended copy is its
    next episode's first observation (same-step autoreset).

    Raises:
        UserError: an env without a transition table `P`, or Taxi with its fickle
            passenger (more than one draw per step; rainy Taxi's moves are in `P`).
    """

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(
        self, env_id: str, env_kwargs: dict | None, num_envs: int, model: TableModel | None = None
    ):
        """`model`: the env's `TableModel`, when the caller has read it already."""
        model = model or TableModel(env_id, env_kwargs)
        self.single_observation_space = model.observation_space
        self.single_action_space = model.action_space
        self.num_envs = num_envs
        self.observation_space = batch_space(model.observation_space, num_envs)
        self.action_space = batch_space(model.action_space, num_envs)
        self.spec = model.spec
        self.max_episode_steps = model.max_episode_steps
        self.model = model.sampler
        self.initial_cum = self.model.initial_cum
        self.rngs: list[np.random.Generator] = []
        # Each copy's current block of uniforms; a checkpoint stores the generator state
        # it was drawn from (6 words per copy, not the block), taken back from the
        # generator's state only then (`capture_state`), not at every refill.
        self.uniforms = np.zeros((num_envs, BLOCK))
        self.next_uniform = np.full(num_envs, BLOCK, dtype=np.int64)
        self.state = np.zeros(num_envs, dtype=np.int64)
        self.elapsed = np.zeros(num_envs, dtype=np.int64)
        self._rows = np.arange(num_envs)

    # -- random numbers ------------------------------------------------------------------

    def _refill(self, c: int) -> None:
        self.rngs[c].random(out=self.uniforms[c])  # BLOCK draws
        self.next_uniform[c] = 0

    def _draw(self, copies: np.ndarray) -> np.ndarray:
        """The next uniform of each copy in `copies` (indices, in order), (k,) float64.
        Every copy (`copies` is `self._rows`, each step) reads `next_uniform` as it is
        and takes from the flat blocks, with no fancy indexing."""
        every = copies is self._rows
        index = self.next_uniform if every else self.next_uniform[copies]
        if copies.size and index.max() >= BLOCK:
            for c in copies[index >= BLOCK]:
                self._refill(int(c))
            index = self.next_uniform if every else self.next_uniform[copies]
        out = np.take(self.uniforms.reshape(-1), copies * BLOCK + index)
        if every:
            self.next_uniform += 1
        else:
            self.next_uniform[copies] += 1
        return out

    def _initial_states(self, copies: np.ndarray) -> np.ndarray:
        u = self._draw(copies)
        index = np.searchsorted(self.initial_cum, u, side="right")  # first cum > u
        return np.where(index < self.initial_cum.size, index, 0)

    # -- the VectorEnv interface ----------------------------------------------------------

    def reset(self, *, seed: int | list[int] | None = None, options: dict[str, Any] | None = None):
        """Reset every copy; an int `seed` seeds copy i with `seed + i` (as `SyncVectorEnv`).

        Returns:
            obs (B,) int64 and info {}.
        """
        if seed is not None or not self.rngs:
            if seed is None:
                seeds = [None] * self.num_envs
            elif isinstance(seed, int):
                seeds = [seed + i for i in range(self.num_envs)]
            else:
                seeds = list(seed)
            self.rngs = np_random_generators(seeds)  # np_random(s) for each, at once
            for c in range(self.num_envs):
                self._refill(c)
        self.state = self._initial_states(self._rows)
        self.elapsed[:] = 0
        return self.state.copy(), {}

    def step(self, actions):
        """One transition per copy (see the class docstring)."""
        actions = np.asarray(actions, dtype=np.int64)
        u = self._draw(self._rows)
        next_state, rewards, terminated = self.model.sample(self.state, actions, u)
        self.elapsed += 1
        if self.max_episode_steps is None:
            truncated = np.zeros(self.num_envs, dtype=bool)
        else:
            truncated = self.elapsed >= self.max_episode_steps
        self.state = next_state
        done = terminated | truncated
        info: dict[str, Any] = {}
        if done.any():
            ended = np.flatnonzero(done)
            info = {"final_obs": next_state.copy(), "_final_obs": done.copy()}
            self.state = next_state.copy()
            self.state[ended] = self._initial_states(ended)
            self.elapsed[ended] = 0
        return self.state.copy(), rewards, terminated, truncated, info

    def transition(self, copies: np.ndarray, actions: np.ndarray):
        """One transition of the copies `copies` ((k,) int64 indices, increasing) under
        `actions` ((k,) int64), drawing each copy's next uniform as `step` does, but with
        no time limit and no autoreset (`hpcrl.evaluation` runs its own episode loop).

        Returns:
            next_state (k,) int64, reward (k,) float64, terminated (k,) bool.
        """
        u = self._draw(copies)
        next_state, rewards, terminated = self.model.sample(self.state[copies], actions, u)
        self.state[copies] = next_state
        return next_state, rewards, terminated

    # -- exact resume (`hpcrl.envs.EnvStepper`) -------------------------------------------

    rng_per_copy = True  # capture_state gives one generator per copy

    def capture_state(self) -> tuple[np.ndarray, np.ndarray]:
        """Every copy's state: ((B, 6) uint64, the generator state its current block of
        uniforms was drawn from, as `hpcrl.state.generator_state`; (B, 3) float64 of the
        MDP state, the episode's step count and the next uniform's index in the block)."""
        values = np.stack([self.state, self.elapsed, self.next_uniform], axis=1)
        # every generator is BLOCK draws past its block's start (`_refill`)
        starts = np.stack([generator_state_before(rng, BLOCK) for rng in self.rngs])
        return starts, values.astype(np.float64)

    def restore_state(self, rng: np.ndarray, values: np.ndarray) -> None:
        """Undo `capture_state` (after a `reset`): each block is drawn again from its state."""
        for c in range(self.num_envs):
            set_generator_state(self.rngs[c], rng[c])
            self._refill(c)
        self.state = values[:, 0].astype(np.int64)
        self.elapsed = values[:, 1].astype(np.int64)
        self.next_uniform = values[:, 2].astype(np.int64)
