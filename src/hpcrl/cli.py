"""Command line: argv -> config -> subcommand (train, evaluate, info, slurm, analyse).

`python -m hpcrl` and `python -m hpcrl train`, with nothing else, run the default job
(`hpcrl.config.DEFAULT_JOB`: IMPALA on CartPole-v1). A `train` with options but no config
file and no `--algo` starts from the shared defaults (tabular Q-learning on FrozenLake8x8).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hpcrl import __version__
from hpcrl.errors import ConfigError


class UsageError(Exception):
    """argparse found bad arguments (printed once, by rank 0, exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # noqa: D401 - argparse hook
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hpcrl",
        description="MPI-native distributed reinforcement learning. Launch with mpirun/srun, "
        "or run as one process. With no arguments (or `train` alone) it trains the default "
        "job: IMPALA on CartPole-v1 (configs/cartpole-impala.yaml), rank 0 learning and the "
        "other ranks acting, into runs/.",
    )
    parser.add_argument("--version", action="version", version=f"hpcrl {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    train = sub.add_parser(
        "train",
        help="train an agent and write a run directory (alone: the default job)",
    )
    train.add_argument("config", nargs="?", help="YAML config file (flat keys, see configs/)")
    train.add_argument(
        "--algo",
        help="algorithm: qlearning (tabular), ppo, a2c, dqn, impala, a3c, async_q or async_nstep_q",
    )
    train.add_argument(
        "--env",
        dest="env_id",
        help="gymnasium env id, e.g. FrozenLake8x8-v1, or pkg.module:MyEnv-v0 (imports "
        "pkg.module on every rank, which registers MyEnv-v0)",
    )
    train.add_argument(
        "--env-module",
        dest="env_module",
        help="a module to import on every rank before the env is made (registers your envs)",
    )
    train.add_argument(
        "--env-kwargs",
        help="JSON keyword arguments for gymnasium.make, e.g. '{\"is_slippery\": false}'",
    )
    train.add_argument(
        "--total-env-steps", type=int, help="env-step budget summed over every acting rank"
    )
    train.add_argument("--seed", type=int, help="base seed; each rank derives its own")
    train.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        help="cuda: each rank's model (deep learners), or its envs and Q-table (qlearning "
        "with layout allreduce), on a GPU of its node (default cpu)",
    )
    train.add_argument("--run-dir", help="output directory (default runs/<algo>-<env>-<time>)")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set layout=allreduce --set alpha=0.05 (repeatable)",
    )
    train.add_argument(
        "--overwrite", action="store_true", help="replace a run that already exists in --run-dir"
    )
    train.add_argument(
        "--resume",
        metavar="RUN_DIR|auto",
        help="continue the run in RUN_DIR from its newest intact checkpoint; 'auto': resume "
        "--run-dir if it holds a checkpoint, else start it (what job scripts use). Exit "
        "status 3 means a signal (SIGUSR1/SIGTERM) stopped the run after a checkpoint",
    )

    evaluate = sub.add_parser("evaluate", help="run the greedy policy of a checkpoint")
    evaluate.add_argument("run_dir", help="a run directory written by `train`")
    evaluate.add_argument(
        "--checkpoint",
        default="latest",
        metavar="latest|best|step-N",
        help="latest (default: the newest intact step file), best (checkpoints/best.h5, "
        "kept by the periodic evaluation, eval_interval) or step-N (checkpoints/step-N.h5)",
    )
    evaluate.add_argument("--episodes", type=int, default=100, help="episodes (default 100)")
    evaluate.add_argument(
        "--seed", type=int, default=0, help="episode i resets with seed S+i (default 0)"
    )
    evaluate.add_argument(
        "--video",
        metavar="DIR",
        help="also write an .mp4 of the policy per episode into DIR (created if missing), "
        "episode i reset with seed S+i as in the evaluation; the JSON's 'video' key lists "
        "the files (needs pip install 'hpcrl[video]')",
    )
    evaluate.add_argument(
        "--video-episodes",
        type=int,
        default=1,
        metavar="N",
        help="episodes to record with --video (default 1)",
    )

    info = sub.add_parser("info", help="print a summary of a run directory")
    info.add_argument("run_dir", help="a run directory written by `train`")

    from hpcrl import slurm
    from hpcrl.analysis import report

    slurm.add_parser(sub)
    report.add_parser(sub)
    return parser


def config_values(args: argparse.Namespace) -> dict:
    """Merge defaults < YAML file < CLI options < --set into flat config values.

    Raises:
        ConfigError: unreadable config file, bad --env-kwargs JSON, bad --set syntax.
    """
    from hpcrl.config import load_yaml, parse_override

    values: dict = {}
    if getattr(args, "config", None):
        values.update(load_yaml(args.config))
    for key in ("algo", "env_id", "env_module", "total_env_steps", "seed", "device"):
        if getattr(args, key, None) is not None:
            values[key] = getattr(args, key)
    if getattr(args, "env_kwargs", None) is not None:
        try:
            values["env_kwargs"] = json.loads(args.env_kwargs)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"--env-kwargs {args.env_kwargs!r} is not valid JSON: {exc.msg}"
            ) from None
    for text in getattr(args, "overrides", []) or []:
        key, value = parse_override(text)
        values[key] = value
    return values


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m hpcrl` and the `hpcrl` script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] == "train":
        # Before MPI starts: a SIGUSR1/SIGTERM from here on requests a checkpoint and a stop
        # instead of killing the rank.
        from hpcrl import preemption
        from hpcrl.storage import space

        preemption.install()
        space.install()  # a full disk: one error line, not hundreds of h5py traces
    parser = build_parser()
    usage_error = None
    try:
        args = parser.parse_args(argv or ["train"])
    except UsageError as exc:
        usage_error, args = str(exc), None

    if usage_error is not None and argv[0] in ("slurm", "analyse"):
        print(f"hpcrl: error: {usage_error}", file=sys.stderr, flush=True)
        return 2
    if args is not None and args.command in ("slurm", "analyse"):
        # Renders (and may submit) a job script, or reads run files: one process. slurm's
        # checks import the runner (and so mpi4py) but never communicate: no MPI_Init on
        # a login node, where some sites forbid it.
        if "mpi4py.MPI" not in sys.modules:
            import mpi4py

            mpi4py.rc.initialize = mpi4py.rc.finalize = False
        from hpcrl import slurm
        from hpcrl.analysis import report
        from hpcrl.errors import UserError

        try:
            return (slurm.run if args.command == "slurm" else report.run)(args)
        except UserError as exc:
            print(f"hpcrl: error: {exc}", file=sys.stderr, flush=True)
            return exc.exit_code

    from mpi4py import MPI

    from hpcrl import runner

    comm = MPI.COMM_WORLD
    if usage_error is not None:
        if comm.Get_rank() == 0:
            print(f"hpcrl: error: {usage_error}", file=sys.stderr, flush=True)
        return 2
    # `python -m hpcrl` and `python -m hpcrl train` alone: the default job.
    default_job = argv in ([], ["train"])
    return runner.guarded(lambda: _dispatch(comm, args, default_job), comm)


def _dispatch(comm, args: argparse.Namespace, default_job: bool = False) -> int:
    from hpcrl import runner
    from hpcrl.comm.agreement import agree
    from hpcrl.config import DEFAULT_JOB

    if args.command == "train":
        values = agree(comm, lambda: dict(DEFAULT_JOB) if default_job else config_values(args))
        outcome = runner.train(comm, values, args.run_dir, args.overwrite, args.resume)
        if outcome.result is not None:
            runner.print_json(outcome.result)
        return outcome.exit_code
    if args.command == "evaluate":
        from hpcrl import video

        if args.video is not None:
            # Before the evaluation: a bad --video or a missing moviepy fails at once.
            agree(
                comm,
                lambda: video.check_request(args.video, args.video_episodes, args.seed),
                root_only=True,
            )
        result = runner.evaluate(comm, args.run_dir, args.episodes, args.seed, args.checkpoint)
        if args.video is not None:
            # Rank 0 records alone; the other ranks wait in `agree` (an error on rank 0 is
            # one line and exit 2 on every rank).
            # The very file evaluated (a training run may have written a newer one since).
            evaluated = Path(result["checkpoint"]).stem if result is not None else ""
            recorded = agree(
                comm,
                lambda: video.record_video(
                    args.run_dir, args.video, evaluated, args.video_episodes, args.seed
                ),
                root_only=True,
            )
            if result is not None:
                result["video"] = recorded
        if result is not None:
            runner.print_json(result)
        return 0
    if args.command == "info":
        summary = agree(comm, lambda: runner.info(args.run_dir), root_only=True)
        if comm.Get_rank() == 0:
            width = max(len(k) for k in summary)
            for key, value in summary.items():
                shown = value
                if isinstance(value, float):
                    shown = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
                print(f"{key:<{width}}  {shown}")
        return 0
    raise AssertionError(args.command)
