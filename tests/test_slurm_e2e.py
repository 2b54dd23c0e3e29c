"""End-to-end tests against a real (local) SLURM: `hpcrl slurm`, the job scripts in jobs/,
and the preemption loop (SIGUSR1 -> checkpoint -> exit 3 -> requeue -> resume -> complete).

`tests/slurm/cluster.sh start` installs (if needed) and starts a private SLURM with two
emulated nodes on this machine; it needs root and apt. Where it cannot run, every test
here is skipped with the reason. Set HPCRL_REQUIRE_SLURM=1 to make a failure to start
the cluster an error instead of a skip (for CI machines that must run these tests).

Run with `make test-slurm`, or `python -m pytest -q -rs -m slurm --timeout=900`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import BIN, REPO

pytestmark = pytest.mark.slurm

CLUSTER_SH = REPO / "tests" / "slurm" / "cluster.sh"
TINY_CONFIG = REPO / "tests" / "slurm" / "tiny.yaml"
# ~15-20 s of training at 2 ranks on 2 shared cores; a multiple of 2 ranks x 32 envs.
BUDGET = 640_000
CMD_TIMEOUT_S = 60  # any single sbatch/scontrol/hpcrl-slurm call
START_TIMEOUT_S = 400  # cluster.sh start, including apt-get install on a fresh machine


# --------------------------------------------------------------------------- fixtures


def _cluster(action: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(CLUSTER_SH), action],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _unavailable(reason: str):
    """Skip (or, under HPCRL_REQUIRE_SLURM=1, fail) with an explicit reason."""
    message = f"local SLURM not available: {reason}"
    if os.environ.get("HPCRL_REQUIRE_SLURM") == "1":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def slurm_env():
    """Environment (SLURM_CONF set, venv first on PATH) for a running local SLURM.

    Starts the cluster unless it already runs; stops it again at the end only if this
    fixture started it.
    """
    if sys.platform != "linux" or shutil.which("bash") is None:
        _unavailable(f"needs Linux with bash (platform {sys.platform})")
    try:
        was_running = _cluster("status", 30).returncode == 0
        proc = _cluster("start", START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _unavailable(f"tests/slurm/cluster.sh start took longer than {START_TIMEOUT_S} s")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    if proc.returncode == 77:
        reason = lines[-1] if lines else "exit status 77"
        _unavailable(re.sub(r"^cluster\.sh: (cannot run a local SLURM here: )?", "", reason))
    match = re.search(r"^export SLURM_CONF=(\S+)$", proc.stdout, re.M)
    if proc.returncode != 0 or match is None:
        detail = " | ".join(lines[-3:]) or proc.stdout.strip() or "no output"
        _unavailable(f"tests/slurm/cluster.sh start failed (exit {proc.returncode}): {detail}")
    env = dict(os.environ)
    env["SLURM_CONF"] = match.group(1)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    # Variables the job scripts read: none leaks in from the caller's environment.
    for key in ("CONFIG", "RUN_DIR", "LAUNCHER", "VENV", "EXTRA_ARGS"):
        env.pop(key, None)
    yield env
    if not was_running:
        _cluster("stop", 60)


@pytest.fixture
def jobs(slurm_env):
    """A list the test appends its job ids to; every one still queued is cancelled after."""
    ids: list[str] = []
    yield ids
    for job_id in ids:
        subprocess.run(
            ["scancel", job_id], env=slurm_env, capture_output=True, timeout=CMD_TIMEOUT_S
        )


# --------------------------------------------------------------------------- helpers


def _run(cmd, env, cwd=REPO, timeout=CMD_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in cmd],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _check_script(path: Path, env: dict, cwd: Path) -> None:
    """`bash -n` and `sbatch --test-only` both accept the script at `path`."""
    syntax = _run(["bash", "-n", path], env, cwd)
    assert syntax.returncode == 0, f"bash -n {path}:\n{syntax.stderr}"
    test = _run(["sbatch", "--test-only", path], env, cwd)
    assert test.returncode == 0, f"sbatch --test-only {path}:\n{test.stdout}{test.stderr}"
    assert re.search(r"Job \d+ to start at", test.stderr), test.stderr


def _render(env: dict, *args: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "hpcrl", "slurm", *args], env)


def _assert_refused(proc: subprocess.CompletedProcess, what: str) -> None:
    """Exit status 2 with exactly one `hpcrl: error:` line and no traceback."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hpcrl: error:")]
    assert proc.returncode == 2, f"{what}: exit {proc.returncode}\n{proc.stderr}"
    assert len(errors) == 1, f"{what}: expected one 'hpcrl: error:' line\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == "", f"{what}: refused, yet printed a script:\n{proc.stdout}"


def _job_fields(job_id: str, env: dict) -> dict[str, str]:
    """`scontrol show job -o` as a dict ({} once the job is gone)."""
    proc = _run(["scontrol", "show", "job", "-o", job_id], env)
    if proc.returncode != 0:
        return {}
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))


def _fake_venv(root: Path) -> tuple[Path, Path, Path]:
    """A venv stand-in whose `python` and launcher only record their arguments.

    Returns (venv, launcher, record): each call appends its argv, one argument per line
    and a blank line after, to `record`.
    """
    venv, record = root / "fake-venv", root / "calls.txt"
    (venv / "bin").mkdir(parents=True)
    recorder = f'#!/bin/bash\nprintf "%s\\n" "$0" "$@" "" >> {record}\n'
    for name in ("python", "fake-launcher"):
        path = venv / "bin" / name
        path.write_text(recorder)
        path.chmod(0o755)
    (venv / "bin" / "activate").write_text(f'export PATH="{venv / "bin"}:$PATH"\n')
    return venv, venv / "bin" / "fake-launcher", record


# --------------------------------------------------------------------------- tests


def test_rendered_script_passes_sbatch_test_only(slurm_env, tmp_path):
    proc = _render(
        slurm_env,
        "configs/frozenlake8x8-qlearning.yaml",
        "--nodes",
        "1",
        "--ntasks-per-node",
        "2",
        "--time",
        "00:10:00",
        "--partition",
        "debug",
        "--preemptible",
    )
    assert proc.returncode == 0, f"hpcrl slurm: exit {proc.returncode}\n{proc.stderr}"
    script = proc.stdout
    assert script.startswith("#!/bin/bash"), script[:200]
    for pattern in (
        r"^#SBATCH\s+--nodes[= ]1\s*$",
        r"^#SBATCH\s+--ntasks-per-node[= ]2\s*$",
        r"^#SBATCH\s+--time[= ]00:10:00\s*$",
        r"^#SBATCH\s+--partition[= ]debug\s*$",
        r"^#SBATCH\s+--requeue\s*$",
        r"^#SBATCH\s+--signal[= ]\S*USR1",
        r"--resume auto",
    ):
        assert re.search(pattern, script, re.M), f"no line matching {pattern!r}:\n{script}"
    path = tmp_path / "rendered.sbatch"
    path.write_text(script)
    _check_script(path, slurm_env, tmp_path)


def _refused_or_checked_and_run(proc, what: str, script_path, slurm_env, tmp_path) -> bool:
    """Either a clean refusal (exit 2, one error line), or a script that passes `bash -n`
    and `sbatch --test-only` and whose every shell line runs (outside SLURM; the launcher
    and python only record). Returns whether it rendered."""
    if proc.returncode == 2:
        _assert_refused(proc, what)
        return False
    assert proc.returncode == 0, f"hpcrl slurm: exit {proc.returncode}\n{proc.stderr}"
    script_path.write_text(proc.stdout)
    _check_script(script_path, slurm_env, tmp_path)
    ran = _run(["bash", script_path], slurm_env, tmp_path)
    assert ran.returncode == 0, f"{ran.stdout}\n{ran.stderr}"
    return True


def test_job_name_cannot_inject_commands(slurm_env, tmp_path):
    marks = [tmp_path / f"pwned{i}" for i in range(3)]
    hostile = f"evil name \"dq\" 'sq' $(touch {marks[0]}) `touch {marks[1]}`; touch {marks[2]}"
    venv, launcher, record = _fake_venv(tmp_path)
    script_path = tmp_path / "named.sbatch"
    common = ["configs/frozenlake8x8-qlearning.yaml", "--partition", "debug"]
    proc = _render(
        slurm_env,
        *common,
        "--job-name",
        hostile,
        "--launcher",
        str(launcher),
        "--venv",
        str(venv),
        "--run-dir",
        str(tmp_path / "run"),
    )
    _refused_or_checked_and_run(proc, "hostile --job-name", script_path, slurm_env, tmp_path)
    for mark in marks + [Path("/tmp/pwned")]:
        assert not mark.exists(), f"the job name was executed: {mark} exists"

    # A newline would end the #SBATCH line and start a shell line: always refused.
    _assert_refused(
        _render(slurm_env, *common, "--job-name", f"ok\ntouch {marks[0]}"), "newline name"
    )
    assert not marks[0].exists()

    # The run directory goes into a shell line: quoted, it reaches `hpcrl train` intact.
    record.unlink(missing_ok=True)
    run_dir = f"runs/a b $(touch {marks[0]}) `touch {marks[1]}`; touch {marks[2]} 'q\""
    proc = _render(
        slurm_env, *common, "--launcher", str(launcher), "--venv", str(venv), "--run-dir", run_dir
    )
    if _refused_or_checked_and_run(proc, "hostile --run-dir", script_path, slurm_env, tmp_path):
        calls = record.read_text().split("\n\n")
        train = [c.splitlines() for c in calls if "train" in c.splitlines()]
        assert train, f"the launcher never ran `hpcrl train`:\n{record.read_text()}"
        argv = train[0]
        assert argv[argv.index("--run-dir") + 1] == run_dir, argv
    for mark in marks:
        assert not mark.exists(), f"the run directory was executed: {mark} exists"


JOB_SCRIPTS = sorted((REPO / "jobs").glob("*.sbatch"))


def test_there_are_job_scripts():
    names = {p.name for p in JOB_SCRIPTS}
    assert {"single-node.sbatch", "preemptible.sbatch"} <= names, sorted(names)


@pytest.mark.parametrize("script", JOB_SCRIPTS, ids=[p.name for p in JOB_SCRIPTS])
def test_job_script_passes_sbatch_test_only(slurm_env, tmp_path, script):
    _check_script(script, slurm_env, tmp_path)


def test_preemptible_job_requeues_resumes_and_completes(slurm_env, jobs, tmp_path):
    """SIGUSR1 to the batch shell -> checkpoint, exit 3 -> requeue -> resume -> complete."""
    venv = Path(sys.prefix)
    mpiexec = BIN / "mpiexec"
    if not (venv / "bin" / "activate").exists() or not mpiexec.exists():
        pytest.skip(f"needs a venv with mpiexec (sys.prefix {venv})")
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    env = dict(slurm_env)
    env.update(
        CONFIG=str(TINY_CONFIG),
        RUN_DIR=str(run_dir),
        VENV=str(venv),
        # Hydra would otherwise bootstrap through srun inside the job (that works too);
        # fork keeps the ranks children of mpiexec, which forwards SIGUSR1 to them.
        LAUNCHER=f"{mpiexec} -launcher fork -n 2",
        EXTRA_ARGS=f"--set total_env_steps={BUDGET}",
    )
    submit = _run(
        [
            "sbatch",
            "--parsable",
            f"--output={log}",
            "--open-mode=append",
            "--job-name=hpcrl-e2e-preempt",
            "--ntasks-per-node=2",
            "--time=00:10:00",
            "jobs/preemptible.sbatch",
        ],
        env,
    )
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip().split(";")[0]
    jobs.append(job_id)

    def context() -> str:
        text = log.read_text(errors="replace") if log.exists() else "(no job output yet)"
        lines = text.splitlines()
        fields = _job_fields(job_id, env)
        state = {k: fields.get(k) for k in ("JobState", "Reason", "Restarts", "ExitCode")}
        return f"\njob {job_id} {state}\n--- job output (last 60 lines) ---\n" + "\n".join(
            lines[-60:]
        )

    # 1. Wait until it visibly trains, then signal the batch shell (the path that
    #    `--signal=B:USR1@...` takes); its trap forwards SIGUSR1 to the launcher.
    #    (`scancel -s USR1` without -b signals job steps only: with a fork-launched
    #    mpiexec there are none, and the signal would reach nothing.)
    progress = re.compile(r"^\[hpcrl\] env_steps [\d,]+/", re.M)
    deadline = time.monotonic() + 120
    while not (log.exists() and progress.search(log.read_text(errors="replace"))):
        fields = _job_fields(job_id, env)
        assert fields.get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), (
            "the job ended before training started" + context()
        )
        assert time.monotonic() < deadline, "no progress line within 120 s" + context()
        time.sleep(0.25)
    signal = _run(["scancel", "-b", "-s", "USR1", job_id], env)
    assert signal.returncode == 0, signal.stderr + context()
    signalled_at = time.monotonic()

    # 2. Wait for it to complete after at least one requeue. A requeued job is held for
    #    cred_expire + 1 s (6 s with cluster.sh's config); if it was started with SLURM's
    #    default (121 s), release it by hand.
    deadline = time.monotonic() + 240
    while True:
        fields = _job_fields(job_id, env)
        state = fields.get("JobState")
        if state == "COMPLETED":
            break
        assert state in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED"), (
            f"job state {state}" + context()
        )
        assert time.monotonic() < deadline, "not completed within 240 s" + context()
        if (
            state == "PENDING"
            and fields.get("Reason") == "BeginTime"
            and time.monotonic() - signalled_at > 20
        ):
            _run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env)
        time.sleep(0.5)
    assert int(fields.get("Restarts", "0")) >= 1, "completed without a requeue" + context()
    assert fields.get("ExitCode") == "0:0", context()

    # 3. The run file: completed, one resume recorded, the budget taken exactly once.
    with h5py.File(run_dir / "run.h5", "r") as f:
        status = f.attrs["status"]
        status = status.decode() if isinstance(status, bytes) else str(status)
        assert status == "completed", context()
        assert "resumes" in f, f"no /resumes group: {sorted(f)}"
        resumes = f["resumes"]
        lengths = {name: resumes[name].shape for name in resumes}
        assert {"env_steps", "world_size", "slurm_restart_count"} <= set(lengths), lengths
        assert all(len(shape) == 1 for shape in lengths.values()), lengths
        assert len(set(lengths.values())) == 1, f"/resumes columns differ in length: {lengths}"
        n = resumes["env_steps"].shape[0]
        assert n >= 1, "no row in /resumes" + context()
        resumed_at = resumes["env_steps"][:]
        assert np.all((resumed_at > 0) & (resumed_at < BUDGET)), resumed_at
        assert np.all(resumes["world_size"][:] == 2), resumes["world_size"][:]
        assert resumes["slurm_restart_count"][0] >= 1, resumes["slurm_restart_count"][:]
        if "slurm_job_id" in resumes:
            assert resumes["slurm_job_id"][0] == int(job_id), resumes["slurm_job_id"][:]

        env_steps = f["metrics/env_steps"][:]
        assert env_steps[-1] == BUDGET, f"final env_steps {env_steps[-1]} != {BUDGET}"
        assert np.all(np.diff(env_steps) >= 0), f"env_steps went backwards: {env_steps}"
        if "trajectories/obs" in f:
            rows = len(f["trajectories/obs"])
            assert rows == BUDGET, f"{rows} trajectory rows for a budget of {BUDGET}"


# The sweep of the README: one job array of 2 x 2 grid points x 3 seeds.
SWEEP_COMMAND = [
    "configs/cartpole-ppo.yaml",
    "--grid",
    "learning_rate=1e-3,3e-4",
    "--grid",
    "num_envs=4,8",
    "--seeds",
    "3",
]


def test_sweep_passes_sbatch_test_only(slurm_env, tmp_path):
    proc = _render(slurm_env, *SWEEP_COMMAND)
    assert proc.returncode == 0, f"hpcrl slurm: exit {proc.returncode}\n{proc.stderr}"
    script = proc.stdout
    assert re.search(r"^#SBATCH --array=0-11$", script, re.M), script[:1500]
    assert len(re.findall(r"^    \d+\) SEED=", script, re.M)) == 12, script
    path = tmp_path / "sweep.sbatch"
    path.write_text(script)
    _check_script(path, slurm_env, tmp_path)


def test_sweep_tasks_run_into_their_own_run_dirs(slurm_env, jobs, tmp_path):
    """Under SLURM, each array task passes its grid values and seed to `hpcrl train`."""
    venv, calls = tmp_path / "fake-venv", tmp_path / "calls"
    (venv / "bin").mkdir(parents=True)
    calls.mkdir()
    # Each task's launcher and python write their argv to calls/<task id>.<program>.
    recorder = f'#!/bin/bash\nprintf "%s\\n" "$@" > "{calls}/$SLURM_ARRAY_TASK_ID.${{0##*/}}"\n'
    for name in ("python", "fake-launcher"):
        (venv / "bin" / name).write_text(recorder)
        (venv / "bin" / name).chmod(0o755)
    (venv / "bin" / "activate").write_text(f'export PATH="{venv / "bin"}:$PATH"\n')
    run_root = tmp_path / "sweep"
    proc = _render(
        slurm_env,
        "configs/frozenlake8x8-qlearning.yaml",
        "--grid",
        "alpha=0.1,0.05",
        "--seeds",
        "2",
        "--ntasks-per-node",
        "2",
        "--time",
        "00:05:00",
        "--launcher",
        str(venv / "bin" / "fake-launcher"),
        "--venv",
        str(venv),
        "--run-dir",
        str(run_root),
    )
    assert proc.returncode == 0, f"hpcrl slurm: exit {proc.returncode}\n{proc.stderr}"
    script = tmp_path / "sweep.sbatch"
    script.write_text(proc.stdout)
    submit = _run(
        ["sbatch", "--parsable", f"--output={tmp_path}/task-%a.out", script], slurm_env, tmp_path
    )
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip().split(";")[0]
    jobs.append(job_id)
    deadline = time.monotonic() + 120
    while _run(["squeue", "-h", "-j", job_id], slurm_env).stdout.strip():
        assert time.monotonic() < deadline, "the array did not finish within 120 s"
        time.sleep(0.5)
    outputs = {p.name: p.read_text() for p in sorted(tmp_path.glob("task-*.out"))}
    for task_id, (alpha, seed) in enumerate([("0.1", 0), ("0.1", 1), ("0.05", 0), ("0.05", 1)]):
        launcher = calls / f"{task_id}.fake-launcher"
        assert launcher.exists(), f"task {task_id} never ran the launcher: {outputs}"
        run_dir = f"{run_root}/alpha={alpha}/seed-{seed}"
        assert launcher.read_text().splitlines() == [
            "python", "-m", "hpcrl", "train", "configs/frozenlake8x8-qlearning.yaml",
            "--run-dir", run_dir, "--resume", "auto", "--set", f"alpha={alpha}",
            "--seed", str(seed),
        ]  # fmt: skip
        info = calls / f"{task_id}.python"
        assert info.read_text().splitlines() == ["-m", "hpcrl", "info", run_dir], outputs
    assert sorted(p.name for p in calls.iterdir()) == sorted(
        f"{task}.{name}" for task in range(4) for name in ("fake-launcher", "python")
    )
