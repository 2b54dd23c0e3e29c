"""The SPMD runner: layout check, rank -> role dispatch, abort on any exception, lifecycle.

Only this module, `hpcrl.topologies` and `hpcrl.comm` import mpi4py. The entry point
hands in `MPI.COMM_WORLD`; everything below takes `comm` as a parameter.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mpi4py import MPI

from hpcrl.comm.agreement import CollectiveUserError, agree
from hpcrl.comm.waits import wait_all
from hpcrl.config import Config
from hpcrl.envs import discrete_sizes, make_env
from hpcrl.errors import ConfigError, UserError
from hpcrl.storage import checkpoints as ckpt
from hpcrl.storage.runfile import RunFile, default_run_dir, open_run, prepare_run_dir


@dataclass(frozen=True)
class Layout:
    """Which ranks do what. `min_world_size` is checked before any communication."""

    name: str
    min_world_size: int

    def roles(self, world_size: int) -> str:
        """Who does what, in words, for the start-up line."""
        if world_size == 1:
            return "one process: every role in turn"
        if self.name == "ps":
            return f"rank 0 parameter server, ranks 1-{world_size - 1} actors"
        return f"ranks 0-{world_size - 1} each act and learn"


LAYOUTS = {
    "ps": Layout("ps", 1),
    "allreduce": Layout("allreduce", 1),
}


class LayoutError(ConfigError):
    """The world is too small for the layout."""


def validate_layout(name: str, world_size: int) -> Layout:
    """Raises:
    ConfigError: unknown layout. LayoutError: fewer ranks than the layout needs."""
    if name not in LAYOUTS:
        raise ConfigError(f"unknown layout {name!r}: expected one of {sorted(LAYOUTS)}")
    layout = LAYOUTS[name]
    if world_size < layout.min_world_size:
        raise LayoutError(
            f"layout {name!r} needs at least {layout.min_world_size} ranks, "
            f"got a world of {world_size}"
        )
    return layout


def guarded(fn, comm: MPI.Comm) -> int:
    """Run `fn()` and turn every failure into an exit status without ever hanging.

    - a `CollectiveUserError` (raised on every rank together): rank 0 prints one line,
      every rank returns 2;
    - a `UserError` raised on one rank: that rank prints one line, the job is aborted (2);
    - any other exception: the traceback, every line tagged `[rank k]`, then
      `COMM_WORLD.Abort(1)` so the whole job ends instead of hanging in `MPI_Finalize`.
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    try:
        return fn() or 0
    except CollectiveUserError as exc:
        if rank == 0:
            print(f"hpcrl: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except UserError as exc:
        print(f"hpcrl: error (rank {rank}): {exc}", file=sys.stderr, flush=True)
        if size > 1:
            MPI.COMM_WORLD.Abort(exc.exit_code)
        return exc.exit_code
    except SystemExit:
        raise
    except BaseException:
        text = "".join(f"[rank {rank}] {line}\n" for line in traceback.format_exc().splitlines())
        sys.stderr.write(text)
        sys.stderr.flush()
        if size > 1:
            MPI.COMM_WORLD.Abort(1)
        return 1


def train(comm: MPI.Comm, cfg: Config, run_dir: str | None, overwrite: bool) -> dict | None:
    """Collective: one whole training run. Returns the final evaluation on rank 0.

    Raises:
        CollectiveUserError: bad layout, env, or run directory (on every rank).
    """
    from hpcrl.topologies.actor_learner import run_parameter_server
    from hpcrl.topologies.context import RunContext, evaluate_greedy
    from hpcrl.topologies.data_parallel import run_allreduce

    rank, world_size = comm.Get_rank(), comm.Get_size()
    run = cfg.run
    layout = agree(comm, lambda: validate_layout(cfg.algo.layout, world_size))
    _limit_threads(run.torch_threads)

    def check_env() -> tuple[int, int]:
        env = make_env(run.env_id, run.env_kwargs)
        try:
            return discrete_sizes(env)
        finally:
            env.close()

    n_states, n_actions = agree(comm, check_env)

    def choose_run_dir() -> str:
        path = (
            run_dir
            or run.run_dir
            or default_run_dir(run.algo, run.env_id, time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
        )
        prepare_run_dir(path, overwrite)
        return str(path)

    path = Path(agree(comm, choose_run_dir, root_only=True))
    run_file = None
    if rank == 0:
        run_file = RunFile(
            path / "run.h5",
            {
                "algo": run.algo,
                "env_id": run.env_id,
                "world_size": world_size,
                "layout": cfg.algo.layout,
                "config": cfg.to_json(),
                "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
            },
        )
        print(
            f"[hpcrl] {run.algo} on {run.env_id}, layout {layout.name} "
            f"({layout.roles(world_size)}), {run.total_env_steps:,} env steps -> {path}",
            flush=True,
        )
    # run.h5 and traj/ exist before any rank writes; one shared start time.
    wait_all([comm.Ibarrier()], comm, "the start barrier", run.watchdog_s)
    ctx = RunContext(comm, cfg, path, n_states, n_actions, run_file)
    try:
        if cfg.algo.layout == "ps":
            q_table = run_parameter_server(ctx)
        else:
            q_table = run_allreduce(ctx)
        if rank != 0:
            q_table = np.zeros((n_states, n_actions))
        else:
            run_file.set_attrs(wall_time_s=ctx.elapsed_s())  # training only, no evaluation
        result = None
        if run.eval_episodes > 0:
            result = evaluate_greedy(
                comm,
                run.env_id,
                run.env_kwargs,
                q_table,
                run.eval_episodes,
                run.seed + 1_000_003,
                ctx.watchdog_s,
            )
        if rank == 0:
            if result is not None:
                run_file.set_attrs(**{f"eval_{k}": v for k, v in result.items()})
            run_file.set_status("completed")
            run_file.close()
            print(
                f"[hpcrl] completed in {ctx.elapsed_s():.1f} s; run directory: {path}", flush=True
            )
        return result
    except BaseException:
        if run_file is not None:
            try:
                run_file.set_status("failed")
                run_file.close()
            except Exception:  # noqa: BLE001 - the original error matters more
                pass
        raise


def evaluate(
    comm: MPI.Comm, run_dir: str, episodes: int, seed: int, watchdog_s: float = 300.0
) -> dict | None:
    """Collective: greedy evaluation of the latest checkpoint in `run_dir` (rank 0 reads it).

    Raises:
        CollectiveUserError: bad `episodes`, no run there, no checkpoint, or a damaged one.
    """
    from hpcrl.topologies.context import evaluate_greedy

    loaded: dict = {}

    def load() -> tuple[str, dict, tuple[int, int]]:
        if episodes < 1:
            raise UserError(f"--episodes {episodes}: expected an integer >= 1")
        if seed < 0:
            raise UserError(f"--seed {seed}: expected an integer >= 0")
        if not Path(run_dir).is_dir():
            raise UserError(f"run directory {run_dir!r} does not exist")
        arrays, meta, _ = ckpt.load_latest(Path(run_dir) / "checkpoints")
        if "q_table" not in arrays:
            raise UserError(
                f"the checkpoint in {run_dir!r} holds no q_table (algo {meta.get('algo')!r})"
            )
        make_env(meta["env_id"], meta.get("env_kwargs", {})).close()  # one clear error
        loaded["q_table"] = arrays["q_table"]
        return meta["env_id"], meta.get("env_kwargs", {}), arrays["q_table"].shape

    env_id, env_kwargs, shape = agree(comm, load, root_only=True)
    q_table = loaded.get("q_table", np.zeros(shape))
    return evaluate_greedy(comm, env_id, env_kwargs, q_table, episodes, seed, watchdog_s)


def info(run_dir: str) -> dict:
    """Summary of a run directory (no MPI needed).

    Raises:
        UserError: not a run directory or unreadable run file.
    """
    with open_run(run_dir) as f:
        if "metrics" not in f or "episodes" not in f:
            raise UserError(f"{run_dir!r}: run.h5 has no /metrics or /episodes: not an hpcrl run")
        out = {k: f.attrs[k] for k in ("algo", "env_id", "world_size", "status") if k in f.attrs}
        out = {k: (v.item() if hasattr(v, "item") else v) for k, v in out.items()}
        out["layout"] = str(f.attrs.get("layout", ""))
        metrics = f["metrics"]
        episodes = f["episodes"]
        out["env_steps"] = (
            int(metrics["env_steps"][-1])
            if "env_steps" in metrics and len(metrics["env_steps"])
            else 0
        )
        out["episodes"] = int(len(episodes["return"]))
        returns = episodes["return"][-100:]
        out["mean_return_last_100"] = float(np.mean(returns)) if len(returns) else None
        wall = float(
            f.attrs.get(
                "wall_time_s",
                metrics["wall_time"][-1]
                if "wall_time" in metrics and len(metrics["wall_time"])
                else 0,
            )
        )
        out["wall_time_s"] = wall
        out["env_steps_per_s"] = out["env_steps"] / wall if wall > 0 else None
        if "eval_mean_return" in f.attrs:
            out["eval_mean_return"] = float(f.attrs["eval_mean_return"])
    return out


def _limit_threads(threads: int) -> None:
    """Threads per rank for OpenMP/BLAS libraries loaded later and for torch, so N ranks on
    N cores do not each start a thread per core (default 1)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, str(threads))
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def print_json(obj: dict) -> None:
    print(json.dumps(obj), flush=True)
