"""The SPMD runner: plan -> check -> run -> evaluate, and abort on any exception.

`train` reads as the lifecycle of a run: plan it (rank 0: fresh, resume or nothing),
check it (the layout against the world size, the env and device), open the run file, run
the layout's topology (`hpcrl.topologies`), evaluate its greedy policy. It never names an
algorithm or a layout: those are `hpcrl.algos`' and `hpcrl.topologies`' registries.

Only this module, `hpcrl.topologies` and `hpcrl.comm` import mpi4py. The entry point
hands in `MPI.COMM_WORLD`; everything below takes `comm` as a parameter.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mpi4py import MPI

from hpcrl import heap, preemption
from hpcrl.analysis.stats import SOLVED_WINDOW, best_window_mean, threshold_crossing
from hpcrl.comm import failures
from hpcrl.comm.agreement import CollectiveUserError, agree
from hpcrl.comm.waits import WatchdogTimeout, wait_all
from hpcrl.config import build_config, config_from_json, resume_conflicts
from hpcrl.envs import BUDGET_SPENT, NOT_CAPTURED, make_env, make_vector_env
from hpcrl.errors import CheckpointError, ConfigError, UserError
from hpcrl.storage import checkpoints as ckpt
from hpcrl.storage import space
from hpcrl.storage.runfile import (
    RunFile,
    default_run_dir,
    lock_run_dir,
    open_run,
    prepare_run_dir,
    probe_writable,
    read_status,
    refuse_in_use,
    run_dir_held,
)

STALE = "running (stale: no live job holds it)"  # `info`'s status of a killed run


def guarded(fn, comm: MPI.Comm) -> int:
    """Run `fn()` and turn every failure into an exit status without ever hanging.

    - a `CollectiveUserError` (raised on every rank together): rank 0 prints one line,
      every rank returns 2;
    - a `UserError` raised on one rank: reported to rank 0 (`hpcrl.comm.failures`), which
      prints it as one line naming the rank and aborts the job (2; `DiskFullError`: 1);
      without the report channel the rank prints the line and aborts itself;
    - `PeerFailed` on rank 0 (another rank's report): one line naming that rank (host,
      pid), then `Abort(1)`; `train` has marked the run `failed`;
    - any other exception: the traceback, every line tagged `[rank k]` (after a watchdog
      timeout or an MPI error, plus a line naming the ranks of this node that died or are
      stopped), the report to rank 0, then `COMM_WORLD.Abort(1)` so the whole job ends
      instead of hanging in `MPI_Finalize`.
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    try:
        return fn() or 0
    except CollectiveUserError as exc:
        if rank == 0:
            print(f"hpcrl: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except UserError as exc:
        if size > 1 and failures.report(str(exc)):
            # Rank 0 prints it with this rank's host and pid and aborts the job; this line
            # only when it has not done so within `failures.REPORT_GRACE_S`.
            print(f"hpcrl: error (rank {rank}): {exc}", file=sys.stderr, flush=True)
            _abort(exc.exit_code)
        print(f"hpcrl: error (rank {rank}): {exc}", file=sys.stderr, flush=True)
        if size > 1:
            _abort(exc.exit_code)
        if isinstance(exc, space.DiskFullError):
            # h5py would retry its writes while closing the files at exit, and on a full
            # disk that has ended in a segmentation fault.
            sys.stdout.flush()
            os._exit(exc.exit_code)
        return exc.exit_code
    except SystemExit:
        raise
    except failures.PeerFailed as exc:
        print(f"hpcrl: error (rank {rank}): {exc}; aborting the job", file=sys.stderr, flush=True)
        if size > 1:
            _abort(1)
        return 1
    except BaseException as exc:
        text = "".join(f"[rank {rank}] {line}\n" for line in traceback.format_exc().splitlines())
        found = failures.census() if isinstance(exc, WatchdogTimeout | MPI.Exception) else ""
        if found:
            text += f"hpcrl: error (rank {rank}): {found}\n"
        sys.stderr.write(text)
        sys.stderr.flush()
        if size > 1:
            summary = f"{type(exc).__name__}: {exc}".splitlines()[0]
            failures.report(summary + (f" ({found})" if found else ""))
            _abort(1, 0.5)
        return 1


def _abort(code: int, delay_s: float = 0.2) -> None:
    """`COMM_WORLD.Abort(code)` after `delay_s`, for the launcher to forward what this
    rank wrote to stderr first: under load, an immediate abort has ended a job with its
    exit status and an empty stderr."""
    time.sleep(delay_s)
    MPI.COMM_WORLD.Abort(code)


@dataclass
class TrainOutcome:
    """How `train` ended, on every rank."""

    # "completed" | "interrupted" (also when a signal stopped the final evaluation; the run
    # file then says `trained`) | "already-completed"
    status: str
    result: dict | None = None  # the greedy evaluation (rank 0)
    run_dir: str = ""  # the run directory (every rank)

    @property
    def exit_code(self) -> int:
        return preemption.EXIT_INTERRUPTED if self.status == "interrupted" else 0


def plan_run(values: dict, run_dir: str | None, overwrite: bool, resume: str | None) -> dict:
    """Rank 0: decide what `train` does (fresh run, resume, or nothing) and check it.

    Args:
        values: the config values the user gave (file, options, `--set`), flat.
        run_dir: `--run-dir` or None.
        overwrite: `--overwrite`.
        resume: None, "auto", or the run directory of `--resume`.

    Nothing in the directory is changed here: `train` applies the plan only after the
    layout and env checks pass too.

    Returns:
        {"mode": "fresh" | "resume" | "evaluate" | "done", "run_dir", "config" (JSON),
        "notes": [...]} ("evaluate": a `trained` run, whose final evaluation a signal stopped)
        plus "overwrite" for a fresh run, and for a resume "checkpoint" (path), "damaged"
        (newer step files that failed their checks), "meta" and "shapes" ({name: shape}
        of the checkpoint's shared arrays).

    Raises:
        UserError: contradictory options, nothing to resume, every checkpoint damaged, a
            config that conflicts with the checkpoint, an unwritable directory, a run file
            that does not match its checkpoint.
    """
    notes: list[str] = []
    if resume is None:
        cfg = build_config(values)
        path = (
            run_dir
            or cfg.run.run_dir
            or default_run_dir(
                cfg.run.algo, cfg.run.env_id, time.strftime("%Y%m%d-%H%M%S", time.gmtime())
            )
        )
        prepare_run_dir(path, overwrite, dry_run=True)
        return {
            "mode": "fresh",
            "run_dir": str(path),
            "config": cfg.to_json(),
            "notes": notes,
            "overwrite": overwrite,
        }
    if overwrite:
        raise UserError("--resume and --overwrite contradict each other: choose one")
    if resume == "auto":
        path = run_dir or str(values.get("run_dir") or "")
        if not path:
            raise UserError(
                "--resume auto needs --run-dir (or run_dir in the config): the directory "
                "to resume, or to start the run in"
            )
    else:
        path = resume
        if run_dir and Path(run_dir).resolve() != Path(resume).resolve():
            raise UserError(
                f"--resume {resume!r} and --run-dir {run_dir!r} name different directories"
            )
    path = Path(path)
    ckpt_dir = path / "checkpoints"
    lock_run_dir(path)
    status = read_status(path)
    refuse_in_use(path, status)
    if status not in (None, "unreadable"):
        _refuse_other_algorithm(path, values)
    if status == "completed":
        return {"mode": "done", "run_dir": str(path), "config": "", "notes": notes}
    if status == "trained":
        _, meta, _, _ = ckpt.load_newest_intact(ckpt_dir)
        merged = config_from_json(json.dumps(meta["config"])).flat()
        merged.update(values)  # e.g. another eval_episodes
        return {
            "mode": "evaluate",
            "run_dir": str(path),
            "config": build_config(merged).to_json(),
            "notes": notes,
        }
    if not ckpt.list_checkpoints(ckpt_dir):
        if resume != "auto":
            what = "no run" if status is None else f"a run (status {status}) but no checkpoint"
            raise UserError(
                f"--resume {str(path)!r}: the directory holds {what}; nothing to resume"
            )
        if status is not None:
            notes.append(
                f"warning: {path} holds a run (status {status}) that never wrote a "
                "checkpoint: starting it again from the beginning"
            )
        cfg = build_config(values)
        prepare_run_dir(path, overwrite=status is not None, dry_run=True)
        return {
            "mode": "fresh",
            "run_dir": str(path),
            "config": cfg.to_json(),
            "notes": notes,
            "overwrite": status is not None,
        }
    if status is None or status == "unreadable":
        raise UserError(
            f"--resume {str(path)!r}: checkpoints but no readable run.h5 there; "
            "not a run directory hpcrl can continue"
        )
    probe_writable(path)
    if status == "running":  # this process holds the lock now: no other job runs it
        notes.append(
            f"{path} says running but no job holds it: the job that ran it ended without "
            "a status (killed, or a crash off rank 0); resuming it as interrupted"
        )
    arrays, meta, ckpt_path, skipped = ckpt.load_newest_intact(ckpt_dir)
    for _, reason in skipped:
        notes.append(f"warning: {reason}; resuming from the previous checkpoint {ckpt_path.name}")
    with open_run(path) as f:
        have = len(f["episodes"]["return"]) if "episodes" in f else -1
    if have < int(meta["episodes_rows"]):
        raise UserError(
            f"--resume {str(path)!r}: run.h5 holds {have} episode rows, fewer than the "
            f"{meta['episodes_rows']} checkpoint {ckpt_path.name} accounts for: they do not "
            "belong together"
        )
    merged = config_from_json(json.dumps(meta["config"])).flat()
    merged.update(values)
    cfg = build_config(merged)
    conflicts = resume_conflicts(meta["config"], cfg)
    if conflicts:
        raise UserError(
            f"--resume {str(path)!r}: the config conflicts with checkpoint {ckpt_path.name}: "
            + ", ".join(conflicts)
            + "; drop those settings or start a new --run-dir"
        )
    return {
        "mode": "resume",
        "run_dir": str(path),
        "config": cfg.to_json(),
        "notes": notes,
        "checkpoint": str(ckpt_path),
        "damaged": [str(bad) for bad, _ in skipped],
        "meta": meta,
        "shapes": array_shapes(arrays, meta),
    }


def _refuse_other_algorithm(path: Path, values: dict) -> None:
    """A resume continues the run's algorithm (run.h5's `algo`), also when the run has
    completed (which a resume otherwise leaves as it is): another `algo` would otherwise
    surface as the old algorithm's keys being unknown to the new one.

    Raises:
        UserError: `values` ask for another algo.
    """
    with open_run(path) as f:
        have = str(f.attrs.get("algo", ""))
    asked = values.get("algo")
    if have and asked is not None and str(asked) != have:
        raise UserError(
            f"--resume {str(path)!r}: a run of algo {have!r}, not {asked!r}; a resume "
            "continues the run's algorithm (drop --algo), or start a new --run-dir"
        )


def train(
    comm: MPI.Comm,
    values: dict,
    run_dir: str | None = None,
    overwrite: bool = False,
    resume: str | None = None,
) -> TrainOutcome:
    """Collective: one whole training run, a resumed one, or nothing (already completed).

    Args:
        values: flat config values from the user (see `plan_run`).
        resume: None (a new run), "auto" or a run directory (see `plan_run`).

    Returns:
        The outcome on every rank; `exit_code` 3 when a preemption signal stopped the run
        after its checkpoint.

    Raises:
        CollectiveUserError: bad config, layout, env, run directory or checkpoint.
    """
    from hpcrl.topologies.run_context import RunContext
    from hpcrl.topologies.segments import ResumePoint

    rank, world_size = comm.Get_rank(), comm.Get_size()
    # Plan (rank 0 alone reads the directory) ...
    # the whole MPI world's size: `comm` may be a part of it (`hpcrl.train(comm=...)`)
    agree(comm, lambda: check_launcher(MPI.COMM_WORLD.Get_size()))
    plan = agree(comm, lambda: plan_run(values, run_dir, overwrite, resume), root_only=True)
    if rank == 0:
        for note in plan["notes"]:
            print(f"[hpcrl] {note}", file=sys.stderr, flush=True)
    path = Path(plan["run_dir"])
    if plan["mode"] == "done":
        if rank == 0:
            print(f"[hpcrl] {path} already completed; nothing to resume", flush=True)
        return TrainOutcome("already-completed", run_dir=str(path))
    cfg = config_from_json(plan["config"])
    if plan["mode"] == "evaluate":
        return _evaluate_trained(comm, cfg, path)

    # ... check (every rank, before any other communication) ...
    topology = agree(comm, lambda: check_layout(cfg, world_size))
    _limit_threads(cfg.run.torch_threads)
    heap.keep_freed_memory()  # no page faults on every step's numpy temporaries
    # Rank 0 alone probes the env (an actor rank need not import what the checks use);
    # meanwhile every other acting rank makes it once (`_warm_env`).
    if rank != 0 and rank in topology.acting_ranks(world_size):
        _warm_env(cfg)
    spaces = agree(
        comm,
        lambda: check_env(cfg, topology, world_size, plan.get("shapes", {})),
        root_only=True,
    )
    resume_point = None
    if plan["mode"] == "resume":
        meta = plan["meta"]
        exact = bool(meta.get("rank_states")) and int(meta["world_size"]) == world_size
        resume_point = ResumePoint(Path(plan["checkpoint"]), meta, exact)
    run_file = _open_run_file(comm, cfg, path, plan, resume_point)
    space.reserve(path, create=rank == 0)  # room to close run.h5 whole after a full disk
    if rank == 0:
        print(f"[hpcrl] {_start_line(cfg, topology, path, resume_point, world_size)}", flush=True)
    # run.h5 and traj/ exist before any rank writes; one shared start time.
    wait_all([comm.Ibarrier()], comm, "the start barrier", cfg.run.watchdog_s)
    failures.install(comm)
    if run_file is not None:  # to match a launcher's "PID N RUNNING AT host" to a rank
        hosts, pids = zip(*failures.peers(), strict=True)
        run_file.set_attrs(rank_hosts=list(hosts), rank_pids=list(pids))

    try:
        # ... run ...
        ctx = RunContext.create(
            comm,
            cfg,
            path,
            spaces,
            run_file,
            resume_point,
            preemption.requested,
            topology.acting_ranks(world_size),
            topology.recording_ranks(world_size),
        )
        result = topology.run(ctx)
        # ... and evaluate.
        outcome = _finish(ctx, result)
        space.release()
        failures.uninstall()
        return outcome
    except BaseException as exc:
        space.release()
        if run_file is not None:
            try:
                if isinstance(exc, failures.PeerFailed):
                    run_file.set_attrs(failure=str(exc))
                run_file.set_status("failed")
                run_file.close()
            except Exception:  # noqa: BLE001 - the original error matters more
                pass
        raise  # the report channel stays open for `guarded` (the job is aborted)


def check_layout(cfg, world_size: int):
    """The run's topology (`hpcrl.contracts.Topology`), checked against the world size
    (`train` and `hpcrl slurm` at render time).

    Raises:
        ConfigError: a layout that cannot run on `world_size` ranks, or `eval_interval`
            for a layout without periodic evaluation.
    """
    from hpcrl.topologies import make_topology

    topology = make_topology(cfg)
    topology.check_world(world_size)
    if cfg.run.eval_interval and not topology.periodic_eval:
        raise ConfigError(
            f"config key 'eval_interval': got {cfg.run.eval_interval}, expected 0: layout "
            f"'{topology.name}' does not evaluate during training"
        )
    return topology


def _warm_env(cfg) -> None:
    """Make the env once and close it, on an acting rank other than 0 while rank 0 probes
    it (`check_env`), so that what the env keeps per process is ready on every rank when
    training starts, as it is on rank 0. A generated 1000 x 1000 `hpcrl/FrozenLake-v0` map
    (and scipy's import) took rank 1 0.2 s after the start barrier while rank 0 waited for
    it at the first round, a tenth of a 16M-step 2-rank run. An error is left to rank 0's
    probe to report, in one line."""
    run = cfg.run
    try:
        make_env(run.env_id, run.env_kwargs, **run.env_options()).close()
    except Exception:  # noqa: BLE001 - the same env fails rank 0's probe, which says why
        pass


def check_env(cfg, topology, world_size: int, shapes: dict) -> tuple:
    """One probe env: the topology's checks (spaces, device, the batch split over the
    ranks, a budget of at least one update); returns its (observation_space, action_space).

    Raises:
        UserError: an env, device or checkpoint this run cannot use.
    """
    run = cfg.run
    env = make_env(run.env_id, run.env_kwargs, **run.env_options())
    try:
        if run.vector_env in ("native", "table"):  # an env the backend cannot step
            make_vector_env(run.env_id, run.env_kwargs, 1, vector_env=run.vector_env).close()
        topology.check_env(env, world_size, shapes)
        return env.observation_space, env.action_space
    finally:
        env.close()


def _open_run_file(comm, cfg, path: Path, plan: dict, resume_point) -> RunFile | None:
    """Collective: rank 0 creates the run directory and `run.h5` (a fresh run) or reopens
    them (a resume: stale temporaries removed, damaged checkpoints set aside, a `/resumes`
    row); returns the run file on rank 0, None elsewhere."""
    opened: dict = {}
    world_size = comm.Get_size()

    def open_run_file() -> None:
        attrs = {
            "algo": cfg.run.algo,
            "env_id": cfg.run.env_id,
            "world_size": world_size,
            "layout": cfg.layout,
            "config": cfg.to_json(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
        }
        if resume_point is None:
            prepare_run_dir(path, plan["overwrite"])
            opened["file"] = RunFile(path / "run.h5", attrs)
            return
        ckpt.remove_stale_temporaries(path / "checkpoints")
        ckpt.quarantine([Path(p) for p in plan["damaged"]])
        meta = resume_point.meta
        run_file = RunFile.reopen(path / "run.h5", meta["episodes_rows"], meta["metrics_rows"])
        run_file.append_resume(
            wall_time=time.time(),
            env_steps=int(meta["env_steps"]),
            world_size=world_size,
            from_world_size=int(meta["world_size"]),
            slurm_restart_count=_int_env("SLURM_RESTART_COUNT"),
            slurm_job_id=_int_env("SLURM_JOB_ID"),
            episodes_dropped=run_file.episodes_dropped,
            exact=int(resume_point.exact),
        )
        opened["file"] = run_file

    agree(comm, open_run_file, root_only=True)
    return opened.get("file")


def _start_line(cfg, topology, path: Path, resume_point, world_size: int) -> str:
    """What rank 0 prints when the run starts: algorithm, env, layout and roles, budget."""
    run = cfg.run
    layout = f"layout {topology.name} ({topology.roles(world_size)})"
    if resume_point is None:
        return f"{run.algo} on {run.env_id}, {layout}, {run.total_env_steps:,} env steps -> {path}"
    meta = resume_point.meta
    how = resume_how(resume_point, cfg, world_size)
    return (
        f"resuming {path} from {resume_point.path.name} at "
        f"{int(meta['env_steps']):,} of {run.total_env_steps:,} env steps, {how}; {layout}"
    )


def resume_how(resume_point, cfg, world_size: int) -> str:
    """How a resume continues, in words, with the true reason when it is not bit-exact:
    the layout does not checkpoint every rank's state (an asynchronous one), the world
    size changed, the device changed (a GPU's env streams are not the CPU's), or some env
    copies' state could not be captured (`hpcrl.envs`, module doc)."""
    meta = resume_point.meta
    reasons = []
    if int(meta["world_size"]) != world_size:
        reasons.append(f"the world size changed: was {meta['world_size']} ranks, now {world_size}")
    if not meta.get("rank_states"):
        layout = meta["config"].get("layout", cfg.layout)
        reasons.append(
            f"layout {layout} is asynchronous and checkpoints the learner, not every rank's state"
        )
    if reasons:
        fresh = "fresh actor seeds, in-progress episodes restart: not bit-exact"
        return f"in a new segment ({'; '.join(reasons)}; {fresh})"
    was = str(meta["config"].get("device", "cpu"))
    if (was == "cpu") != (cfg.run.device == "cpu"):
        return (
            f"with every rank's state but not bit-exact (device {was} then, "
            f"{cfg.run.device} now: the env copies restart with fresh streams)"
        )
    flags = ckpt.read_rank_values(resume_point.path, "env_captured")
    lost = sorted(rank for rank, flag in flags.items() if int(flag[0]) == NOT_CAPTURED)
    if lost:
        ranks = ", ".join(map(str, lost[:8])) + (", ..." if len(lost) > 8 else "")
        return (
            f"with every rank's state but not bit-exact ({cfg.run.env_id}'s env state could "
            f"not be captured on rank {ranks}: their in-progress episodes restart)"
        )
    if any(int(flag[0]) == BUDGET_SPENT for flag in flags.values()):
        # the run's last checkpoint (its budget, which a resume cannot change, is spent)
        return "exactly (the env-step budget was spent at this checkpoint: nothing is left to step)"
    return "exactly (every rank's state restored)"


def _finish(ctx, result) -> TrainOutcome:
    """Collective, after the topology's run: the status, the greedy evaluation (every rank
    takes a share of the episodes) and the closing lines. A run stopped early because it
    reached `stop_at_return` (rank 0's `Reporter.solved_at`) is complete."""
    comm, run, run_file, path = ctx.comm, ctx.cfg.run, ctx.run_file, ctx.run_dir
    failures.finished()  # from here a rank may leave without having died
    if ctx.rank == 0:
        run_file.set_attrs(wall_time_s=ctx.elapsed_s())  # training only, no evaluation
    solved_at = comm.bcast(ctx.reporter.solved_at if ctx.reporter is not None else None, root=0)
    early = result.interrupted and solved_at is not None  # else the budget ended first
    if early and ctx.rank == 0:
        stopped = run_file.file["metrics/env_steps"]
        print(
            f"[hpcrl] stopped early at {int(stopped[-1]):,} env steps: the mean return over "
            f"{SOLVED_WINDOW} training episodes reached {solved_at[1]:.4g} >= stop_at_return "
            f"{run.stop_at_return:g} at {solved_at[0]:,} env steps",
            flush=True,
        )
    if result.interrupted and not early:
        if ctx.rank == 0:
            run_file.set_status("interrupted")
            run_file.close()
            print(
                f"[hpcrl] {preemption.signal_name() or 'a preemption signal'}: "
                f"checkpointed and stopped; continue with: hpcrl train --resume {path}",
                flush=True,
            )
        return TrainOutcome("interrupted", run_dir=str(path))
    evaluation = None
    if run.eval_episodes > 0:
        try:
            evaluation = result.greedy.evaluate(
                comm,
                run.env_id,
                run.env_kwargs,
                run.env_options(),
                run.eval_episodes,
                run.seed + 1_000_003,
                ctx.watchdog_s,
            )
        except preemption.EvaluationInterrupted as exc:
            return _evaluation_stopped(ctx.rank, run_file, path, exc)
    if ctx.rank == 0:
        _record_completion(run_file, path, run, evaluation, ctx.elapsed_s())
    return TrainOutcome("completed", evaluation, str(path))


def _evaluation_stopped(rank: int, run_file, path: Path, exc: Exception) -> TrainOutcome:
    """A preemption signal stopped the final evaluation: training is complete and
    checkpointed, so the run is marked `trained` and a resume runs only the evaluation."""
    if rank == 0:
        run_file.set_status("trained")
        run_file.close()
        print(
            f"[hpcrl] {exc}: training is complete and checkpointed, the final evaluation "
            f"was stopped; run it with: hpcrl train --resume {path}",
            flush=True,
        )
    return TrainOutcome("interrupted", run_dir=str(path))


def _record_completion(run_file, path: Path, run, evaluation: dict | None, elapsed_s) -> None:
    """Rank 0: the evaluation's attributes, status `completed`, and the closing lines."""
    best = _best_evaluation(path) if run.eval_interval > 0 else None
    if evaluation is not None:
        run_file.set_attrs(**{f"eval_{k}": v for k, v in evaluation.items() if k != "checkpoint"})
        if best is not None:
            evaluation.update({k: v for k, v in best.items() if k.startswith("best_")})
    run_file.set_status("completed")
    solved = solved_line(run_file.file["episodes"], run.env_id)
    run_file.close()
    print(f"[hpcrl] completed in {elapsed_s:.1f} s; run directory: {path}", flush=True)
    if solved:
        print(f"[hpcrl] {solved}", flush=True)
    if evaluation is not None:
        print(
            f"[hpcrl] final greedy evaluation: mean return {evaluation['mean_return']:.4g} "
            f"over {evaluation['episodes']} episodes",
            flush=True,
        )
    if best is not None:
        print(
            f"[hpcrl] best periodic evaluation: mean return "
            f"{best['best_eval_mean_return']:.4g} over {best['episodes']} "
            f"episodes at {best['best_eval_env_steps']:,} env steps, kept as "
            f"{path / 'checkpoints' / ckpt.BEST} (hpcrl evaluate {path} --checkpoint best)",
            flush=True,
        )


def _evaluate_trained(comm, cfg, path: Path) -> TrainOutcome:
    """Collective: a resume of a `trained` run: only the final greedy evaluation, of the
    checkpoint written at the end of training, then status `completed` (any world size:
    the evaluation's episodes do not depend on it)."""
    run = cfg.run
    if comm.Get_rank() == 0:
        print(f"[hpcrl] {path}: training is complete; running its final evaluation", flush=True)
    try:
        evaluation = None
        if run.eval_episodes > 0:  # `--set eval_episodes=0` completes it unevaluated
            evaluation = evaluate(
                comm, str(path), run.eval_episodes, run.seed + 1_000_003, "latest", run.watchdog_s
            )
    except preemption.EvaluationInterrupted as exc:
        run_file = RunFile.open_as_is(path / "run.h5") if comm.Get_rank() == 0 else None
        return _evaluation_stopped(comm.Get_rank(), run_file, path, exc)
    if comm.Get_rank() == 0:
        run_file = RunFile.open_as_is(path / "run.h5")
        elapsed = float(run_file.file.attrs.get("wall_time_s", 0.0))
        _record_completion(run_file, path, run, evaluation, elapsed)
    return TrainOutcome("completed", evaluation, str(path))


def _best_evaluation(run_dir: Path) -> dict | None:
    """The mean return and env steps recorded in `checkpoints/best.h5`, if there is one."""
    try:
        _, meta = ckpt.load_checkpoint(run_dir / "checkpoints" / ckpt.BEST)
    except (CheckpointError, OSError):
        return None
    return {
        "best_eval_mean_return": float(meta["eval_mean_return"]),
        "best_eval_env_steps": int(meta["env_steps"]),
        "episodes": int(meta["eval_episodes"]),
    }


def solved_line(episodes, env_id: str) -> str:
    """Where the training episodes first reached the env's `spec.reward_threshold` (e.g.
    475 for CartPole-v1) as a mean over `SOLVED_WINDOW` episodes, in words ("" when the env
    has no threshold or the run had too few episodes).

    Args:
        episodes: the run file's `/episodes` group (return, env_steps, wall_time).
    """
    import gymnasium as gym

    try:
        threshold = gym.spec(env_id).reward_threshold
    except gym.error.Error:
        return ""
    returns = episodes["return"][()]
    if threshold is None or len(returns) < SOLVED_WINDOW:
        return ""
    end = threshold_crossing(returns, threshold)
    if end is None:
        return (
            f"did not reach {env_id}'s reward threshold {threshold:g}: best mean return over "
            f"{SOLVED_WINDOW} training episodes {best_window_mean(returns):.4g}"
        )
    mean = float(np.mean(returns[end - SOLVED_WINDOW + 1 : end + 1]))
    return (
        f"reached a mean return of {mean:.4g} >= {threshold:g} ({env_id}'s reward "
        f"threshold) over {SOLVED_WINDOW} training episodes at "
        f"{int(episodes['env_steps'][end]):,} env steps, {float(episodes['wall_time'][end]):.1f} s "
        "into training"
    )


def check_launcher(world_size: int) -> None:
    """Refuse N one-rank worlds started by one `srun` step: when srun's MPI plugin does not
    match the MPI mpi4py loaded, each task starts alone, and N copies would write the same
    run directory. Rank and size still come from MPI; SLURM's task count is only compared.

    Raises:
        UserError: the srun step has several tasks but the MPI world has one rank.
    """
    step_tasks = _int_env("SLURM_STEP_NUM_TASKS")
    if world_size == 1 and step_tasks > 1 and "SLURM_STEP_ID" in os.environ:
        raise UserError(
            f"srun started {step_tasks} tasks but MPI sees a world of 1 rank: the launcher "
            "does not match mpi4py's MPI (with the pip mpich wheel use `srun --mpi=pmi2`, "
            "with a site MPI its plugin, e.g. `--mpi=pmix`)"
        )


def _int_env(name: str) -> int:
    """An integer environment variable such as SLURM_RESTART_COUNT, -1 when unset or odd."""
    try:
        return int(os.environ.get(name, "-1"))
    except ValueError:
        return -1


def evaluate(
    comm: MPI.Comm,
    run_dir: str,
    episodes: int,
    seed: int,
    checkpoint: str = "latest",
    watchdog_s: float = 300.0,
) -> dict | None:
    """Collective: greedy evaluation of a checkpoint in `run_dir` (rank 0 reads it; its
    layout's topology makes the policy on every rank).

    Args:
        checkpoint: "latest" (the newest intact step file), "best" (`best.h5`, kept by the
            periodic evaluation) or "step-N" (`step-N.h5`).

    Returns:
        On rank 0, `{"mean_return", "std_return", "episodes", "checkpoint"}` (undiscounted
        returns; the absolute path of the file evaluated); None on the other ranks.

    Raises:
        CollectiveUserError: bad `episodes` or `checkpoint`, no run there, no such
            checkpoint, or a damaged one.
    """
    from hpcrl.topologies import make_topology

    loaded: dict = {}

    def load() -> tuple[str, dict, dict]:
        if episodes < 1:
            raise UserError(f"--episodes {episodes}: expected an integer >= 1")
        if seed < 0:
            raise UserError(f"--seed {seed}: expected an integer >= 0")
        arrays, meta, path, shapes = read_policy_checkpoint(run_dir, checkpoint)
        cfg = config_from_json(json.dumps(meta["config"]))
        make_env(cfg.run.env_id, cfg.run.env_kwargs, **cfg.run.env_options()).close()
        loaded.update(arrays)
        return str(path), meta, shapes

    path, meta, shapes = agree(comm, load, root_only=True)
    cfg = config_from_json(json.dumps(meta["config"]))
    policy = make_topology(cfg).checkpoint_policy(Path(path), meta, shapes, loaded)
    run = cfg.run
    result = policy.evaluate(
        comm, run.env_id, run.env_kwargs, run.env_options(), episodes, seed, watchdog_s
    )
    if result is not None:
        result["checkpoint"] = str(Path(path).absolute())  # the file evaluated
    return result


def read_policy_checkpoint(run_dir: str | Path, checkpoint: str) -> tuple[dict, dict, Path, dict]:
    """The checkpoint `evaluate` and `load_policy` act from: its arrays, meta and path, and
    the shapes of its top-level arrays ({name: shape}, what `checkpoint_policy` takes).

    Raises:
        UserError: no run directory, or as `_load_for_evaluation`.
    """
    if Path(run_dir).is_file():
        raise UserError(
            f"run directory {str(run_dir)!r} is a file: expected the directory `train` wrote "
            "(the one holding run.h5 and checkpoints/)"
        )
    if not Path(run_dir).is_dir():
        raise UserError(f"run directory {str(run_dir)!r} does not exist")
    arrays, meta, path = _load_for_evaluation(Path(run_dir) / "checkpoints", checkpoint)
    return arrays, meta, path, array_shapes(arrays, meta)


def array_shapes(arrays: dict, meta: dict) -> dict[str, list[int]]:
    """{name: shape} of a checkpoint's top-level arrays, and of those its meta declares
    stored elsewhere (`shapes`: a sharded checkpoint's `q_table`, in its shard files)."""
    shapes = {name: list(a.shape) for name, a in arrays.items() if "/" not in name}
    shapes.update(meta.get("shapes", {}))
    return shapes


def _load_for_evaluation(ckpt_dir: Path, checkpoint: str) -> tuple[dict, dict, Path]:
    """Rank 0: the arrays, meta and path of the checkpoint `evaluate` was asked for.

    Raises:
        UserError: `checkpoint` is not latest, best or step-N, or that file is missing
            (the message lists what there is).
        CheckpointError: the file is damaged (`latest`: no intact step file).
    """
    if checkpoint == "latest":
        arrays, meta, path, skipped = ckpt.load_newest_intact(ckpt_dir)
        for _, reason in skipped:
            print(f"[hpcrl] warning: {reason}; using {path.name}", file=sys.stderr, flush=True)
        return arrays, meta, path
    if checkpoint != "best" and not re.fullmatch(r"step-\d+", checkpoint):
        raise UserError(f"--checkpoint {checkpoint!r}: expected latest, best or step-N")
    path = ckpt_dir / f"{checkpoint}.h5"
    if not path.exists():
        there = [p.name for p in ckpt.list_checkpoints(ckpt_dir)]
        if (ckpt_dir / ckpt.BEST).exists():
            there.append(ckpt.BEST)
        hint = " (best.h5 is written only with eval_interval > 0)" if checkpoint == "best" else ""
        raise UserError(
            f"--checkpoint {checkpoint}: no {path}{hint}; there are: {', '.join(there) or 'none'}"
        )
    arrays, meta = ckpt.load_checkpoint(path)
    return arrays, meta, path


def info(run_dir: str) -> dict:
    """Summary of a run directory (no MPI needed); a run still training is read without
    a lock, as of its last flush.

    Raises:
        UserError: not a run directory or unreadable run file.
    """
    with open_run(run_dir, live=True) as f:
        if "metrics" not in f or "episodes" not in f:
            raise UserError(f"{run_dir!r}: run.h5 has no /metrics or /episodes: not an hpcrl run")
        out = {k: f.attrs[k] for k in ("algo", "env_id", "world_size", "status") if k in f.attrs}
        out = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in out.items()}
        if out.get("status") == "running" and run_dir_held(run_dir) is False:
            out["status"] = STALE
        if "failure" in f.attrs:  # the rank that failed or died, in rank 0's words
            out["failure"] = str(f.attrs["failure"])
        out["layout"] = str(f.attrs.get("layout", ""))
        metrics = f["metrics"]
        episodes = f["episodes"]
        out["env_steps"] = (
            int(metrics["env_steps"][-1])
            if "env_steps" in metrics and len(metrics["env_steps"])
            else 0
        )
        out["episodes"] = int(len(episodes["return"]))
        out["resumes"] = int(len(f["resumes"]["env_steps"])) if "resumes" in f else 0
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
