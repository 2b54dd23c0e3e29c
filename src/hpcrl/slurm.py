"""`hpcrl slurm CONFIG`: render (and optionally submit) an sbatch script that trains CONFIG.

The rendered script has the structure of `jobs/single-node.sbatch` or, with
`--preemptible`, of `jobs/preemptible.sbatch` (checkpoint on SIGUSR1, requeue on exit 3).
It trains with `--resume auto` into a run directory fixed at render time, so submitting
the same script again continues the run.

A sweep (`--grid KEY=V1,V2 ...` and/or `--seeds N`) is one job array over the product of
the grid values and the seeds: the script holds a table from `SLURM_ARRAY_TASK_ID` to one
grid point and seed, and each task trains into `RUN_DIR/<point>/seed-<seed>` (the point
named `KEY=VALUE,KEY2=VALUE2`), so `hpcrl analyse RUN_DIR` reads every task's run.

Before anything is written, every task's config is built as `hpcrl train` builds it and
checked against the job's world size (`check_training_config`).

Two parsers read the script, and each value is made safe for the one that reads it:

- `#SBATCH` lines are read by sbatch, which splits on whitespace, honours quotes and
  backslashes, ends the line at an unquoted `#` and starts a new heterogeneous component
  at any line containing `hetjob` or `packjob`. It does no command substitution. Every
  value written there is therefore checked against a strict pattern (no control
  characters, spaces, quotes, backslashes or `#`) and refused otherwise; nothing is
  quoted or rewritten.
- Every value written into a shell command line is quoted with `shlex.quote`.

Rank and world size always come from MPI inside the job, never from SLURM variables.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from hpcrl import __version__
from hpcrl.errors import UserError

TIME_FORMATS = "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
_TIME_PATTERNS = (
    # (regex, field names in order); every field is a run of digits.
    (re.compile(r"(\d+)"), ("minutes",)),
    (re.compile(r"(\d+):(\d+)"), ("minutes", "seconds")),
    (re.compile(r"(\d+):(\d+):(\d+)"), ("hours", "minutes", "seconds")),
    (re.compile(r"(\d+)-(\d+)"), ("days", "hours")),
    (re.compile(r"(\d+)-(\d+):(\d+)"), ("days", "hours", "minutes")),
    (re.compile(r"(\d+)-(\d+):(\d+):(\d+)"), ("days", "hours", "minutes", "seconds")),
)
_SECONDS = {"days": 86400, "hours": 3600, "minutes": 60, "seconds": 1}
# A field that follows a larger unit must stay below that unit.
_FIELD_LIMIT = {"hours": 24, "minutes": 60, "seconds": 60}

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_JOB_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
_GPUS_RE = re.compile(r"(?:[A-Za-z0-9_.-]+:)?[1-9][0-9]*")
_ARRAY_ITEM_RE = re.compile(r"(\d+)(?:-(\d+)(?::(\d+))?)?")
# What may appear in an #SBATCH value at all (each option also has its own pattern).
_DIRECTIVE_VALUE_RE = re.compile(r"[A-Za-z0-9_.:%,@+=/-]*")
_HETJOB_WORDS = ("hetjob", "packjob")
# A config key as `--grid` takes it (dotted for nested keys, e.g. debug.fail_rank).
_CONFIG_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
# Characters kept in a grid point's directory name; any other becomes "_".
_UNSAFE_NAME_CHAR_RE = re.compile(r"[^A-Za-z0-9_.+=-]")
MAX_NAME_BYTES = 255  # one path component on Linux file systems
# Keys a sweep sets itself, per task.
_SWEEP_KEYS = {"seed": "--seeds", "run_dir": "--run-dir"}
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")

MAX_SIGNAL_LEAD_S = 65535  # sbatch --signal keeps the lead time in 16 bits


@dataclasses.dataclass(frozen=True)
class JobOptions:
    """Everything a rendered job script depends on (validated by `validate_options`).

    Attributes:
        config: path of the YAML config, relative to the directory sbatch is run from.
        job_name: `#SBATCH --job-name`.
        run_dir: the run directory; with `array`, the parent of one `seed-<k>` per task;
            in a sweep, the parent of one `<point>/seed-<k>` (or `seed-<k>`) per task.
        nodes: `#SBATCH --nodes`.
        ntasks_per_node: `#SBATCH --ntasks-per-node` (MPI ranks per node).
        cpus_per_task: `#SBATCH --cpus-per-task`.
        time: `#SBATCH --time`, one of `TIME_FORMATS`.
        partition: `#SBATCH --partition`, or None for the site default.
        account: `#SBATCH --account`, or None for the site default.
        gpus: `#SBATCH --gpus-per-node`, e.g. "1" or "a100:2", or None.
        array: `#SBATCH --array` spec, e.g. "0-4", "0-9%2", "1,3,5"; the array task id
            is passed to `hpcrl train` as `--seed`. Excludes `grid` and `seeds`.
        grid: the sweep's grid, `((key, (value, ...)), ...)`, values as given on the
            command line (each passed on as `--set key=value`); see `check_grid`.
        seeds: the sweep's seeds 0..seeds-1, or None (1 when `grid` is given).
        max_running: in a sweep, at most this many array tasks at once (`%N`), or None.
        preemptible: checkpoint on SIGUSR1 `signal_lead_s` before the time limit, requeue.
        signal_lead_s: seconds before the time limit that SLURM sends SIGUSR1.
        launcher: the launcher command line, e.g. "srun --mpi=pmi2" (split like a shell).
        venv: the virtual environment the job activates.
        overrides: `--set KEY=VALUE` arguments passed on to `hpcrl train`.
    """

    config: str
    job_name: str
    run_dir: str
    nodes: int = 1
    ntasks_per_node: int = 4
    cpus_per_task: int = 1
    time: str = "01:00:00"
    partition: str | None = None
    account: str | None = None
    gpus: str | None = None
    array: str | None = None
    grid: tuple[tuple[str, tuple[str, ...]], ...] = ()
    seeds: int | None = None
    max_running: int | None = None
    preemptible: bool = False
    signal_lead_s: int = 120
    launcher: str = "srun"
    venv: str = ".venv"
    overrides: tuple[str, ...] = ()

    @property
    def sweep(self) -> bool:
        """Whether this job is a sweep (`--grid` or `--seeds`)."""
        return bool(self.grid) or self.seeds is not None


@dataclasses.dataclass(frozen=True)
class SweepTask:
    """One array task of a sweep.

    Attributes:
        point: the grid point's directory name, `KEY=VALUE,KEY2=VALUE2`, "" without a grid.
        seed: passed to `hpcrl train` as `--seed`.
        overrides: the point's `KEY=VALUE` texts, each passed on as `--set`.
    """

    point: str
    seed: int
    overrides: tuple[str, ...]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `slurm` subcommand to the CLI's subparsers.

    Numbers and names are taken as strings and validated by `options_from_args`, so that
    every bad value gets the same kind of one-line error.

    Args:
        subparsers: the object returned by `ArgumentParser.add_subparsers`.

    Returns:
        The `slurm` subparser.
    """
    parser = subparsers.add_parser(
        "slurm",
        help="render (and optionally submit) an sbatch script that trains a config",
        description="Print an sbatch script that trains CONFIG with `--resume auto` (so "
        "submitting it again continues the run); with --grid or --seeds, one job array over "
        "every combination. Every task's config is first checked as `hpcrl train` would "
        "check it, for --nodes x --ntasks-per-node ranks. Paths are relative to the "
        "directory you submit from.",
    )
    parser.add_argument("config", help="YAML config file (must exist)")
    job = parser.add_argument_group("resources (#SBATCH lines)")
    job.add_argument("--nodes", default="1", help="nodes (default 1)")
    job.add_argument("--ntasks-per-node", default="4", help="MPI ranks per node (default 4)")
    job.add_argument("--cpus-per-task", default="1", help="CPUs per rank (default 1)")
    job.add_argument(
        "--time", default="01:00:00", help=f"time limit: {TIME_FORMATS} (default 01:00:00)"
    )
    job.add_argument("--partition", help="partition (default: the site's default)")
    job.add_argument("--account", help="account to charge (default: your default)")
    job.add_argument("--gpus", help="GPUs per node, e.g. 1 or a100:2 (default none)")
    job.add_argument(
        "--array",
        help="job array, e.g. 0-4, 0-9%%2, 1,3,5: one run per array task, seed = task id, "
        "run dir RUN_DIR/seed-<id> (not with --grid or --seeds, which make their own array)",
    )
    job.add_argument("--job-name", help="job name (default hpcrl-<config stem>)")
    job.add_argument(
        "--preemptible",
        action="store_true",
        help="checkpoint on SIGUSR1 before the time limit and requeue until complete",
    )
    job.add_argument(
        "--signal-lead-s",
        default="120",
        help="with --preemptible: seconds before the time limit that SIGUSR1 is sent "
        "(default 120; SLURM may send it up to 60 s earlier)",
    )
    run = parser.add_argument_group("what the job runs")
    run.add_argument(
        "--run-dir",
        help="run directory (default runs/<job name>; with --array, --grid or --seeds the "
        "parent of every task's directory)",
    )
    run.add_argument(
        "--launcher",
        help="launcher command (default: 'srun --mpi=pmi2' when mpi4py uses the pip mpich "
        "wheel, as after `make venv`; plain 'srun' otherwise, which uses the site's MPI "
        "plugin); e.g. 'mpiexec -n 4'",
    )
    run.add_argument("--venv", default=".venv", help="virtual environment (default .venv)")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override passed on to `hpcrl train` (repeatable)",
    )
    sweep = parser.add_argument_group(
        "sweep (one job array over every combination of --grid values and --seeds)"
    )
    sweep.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="a config key and its values, split at commas (repeatable, once per key): "
        "each array task trains one combination of the values, passed as --set KEY=V, into "
        "RUN_DIR/KEY=V,KEY2=V2/seed-<seed>",
    )
    sweep.add_argument(
        "--seeds",
        metavar="N",
        help="train every grid point with seeds 0..N-1, one array task each (default 1 with "
        "--grid); alone: N tasks into RUN_DIR/seed-<seed>",
    )
    sweep.add_argument(
        "--max-running",
        metavar="N",
        help="with --grid or --seeds: at most N array tasks run at once (#SBATCH --array=...%%N)",
    )
    out = parser.add_argument_group("output")
    out.add_argument("--output", help="write the script to this file instead of stdout")
    out.add_argument(
        "--submit",
        action="store_true",
        help="write the script (to --output, default ./<job name>.sbatch), run `sbatch` "
        "on it and print the job id",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Execute `hpcrl slurm` for parsed `args` (no MPI).

    Args:
        args: the namespace parsed by the `slurm` subparser.

    Returns:
        The exit status: 0.

    Raises:
        UserError: a bad option value, a config `hpcrl train` would refuse for this job,
            an unwritable output file, no `sbatch` on PATH, or sbatch refusing the script.
    """
    options = options_from_args(args)
    script = render_script(options)
    if not args.submit and args.output is None:
        sys.stdout.write(script)
        return 0
    path = Path(args.output if args.output is not None else f"{options.job_name}.sbatch")
    _check_text("--output", str(path))
    try:
        path.write_text(script)
    except OSError as exc:
        raise UserError(f"--output {str(path)!r}: cannot write: {exc.strerror}") from None
    if not args.submit:
        print(f"hpcrl: wrote {path}; submit with: sbatch {shlex.quote(str(path))}", file=sys.stderr)
        return 0
    job_id = submit(path)
    print(f"hpcrl: wrote {path}; sbatch accepted it as job {job_id}", file=sys.stderr)
    print(job_id)
    return 0


def options_from_args(args: argparse.Namespace) -> JobOptions:
    """Turn the parsed `slurm` arguments into validated `JobOptions`.

    Args:
        args: the namespace parsed by the `slurm` subparser (numbers still strings).

    Returns:
        The options, already checked by `validate_options` and `check_training_config`.

    Raises:
        UserError: the first bad value, naming it and what was expected, or the first
            task's config that `hpcrl train` would refuse.
    """
    config = args.config
    _check_text("CONFIG", config)
    if not Path(config).is_file():
        raise UserError(f"config file {config!r} does not exist (expected a YAML file)")
    job_name = args.job_name
    if job_name is None:
        job_name = "hpcrl-" + re.sub(r"[^A-Za-z0-9_.+-]", "_", Path(config).stem)[:120]
    else:
        check_job_name(job_name)
    run_dir = args.run_dir if args.run_dir is not None else f"runs/{job_name}"
    launcher = args.launcher if args.launcher is not None else default_launcher()
    options = JobOptions(
        config=config,
        job_name=job_name,
        run_dir=run_dir,
        nodes=parse_positive_int("--nodes", args.nodes),
        ntasks_per_node=parse_positive_int("--ntasks-per-node", args.ntasks_per_node),
        cpus_per_task=parse_positive_int("--cpus-per-task", args.cpus_per_task),
        time=args.time,
        partition=args.partition,
        account=args.account,
        gpus=args.gpus,
        array=args.array,
        grid=parse_grid(args.grid),
        seeds=None if args.seeds is None else parse_positive_int("--seeds", args.seeds),
        max_running=(
            None
            if args.max_running is None
            else parse_positive_int("--max-running", args.max_running)
        ),
        preemptible=args.preemptible,
        signal_lead_s=parse_positive_int("--signal-lead-s", args.signal_lead_s),
        launcher=launcher,
        venv=args.venv,
        overrides=tuple(args.overrides),
    )
    validate_options(options)
    check_training_config(options)
    return options


def default_launcher() -> str:
    """The launcher used when `--launcher` is not given.

    `srun --mpi=pmi2` when this Python has the pip `mpich` wheel (what `make venv`
    installs): its ranks find each other only through PMI-2, and under a plain `srun`
    each would start as its own one-rank world. Otherwise plain `srun`, which uses the
    site's default MPI plugin (usually PMIx, which a site MPI such as Open MPI 5 needs).

    Returns:
        The launcher command line.
    """
    from importlib import metadata

    try:
        metadata.distribution("mpich")
    except metadata.PackageNotFoundError:
        return "srun"
    return "srun --mpi=pmi2"


def validate_options(options: JobOptions) -> None:
    """Check every field of `options`; see the module docstring for the rules.

    Args:
        options: the options to check.

    Raises:
        UserError: the first bad value, naming it and what was expected.
    """
    _check_text("CONFIG", options.config)
    check_job_name(options.job_name)
    for flag, value in (
        ("--nodes", options.nodes),
        ("--ntasks-per-node", options.ntasks_per_node),
        ("--cpus-per-task", options.cpus_per_task),
        ("--signal-lead-s", options.signal_lead_s),
        ("--seeds", options.seeds),
        ("--max-running", options.max_running),
    ):
        if value is None and flag in ("--seeds", "--max-running"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{flag} {value!r}: expected a positive integer")
    limit_s = parse_time_limit_s(options.time)
    for flag, value in (("--partition", options.partition), ("--account", options.account)):
        if value is not None and not _NAME_RE.fullmatch(value):
            raise UserError(f"{flag} {value!r}: expected a name of letters, digits and _ . -")
    if options.gpus is not None and not _GPUS_RE.fullmatch(options.gpus):
        raise UserError(
            f"--gpus {options.gpus!r}: expected a GPU count per node, optionally with a "
            "type, e.g. 1 or a100:2"
        )
    if options.array is not None:
        check_array_spec(options.array)
        if options.sweep:
            raise UserError(
                f"--array {options.array!r}: not with --grid or --seeds, which make the job "
                "array themselves (use --max-running N for %N)"
            )
    if options.max_running is not None and not options.sweep:
        raise UserError(
            f"--max-running {options.max_running}: expected --grid or --seeds as well "
            "(with --array, write the limit into it: --array 0-9%N)"
        )
    check_grid(options.grid)
    if options.preemptible:
        if options.signal_lead_s > MAX_SIGNAL_LEAD_S:
            raise UserError(
                f"--signal-lead-s {options.signal_lead_s}: expected at most {MAX_SIGNAL_LEAD_S}"
            )
        if options.signal_lead_s >= limit_s:
            raise UserError(
                f"--signal-lead-s {options.signal_lead_s}: expected less than the time limit "
                f"(--time {options.time} is {limit_s} s)"
            )
    for flag, value in (
        ("--run-dir", options.run_dir),
        ("--venv", options.venv),
        ("--launcher", options.launcher),
    ):
        _check_text(flag, value)
        if not value.strip():
            raise UserError(f"{flag} {value!r}: expected a non-empty value")
    try:
        words = shlex.split(options.launcher)
    except ValueError as exc:
        raise UserError(f"--launcher {options.launcher!r}: cannot split it: {exc}") from None
    if not words:
        raise UserError(f"--launcher {options.launcher!r}: expected a command")
    for override in options.overrides:
        _check_text("--set", override)
        key, sep, _ = override.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {override!r}: expected KEY=VALUE")
        key = key.strip()
        if key in dict(options.grid):
            raise UserError(
                f"--set {override!r}: {key!r} is also a --grid key; give it in one place"
            )
        if key == "seed" and (options.sweep or options.array is not None):
            flag = "--seeds" if options.sweep else "--array"
            raise UserError(
                f"--set {override!r}: each array task passes its own --seed ({flag}); "
                "drop this --set"
            )


def check_job_name(name: str) -> None:
    """Refuse a job name that sbatch would not read back unchanged from `#SBATCH`.

    sbatch splits `#SBATCH` lines itself: whitespace separates, quotes and backslashes
    are removed, an unquoted `#` ends the line, and a line containing `hetjob` or
    `packjob` starts a heterogeneous component. Rather than escape for that parser, the
    name is limited to 1-128 of `A-Z a-z 0-9 _ . + -`, starting with a letter or digit
    (it also names the output file and the default run directory).

    Args:
        name: the requested job name.

    Raises:
        UserError: the name has any other character, or contains `hetjob`/`packjob`.
    """
    if not _JOB_NAME_RE.fullmatch(name):
        raise UserError(
            f"--job-name {name!r}: expected 1-128 letters, digits and _ . + - starting with "
            "a letter or digit (sbatch parses #SBATCH lines itself, so spaces, quotes, "
            "backslashes, '#', '$' and control characters are refused)"
        )
    _check_not_hetjob("--job-name", name)


def check_array_spec(spec: str) -> None:
    """Check a job array spec: `ITEM[,ITEM...][%MAX_RUNNING]`.

    An ITEM is `N`, `N-M` (N <= M) or `N-M:STEP` (STEP >= 1); MAX_RUNNING >= 1.

    Args:
        spec: e.g. "0-4", "0-9%2", "1,3,5", "0-20:5".

    Raises:
        UserError: the spec does not follow that grammar.
    """
    expected = "expected INDEX, FIRST-LAST or FIRST-LAST:STEP items joined by commas, optionally %MAX_RUNNING, e.g. 0-4, 0-9%2, 1,3,5"  # noqa: E501
    body, percent, throttle = spec.partition("%")
    if percent and not (throttle.isdigit() and throttle.isascii() and int(throttle) >= 1):
        raise UserError(f"--array {spec!r}: {expected}")
    for item in body.split(","):
        match = _ARRAY_ITEM_RE.fullmatch(item)
        if match is None or not item.isascii():
            raise UserError(f"--array {spec!r}: {expected}")
        first, last, step = match.groups()
        if last is not None and int(last) < int(first):
            raise UserError(f"--array {spec!r}: range {item!r} ends before it starts")
        if step is not None and int(step) < 1:
            raise UserError(f"--array {spec!r}: step in {item!r} must be at least 1")


def parse_grid(texts: list[str] | tuple[str, ...]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Split `--grid KEY=V1,V2,...` arguments into a grid (checked by `check_grid`).

    Args:
        texts: the `--grid` arguments, in the order given.

    Returns:
        `((key, (value, ...)), ...)` in the order given; values are the texts between
        commas, unchanged (so a grid value cannot hold a comma).

    Raises:
        UserError: an argument without `=`, or a grid `check_grid` refuses.
    """
    grid = []
    for text in texts:
        _check_text("--grid", text)
        key, sep, values = text.partition("=")
        if not sep:
            raise UserError(f"--grid {text!r}: expected KEY=VALUE1,VALUE2,...")
        grid.append((key.strip(), tuple(values.split(","))))
    out = tuple(grid)
    check_grid(out)
    return out


def check_grid(grid: tuple[tuple[str, tuple[str, ...]], ...]) -> None:
    """Check a sweep's grid before any config is built.

    Args:
        grid: `((key, (value, ...)), ...)`, as `parse_grid` returns it.

    Raises:
        UserError: a key that is not a config key's name (letters, digits, _ and dots), a
            key the sweep sets per task (seed, run_dir), a key given twice, an empty value
            list, an empty or repeated value, or two values of one key that give the same
            directory name.
    """
    seen = set()
    for key, values in grid:
        shown = f"--grid {key + '=' + ','.join(values)!r}"
        _check_text("--grid", shown)
        if not _CONFIG_KEY_RE.fullmatch(key):
            raise UserError(
                f"{shown}: expected KEY=VALUE1,VALUE2,... with KEY a config key "
                "(letters, digits, _ and dots)"
            )
        if key in _SWEEP_KEYS:
            raise UserError(f"{shown}: each array task sets its own {key} (use {_SWEEP_KEYS[key]})")
        if key in seen:
            raise UserError(f"{shown}: key {key!r} is given twice; list its values in one --grid")
        seen.add(key)
        if values in ((), ("",)):
            raise UserError(f"{shown}: expected at least one value after '{key}='")
        if "" in values:
            raise UserError(f"{shown}: an empty value (two commas, or one at an end)")
        repeated = sorted({value for value in values if values.count(value) > 1})
        if repeated:
            raise UserError(f"{shown}: value {repeated[0]!r} is listed twice")
        names: dict[str, str] = {}
        for value in values:
            name = _point_part(key, value)
            if name in names:
                raise UserError(
                    f"{shown}: values {names[name]!r} and {value!r} both give the run "
                    f"directory name {name!r}"
                )
            names[name] = value
    if grid:
        longest = max((_point_name(point) for point in itertools.product(*_pairs(grid))), key=len)
        if len(longest.encode()) > MAX_NAME_BYTES:
            raise UserError(
                f"--grid: the run directory name {longest[:60]!r}... is longer than "
                f"{MAX_NAME_BYTES} bytes; use shorter values"
            )


def sweep_tasks(options: JobOptions) -> list[SweepTask]:
    """The array tasks of a sweep, in task-id order: task id = point index * seeds + seed.

    Points are the product of the grid's values, the last key varying fastest.

    Args:
        options: the job.

    Returns:
        One `SweepTask` per array task; [] when `options` is not a sweep.
    """
    if not options.sweep:
        return []
    seeds = 1 if options.seeds is None else options.seeds
    return [
        SweepTask(_point_name(point), seed, tuple(f"{key}={value}" for key, value in point))
        for point in itertools.product(*_pairs(options.grid))
        for seed in range(seeds)
    ]


def check_training_config(options: JobOptions) -> None:
    """Build each task's config as `hpcrl train` would and check it for the job's ranks.

    The config is CONFIG, then `--set`, then the task's grid values (and seed), merged
    by `hpcrl.cli.config_values` and built by `hpcrl.config.build_config`. Each grid point
    (every one, with its first seed) is then checked as `hpcrl.runner.train` checks it:
    the layout against the world size `nodes * ntasks_per_node` (the ranks srun starts),
    and one probe env against the layout (e.g. that PPO's batch splits over the ranks).
    The device is not checked: the GPU is on the compute node, not where this runs.

    Args:
        options: the job, already checked by `validate_options`.

    Raises:
        UserError: the first config `hpcrl train` would refuse (a grid point's is prefixed
            with its name), or two grid points whose configs are the same (e.g. 1e-3 and
            0.001).
    """
    from hpcrl import runner
    from hpcrl.cli import config_values
    from hpcrl.config import build_config
    from hpcrl.topologies import make_topology

    world_size = options.nodes * options.ntasks_per_node
    points: dict[tuple[str, ...], SweepTask] = {}
    for task in sweep_tasks(options) or [SweepTask("", -1, ())]:
        points.setdefault(task.overrides, task)
    built: dict[str, str] = {}  # config JSON -> the point that gave it
    for task in points.values():
        where = f"grid point {task.point}: " if task.point else ""
        args = argparse.Namespace(
            config=options.config, overrides=[*options.overrides, *task.overrides]
        )
        try:
            values = config_values(args)
            if task.seed >= 0:
                values["seed"] = task.seed
            cfg = build_config(values)
        except UserError as exc:
            raise UserError(f"{where}{exc}") from None
        world = (
            f" (the job's world: --nodes {options.nodes} x --ntasks-per-node "
            f"{options.ntasks_per_node} = {world_size} ranks)"
        )
        try:
            try:
                runner.check_layout(cfg, world_size)
            except UserError as exc:
                raise UserError(f"{exc}{world}") from None
            on_cpu = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, device="cpu"))
            runner.check_env(on_cpu, make_topology(on_cpu), world_size, {})
        except UserError as exc:
            raise UserError(f"{where}{exc}") from None
        key = cfg.to_json()
        if key in built:
            raise UserError(
                f"grid points {built[key]} and {task.point} give the same config; drop one "
                "of the values"
            )
        built[key] = task.point


def _pairs(grid) -> list[list[tuple[str, str]]]:
    return [[(key, value) for value in values] for key, values in grid]


def _point_part(key: str, value: str) -> str:
    return _UNSAFE_NAME_CHAR_RE.sub("_", f"{key}={value}")


def _point_name(point) -> str:
    """`KEY=VALUE,KEY2=VALUE2` with any character but `A-Za-z0-9_.+=-` made `_`."""
    return ",".join(_point_part(key, value) for key, value in point)


def parse_time_limit_s(text: str) -> int:
    """Parse a SLURM time limit.

    Args:
        text: one of `TIME_FORMATS`, e.g. "30", "1:30:00", "2-12".

    Returns:
        The limit in seconds (> 0).

    Raises:
        UserError: another format, a field out of range (minutes and seconds after a
            larger unit < 60, hours after days < 24), or a zero limit.
    """
    for pattern, fields in _TIME_PATTERNS:
        match = pattern.fullmatch(text) if text.isascii() else None
        if match is None:
            continue
        values = [int(group) for group in match.groups()]
        for index, (field, value) in enumerate(zip(fields, values, strict=True)):
            if index > 0 and value >= _FIELD_LIMIT[field]:
                raise UserError(
                    f"--time {text!r}: {field} must be below {_FIELD_LIMIT[field]} "
                    f"(formats {TIME_FORMATS})"
                )
        total_s = sum(_SECONDS[field] * value for field, value in zip(fields, values, strict=True))
        if total_s == 0:
            raise UserError(f"--time {text!r}: expected a limit above zero")
        return total_s
    raise UserError(f"--time {text!r}: expected a SLURM time limit: {TIME_FORMATS}")


def parse_positive_int(flag: str, text: str) -> int:
    """Parse a positive decimal integer option.

    Args:
        flag: the option's name, for the message.
        text: the value as given.

    Returns:
        The integer (>= 1).

    Raises:
        UserError: not a decimal integer >= 1.
    """
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise UserError(f"{flag} {text!r}: expected a positive integer")
    return int(text)


def render_script(options: JobOptions) -> str:
    """Render the sbatch script for `options` (pure: no SLURM, no file access).

    Args:
        options: the job; validated here again, so no unchecked value is rendered.

    Returns:
        The script text: `#SBATCH` lines first (sbatch stops reading them at the first
        command), then a bash body that trains with `--resume auto` and, when the run
        completed, prints `hpcrl info`.

    Raises:
        UserError: a bad value in `options` (see `validate_options`).
    """
    validate_options(options)
    directives = [
        ("job-name", options.job_name),
        ("nodes", str(options.nodes)),
        ("ntasks-per-node", str(options.ntasks_per_node)),
        ("cpus-per-task", str(options.cpus_per_task)),
        ("time", options.time),
    ]
    tasks = sweep_tasks(options)
    array = options.array
    if tasks:
        array = f"0-{len(tasks) - 1}"
        if options.max_running is not None:
            array += f"%{options.max_running}"
    for name, value in (
        ("partition", options.partition),
        ("account", options.account),
        ("gpus-per-node", options.gpus),
        ("array", array),
    ):
        if value is not None:
            directives.append((name, value))
    directives.append(("output", "%x-%A_%a.out" if array else "%x-%j.out"))
    if options.preemptible:
        directives += [
            ("signal", f"B:USR1@{options.signal_lead_s}"),
            ("requeue", None),
            ("open-mode", "append"),
        ]

    lines = [
        "#!/bin/bash",
        f"# Generated by `hpcrl slurm` (hpcrl {__version__}); to change it, render it again.",
        "# Submit from the directory the paths below are relative to: sbatch THIS_FILE",
        "# Trains with `--resume auto`: submitting it again continues the run.",
    ]
    if options.preemptible:
        lines += [
            f"# Preemptible: SLURM sends SIGUSR1 {options.signal_lead_s} s before the time "
            "limit (up to 60 s",
            "# earlier); the ranks checkpoint and exit 3, and the script requeues the job.",
        ]
    if options.array:
        lines.append("# Array: task k trains with --seed k into RUN_DIR/seed-k.")
    if tasks:
        seeds = 1 if options.seeds is None else options.seeds
        if options.grid:
            lines += [
                f"# Sweep: {len(tasks)} array tasks = {len(tasks) // seeds} grid points x "
                f"{seeds} seeds; the table below",
                "# gives each task its grid values (passed as --set) and seed (--seed), and "
                "it trains",
                "# into RUN_DIR/<grid point>/seed-<seed>.",
            ]
        else:
            lines.append(
                f"# Sweep: {seeds} array tasks; task k trains with --seed k into RUN_DIR/seed-k."
            )
    lines.append("# Ranks take rank and size from MPI, never from SLURM variables.")
    lines += [_directive(name, value) for name, value in directives]

    launcher_words = " ".join(shlex.quote(word) for word in shlex.split(options.launcher))
    train_args = []
    for override in options.overrides:
        train_args += ["--set", override]
    lines += [
        "set -euo pipefail",
        "",
        f"CONFIG={shlex.quote(_not_an_option(options.config))}",
    ]
    if options.array:
        lines += [
            'SEED=${SLURM_ARRAY_TASK_ID:?"submit with sbatch: the array task id is the seed"}',
            f'RUN_DIR={shlex.quote(_not_an_option(options.run_dir))}/seed-"$SEED"',
        ]
    elif tasks:
        lines += _task_table(tasks, bool(options.grid))
        point = '"$POINT"/' if options.grid else ""
        lines.append(f'RUN_DIR={shlex.quote(_not_an_option(options.run_dir))}/{point}seed-"$SEED"')
    else:
        lines.append(f"RUN_DIR={shlex.quote(_not_an_option(options.run_dir))}")
    lines += [
        f"VENV={shlex.quote(_not_an_option(options.venv))}",
        f"launcher=({launcher_words})",
        f"train_args=({' '.join(shlex.quote(arg) for arg in train_args)})",
    ]
    if options.grid:
        lines.append('train_args+=("${point_args[@]}" --seed "$SEED")')
    elif options.array or tasks:
        lines.append('train_args+=(--seed "$SEED")')
    lines += [
        "# EXTRA_ARGS (environment): more `hpcrl train` arguments, split on whitespace on",
        "# purpose (no quoting, no globbing).",
        'read -r -a extra_args <<<"${EXTRA_ARGS:-}"',
        "",
    ]
    if options.preemptible:
        lines.append(
            'echo "hpcrl: job ${SLURM_JOB_ID:-local} starts,'
            ' SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}, run dir $RUN_DIR"'
        )
    else:
        lines.append('echo "hpcrl: job ${SLURM_JOB_ID:-local}, run dir $RUN_DIR"')
    lines += _BODY_SETUP
    lines += _BODY_PREEMPTIBLE if options.preemptible else _BODY_PLAIN
    return "\n".join(lines) + "\n"


def _task_table(tasks: list[SweepTask], grid: bool) -> list[str]:
    """Shell lines that set SEED (and POINT, point_args) from SLURM_ARRAY_TASK_ID."""
    lines = [
        'TASK=${SLURM_ARRAY_TASK_ID:?"submit with sbatch: the array task id picks the task"}',
        'case "$TASK" in',
    ]
    for task_id, task in enumerate(tasks):
        arm = f"SEED={task.seed}"
        if grid:
            sets = " ".join(f"--set {shlex.quote(text)}" for text in task.overrides)
            arm += f"; POINT={shlex.quote(task.point)}; point_args=({sets})"
        lines.append(f"    {task_id}) {arm} ;;")
    lines += [
        f'    *) echo "hpcrl: array task $TASK is not a task of this sweep (0-{len(tasks) - 1})"'
        " >&2; exit 2 ;;",
        "esac",
    ]
    return lines


def submit(path: str | Path) -> str:
    """Submit a written script with `sbatch PATH`.

    Args:
        path: the script file.

    Returns:
        The job id sbatch printed.

    Raises:
        UserError: no `sbatch` on PATH, sbatch failed, or it printed no job id.
    """
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise UserError(
            f"sbatch not found on PATH (the script is in {str(path)!r}; submit it on a "
            "SLURM login node with: sbatch FILE)"
        )
    try:
        done = subprocess.run(
            [sbatch, str(path)], capture_output=True, text=True, timeout=120, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UserError(f"sbatch {str(path)!r} could not run: {exc}") from None
    if done.returncode != 0:
        printed = [line.strip() for line in (done.stderr + done.stdout).splitlines()]
        message = ([line for line in printed if line] or ["no message"])[-1]
        raise UserError(f"sbatch {str(path)!r} failed (exit {done.returncode}): {message}")
    match = re.search(r"Submitted batch job (\d+)", done.stdout) or re.match(
        r"\s*(\d+)", done.stdout
    )
    if match is None:
        printed = " ".join(done.stdout.split())
        raise UserError(f"sbatch {str(path)!r} printed no job id: {printed!r}")
    return match.group(1)


def _directive(name: str, value: str | None) -> str:
    if value is None:
        return f"#SBATCH --{name}"
    # Every option was checked against its own pattern; this is the last line of defence
    # for sbatch's own parser (see the module docstring).
    if not _DIRECTIVE_VALUE_RE.fullmatch(value):
        raise UserError(f"--{name} {value!r}: characters sbatch would not read back unchanged")
    _check_not_hetjob(f"--{name}", value)
    return f"#SBATCH --{name}={value}"


def _check_not_hetjob(flag: str, value: str) -> None:
    lowered = value.lower()
    for word in _HETJOB_WORDS:
        if word in lowered:
            raise UserError(
                f"{flag} {value!r}: must not contain {word!r} (sbatch starts a heterogeneous "
                "job component at any #SBATCH line containing it)"
            )


def _check_text(flag: str, value: str) -> None:
    if _CONTROL_RE.search(value):
        raise UserError(f"{flag} {value!r}: control characters (e.g. newlines) are refused")


def _not_an_option(path: str) -> str:
    """Keep a relative path that starts with '-' from being read as an option."""
    return f"./{path}" if path.startswith("-") else path


_BODY_SETUP = [
    "",
    "# shellcheck disable=SC1091  # the venv exists only at run time",
    'source "$VENV/bin/activate"',
    "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}",
    "# srun does not inherit --cpus-per-task from sbatch (Slurm >= 22.05).",
    'if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then',
    "    export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK",
    "fi",
    "",
]

_TRAIN = (
    '"${launcher[@]}" python -m hpcrl train "$CONFIG" --run-dir "$RUN_DIR" --resume auto \\\n'
    '    ${train_args[@]+"${train_args[@]}"} ${extra_args[@]+"${extra_args[@]}"}'
)

_BODY_PLAIN = [
    "status=0",
    _TRAIN + " || status=$?",
    'if [ "$status" -eq 0 ]; then',
    '    python -m hpcrl info "$RUN_DIR"',
    "fi",
    "# 3 = checkpointed but not finished: submit this script again to continue.",
    'exit "$status"',
]

_BODY_PREEMPTIBLE = [
    "launcher_pid=",
    "pending=",
    "forward_signal() {",
    '    echo "hpcrl: batch shell got SIG$1, sending SIGUSR1 (checkpoint and stop) to the'
    ' launcher"',
    '    if [ -n "$launcher_pid" ]; then',
    '        kill -USR1 "$launcher_pid" 2>/dev/null || true',
    "    else",
    "        pending=1  # the launcher is starting: forwarded once its pid is known",
    "    fi",
    "}",
    "trap 'forward_signal USR1' USR1",
    "trap 'forward_signal TERM' TERM",
    "",
    "# In the background: bash runs a trap only between commands, and `wait` is the one",
    "# command a signal interrupts.",
    _TRAIN + " &",
    "launcher_pid=$!",
    "# A signal that arrived between the fork and the line above (a trap runs between two",
    "# commands) found no pid to forward to.",
    'if [ -n "$pending" ]; then',
    '    kill -USR1 "$launcher_pid" 2>/dev/null || true',
    "fi",
    "# `wait` returns early (status > 128) when a trapped signal arrives: keep waiting while",
    "# the launcher runs. Then wait once more: bash keeps the status of an exited child, so",
    "# this returns the launcher's real exit status.",
    'while kill -0 "$launcher_pid" 2>/dev/null; do',
    '    wait "$launcher_pid" || true',
    "done",
    "status=0",
    'wait "$launcher_pid" || status=$?',
    "",
    "case $status in",
    "    0)",
    '        python -m hpcrl info "$RUN_DIR"',
    "        ;;",
    "    3)",
    '        if [ -z "${SLURM_JOB_ID:-}" ]; then',
    '            echo "hpcrl: checkpointed, not finished; not under SLURM: run again to continue"',
    "            exit 3",
    "        fi",
    '        echo "hpcrl: checkpointed, not finished: requeueing job $SLURM_JOB_ID"',
    '        if ! scontrol requeue "$SLURM_JOB_ID"; then',
    '            echo "hpcrl: scontrol requeue failed; submit this script again to continue" >&2',
    "            exit 3",
    "        fi",
    "        ;;",
    "    *)",
    '        echo "hpcrl: the launcher exited with status $status" >&2',
    '        exit "$status"',
    "        ;;",
    "esac",
]
