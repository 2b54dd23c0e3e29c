"""Tabular Q-learning on a torch device (`device: cuda` with layout `allreduce`): a rank's
`num_envs` copies of a table-stepped env (`hpcrl.table_vector.TableModel`), its Q-table,
its ε-greedy or Boltzmann actions and its batched updates, all as tensors on the device,
so a vector step moves nothing to the host; finished episodes come back at the sync
points, every transition only when trajectories are recorded.

Random numbers: one `torch.Generator` on the device per rank, seeded from the rank's env
seed, draws per vector step in this order: the exploration uniforms (B,), the random
actions (B,) (ε-greedy) and the tie-breaking uniforms (B, A) (or one uniform per copy
for Boltzmann), the transition uniforms (B,) and the reset uniforms (B,) (drawn for every
copy, used by those whose episode ended, so no step waits on the host to learn which).
Each uniform is turned into an outcome by gymnasium's rule (`categorical_sample`: the
first index whose cumulative probability exceeds it), as the CPU's exact mode does; only
the generator differs (Philox on CUDA, not one PCG64 per copy), so the trajectories are
not gymnasium's, and `tests/test_table_torch.py` checks the transition frequencies
against `env.unwrapped.P` with a chi-square test. A run is deterministic for a fixed
seed, world size and device type, and resumes bit-exactly (the checkpoint holds the
generator's state and every copy's state).

Updates: the batch semantics of `hpcrl.algos.qlearning.update_towards` (every TD error
against the table before the batch; the K copies of a pair share one step of size α
along their mean TD error), computed as per-pair sums and counts with `index_add_` over
the flat table, then one add over the whole table (an untouched entry adds 0.0,
exactly). On the CPU `index_add_` adds in batch order, so the table equals the numpy
update's bit for bit (tested); on CUDA its float64 atomics would add in any order, so
`_add_at` turns on `torch.use_deterministic_algorithms` around it alone (CUDA's
`index_add` is then deterministic; PyTorch docs, `torch.use_deterministic_algorithms`).

Source: Watkins & Dayan 1992 (the update); gymnasium 1.4 `toy_text/utils.py`
(`categorical_sample`) and `wrappers/common.py` (`TimeLimit`).
"""

from __future__ import annotations

import numpy as np
import torch

from hpcrl.envs import NATIVE_CAPTURED, StepBatch, check_state_copies
from hpcrl.frozen_lake import _MOVES, FrozenLakeGrid
from hpcrl.table_vector import PaddedTable, TableModel

# Finished-episode buffers hold at most this many (step, copy) entries before they are
# moved to the host, whatever the sync interval (about 17 bytes each).
_BUFFER_ENTRIES = 1 << 24


class _TableSampler:
    """`PaddedTable.sample` on tensors."""

    def __init__(self, table: PaddedTable, device: torch.device):
        self.cum_prob = torch.as_tensor(table.cum_prob, device=device)
        self.next_state = torch.as_tensor(table.next_state, device=device)
        self.reward = torch.as_tensor(table.reward, device=device)
        self.terminal = torch.as_tensor(table.terminal, device=device)

    def sample(self, states, actions, u):
        above = (self.cum_prob[states, actions] > u[:, None]).to(torch.uint8)
        k = above.argmax(dim=1)  # the first index > u; 0 where none is (as gymnasium)
        return (
            self.next_state[states, actions, k],
            self.reward[states, actions, k],
            self.terminal[states, actions, k],
        )


class _GridSampler:
    """`hpcrl.frozen_lake.FrozenLakeGrid.sample` on tensors (no table)."""

    def __init__(self, grid: FrozenLakeGrid, device: torch.device):
        self.nrow, self.ncol, self.slippery = grid.nrow, grid.ncol, grid.slippery
        self.cum = torch.as_tensor(grid.cum, device=device)
        self.stops = torch.as_tensor(grid.stops, device=device)
        self.schedule = torch.as_tensor(grid.schedule, device=device)
        self.arrival = torch.as_tensor(grid.arrival, device=device).long()
        self.moves = torch.as_tensor(_MOVES, device=device)

    def sample(self, states, actions, u):
        k = (self.cum[None, :] > u[:, None]).to(torch.uint8).argmax(dim=1)
        direction = (actions - 1 + k) % 4 if self.slippery else actions
        row = (states // self.ncol + self.moves[direction, 0]).clamp(0, self.nrow - 1)
        col = (states % self.ncol + self.moves[direction, 1]).clamp(0, self.ncol - 1)
        moved = row * self.ncol + col
        stay = self.stops[states]
        next_state = torch.where(stay, states, moved)
        reward = torch.where(stay, 0.0, self.schedule[self.arrival[moved]])
        return next_state, reward, stay | self.stops[moved]


class DeviceTabular:
    """One rank's envs, Q-table and Q-learning on a torch device (see the module doc).

    Args:
        env_id, env_kwargs: an env `TableModel` can step (its `P`, or a
            `transition_model()`).
        num_envs: B, the env copies.
        q_table: (S, A) float64, the starting table (copied to the device).
        gamma: discount γ in [0, 1].
        exploration: "epsilon_greedy" or "boltzmann".
        seed: seeds the device generator.
        device: where everything lives.

    Raises:
        UserError: an env without a transition table (`TableModel`).
    """

    def __init__(
        self,
        env_id: str,
        env_kwargs: dict | None,
        num_envs: int,
        q_table: np.ndarray,
        gamma: float,
        exploration: str,
        seed: int,
        device: torch.device,
    ):
        model = TableModel(env_id, env_kwargs)
        sampler = model.sampler
        if isinstance(sampler, FrozenLakeGrid):
            self.sampler = _GridSampler(sampler, device)
        else:
            self.sampler = _TableSampler(sampler, device)
        self.initial_cum = torch.as_tensor(sampler.initial_cum, device=device)
        self.max_episode_steps = model.max_episode_steps
        self.num_envs, self.device = num_envs, device
        self.gamma, self.boltzmann = gamma, exploration == "boltzmann"
        self.q = torch.as_tensor(q_table, dtype=torch.float64, device=device).clone()
        self.n_actions = self.q.shape[1]
        self.visited = torch.zeros(self.q.numel(), dtype=torch.bool, device=device)
        self.generator = torch.Generator(device=device)
        self.seed(seed)
        self._buffered: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    # -- random numbers and resets -------------------------------------------------------

    def _uniform(self, *shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator, dtype=torch.float64, device=self.device)

    def _initial_states(self) -> torch.Tensor:
        """(B,) one start state per copy from B fresh uniforms (gymnasium's rule)."""
        index = torch.searchsorted(self.initial_cum, self._uniform(self.num_envs), right=True)
        return torch.where(index < self.initial_cum.numel(), index, 0)

    def seed(self, seed: int) -> None:
        """Reseed the generator and start every copy's episode afresh."""
        self.generator.manual_seed(seed)
        self.state = self._initial_states()
        self.elapsed = torch.zeros(self.num_envs, dtype=torch.int64, device=self.device)
        self.returns = torch.zeros(self.num_envs, dtype=torch.float64, device=self.device)
        self.lengths = torch.zeros(self.num_envs, dtype=torch.int64, device=self.device)

    # -- one vector step -------------------------------------------------------------------

    def _actions(self, rows: torch.Tensor, exploration: float) -> torch.Tensor:
        """(B,) actions from the (B, A) rows: ε-greedy with ties broken uniformly, as
        `hpcrl.algos.qlearning.epsilon_greedy`, or Boltzmann with temperature τ."""
        batch = rows.shape[0]
        if self.boltzmann:
            logits = (rows - rows.max(dim=1, keepdim=True).values) / exploration
            cumulative = torch.cumsum(torch.exp(logits), dim=1)
            threshold = self._uniform(batch, 1) * cumulative[:, -1:]
            return ((cumulative < threshold).sum(dim=1)).clamp(max=self.n_actions - 1)
        explore = self._uniform(batch) < exploration
        random_actions = torch.randint(
            0, self.n_actions, (batch,), generator=self.generator, device=self.device
        )
        is_max = rows == rows.max(dim=1, keepdim=True).values
        ties = torch.where(is_max, self._uniform(batch, self.n_actions), -1.0)
        return torch.where(explore, random_actions, ties.argmax(dim=1))

    def step(self, alpha: float, exploration: float, n: int, keep: bool) -> StepBatch | None:
        """Act on the table, step every copy, update the table from the first `n` copies'
        transitions (the counted ones) and buffer their finished episodes.

        Args:
            alpha: step size α in (0, 1].
            exploration: ε (epsilon_greedy) or τ (boltzmann).
            n: the copies whose transitions count, 1 <= n <= B.
            keep: return the step's transitions on the host (trajectory recording).

        Returns:
            With `keep`, the step's StepBatch on the host (its episodes are not in it:
            `take_episodes` gives them); else None.
        """
        q, state = self.q, self.state
        actions = self._actions(q[state], exploration)
        u = self._uniform(len(state))
        next_state, reward, terminated = self.sampler.sample(state, actions, u)
        self.elapsed += 1
        if self.max_episode_steps is None:
            truncated = torch.zeros_like(terminated)
        else:
            truncated = self.elapsed >= self.max_episode_steps
        done = terminated | truncated
        # the update: targets and TD errors against the table before the batch
        bootstrap = torch.where(terminated, 0.0, q[next_state].max(dim=1).values)
        targets = reward + self.gamma * bootstrap
        flat = state[:n] * self.n_actions + actions[:n]
        td_error = targets[:n] - q.view(-1)[flat]
        sums = _add_at(
            torch.zeros(q.numel(), dtype=torch.float64, device=self.device), flat, td_error
        )
        counts = _add_at(torch.zeros_like(sums), flat, torch.ones_like(td_error))
        q.view(-1).add_(alpha * (sums / counts.clamp(min=1.0)))
        self.visited[flat] = True
        # episodes: returns and lengths of those that ended, then the autoreset
        self.returns += reward
        self.lengths += 1
        counted = done.clone()
        counted[n:] = False
        self._buffered.append((counted, self.returns.clone(), self.lengths.clone()))
        self.returns.masked_fill_(done, 0.0)
        self.lengths.masked_fill_(done, 0)
        self.state = torch.where(done, self._initial_states(), next_state)
        self.elapsed.masked_fill_(done, 0)
        if not keep:
            return None
        host = [_host(t) for t in (state, actions, reward, next_state, terminated)]
        return StepBatch(
            *host,
            _host(truncated),
            np.zeros(0, dtype=np.int64),
            np.zeros(0),
            np.zeros(0, dtype=np.int64),
        )

    def buffer_full(self) -> bool:
        """Whether the buffered episodes should go to the host before the next step."""
        return (len(self._buffered) + 1) * self.num_envs > _BUFFER_ENTRIES

    def take_episodes(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """The buffered steps' finished episodes on the host, one (returns (k,) float64,
        lengths (k,) int64) per step in order, and the buffer emptied (one transfer)."""
        if not self._buffered:
            return []
        columns = zip(*self._buffered, strict=True)
        done, returns, lengths = (_host(torch.stack(column)) for column in columns)
        self._buffered.clear()
        return [(returns[j][done[j]], lengths[j][done[j]]) for j in range(len(done))]

    # -- the sync with the other ranks ---------------------------------------------------------

    def table(self) -> np.ndarray:
        """(S, A) float64: the table on the host (a copy)."""
        return _host(self.q)

    def take_visited(self) -> np.ndarray:
        """(S, A) float64: 1 where this rank updated the pair since the last call, else 0."""
        visited = _host(self.visited.view(self.q.shape).to(torch.float64))
        self.visited.zero_()
        return visited

    def set_table(self, q_table: np.ndarray) -> None:
        """Replace the table's values with (S, A) float64 `q_table` (copied)."""
        self.q.copy_(torch.as_tensor(q_table))

    # -- exact resume (`hpcrl.topologies.checkpointing.rank_state`) -----------------------------

    @property
    def obs(self) -> np.ndarray:
        return _host(self.state)

    def state_dict(self, envs: bool = True) -> dict[str, np.ndarray]:
        """As `EnvStepper.state_dict`, with "device_rng" (uint8) the generator's state and
        "env_state" (B, 1) float64 each copy's step count in its episode. Taken at a sync
        point, after `take_episodes`; whole whatever `envs` says (one generator's state
        costs nothing to take)."""
        return {
            "obs": self.obs,
            "episode_return": _host(self.returns),
            "episode_length": _host(self.lengths),
            "env_captured": np.array([NATIVE_CAPTURED], dtype=np.int8),
            "env_rng": np.zeros((self.num_envs, 6), dtype=np.uint64),
            "env_state": _host(self.elapsed).astype(np.float64)[:, None],
            "device_rng": _host(self.generator.get_state()),
        }

    def load_state_dict(self, state: dict[str, np.ndarray], fallback_seed: int) -> bool:
        """Continue from `state_dict()` output; from any other (a checkpoint of the CPU
        steppers, or of a device of another type) every copy starts afresh from
        `fallback_seed`. Returns whether the exact state was restored.

        Raises:
            ValueError: `state` is for a different number of env copies.
        """
        check_state_copies(state, self.num_envs)
        rng = state.get("device_rng")
        try:
            if rng is None:
                raise ValueError("no device generator state")
            self.generator.set_state(torch.tensor(rng, dtype=torch.uint8))
        except (RuntimeError, ValueError):
            self.seed(fallback_seed)
            return False
        as_tensor = lambda a, dtype: torch.tensor(a, dtype=dtype, device=self.device)  # noqa: E731
        self.state = as_tensor(state["obs"], torch.int64)
        self.returns = as_tensor(state["episode_return"], torch.float64)
        self.lengths = as_tensor(state["episode_length"], torch.int64)
        self.elapsed = as_tensor(state["env_state"][:, 0], torch.int64)
        return True

    def close(self) -> None:
        self._buffered.clear()


def _add_at(out: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`out.index_add_(0, index, values)`, deterministic on CUDA too (see the module doc);
    the global switch is put back as it was."""
    if not out.is_cuda:
        return out.index_add_(0, index, values)
    mode = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return out.index_add_(0, index, values)
    finally:
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)


def _host(tensor: torch.Tensor) -> np.ndarray:
    """A numpy copy on the host (never a view of a CPU tensor that changes later)."""
    return tensor.to("cpu", copy=True).numpy()
