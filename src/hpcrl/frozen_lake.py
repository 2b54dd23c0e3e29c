"""FrozenLake on maps of any size: gymnasium's dynamics computed from the map, with no
transition table.

gymnasium's `FrozenLakeEnv` builds `P` as nested Python lists (12 tuples per cell), which
takes minutes and gigabytes for a map of 10^6 cells. `GridFrozenLake` (registered as
`hpcrl/FrozenLake-v0`) is the same MDP, the same map, the same draws: `reset` is
gymnasium's own and `step` turns its one uniform into an outcome by gymnasium's rule
(`categorical_sample` over the cumulative probabilities `np.cumsum([fail, success,
fail])`, slipping to (a - 1) mod 4, a or (a + 1) mod 4; a hole or the goal stays put with
`terminated`), but from the map (`FrozenLakeGrid`), vectorized for the table stepper.
`tests/test_table_vector.py` checks it bit for bit against gymnasium's FrozenLake of the
same map.

    hpcrl train --env hpcrl/FrozenLake-v0 --env-kwargs '{"size": 1000, "p": 0.8,
        "map_seed": 3, "max_episode_steps": 20000}' --set layout=sharded

Source: gymnasium 1.4 `gymnasium/envs/toy_text/frozen_lake.py` (`FrozenLakeEnv`,
`generate_random_map`) and `toy_text/utils.py` (`categorical_sample`).
"""

from __future__ import annotations

import functools

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.envs.toy_text.frozen_lake import FrozenLakeEnv, generate_random_map
from gymnasium.utils import seeding

ENV_ID = "hpcrl/FrozenLake-v0"
# (Δrow, Δcol) of LEFT, DOWN, RIGHT, UP (gymnasium's action order)
_MOVES = np.array([[0, -1], [1, 0], [0, 1], [-1, 0]], dtype=np.int64)


def generated_map(size: int, p: float, seed: int | None) -> list[str]:
    """gymnasium's `generate_random_map(size, p, seed)`, the same map from the same draws,
    with its path check done by `scipy.ndimage.label` where scipy is installed (gymnasium's
    is a Python search that holds every cell as a tuple: 2 s and ~100 MiB at 10^6 cells),
    and kept per process when seeded (a run makes the env several times)."""
    if seed is None:
        return _generate(size, p, None)
    return list(_seeded_map(int(size), float(p), int(seed)))


@functools.lru_cache(maxsize=4)
def _seeded_map(size: int, p: float, seed: int) -> tuple[str, ...]:
    return tuple(_generate(size, p, seed))


def _generate(size: int, p: float, seed: int | None) -> list[str]:
    try:
        from scipy import ndimage
    except ImportError:  # without the analysis extra: gymnasium's own
        return generate_random_map(size=size, p=p, seed=seed)
    np_random, _ = seeding.np_random(seed)
    while True:  # gymnasium's loop and draws, line for line
        p = min(1, p)
        board = np_random.choice(["F", "H"], (size, size), p=[p, 1 - p])
        board[0][0] = "S"
        board[-1][-1] = "G"
        # valid: the goal in the start's 4-connected region of cells that are not holes
        labels, _ = ndimage.label(board != "H")
        if size > 1 and labels[0, 0] == labels[-1, -1]:
            return ["".join(row) for row in board]


def map_cells(desc) -> np.ndarray:
    """The map as an (nrow, ncol) |S1 array: `np.asarray(desc, dtype="c")`, done in one
    pass for rows of str of one length (the generic conversion took 20 ms for a 1000 x
    1000 map, and building its vector env converted it 7 times)."""
    if isinstance(desc, list | tuple) and desc and all(isinstance(row, str) for row in desc):
        width = len(desc[0])
        if width and all(len(row) == width for row in desc) and all(row.isascii() for row in desc):
            flat = np.frombuffer("".join(desc).encode("ascii"), dtype="S1")
            return flat.reshape(len(desc), width).copy()
    return np.asarray(desc, dtype="c")


class FrozenLakeGrid:
    """The transitions of a FrozenLake map, for a batch at a time (numpy, no table).

    Args:
        desc: the map, rows of "S", "F", "H", "G" (as gymnasium's `desc`).
        is_slippery, success_rate, reward_schedule: as gymnasium's `FrozenLakeEnv`.
    """

    def __init__(self, desc, is_slippery=True, success_rate=1.0 / 3.0, reward_schedule=(1, 0, 0)):
        cells = map_cells(desc)
        self.nrow, self.ncol = cells.shape
        flat = cells.ravel()
        self.stops = (flat == b"G") | (flat == b"H")  # terminated on arrival; absorbing
        # reward on arrival: reward_schedule[index in "GHF"], other letters as "F"; one
        # byte per cell, not a float
        self.schedule = np.array([float(r) for r in reward_schedule])
        self.arrival = np.full(flat.shape, 2, dtype=np.int8)
        self.arrival[flat == b"G"] = 0
        self.arrival[flat == b"H"] = 1
        # The start distribution's cumulative sum up to its last start cell: the constant
        # tail after it changes no draw (no entry there exceeds a uniform the last one
        # does not), and is a float per cell.
        initial = (flat == b"S").astype(np.float64)
        last = int(np.flatnonzero(initial)[-1])
        self.initial_cum = np.cumsum(initial[: last + 1] / initial.sum())
        fail = (1.0 - success_rate) / 2.0
        # gymnasium's categorical_sample over [fail, success, fail] (or [1.0])
        self.cum = np.cumsum([fail, success_rate, fail]) if is_slippery else np.array([1.0])
        self.slippery = bool(is_slippery)

    @property
    def n_states(self) -> int:
        return self.nrow * self.ncol

    def sample(self, states: np.ndarray, actions: np.ndarray, u: np.ndarray):
        """One transition per (state, action, uniform); (B,) arrays in, (next_state int64,
        reward float64, terminated bool) out, as gymnasium's step draws it."""
        # the first index with cum > u, else 0 (gymnasium's argmax of all-False): a binary
        # search, 4x faster than the argmax along the short axis of (B, 3) comparisons
        k = np.searchsorted(self.cum, u, side="right")
        k[k == len(self.cum)] = 0
        direction = (actions - 1 + k) % 4 if self.slippery else actions
        row = np.clip(states // self.ncol + _MOVES[direction, 0], 0, self.nrow - 1)
        col = np.clip(states % self.ncol + _MOVES[direction, 1], 0, self.ncol - 1)
        moved = row * self.ncol + col
        stay = self.stops[states]
        next_state = np.where(stay, states, moved)
        reward = np.where(stay, 0.0, self.schedule[self.arrival[moved]])
        terminated = stay | self.stops[moved]
        return next_state, reward, terminated


class GridFrozenLake(FrozenLakeEnv):
    """gymnasium's FrozenLake, stepped from its map instead of a transition table (see the
    module doc). No `P`: `hpcrl.table_vector` steps it through `transition_model()`.

    Args:
        desc: the map (rows of "SFHG"); or None for a generated one:
        size, p, map_seed: `generate_random_map(size, p, map_seed)` (gymnasium's; p is the
            probability of a frozen cell).
        is_slippery, success_rate, reward_schedule, render_mode: as `FrozenLakeEnv`.
    """

    def __init__(
        self,
        render_mode: str | None = None,
        desc: list[str] | None = None,
        size: int = 8,
        p: float = 0.8,
        map_seed: int | None = None,
        is_slippery: bool = True,
        success_rate: float = 1.0 / 3.0,
        reward_schedule: tuple[int, int, int] = (1, 0, 0),
    ):
        if desc is None:
            desc = generated_map(size, p, map_seed)
        self.desc = map_cells(desc)
        self.model = FrozenLakeGrid(self.desc, is_slippery, success_rate, reward_schedule)
        self.nrow, self.ncol = self.desc.shape
        self.reward_range = (min(reward_schedule), max(reward_schedule))
        self.observation_space = spaces.Discrete(self.nrow * self.ncol)
        self.action_space = spaces.Discrete(4)
        self.render_mode = render_mode
        self.window_size = (min(64 * self.ncol, 512), min(64 * self.nrow, 512))
        self.cell_size = (self.window_size[0] // self.ncol, self.window_size[1] // self.nrow)
        self.window_surface = self.clock = None
        self.ice_img = self.ice_crack_imgs = self.hole_img = self.agent_img = None
        self.goal_flag_img = self.letter_s_img = self.letter_g_img = None

    def transition_model(self) -> FrozenLakeGrid:
        return self.model

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """gymnasium's reset: one uniform, the first start cell whose cumulative
        probability exceeds it (`categorical_sample`, over the trimmed sum)."""
        gym.Env.reset(self, seed=seed)
        self.s = int(np.argmax(self.model.initial_cum > self.np_random.random()))
        self.lastaction = None
        if self.render_mode == "human":
            self.render()
        return self.s, {"prob": 1}

    def step(self, a):
        u = self.np_random.random()  # the one draw of gymnasium's categorical_sample
        s, r, t = self.model.sample(np.array([self.s]), np.array([int(a)]), np.array([u]))
        self.s, self.lastaction = int(s[0]), a
        if self.render_mode == "human":
            self.render()
        return self.s, float(r[0]), bool(t[0]), False, {}


def register() -> None:
    """Register `hpcrl/FrozenLake-v0` with gymnasium (once); a time limit of 100 steps as
    FrozenLake-v1, or `max_episode_steps` in the env kwargs. Outside hpcrl,
    `gym.make("hpcrl.frozen_lake:hpcrl/FrozenLake-v0", ...)` imports it first."""
    if ENV_ID not in gym.registry:
        gym.register(ENV_ID, entry_point=GridFrozenLake, max_episode_steps=100)


register()  # on import: hpcrl.envs and hpcrl.table_vector import this module
