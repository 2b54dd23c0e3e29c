"""`hpcrl.train` for scripts and notebooks: the run `python -m hpcrl train` makes, from
Python, with the user's own env constructor and network.

Under `mpirun -n N python my_script.py` every rank runs the script and calls `train` with
the same arguments (SPMD, as Spinning Up's `ppo(env_fn, ...)` under `mpirun`); in a
notebook or a plain `python` process it is a run of one rank.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import gymnasium as gym

from hpcrl.errors import ConfigError

ENV_FN_NAMESPACE = "hpcrl_env_fn"  # gymnasium ids under which `env_fn`s are registered
_registered: dict[str, Callable] = {}  # env id -> the env_fn this process registered


def train(
    config: str | Path | dict | Any | None = None,
    *,
    comm=None,
    env_fn: Callable[..., gym.Env] | None = None,
    network_fn: Callable | None = None,
    run_dir: str | Path | None = None,
    overwrite: bool = False,
    resume: str | Path | None = None,
    **overrides,
):
    """Train (or resume) one run, collectively over `comm`: what `hpcrl train` does.

    Args:
        config: a YAML file (path), a dict of config keys (flat, `{"algo": "ppo"}`, or
            nested, `{"debug": {"fail_rank": 1}}`), an `hpcrl.config.Config`, or None:
            the default job (IMPALA on CartPole-v1) when no `overrides` are given either,
            else the shared defaults with the overrides (as `hpcrl train --set ...`).
        comm: the MPI communicator the run spans (every rank of it must call `train`);
            default `mpi4py.MPI.COMM_WORLD`, one rank in a plain `python` process.
        env_fn: a callable that builds the env on each rank, `env_fn(**env_kwargs) ->
            gymnasium.Env`, for a simulator that is not a registered gymnasium id. It is
            registered with gymnasium under `env_id` if the config sets one, else under
            `hpcrl_env_fn/<its __name__>`; that id is what the run records, and a resume
            must pass the same `env_fn` again. A run made this way is evaluated by
            `hpcrl.load_policy` in your own loop, not by `hpcrl evaluate` (which cannot
            import your function).
        network_fn: your own torch network for a deep algorithm, `network_fn(
            observation_space) -> torch.nn.Module` mapping a batch of observations
            (B, *observation_space.shape), as the env gives them, to float features
            (B, F); hpcrl adds the policy and value heads (actor-critic) or the Q head
            (DQN, asynchronous Q) on top (`hpcrl.models.custom_encoder`). The run records
            `custom_network: true`; pass the same `network_fn` to resume it and to
            `hpcrl.load_policy`.
        run_dir, overwrite, resume: `--run-dir`, `--overwrite` and `--resume` (a run
            directory or "auto").
        **overrides: config keys over `config`, e.g. `learning_rate=3e-4` (`--set`).

    Returns:
        `hpcrl.runner.TrainOutcome` on every rank: `status` ("completed", "interrupted"
        by SIGUSR1/SIGTERM after a checkpoint, or "already-completed"), `run_dir`,
        `exit_code` (0, or 3 when interrupted) and `result`, the final greedy evaluation
        (`mean_return`, `std_return`, `episodes`, ...) on rank 0 (None elsewhere, or
        when `eval_episodes` is 0).

    Raises:
        hpcrl.errors.UserError (on every rank together): a bad config key or value, env,
            run directory, checkpoint or `network_fn` output; one line, as on the command
            line. Any other exception on one rank of several prints that rank's traceback
            and aborts the whole job (`MPI_Abort`), so no rank waits forever for it.
    """
    from mpi4py import MPI

    from hpcrl import preemption, runner
    from hpcrl.comm.agreement import CollectiveUserError, agree

    comm = MPI.COMM_WORLD if comm is None else comm

    def prepare() -> dict:
        values = config_values(config, overrides)
        if env_fn is not None:
            values["env_id"] = register_env_fn(env_fn, values.get("env_id"))
        if network_fn is not None:
            from hpcrl.algos import algorithm

            algo = values.get("algo", "qlearning")
            if "custom_network" not in {f.name for f in fields(algorithm(algo).config)}:
                raise ConfigError(f"network_fn: algo {algo!r} has no network (a deep algo has)")
            values["custom_network"] = True
        return values

    try:
        values = agree(comm, prepare)
        # SIGUSR1/SIGTERM checkpoint and stop the run (exit_code 3), as on the command line
        with preemption.installed(), custom_network(network_fn):
            return runner.train(
                comm,
                values,
                None if run_dir is None else str(run_dir),
                overwrite,
                None if resume is None else str(resume),
            )
    except CollectiveUserError:
        raise  # every rank raises it together: nobody is left waiting
    except BaseException as exc:
        if comm.Get_size() == 1:
            raise
        # this rank's traceback, then MPI_Abort of the whole job
        runner.guarded(functools.partial(_reraise, exc), comm)
        raise


def _reraise(exc: BaseException):
    raise exc


def config_values(config, overrides: dict) -> dict:
    """`train`'s `config` and `overrides` as the flat values `runner.train` takes.

    Raises:
        ConfigError: a config file that cannot be read, or a `config` of another type.
    """
    from hpcrl.config import DEFAULT_JOB, Config, flatten, load_yaml

    if config is None:
        values = {} if overrides else dict(DEFAULT_JOB)
    elif isinstance(config, (str, Path)):
        values = load_yaml(config)
    elif isinstance(config, Config):
        values = config.flat()
    elif isinstance(config, dict):
        values = flatten(config)
    else:
        raise ConfigError(
            f"config {config!r}: expected a YAML file path, a dict of config keys, an "
            "hpcrl.config.Config or None"
        )
    values.update(overrides)
    return values


def register_env_fn(env_fn: Callable[..., gym.Env], env_id: str | None) -> str:
    """Register `env_fn` with gymnasium (this process only) and return its id.

    Args:
        env_id: the id to register it under; None: `hpcrl_env_fn/<env_fn.__name__>`.

    Raises:
        ConfigError: `env_fn` is not callable, or `env_id` names an env registered by
            something else (gymnasium's own, or a package's).
    """
    if not callable(env_fn):
        raise ConfigError(f"env_fn {env_fn!r}: expected a callable that returns a gymnasium.Env")
    if not env_id:
        name = getattr(env_fn, "__name__", type(env_fn).__name__)
        env_id = f"{ENV_FN_NAMESPACE}/{re.sub(r'[^A-Za-z0-9_.-]', '_', name).strip('_') or 'env'}"
    if env_id in gym.registry and env_id not in _registered:
        raise ConfigError(
            f"config key 'env_id': {env_id!r} is a registered gymnasium env; with env_fn, "
            "give your env an id of its own (or leave env_id unset)"
        )
    if _registered.get(env_id) is not env_fn:
        gym.registry.pop(env_id, None)  # re-registered: a new function under the same id
        gym.register(id=env_id, entry_point=env_fn)
        _registered[env_id] = env_fn
    return env_id


@contextlib.contextmanager
def custom_network(network_fn: Callable | None) -> Iterator[None]:
    """Within the block, deep learners build their encoder with `network_fn`
    (`hpcrl.models.custom_encoder`); None leaves the built-in networks."""
    if network_fn is None:
        yield
        return
    from hpcrl import models

    previous = models.set_network_fn(network_fn)
    try:
        yield
    finally:
        models.set_network_fn(previous)
