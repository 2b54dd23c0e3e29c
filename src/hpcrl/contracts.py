"""The contracts between hpcrl's layers, in one place: what a layout's loop (a `Topology`)
asks of an algorithm's learner, what a learner may ask of the other ranks, and what the
runner asks of a topology. No MPI here; the implementations are in `hpcrl.algos` (the
learners) and `hpcrl.topologies` (the loops and collectives). In the spirit of Acme's
`core.py`: each interface's docstring shows the calls in the order they come.

Algorithms never see ranks: a learner is given the collectives it may use (`DataParallel`,
`LearnerGroup`) and nothing else, so the same learner runs on one process or on many.

    config:    cfg = build_config(values)                     # algos.algorithm(name): its
                                                              #   `Algorithm`; the layout's Config
    runner:    topology = topologies.make_topology(cfg)
               topology.check_world(world_size)               # LayoutError before any MPI call
               topology.check_env(probe_env, world_size, checkpoint_shapes)
               ctx = RunContext.create(..., topology.acting_ranks(world_size), ...)
               result = topology.run(ctx)                     # `LoopResult` on every rank
               result.greedy.evaluate(comm, ...)              # the final greedy evaluation
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from hpcrl.errors import ConfigError

if TYPE_CHECKING:
    import torch


class LayoutError(ConfigError):
    """The world is too small (or otherwise wrong) for the layout: raised by
    `Topology.check_world` on every rank, before any communication."""


# --------------------------------------------------------------------------------------
# What a learner may ask of the other ranks (implemented in hpcrl.topologies).


class DataParallel(Protocol):
    """The collectives of the `data_parallel` layout, over every rank."""

    def average_gradients(self) -> None:
        """Every `p.grad` of the model becomes its mean over the ranks (one `Allreduce`).
        The gradients stay views into one flat buffer if the learner zeroes them with
        `zero_grad(set_to_none=False)` (no copies)."""

    def clip_gradients(self, max_norm: float) -> None:
        """Scale the averaged gradient to a global L2 norm of at most `max_norm`."""

    def sum(self, buffer: np.ndarray) -> None:
        """Sum a float64 `buffer` over every rank, in place (one `Allreduce`)."""

    def mean_std(self, values: np.ndarray) -> tuple[float, float]:
        """Mean and std of `values` pooled over every rank."""


class LearnerGroup(Protocol):
    """The collectives of the `actor_learner` layout's learner group (ranks 0..k-1)."""

    contributors: int  # learners whose gradient is in this update's sum

    def average_gradients(self) -> None:
        """Every `p.grad` becomes the group's sum divided by `contributors`."""

    def clip_gradients(self, max_norm: float) -> None:
        """Scale the averaged gradient to a global L2 norm of at most `max_norm`."""


# --------------------------------------------------------------------------------------
# Learners, one interface per kind of layout.


class TabularPolicy(Protocol):
    """An actor's behaviour policy over a (possibly stale) Q-table."""

    def select_actions(self, q_table: np.ndarray, obs: np.ndarray, progress: float) -> np.ndarray:
        """(n_states, n_actions) float64 table, (B,) int64 states, budget fraction in
        [0, 1] -> (B,) int64 actions."""

    def exploration_value(self, progress: float) -> float:
        """ε or τ at this fraction of the budget (logged as `exploration`)."""


class TabularLearner(Protocol):
    """A Q-table and its update; the `ps`, `allreduce` and `sharded` layouts.

    Call sequence (`ps`: rank 0 updates, actors act; `allreduce`: every rank both;
    `sharded`: `targets` on the acting rank, `update_towards` on the shard's owner):
        learner = make_learner(cfg, observation_space, action_space, ...)
        policy = learner.behaviour_policy(rng)                  # on every acting rank
        actions = policy.select_actions(q_table, obs, progress)  # per vector step
        learner.update(obs, actions, rewards, next_obs, terminated, progress)
    """

    q_table: np.ndarray  # (n_states, n_actions) float64
    learner_updates: int
    n_step: int  # 1: one-step targets; n: n-step returns over rollouts (layout async)

    def behaviour_policy(self, rng: np.random.Generator) -> TabularPolicy: ...

    def update(self, obs, actions, rewards, next_obs, terminated, progress: float) -> None:
        """One batched update on (B,) arrays of transitions."""

    def targets(self, rewards, next_q_rows, terminated) -> np.ndarray:
        """`sharded`: (B,) float64 targets from (B,) rewards, the (B, n_actions) rows
        Q(s', ·) fetched from their owners and (B,) terminated flags."""

    def update_towards(self, rows, actions, target_sums, counts, progress: float) -> None:
        """`sharded`: one batched step of (P,) pairs (rows of this learner's table, its
        shard) towards their mean targets, from (P,) sums of targets and their counts;
        the pairs may repeat (one partial sum per sending rank)."""


class DeepLearner(Protocol):
    """What every deep learner offers, whatever its layout."""

    model: torch.nn.Module
    learner_updates: int

    def to(self, device: torch.device) -> DeepLearner: ...

    def synced_modules(self) -> list[torch.nn.Module]:
        """The networks every learner rank holds bit-identically (the model, and for DQN
        its target network): broadcast at the start, checked for drift."""

    def shared_arrays(self) -> dict[str, np.ndarray]:
        """Parameters and optimizer state for a checkpoint (`params/...`, `optimizer/...`)."""

    def load_shared(self, arrays: dict[str, np.ndarray]) -> None: ...

    def greedy_actions(self, obs: np.ndarray) -> np.ndarray:
        """(N, *obs_shape) observations -> (N, ...) deterministic actions."""


class DataParallelLearner(DeepLearner, Protocol):
    """A synchronous learner replicated on every rank; the `data_parallel` layout.

    Call sequence (every rank in lockstep):
        learner = make_learner(cfg, observation_space, action_space, num_envs, world, seed)
        for each vector step: actions = learner.act(obs, progress)
                              learner.observe(rewards, terminated, truncated, next_obs)
        every `rollout_steps` vector steps: metrics = learner.update(dp, progress)
    """

    rollout_steps: int  # vector steps per rank between updates

    def act(self, obs: np.ndarray, progress: float) -> np.ndarray: ...

    def observe(self, rewards, terminated, truncated, next_obs) -> None: ...

    def update(self, dp: DataParallel, progress: float) -> dict[str, float]: ...

    def rank_arrays(self) -> dict[str, np.ndarray]:
        """This rank's own state between updates (e.g. a shuffling generator)."""

    def load_rank(self, arrays: dict[str, np.ndarray]) -> None: ...


class AsyncActor(Protocol):
    """What an actor rank of the `actor_learner` layout acts with: the learner itself, or
    (`Algorithm.make_actor`) a policy over the learner's published parameters that needs
    no torch (`hpcrl.numpy_policy`).

    Call sequence:
        actions, log_probs = act(obs, progress)          # per vector step
        values(final_obs)                               # bootstrap at a time limit
        pack(unroll, message)                           # per unroll, then Isend
        load_published(flat)                            # when new parameters came
        greedy_actions(obs)                             # the final evaluation
    """

    def act(self, obs: np.ndarray, progress: float) -> tuple[np.ndarray, np.ndarray]:
        """Behaviour actions (B, ...) and their log-probabilities (B,)."""

    def values(self, obs: np.ndarray) -> np.ndarray:
        """Bootstrap values (B,) of final observations at a time limit."""

    def message_schema(self, unroll: Any) -> Any:
        """The `protocol.Schema` an actor sends, given the unroll schema it fills: the
        unroll itself (IMPALA) or a gradient computed on it (A3C, asynchronous Q)."""

    @property
    def payload(self) -> tuple[str, ...]:
        """The fields of a message the learner's `update` batch is made of."""

    def pack(self, unroll: Any, message: Any) -> None:
        """Fill `payload` of `message` from a filled unroll (an actor's last, partial
        unroll is only counted: its payload may be zeros)."""

    def published(self) -> np.ndarray:
        """The flat float32 vector learners send to actors."""

    def load_published(self, flat: np.ndarray) -> None: ...

    def greedy_actions(self, obs: np.ndarray) -> np.ndarray:
        """(N, *obs_shape) observations -> (N, ...) deterministic actions."""


class AsyncLearner(AsyncActor, DeepLearner, Protocol):
    """One object per learner rank (and per actor rank where the algorithm has no
    `make_actor`); the `actor_learner` layout. An `AsyncActor`, and:

    Call sequence:
        learner: make_optimizer()                                # once, before the first
                 update(batch, group, progress)                  #   update; batch: the
                 published()                                     #   `payload` fields
    """

    def make_optimizer(self) -> Any:
        """Make the optimizer now if it is not made yet (actors never call it: the first
        `torch.optim` optimizer of a process imports `torch._dynamo`, ~1.5 s of CPU)."""

    def update(self, batch: dict[str, np.ndarray], group: LearnerGroup, progress: float) -> dict:
        """One optimizer step on the learner group's gradient; returns loss metrics."""


# --------------------------------------------------------------------------------------
# Algorithms and topologies.


@dataclass(frozen=True)
class Algorithm:
    """One algorithm module's entry: what the config builder and the runner need."""

    name: str
    # its hyperparameter dataclass (`PPOConfig`): `validate()`, `check_spaces(obs, act)`;
    # for the data_parallel layout also `rollout_steps(world_size, num_envs)` and
    # `first_update_env_steps(world_size, num_envs)`; deep ones derive `NetworkConfig`
    config: type
    layouts: tuple[str, ...]  # the layouts it runs in; the first is the default
    make_learner: Callable[..., Any]  # (config, observation_space, action_space,
    #                                    num_envs, world_size, seed) -> learner
    # (config, observation_space, action_space, seed) -> an `AsyncActor` that needs no
    # torch, or None where the actor must keep the learner's model; None: always the learner
    make_actor: Callable[..., Any] | None = None
    topology_defaults: dict = field(default_factory=dict)  # e.g. DD-PPO's sync_frac 0.6
    run_defaults: dict = field(default_factory=dict)  # shared keys, e.g. DQN's num_envs 1
    renamed_keys: dict = field(default_factory=dict)  # {old key: new key}, for old runs


class GreedyPolicy(Protocol):
    """A trained policy acting greedily, evaluated collectively on every rank."""

    def evaluate(
        self,
        comm: Any,
        env_id: str,
        env_kwargs: dict,
        env_options: dict,
        episodes: int,
        seed: int,
        watchdog_s: float,
    ) -> dict | None:
        """Every rank runs a contiguous share of `episodes` greedy episodes.

        Returns:
            On rank 0 `{"mean_return", "std_return", "episodes"}`; None elsewhere.
        """


@dataclass
class LoopResult:
    """What a topology's `run` hands back to the runner, on every rank."""

    interrupted: bool  # stopped by a preemption signal after a checkpoint (agreed)
    greedy: GreedyPolicy  # the final policy, for the greedy evaluation


class Topology(ABC):
    """A layout: which rank does what, and the loop that does it.

    A subclass sets `name` and `Config` (its settings dataclass, whose fields are
    config keys) and is registered in `hpcrl.topologies.TOPOLOGIES`.

    Call sequence (the runner, on every rank):
        topology = make_topology(cfg)
        topology.check_world(world_size)       # before any communication
        topology.check_env(probe_env, world_size, checkpoint_shapes)
        topology.roles(world_size)             # for the start-up line
        topology.acting_ranks(world_size), topology.recording_ranks(world_size)
        result = topology.run(ctx)             # collective
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    ROLES: ClassVar[str] = ""  # `rank_roles` in words; {last} is the last rank
    # Whether its loop runs the periodic greedy evaluation (`eval_interval`,
    # `topologies.periodic_eval`); the runner refuses the key for one that does not.
    periodic_eval: ClassVar[bool] = False

    def __init__(self, cfg: Any):
        self.cfg = cfg  # the whole run's `hpcrl.config.Config`
        self.settings = cfg.topology  # this layout's `Config`

    def min_world_size(self) -> int:
        """The fewest ranks this layout (with these settings) runs on."""
        return 1

    def check_world(self, world_size: int) -> None:
        """Raises:
        LayoutError: fewer ranks than `min_world_size()`."""
        need = self.min_world_size()
        if world_size < need:
            raise LayoutError(
                f"layout {self.name!r} needs at least {need} ranks{self.why_min()}, "
                f"got a world of {world_size}"
            )

    def why_min(self) -> str:
        """Words after "needs at least N ranks" saying why (e.g. the learner ranks)."""
        return ""

    @abstractmethod
    def check_env(self, env: Any, world_size: int, shapes: dict) -> None:
        """Raises a one-line `UserError` for an env (a probe instance), device or
        checkpoint this run cannot use (`shapes`: {name: shape} of the resumed
        checkpoint's shared arrays, or {})."""

    def roles(self, world_size: int) -> str:
        """Who does what, in words, for the start-up line."""
        return "one process: every role in turn" if world_size == 1 else self.rank_roles(world_size)

    def rank_roles(self, world_size: int) -> str:
        """`roles` on two or more ranks (by default `ROLES`)."""
        return self.ROLES.format(last=world_size - 1)

    def acting_ranks(self, world_size: int) -> range:
        """The ranks that step envs (the run's budget is split over them)."""
        return range(world_size)

    def recording_ranks(self, world_size: int) -> range:
        """The ranks that write `traj/rank-<k>.h5`."""
        return self.acting_ranks(world_size)

    @abstractmethod
    def run(self, ctx: Any) -> LoopResult:
        """Collective: the whole loop, from the first env step to the last checkpoint."""

    @abstractmethod
    def checkpoint_policy(self, path: Any, meta: dict, shapes: dict, arrays: dict) -> GreedyPolicy:
        """The greedy policy a checkpoint holds, on every rank (`shapes`: {name: shape} of
        its shared arrays; `arrays`: those arrays as rank 0 read them, {} elsewhere)."""
