"""Gymnasium environments: creation with clear errors, Atari preprocessing, vector envs,
episode bookkeeping, and capture/restore of each env copy's state for exact resume.

Atari (`ALE/...` ids): unless `atari_preprocessing` is off, the env is made with
`frameskip=1` and wrapped in gymnasium's `AtariPreprocessing` (noop reset up to 30, frame
skip 4 with max-pooling of the last two frames, 84 x 84 grayscale uint8, no life-loss
termination, no scaling; Machado et al. 2018) and `FrameStackObservation(frame_stack)`, so
an observation is (frame_stack, 84, 84) uint8 (84 x 84 when frame_stack is 1). The v5
sticky actions (the previous action repeated with probability 0.25 at each emulator
frame) are applied by gymnasium's `StickyAction` under the frame skip instead of inside
the emulator, with the same effect, because the emulator's saved state lacks the action
it would repeat.

Env-state capture (what a checkpoint holds per env copy): the unwrapped env's `np_random`
(PCG64) state, the dynamic attributes of the gymnasium toy-text and classic-control envs
listed in `_ENV_STATE_SPECS`, `TimeLimit`'s step count, `StickyAction`'s last action and
repeat counters, `AtariPreprocessing`'s lives and max-pooling buffers,
`FrameStackObservation`'s frames, and for Atari (ale-py) the emulator's
`cloneState(include_rng=True).serialize()` bytes. Envs or wrappers outside those lists, an
emulator with its own sticky actions (`atari_preprocessing=false` with a nonzero
`repeat_action_probability`), and the copies of an `AsyncVectorEnv` (they live in
subprocesses) cannot be captured: their copies restart their in-progress episodes on
resume (the documented fallback); the env-step budget stays exact, only those unfinished
episodes are not recorded. A run's last checkpoint, taken when its budget is spent,
captures no env copy (`BUDGET_SPENT`): nothing is left to step.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv, VectorEnv

from hpcrl import frozen_lake  # noqa: F401 - registers hpcrl/FrozenLake-v0
from hpcrl.config import VECTOR_ENVS
from hpcrl.errors import UserError, first_line
from hpcrl.state import generator_state, set_generator_state

ATARI_FRAME_SKIP = 4  # emulator frames per agent step under AtariPreprocessing
# `EnvStepper.state_dict()["env_captured"]`: not captured, each copy (a SyncVectorEnv's), or
# the whole vector env (`capture_state`: the native CartPole's generator in row 0 of
# env_rng, a table env's one generator per row); or not asked for because the rank's
# env-step budget is spent (`state_dict(envs=False)`, the last checkpoint of a run).
NOT_CAPTURED, COPIES_CAPTURED, NATIVE_CAPTURED, BUDGET_SPENT = 0, 1, 2, 3

# Entry-point prefix -> (what is missing, extra that installs it) for gymnasium's optional
# dependencies, named in the one-line error instead of gymnasium's own advice.
_EXTRAS = {"gymnasium.envs.box2d": ("Box2D", "box2d")}


def make_env(
    env_id: str,
    env_kwargs: dict | None = None,
    *,
    atari_preprocessing: bool = True,
    frame_stack: int = 4,
) -> gym.Env:
    """`gymnasium.make(env_id, **env_kwargs)` with one-line errors; for `ALE/...` ids with
    `atari_preprocessing`, the standard Atari wrappers (see the module docstring).

    Args:
        atari_preprocessing: wrap ALE envs in AtariPreprocessing and FrameStackObservation
            (ignored for other ids).
        frame_stack: frames stacked after AtariPreprocessing (1: no stacking).

    Raises:
        UserError: unknown id (closest registered ids suggested), kwargs the env rejects, or
            a missing optional dependency (the `hpcrl[...]` extra that installs it named).
    """
    kwargs = dict(env_kwargs or {})
    ale = env_id.startswith("ALE/")
    if ale and env_id not in gym.registry:
        try:
            import ale_py

            ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)  # no banner on stderr
            gym.register_envs(ale_py)
        except ImportError:
            raise UserError(f"env {env_id!r} needs ale-py: pip install 'hpcrl[atari]'") from None
    if env_id not in gym.registry:
        hint = difflib.get_close_matches(env_id, list(gym.registry), n=3, cutoff=0.6)
        near = f"; did you mean {', '.join(repr(h) for h in hint)}?" if hint else ""
        raise UserError(f"unknown env id {env_id!r}: not in the gymnasium registry{near}")
    preprocess = ale and atari_preprocessing
    if preprocess:
        if kwargs.get("frameskip", 1) != 1:
            raise UserError(
                f"env {env_id!r}: env_kwargs frameskip={kwargs['frameskip']!r} with "
                f"atari_preprocessing, which skips {ATARI_FRAME_SKIP} frames itself: drop "
                "frameskip from env_kwargs or set atari_preprocessing=false"
            )
        if kwargs.get("obs_type") == "ram":
            raise UserError(
                f"env {env_id!r}: env_kwargs obs_type='ram' with atari_preprocessing, which "
                "reads the screen: set atari_preprocessing=false for RAM observations"
            )
        # Sticky actions move from the emulator (whose last action is not in its saved
        # state) to gymnasium's StickyAction under the frame skip: the same per-frame
        # repeat probability, with state that a checkpoint captures.
        sticky = kwargs.get(
            "repeat_action_probability",
            gym.registry[env_id].kwargs.get("repeat_action_probability", 0.0),
        )
        kwargs.update(frameskip=1, repeat_action_probability=0.0)
    try:
        env = gym.make(env_id, **kwargs)
    except gym.error.DependencyNotInstalled as exc:
        raise _missing_dependency(env_id, exc) from None
    except Exception as exc:  # noqa: BLE001 - any constructor failure is the user's input
        raise UserError(
            f"env {env_id!r} could not be made with env_kwargs {dict(env_kwargs or {})!r}: "
            f"{type(exc).__name__}: {first_line(exc)}"
        ) from None
    if preprocess:
        try:
            if sticky:
                env = gym.wrappers.StickyAction(env, repeat_action_probability=sticky)
            env = gym.wrappers.AtariPreprocessing(
                env,
                noop_max=30,
                frame_skip=ATARI_FRAME_SKIP,
                screen_size=84,
                terminal_on_life_loss=False,
                grayscale_obs=True,
                scale_obs=False,
            )
        except gym.error.DependencyNotInstalled:
            env.close()
            raise UserError(
                f"env {env_id!r} with atari_preprocessing needs opencv: pip install 'hpcrl[atari]'"
            ) from None
        except Exception as exc:  # noqa: BLE001 - e.g. obs_type='ram', a bad probability
            env.close()
            raise UserError(
                f"env {env_id!r} with env_kwargs {dict(env_kwargs or {})!r} cannot take the "
                f"Atari preprocessing ({type(exc).__name__}: {first_line(exc)}); "
                "set atari_preprocessing=false"
            ) from None
        if frame_stack > 1:
            env = gym.wrappers.FrameStackObservation(env, frame_stack)
    return env


def _missing_dependency(env_id: str, exc: BaseException) -> UserError:
    entry_point = str(gym.registry[env_id].entry_point)
    for prefix, (what, extra) in _EXTRAS.items():
        if entry_point.startswith(prefix):
            return UserError(f"env {env_id!r} needs {what}: pip install 'hpcrl[{extra}]'")
    return UserError(f"env {env_id!r} needs a package that is not installed: {first_line(exc)}")


# A Box with more entries than this is stored without its bounds when they vary (an
# HDF5 attribute holds at most 64 KiB); `space_from_json` then returns None.
_MAX_STORED_BOUNDS = 1024


def space_to_json(space: gym.Space) -> dict | None:
    """A `Discrete` or `Box` space as a JSON-ready dict (what a checkpoint's meta stores, so
    `hpcrl.load_policy` needs no env); None for other spaces or a large Box with bounds
    that vary per entry. `space_from_json` inverts it."""
    if isinstance(space, gym.spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start)}
    if not isinstance(space, gym.spaces.Box):
        return None
    bounds = {}
    for name in ("low", "high"):
        values = np.asarray(getattr(space, name))
        if values.size and (values == values.flat[0]).all():
            bounds[name] = values.flat[0].item()  # one value for every entry
        elif values.size <= _MAX_STORED_BOUNDS:
            bounds[name] = values.tolist()
        else:
            return None
    return {"type": "Box", "shape": list(space.shape), "dtype": str(space.dtype), **bounds}


def space_from_json(data: dict | None) -> gym.Space | None:
    """The space `space_to_json` stored, or None where it stored none."""
    if not data:
        return None
    if data["type"] == "Discrete":
        return gym.spaces.Discrete(data["n"], start=data["start"])
    shape, dtype = tuple(data["shape"]), np.dtype(data["dtype"])
    low = np.broadcast_to(np.asarray(data["low"], dtype=dtype), shape)
    high = np.broadcast_to(np.asarray(data["high"], dtype=dtype), shape)
    return gym.spaces.Box(low, high, shape, dtype)


def checkpoint_spaces(meta: dict, run) -> tuple[gym.Space, gym.Space]:
    """(observation_space, action_space) of a checkpoint: those its meta stores, else (an
    older checkpoint, or a space `space_to_json` cannot store) one env's, made from the
    run's config `run` (`RunConfig`) after importing its `env_module`.

    Raises:
        UserError: as `make_env` and `import_env_module`, where the env has to be made.
    """
    spaces = (
        space_from_json(meta.get("observation_space")),
        space_from_json(meta.get("action_space")),
    )
    if None not in spaces:
        return spaces
    from hpcrl.config import import_env_module

    import_env_module(run.env_module)
    env = make_env(run.env_id, run.env_kwargs, **run.env_options())
    env.close()
    return env.observation_space, env.action_space


def discrete_sizes(env: gym.Env) -> tuple[int, int]:
    """(n_states, n_actions) of an env whose spaces are both `Discrete`.

    Raises:
        UserError: either space is not `Discrete` (tabular methods need both).
    """
    obs_space, act_space = env.observation_space, env.action_space
    for kind, space in (("observation", obs_space), ("action", act_space)):
        if not isinstance(space, gym.spaces.Discrete):
            raise UserError(
                f"env {env.spec.id if env.spec else env!r} has {kind} space {space}: "
                "tabular Q-learning needs Discrete observation and action spaces"
            )
        if int(space.start) != 0:
            raise UserError(f"{kind} space {space} does not start at 0: tabular needs 0..n-1")
    return int(obs_space.n), int(act_space.n)


def make_vector_env(
    env_id: str,
    env_kwargs: dict | None,
    num_envs: int,
    *,
    atari_preprocessing: bool = True,
    frame_stack: int = 4,
    vector_env: str = "auto",
) -> VectorEnv:
    """A gymnasium vector env of `num_envs` `make_env` copies that resets finished copies in
    the same step (`AutoresetMode.SAME_STEP`), so every call to `step` is one real
    transition per copy and the final observation is in `info["final_obs"]`.

    Args:
        vector_env: "sync" (`SyncVectorEnv`, copies stepped in turn in this process),
            "async" (`AsyncVectorEnv`, one forked subprocess per copy; its env state is not
            captured in checkpoints, see the module docstring), "native" (gymnasium's
            numpy implementation of all copies at once, `hpcrl.native_vector`) or "table"
            (toy-text MDPs sampled from their transition table, bit-identical to "sync",
            `hpcrl.table_vector`); "auto" (the default): "table" for the envs it steps
            exactly (`table_vector.steps_exactly`), "sync" for every other.

    Raises:
        UserError: as `make_env`; "native" for an env without a native implementation,
            "table" for one without a transition table.
        ValueError: `vector_env` is not one of `VECTOR_ENVS`.
    """
    if vector_env not in VECTOR_ENVS:
        raise ValueError(f"vector_env {vector_env!r}: expected one of {VECTOR_ENVS}")
    if vector_env == "auto":
        vector_env = resolve_vector_env(env_id, env_kwargs)
    if vector_env == "native":
        from hpcrl.native_vector import make_native_vector_env

        make_env(env_id, env_kwargs).close()  # the same one-line errors as the other backends
        return make_native_vector_env(env_id, env_kwargs, num_envs)
    if vector_env == "table":
        from hpcrl.table_vector import TableVectorEnv

        make_env(env_id, env_kwargs).close()
        return TableVectorEnv(env_id, env_kwargs, num_envs)
    options = {"atari_preprocessing": atari_preprocessing, "frame_stack": frame_stack}
    make_env(env_id, env_kwargs, **options).close()  # one clear error, not num_envs tracebacks
    kwargs = dict(env_kwargs or {})
    env_fns = [lambda: make_env(env_id, kwargs, **options) for _ in range(num_envs)]
    if vector_env == "async":
        # fork, not spawn: a spawned child would re-import hpcrl and mpi4py and could
        # initialise MPI again as a copy of this rank; the forked workers never call MPI.
        return AsyncVectorEnv(env_fns, autoreset_mode=AutoresetMode.SAME_STEP, context="fork")
    return SyncVectorEnv(env_fns, autoreset_mode=AutoresetMode.SAME_STEP)


def resolve_vector_env(env_id: str, env_kwargs: dict | None) -> str:
    """The backend `vector_env: auto` steps `env_id` with: "table" where the transition
    table reproduces gymnasium's env exactly (`table_vector.steps_exactly`), else "sync".

    Raises:
        UserError: as `make_env`.
    """
    from hpcrl.table_vector import steps_exactly

    env = make_env(env_id, env_kwargs)
    try:
        return "table" if steps_exactly(env) else "sync"
    finally:
        env.close()


@dataclass
class StepBatch:
    """One vector step of B transitions (arrays of shape (B,))."""

    obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_obs: np.ndarray  # the final observation where the episode ended
    terminated: np.ndarray
    truncated: np.ndarray
    done_envs: np.ndarray  # indices of copies whose episode ended in this step
    episode_returns: np.ndarray  # (len(done_envs),) float64, undiscounted
    episode_lengths: np.ndarray  # (len(done_envs),) int64


class EnvStepper:
    """Steps a vector env and keeps each copy's running episode return and length."""

    def __init__(self, envs: VectorEnv, seed: int):
        self.envs = envs
        self.num_envs = envs.num_envs
        obs, _ = envs.reset(seed=seed)
        self.obs = np.asarray(obs)
        self.returns = np.zeros(self.num_envs, dtype=np.float64)
        self.lengths = np.zeros(self.num_envs, dtype=np.int64)

    def step(self, actions: np.ndarray) -> StepBatch:
        """Step every copy once with `actions` ((B,) int64 for Discrete)."""
        obs = self.obs
        next_obs, rewards, terminated, truncated, info = self.envs.step(actions)
        rewards = np.asarray(rewards, dtype=np.float64)
        done = np.logical_or(terminated, truncated)
        self.returns += rewards
        self.lengths += 1
        final_next = next_obs
        done_envs = np.flatnonzero(done)
        ep_returns = ep_lengths = _EMPTY
        if done_envs.size:
            final_next = next_obs.copy()
            final = info["final_obs"][done_envs]
            # gymnasium's vector envs give an object array of observations; the table and
            # native ones a numeric array already (stacking its elements cost 4% of a step)
            final_next[done_envs] = np.stack(final) if final.dtype == object else final
            ep_returns = self.returns[done_envs].copy()
            ep_lengths = self.lengths[done_envs].copy()
            self.returns[done_envs] = 0.0
            self.lengths[done_envs] = 0
        self.obs = np.asarray(next_obs)
        return StepBatch(
            obs,
            np.asarray(actions),
            rewards,
            final_next,
            np.asarray(terminated),
            np.asarray(truncated),
            done_envs,
            ep_returns,
            ep_lengths,
        )

    def state_dict(self, envs: bool = True) -> dict[str, np.ndarray]:
        """Everything needed to continue stepping exactly: the current observations, the
        running episode returns and lengths, and every copy's env state (see module doc).

        Args:
            envs: False when nothing is left to step (the rank's budget is spent): the env
                copies' states are then not captured (`BUDGET_SPENT`; env_rng and
                env_state are (B, 0)). For 8,192 table-stepped copies that is 16 ms and
                600 KB a rank less in a run's last checkpoint.

        Returns:
            {"obs": (B, ...), "episode_return": (B,) float64, "episode_length": (B,) int64,
             "env_captured": (1,) int8, "env_rng": (B, 6) uint64, "env_state": (B, D) float64}
            and, for emulators (ALE) and wrappers that keep frames, "env_blob": (B, L) uint8
            with "env_blob_len": (B,) int64 (each copy's bytes, zero-padded to the longest).
        """
        episodes = {
            "obs": np.asarray(self.obs).copy(),
            "episode_return": self.returns.copy(),
            "episode_length": self.lengths.copy(),
        }
        if not envs:
            none = np.zeros((self.num_envs, 0), dtype=np.uint64)
            return episodes | _env_arrays(BUDGET_SPENT, none, np.zeros((self.num_envs, 0)))
        if hasattr(self.envs, "capture_state"):  # a native vector env: one shared state
            return episodes | self._native_env_arrays()
        copies = getattr(self.envs, "envs", None)  # None for AsyncVectorEnv (subprocesses)
        captured = [capture_env_state(env) for env in copies] if copies else [None]
        if not all(c is not None for c in captured):
            none = np.zeros((self.num_envs, 6), np.uint64)
            return episodes | _env_arrays(NOT_CAPTURED, none, np.zeros((self.num_envs, 0)))
        blobs = {}
        if captured[0][2] is not None:
            lengths = np.array([len(c[2]) for c in captured], dtype=np.int64)
            blob = np.zeros((self.num_envs, int(lengths.max())), dtype=np.uint8)
            for i, c in enumerate(captured):
                blob[i, : lengths[i]] = np.frombuffer(c[2], dtype=np.uint8)
            blobs = {"env_blob": blob, "env_blob_len": lengths}
        rng, state = np.stack([c[0] for c in captured]), np.stack([c[1] for c in captured])
        return blobs | episodes | _env_arrays(COPIES_CAPTURED, rng, state)

    def _native_env_arrays(self) -> dict[str, np.ndarray]:
        # A shared generator goes in row 0 of env_rng (the other rows are zero); a vector
        # env with a generator per copy (`rng_per_copy`, hpcrl.table_vector) fills them all.
        rng, values = self.envs.capture_state()
        env_rng = np.zeros((self.num_envs, 6), dtype=np.uint64)
        if getattr(self.envs, "rng_per_copy", False):
            env_rng[:] = rng
        else:
            env_rng[0] = rng
        return _env_arrays(NATIVE_CAPTURED, env_rng, values)

    def load_state_dict(self, state: dict[str, np.ndarray], fallback_seed: int) -> bool:
        """Continue from `state_dict()` output. When the env state was not captured (or this
        vector env's copies are out of reach, as an AsyncVectorEnv's are), the copies are
        reset with `fallback_seed` instead and their in-progress episodes start over.
        Returns whether the exact state was restored.

        Raises:
            ValueError: `state` is for a different number of env copies.
        """
        check_state_copies(state, self.num_envs)
        captured = int(state["env_captured"][0])
        if captured == NATIVE_CAPTURED and hasattr(self.envs, "restore_state"):
            self.envs.reset(seed=fallback_seed)
            per_copy = getattr(self.envs, "rng_per_copy", False)
            rng = state["env_rng"] if per_copy else state["env_rng"][0]
            self.envs.restore_state(rng, state["env_state"])
        elif captured == COPIES_CAPTURED and hasattr(self.envs, "envs"):
            for i, env in enumerate(self.envs.envs):  # a SyncVectorEnv's copies
                blob = None
                if "env_blob" in state:
                    blob = state["env_blob"][i, : int(state["env_blob_len"][i])].tobytes()
                restore_env_state(env, state["env_rng"][i], state["env_state"][i], blob)
        else:  # not captured (or its budget was spent), or by another backend
            obs, _ = self.envs.reset(seed=fallback_seed)
            self.obs = np.asarray(obs)
            self.returns[:] = 0.0
            self.lengths[:] = 0
            return False
        self.obs = np.asarray(state["obs"]).copy()
        self.returns[:] = state["episode_return"]
        self.lengths[:] = state["episode_length"]
        return True

    def close(self) -> None:
        self.envs.close()


def _env_arrays(flag: int, rng: np.ndarray, state: np.ndarray) -> dict[str, np.ndarray]:
    """The env copies' part of `EnvStepper.state_dict`: how they were captured, and their
    generator states and values."""
    return {"env_captured": np.array([flag], dtype=np.int8), "env_rng": rng, "env_state": state}


def check_state_copies(state: dict[str, np.ndarray], num_envs: int) -> None:
    """Raises ValueError when an env state (`EnvStepper.state_dict()` or a stepper's with
    the same keys) is not for `num_envs` copies."""
    if len(state["episode_return"]) != num_envs:
        raise ValueError(
            f"env state for {len(state['episode_return'])} copies, this rank has {num_envs}"
        )


_EMPTY = np.zeros(0)

# The dynamic state of known envs: (attribute, kind, size) per unwrapped class.
#   int / opt_int / bool / opt_float: one scalar (opt_: None allowed, stored as NaN);
#   array: an ndarray or tuple of `size` floats, stored with a type code (its dtype).
_ENV_STATE_SPECS: dict[str, tuple[tuple[str, str, int], ...]] = {
    "gymnasium.envs.toy_text.frozen_lake.FrozenLakeEnv": (
        ("s", "int", 1),
        ("lastaction", "opt_int", 1),
    ),
    "hpcrl.frozen_lake.GridFrozenLake": (
        ("s", "int", 1),
        ("lastaction", "opt_int", 1),
    ),
    "gymnasium.envs.toy_text.cliffwalking.CliffWalkingEnv": (
        ("s", "int", 1),
        ("lastaction", "opt_int", 1),
    ),
    "gymnasium.envs.toy_text.taxi.TaxiEnv": (
        ("s", "int", 1),
        ("lastaction", "opt_int", 1),
        ("taxi_orientation", "int", 1),
        ("fickle_step", "bool", 1),
    ),
    "gymnasium.envs.classic_control.cartpole.CartPoleEnv": (
        ("state", "array", 4),
        ("steps_beyond_terminated", "opt_int", 1),
    ),
    "gymnasium.envs.classic_control.mountain_car.MountainCarEnv": (("state", "array", 2),),
    "gymnasium.envs.classic_control.continuous_mountain_car.Continuous_MountainCarEnv": (
        ("state", "array", 2),
    ),
    "gymnasium.envs.classic_control.acrobot.AcrobotEnv": (("state", "array", 4),),
    "gymnasium.envs.classic_control.pendulum.PendulumEnv": (
        ("state", "array", 2),
        ("last_u", "opt_float", 1),
    ),
}
# Wrappers that hold no state the dynamics depend on, and the one that does.
_STATELESS_WRAPPERS = {"OrderEnforcing", "PassiveEnvChecker"}
_ARRAY_TYPES = {1: np.float64, 2: np.float32}  # type code -> dtype; 3: tuple; 0: None


def _wrappers(env: gym.Env) -> list[gym.Env]:
    chain = []
    while isinstance(env, gym.Wrapper):
        chain.append(env)
        env = env.env
    return chain


def _is_ale(env: gym.Env) -> bool:
    return type(env.unwrapped).__module__.startswith("ale_py") and hasattr(env.unwrapped, "ale")


def _spec_of(env: gym.Env) -> tuple[tuple[str, str, int], ...] | None:
    if _is_ale(env):
        # The emulator's saved state lacks the last action its own sticky actions repeat
        # (make_env moves them to StickyAction); otherwise everything is in that state.
        return None if env.unwrapped.ale.getFloat("repeat_action_probability") > 0 else ()
    cls = type(env.unwrapped)
    return _ENV_STATE_SPECS.get(f"{cls.__module__}.{cls.__name__}")


def capture_env_state(env: gym.Env) -> tuple[np.ndarray, np.ndarray, bytes | None] | None:
    """One env copy's state, or None when it cannot be captured (unknown env class or
    wrapper, or a generator other than PCG64).

    Returns:
        (rng (6,) uint64 as `hpcrl.state.generator_state`, values (D,) float64: per wrapper
        from the outside in, TimeLimit's elapsed steps and AtariPreprocessing's lives and
        game-over flag, then the spec's attributes in order, None as NaN, and the bytes of
        the frames the wrappers keep (AtariPreprocessing's two max-pooling buffers,
        FrameStackObservation's frames, from the outside in) followed by the ALE emulator
        state, or None when there are neither).
    """
    spec = _spec_of(env)
    if spec is None:
        return None
    values: list[float] = []
    chunks: list[bytes] = []
    for wrapper in _wrappers(env):
        name = type(wrapper).__name__
        if isinstance(wrapper, gym.wrappers.TimeLimit):
            elapsed = wrapper._elapsed_steps
            values.append(np.nan if elapsed is None else float(elapsed))
        elif isinstance(wrapper, gym.wrappers.StickyAction):
            last = wrapper.last_action
            values += [np.nan if last is None else float(last), float(wrapper.is_sticky_actions)]
            values += [float(wrapper.num_repeats), float(wrapper.repeats_taken)]
        elif isinstance(wrapper, gym.wrappers.AtariPreprocessing):
            values += [float(wrapper.lives), float(wrapper.game_over)]
            chunks += [np.ascontiguousarray(b).tobytes() for b in wrapper.obs_buffer]
        elif isinstance(wrapper, gym.wrappers.FrameStackObservation):
            space = wrapper.env.observation_space
            frames = list(wrapper.obs_queue)
            if not isinstance(space, gym.spaces.Box) or any(
                np.shape(f) != space.shape for f in frames
            ):
                return None
            chunks += [np.ascontiguousarray(f, dtype=space.dtype).tobytes() for f in frames]
        elif name not in _STATELESS_WRAPPERS:
            return None
    unwrapped = env.unwrapped
    for attr, kind, size in spec:
        value = getattr(unwrapped, attr)
        if kind == "array":
            if value is None:
                values.extend([0.0] + [np.nan] * size)
            elif isinstance(value, tuple):
                values.extend([3.0] + [float(v) for v in value])
            else:
                code = {np.dtype(t): c for c, t in _ARRAY_TYPES.items()}.get(value.dtype)
                if code is None or value.size != size:
                    return None
                values.extend([float(code)] + value.astype(np.float64).ravel().tolist())
        else:
            values.append(np.nan if value is None else float(value))
    try:
        rng = generator_state(unwrapped.np_random)
    except TypeError:
        return None
    if _is_ale(env):
        chunks.append(unwrapped.ale.cloneState(include_rng=True).serialize())
    blob = b"".join(chunks) if chunks else None
    return rng, np.array(values, dtype=np.float64), blob


def restore_env_state(
    env: gym.Env, rng: np.ndarray, values: np.ndarray, blob: bytes | None = None
) -> None:
    """Put `capture_env_state`'s output back into an env copy of the same class and
    wrappers (after a reset, so wrappers that enforce a reset before `step` are
    satisfied)."""
    spec = _spec_of(env)
    values = list(np.asarray(values, dtype=np.float64))
    pos = 0
    data = memoryview(blob or b"")
    offset = 0

    def take(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        nonlocal offset
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        array = np.frombuffer(data[offset : offset + nbytes], dtype=dtype).reshape(shape)
        offset += nbytes
        return array.copy()

    for wrapper in _wrappers(env):
        if isinstance(wrapper, gym.wrappers.TimeLimit):
            elapsed = values[pos]
            wrapper._elapsed_steps = None if np.isnan(elapsed) else int(elapsed)
            pos += 1
        elif isinstance(wrapper, gym.wrappers.StickyAction):
            last, sticky, repeats, taken = values[pos : pos + 4]
            pos += 4
            wrapper.last_action = None if np.isnan(last) else int(last)
            wrapper.is_sticky_actions = bool(sticky)
            wrapper.num_repeats, wrapper.repeats_taken = int(repeats), int(taken)
        elif isinstance(wrapper, gym.wrappers.AtariPreprocessing):
            wrapper.lives, wrapper.game_over = int(values[pos]), bool(values[pos + 1])
            pos += 2
            for buffer in wrapper.obs_buffer:
                buffer[...] = take(buffer.shape, buffer.dtype)
        elif isinstance(wrapper, gym.wrappers.FrameStackObservation):
            space = wrapper.env.observation_space
            frames = [take(space.shape, space.dtype) for _ in range(wrapper.stack_size)]
            wrapper.obs_queue.clear()
            wrapper.obs_queue.extend(frames)
    unwrapped = env.unwrapped
    for attr, kind, size in spec:
        if kind == "array":
            code = int(values[pos])
            items = values[pos + 1 : pos + 1 + size]
            pos += 1 + size
            if code == 0:
                value = None
            elif code == 3:
                value = tuple(float(v) for v in items)
            else:
                value = np.array(items, dtype=_ARRAY_TYPES[code])
        else:
            raw = values[pos]
            pos += 1
            if np.isnan(raw):
                value = None
            elif kind == "bool":
                value = bool(raw)
            elif kind in ("int", "opt_int"):
                value = int(raw)
            else:
                value = float(raw)
        setattr(unwrapped, attr, value)
    set_generator_state(unwrapped.np_random, rng)
    if _is_ale(env) and blob is not None:
        import ale_py

        unwrapped.ale.restoreState(ale_py.ALEState(bytes(data[offset:])))
