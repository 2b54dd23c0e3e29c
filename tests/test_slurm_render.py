"""Job scripts without SLURM: jobs/*.sbatch and `hpcrl slurm` output parse, quote and trap.

SLURM itself is never needed: the launcher, `scontrol`, `sbatch` and the venv's `python`
are replaced by small shims that record what they were called with.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hpcrl import slurm
from hpcrl.errors import UserError

REPO = Path(__file__).resolve().parents[1]
JOB_SCRIPTS = sorted((REPO / "jobs").glob("*.sbatch"))
CONFIG = "configs/frozenlake8x8-qlearning.yaml"
SHELLCHECK = shutil.which("shellcheck")

# A launcher that records its argv, then waits for SIGUSR1/SIGTERM: it sleeps 0.5 s (as if
# writing a checkpoint), leaves an `exited` marker and exits with $FAKE_RC.
FAKE_LAUNCHER = textwrap.dedent(
    """
    import json, os, signal, sys, time
    log = os.environ["FAKE_DIR"]
    def stop(signum, frame):
        with open(os.path.join(log, "signals"), "a") as f:
            f.write(signal.Signals(signum).name + "\\n")
        time.sleep(0.5)
        open(os.path.join(log, "exited"), "w").close()
        sys.exit(int(os.environ.get("FAKE_RC", "3")))
    signal.signal(signal.SIGUSR1, stop)
    signal.signal(signal.SIGTERM, stop)
    with open(os.path.join(log, "argv.json"), "w") as f:
        json.dump(sys.argv[1:], f)
    open(os.path.join(log, "ready"), "w").close()
    while True:
        time.sleep(0.02)
    """
)

# A launcher that only records its argv and exits 0.
ARGV_LAUNCHER = textwrap.dedent(
    """
    import json, os, sys
    with open(os.path.join(os.environ["FAKE_DIR"], "argv.json"), "w") as f:
        json.dump(sys.argv[1:], f)
    """
)


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def fakes(tmp_path: Path) -> dict:
    """Shims: a venv whose `python` records its args, `scontrol`, launchers; a work dir."""
    log = tmp_path / "log"
    log.mkdir()
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "activate").write_text(f'PATH="{venv_bin}:$PATH"; export PATH\n')
    _executable(venv_bin / "python", f'#!/bin/sh\necho "$*" >> "{log}/python.log"\n')
    shims = tmp_path / "shims"
    shims.mkdir()
    # scontrol records its arguments and whether the launcher had exited by then.
    _executable(
        shims / "scontrol",
        f'#!/bin/sh\nif [ -e "{log}/exited" ]; then when=after-exit; else when=before-exit; fi\n'
        f'echo "$* $when" >> "{log}/scontrol.log"\n',
    )
    (tmp_path / "fake_launcher.py").write_text(FAKE_LAUNCHER)
    (tmp_path / "argv_launcher.py").write_text(ARGV_LAUNCHER)
    work = tmp_path / "work"
    work.mkdir()
    (work / "configs").mkdir()
    (work / CONFIG).write_text("algo: qlearning\n")
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("SLURM_", "SBATCH_", "SRUN_"))
        and key not in ("VIRTUAL_ENV", "EXTRA_ARGS", "RUN_DIR", "CONFIG", "LAUNCHER", "VENV")
    }
    env["PATH"] = f"{shims}:{env.get('PATH', '/usr/bin:/bin')}"
    env["FAKE_DIR"] = str(log)
    return {"tmp": tmp_path, "log": log, "venv": tmp_path / "venv", "work": work, "env": env}


def _render(**fields) -> str:
    fields.setdefault("config", CONFIG)
    fields.setdefault("job_name", "hpcrl-test")
    fields.setdefault("run_dir", "runs/hpcrl-test")
    fields.setdefault("launcher", "srun --mpi=pmi2")
    return slurm.render_script(slurm.JobOptions(**fields))


def _bash_n(path: Path, *shellcheck_args: str) -> None:
    done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    if SHELLCHECK:
        done = subprocess.run(
            [SHELLCHECK, *shellcheck_args, str(path)], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stdout


def _directive_lines_first(text: str) -> list[str]:
    """The #SBATCH lines, checking that none follows a command (sbatch stops there)."""
    directives, seen_command = [], False
    for line in text.splitlines()[1:]:
        stripped = line.strip()
        if line.startswith("#SBATCH"):
            assert not seen_command, f"#SBATCH after the first command: {line!r}"
            directives.append(line)
        elif stripped and not stripped.startswith("#"):
            seen_command = True
    return directives


def _hpcrl_slurm(*args: str, cwd: Path = REPO, env: dict | None = None):
    return subprocess.run(
        [sys.executable, "-m", "hpcrl", "slurm", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


# --- jobs/*.sbatch ---------------------------------------------------------------------


def test_every_expected_job_script_exists():
    names = {path.name for path in JOB_SCRIPTS}
    assert {
        "single-node.sbatch",
        "multi-node.sbatch",
        "hetero-gpu-learner.sbatch",
        "seed-sweep.sbatch",
        "preemptible.sbatch",
    } <= names


@pytest.mark.parametrize("path", JOB_SCRIPTS, ids=lambda p: p.name)
def test_job_script_parses_and_resumes(path: Path):
    _bash_n(path)
    text = path.read_text()
    assert _directive_lines_first(text), "no #SBATCH lines"
    assert "--resume auto" in text
    assert "python -m hpcrl info" in text
    for variable in ("CONFIG", "RUN_DIR", "LAUNCHER", "VENV", "EXTRA_ARGS"):
        assert f"{variable}=${{{variable}:-" in text or f"${{{variable}:-}}" in text, variable


def test_hetero_script_has_two_components():
    directives = _directive_lines_first((REPO / "jobs/hetero-gpu-learner.sbatch").read_text())
    separators = [line for line in directives if line.split()[1:] == ["hetjob"]]
    assert len(separators) == 1
    first = directives[: directives.index(separators[0])]
    assert any("gpus" in line or "gres=gpu" in line for line in first)


def test_single_node_script_runs_the_launcher_with_extra_args(fakes):
    env = dict(
        fakes["env"],
        LAUNCHER=f"{sys.executable} {fakes['tmp'] / 'argv_launcher.py'}",
        VENV=str(fakes["venv"]),
        RUN_DIR="runs/x",
        EXTRA_ARGS="--seed 3  --set layout=allreduce",
    )
    done = subprocess.run(
        ["bash", str(REPO / "jobs/single-node.sbatch")],
        cwd=fakes["work"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    argv = json.loads((fakes["log"] / "argv.json").read_text())
    assert argv == [
        "python", "-m", "hpcrl", "train", CONFIG, "--run-dir", "runs/x", "--resume", "auto",
        "--seed", "3", "--set", "layout=allreduce",
    ]  # fmt: skip
    assert (fakes["log"] / "python.log").read_text() == "-m hpcrl info runs/x\n"


# --- the preemption loop (trap, wait, real exit status, requeue) ------------------------


def _preemptible_script(kind: str, fakes) -> tuple[Path, dict]:
    launcher = f"{sys.executable} {fakes['tmp'] / 'fake_launcher.py'}"
    env = dict(fakes["env"], SLURM_JOB_ID="4242", SLURM_RESTART_COUNT="2")
    if kind == "jobs":
        env.update(LAUNCHER=launcher, VENV=str(fakes["venv"]), RUN_DIR="runs/p")
        return REPO / "jobs/preemptible.sbatch", env
    path = fakes["tmp"] / "rendered.sbatch"
    path.write_text(
        _render(preemptible=True, launcher=launcher, venv=str(fakes["venv"]), run_dir="runs/p")
    )
    return path, env


def _run_and_signal(path: Path, env: dict, fakes, signum: int):
    process = subprocess.Popen(
        ["bash", str(path)],
        cwd=fakes["work"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not (fakes["log"] / "ready").exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the fake launcher never started"
        time.sleep(0.02)
    process.send_signal(signum)  # to the batch shell, as `--signal=B:USR1@...` does
    stdout, stderr = process.communicate(timeout=30)
    return process.returncode, stdout, stderr


@pytest.mark.parametrize(
    ("kind", "signum"),
    [("jobs", signal.SIGUSR1), ("rendered", signal.SIGUSR1), ("jobs", signal.SIGTERM)],
)
def test_preemptible_forwards_usr1_and_requeues_on_exit_3(kind, signum, fakes):
    path, env = _preemptible_script(kind, fakes)
    rc, stdout, stderr = _run_and_signal(path, env, fakes, signum)
    assert rc == 0, stderr
    assert (fakes["log"] / "signals").read_text() == "SIGUSR1\n"
    # The trap returned at once, but the script waited for the launcher's real exit.
    assert (fakes["log"] / "scontrol.log").read_text() == "requeue 4242 after-exit\n"
    assert "SLURM_RESTART_COUNT=2" in stdout
    assert not (fakes["log"] / "python.log").exists()  # no `info` for an unfinished run
    argv = json.loads((fakes["log"] / "argv.json").read_text())
    assert argv[:4] == ["python", "-m", "hpcrl", "train"]
    assert argv[argv.index("--run-dir") + 1] == "runs/p"
    assert argv[argv.index("--resume") + 1] == "auto"


@pytest.mark.parametrize(("kind", "launcher_rc"), [("jobs", 0), ("rendered", 0), ("jobs", 1)])
def test_preemptible_other_exit_statuses(kind, launcher_rc, fakes):
    path, env = _preemptible_script(kind, fakes)
    env["FAKE_RC"] = str(launcher_rc)
    rc, _, stderr = _run_and_signal(path, env, fakes, signal.SIGUSR1)
    assert rc == launcher_rc, stderr
    assert not (fakes["log"] / "scontrol.log").exists()
    info_calls = (fakes["log"] / "python.log").read_text() if launcher_rc == 0 else ""
    assert info_calls == ("-m hpcrl info runs/p\n" if launcher_rc == 0 else "")


# --- render_script ---------------------------------------------------------------------

OPTION_SETS = {
    "plain": {},
    "preemptible": {"preemptible": True, "signal_lead_s": 300, "time": "2-00:00:00"},
    "array": {"array": "0-9%2", "partition": "debug", "account": "proj_1.a-b"},
    "array-preemptible": {"array": "1,3,5", "preemptible": True, "overrides": ("alpha=0.05",)},
    "gpus-multinode": {"gpus": "a100:2", "nodes": 2, "ntasks_per_node": 8, "cpus_per_task": 4},
    "mpiexec": {"launcher": "mpiexec -n 4", "venv": "/opt/venvs/hpc rl", "time": "45"},
    "sweep": {
        "grid": (("alpha", ("0.1", "0.05")), ("gamma", ("0.9", "0.99", "0.999"))),
        "seeds": 2,
        "max_running": 3,
    },
    "seeds-preemptible": {"seeds": 4, "preemptible": True, "overrides": ("alpha=0.05",)},
}
# The #SBATCH --array a sweep in OPTION_SETS gets: grid points x seeds tasks.
SWEEP_ARRAYS = {"sweep": "0-11%3", "seeds-preemptible": "0-3"}


@pytest.mark.parametrize("name", OPTION_SETS)
def test_rendered_script_parses(name, tmp_path):
    path = tmp_path / f"{name}.sbatch"
    path.write_text(_render(**OPTION_SETS[name]))
    _bash_n(path)


@pytest.mark.parametrize("name", OPTION_SETS)
def test_rendered_directives(name):
    fields = OPTION_SETS[name]
    directives = _directive_lines_first(_render(**fields))
    assert directives[0] == "#SBATCH --job-name=hpcrl-test"
    for line in directives:
        assert len(line.split()) == 2 and "hetjob" not in line, line
    assert ("#SBATCH --requeue" in directives) == bool(fields.get("preemptible"))
    if fields.get("preemptible"):
        lead = fields.get("signal_lead_s", 120)
        assert f"#SBATCH --signal=B:USR1@{lead}" in directives
        assert "#SBATCH --open-mode=append" in directives
    array = fields.get("array", SWEEP_ARRAYS.get(name))
    assert [line for line in directives if line.startswith("#SBATCH --array")] == (
        [f"#SBATCH --array={array}"] if array else []
    )
    if array:
        assert "#SBATCH --output=%x-%A_%a.out" in directives
    else:
        assert "#SBATCH --output=%x-%j.out" in directives
    if "gpus" in fields:
        assert f"#SBATCH --gpus-per-node={fields['gpus']}" in directives


def test_rendered_array_script_seeds_from_the_task_id(fakes):
    path = fakes["tmp"] / "array.sbatch"
    path.write_text(
        _render(
            array="0-4",
            launcher=f"{sys.executable} {fakes['tmp'] / 'argv_launcher.py'}",
            venv=str(fakes["venv"]),
            run_dir="runs/sweep",
        )
    )
    env = dict(fakes["env"], SLURM_ARRAY_TASK_ID="3")
    done = subprocess.run(
        ["bash", str(path)], cwd=fakes["work"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    argv = json.loads((fakes["log"] / "argv.json").read_text())
    assert argv[argv.index("--run-dir") + 1] == "runs/sweep/seed-3"
    assert argv[argv.index("--seed") + 1] == "3"


def test_hostile_values_render_inert(fakes):
    """Spaces, quotes, `$(...)`, backticks and globs reach the program unchanged."""
    canary = fakes["work"] / "PWNED"  # the script runs in work/
    hostile = """runs/a b $(touch PWNED) `touch PWNED` 'q' "d" $HOME * ;x"""
    config = "configs/my $(touch PWNED) 'c'.yaml"
    (fakes["work"] / config).write_text("algo: qlearning\n")
    override = "note=$(touch PWNED); ${HOME}"
    venv = fakes["tmp"] / "v e n v $(x)"
    shutil.copytree(fakes["venv"], venv)
    (venv / "bin" / "activate").write_text(f"PATH={shlex.quote(str(venv / 'bin'))}:$PATH\n")
    path = fakes["tmp"] / "hostile.sbatch"
    path.write_text(
        _render(
            config=config,
            run_dir=hostile,
            overrides=(override,),
            venv=str(venv),
            launcher=f"{sys.executable} '{fakes['tmp'] / 'argv_launcher.py'}'",
        )
    )
    _bash_n(path, "--exclude=SC2016")  # SC2016: "$(...) in single quotes": literal on purpose
    done = subprocess.run(
        ["bash", str(path)], cwd=fakes["work"], env=fakes["env"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    argv = json.loads((fakes["log"] / "argv.json").read_text())
    assert argv == [
        "python", "-m", "hpcrl", "train", config, "--run-dir", hostile, "--resume", "auto",
        "--set", override,
    ]  # fmt: skip
    assert not canary.exists()


def test_a_path_starting_with_a_dash_is_not_an_option():
    text = _render(run_dir="-rf")
    assert "RUN_DIR=./-rf\n" in text


# --- validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30", 1800),
        ("5:30", 330),
        ("01:00:00", 3600),
        ("2-12", 2 * 86400 + 12 * 3600),
        ("1-00:30", 86400 + 1800),
        ("0-00:00:45", 45),
        ("100:00:00", 360000),
    ],
)
def test_time_limit_formats(text, seconds):
    assert slurm.parse_time_limit_s(text) == seconds


@pytest.mark.parametrize("text", ["", "1h", "0", "00:00", "1:60", "1-24", "1:2:3:4", "-1", "١٢"])
def test_bad_time_limits(text):
    with pytest.raises(UserError, match="--time"):
        slurm.parse_time_limit_s(text)


@pytest.mark.parametrize("spec", ["0-4", "0-9%2", "1,3,5", "0-20:5", "7", "0-3,8,10-12%1"])
def test_array_specs(spec):
    slurm.check_array_spec(spec)


@pytest.mark.parametrize("spec", ["", "5-1", "0-4%0", "0-4%", "a", "1,,2", "0-4:0", "1 2"])
def test_bad_array_specs(spec):
    with pytest.raises(UserError, match="--array"):
        slurm.check_array_spec(spec)


@pytest.mark.parametrize(
    "name",
    [
        "a b \"c\" 'd' $(touch x)\nx",
        "two words",
        "semi;colon",
        "has#hash",
        "back\\slash",
        "-dash",
        "..",
        "hetjob-1",
        "my-PackJob",
        "a" * 129,
    ],
)
def test_risky_job_names_are_refused(name):
    with pytest.raises(UserError, match="--job-name") as info:
        slurm.check_job_name(name)
    assert "\n" not in str(info.value)


def test_default_job_name_and_run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "my config $(x).yaml"
    config.write_text("algo: qlearning\n")
    args = slurm.add_parser(_subparsers()).parse_args([str(config), "--launcher", "srun"])
    options = slurm.options_from_args(args)
    assert options.job_name == "hpcrl-my_config___x_"
    assert options.run_dir == "runs/hpcrl-my_config___x_"


def test_default_launcher_follows_the_mpich_wheel(monkeypatch):
    from importlib import metadata

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    assert slurm.default_launcher() == "srun"
    monkeypatch.setattr(metadata, "distribution", lambda name: object())
    assert slurm.default_launcher() == "srun --mpi=pmi2"


def _subparsers():
    import argparse

    return argparse.ArgumentParser().add_subparsers()


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--job-name", 'x "y" $(touch PWNED)\nz'], "--job-name"),
        (["--job-name", "x-hetjob"], "--job-name"),
        (["--time", "1h"], "--time"),
        (["--nodes", "0"], "--nodes"),
        (["--ntasks-per-node", "four"], "--ntasks-per-node"),
        (["--cpus-per-task", "-1"], "--cpus-per-task"),
        (["--partition", "debug #x"], "--partition"),
        (["--account", "a'b"], "--account"),
        (["--gpus", "a100:0"], "--gpus"),
        (["--array", "4-0"], "--array"),
        (["--preemptible", "--time", "2", "--signal-lead-s", "120"], "--signal-lead-s"),
        (["--run-dir", "runs/a\nb"], "--run-dir"),
        (["--launcher", "srun 'unclosed"], "--launcher"),
        (["--set", "novalue"], "--set"),
    ],
)
def test_cli_refuses_bad_values(args, named):
    done = _hpcrl_slurm(CONFIG, *args)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpcrl: error: "), done.stderr
    assert named in lines[0]
    assert not (REPO / "PWNED").exists()


def test_cli_refuses_a_missing_config():
    done = _hpcrl_slurm("configs/no-such-config.yaml")
    assert done.returncode == 2
    assert done.stderr == (
        "hpcrl: error: config file 'configs/no-such-config.yaml' does not exist "
        "(expected a YAML file)\n"
    )


def test_cli_prints_the_rendered_script():
    done = _hpcrl_slurm(CONFIG, "--preemptible", "--launcher", "srun", "--time", "30")
    assert done.returncode == 0, done.stderr
    expected = _render(
        job_name="hpcrl-frozenlake8x8-qlearning",
        run_dir="runs/hpcrl-frozenlake8x8-qlearning",
        launcher="srun",
        preemptible=True,
        time="30",
    )
    assert done.stdout == expected


# --- --output and --submit -------------------------------------------------------------


def _fake_sbatch(fakes) -> dict:
    shims = fakes["tmp"] / "sbatch-shim"
    shims.mkdir()
    _executable(
        shims / "sbatch",
        f'#!/bin/sh\necho "$*" >> "{fakes["log"]}/sbatch.log"\necho "Submitted batch job 42"\n',
    )
    return dict(fakes["env"], PATH=f"{shims}:{fakes['env']['PATH']}")


def test_submit_writes_the_script_and_prints_the_job_id(fakes):
    env = _fake_sbatch(fakes)
    done = _hpcrl_slurm(CONFIG, "--submit", "--launcher", "srun", cwd=fakes["work"], env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "42\n"
    script = "hpcrl-frozenlake8x8-qlearning.sbatch"
    assert (fakes["log"] / "sbatch.log").read_text() == f"{script}\n"
    text = (fakes["work"] / script).read_text()
    assert text.startswith("#!/bin/bash\n") and "--resume auto" in text


def test_submit_to_a_chosen_file(fakes):
    env = _fake_sbatch(fakes)
    target = fakes["tmp"] / "out dir" / "job.sbatch"
    target.parent.mkdir()
    done = _hpcrl_slurm(
        CONFIG, "--submit", "--output", str(target), "--array", "0-2", cwd=fakes["work"], env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "42\n"
    assert (fakes["log"] / "sbatch.log").read_text() == f"{target}\n"
    assert "#SBATCH --array=0-2\n" in target.read_text()


def test_output_without_submit_does_not_call_sbatch(fakes):
    env = _fake_sbatch(fakes)
    done = _hpcrl_slurm(CONFIG, "--output", "job.sbatch", cwd=fakes["work"], env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert (fakes["work"] / "job.sbatch").exists()
    assert not (fakes["log"] / "sbatch.log").exists()


def test_submit_without_sbatch_is_one_error_line(fakes):
    empty = fakes["tmp"] / "empty-bin"
    empty.mkdir()
    env = dict(fakes["env"], PATH=str(empty))
    done = _hpcrl_slurm(CONFIG, "--submit", cwd=fakes["work"], env=env)
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpcrl: error: sbatch not found"), done.stderr


def test_submit_reports_sbatch_refusing(fakes):
    shims = fakes["tmp"] / "failing-sbatch"
    shims.mkdir()
    _executable(
        shims / "sbatch",
        "#!/bin/sh\necho 'sbatch: error: Batch job submission failed: Invalid partition name"
        " specified' >&2\nexit 1\n",
    )
    env = dict(fakes["env"], PATH=f"{shims}:{fakes['env']['PATH']}")
    done = _hpcrl_slurm(CONFIG, "--submit", "--partition", "nope", cwd=fakes["work"], env=env)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert "Invalid partition name specified" in done.stderr


# --- sweeps: --grid and --seeds ---------------------------------------------------------

PPO_CONFIG = REPO / "configs" / "cartpole-ppo.yaml"
# The sweep of the README: 2 x 2 grid points x 3 seeds.
SWEEP_ARGS = ["--grid", "learning_rate=1e-3,3e-4", "--grid", "num_envs=4,8", "--seeds", "3"]
SWEEP_GRID = (("learning_rate", ("1e-3", "3e-4")), ("num_envs", ("4", "8")))


def _run_task(path: Path, fakes, task_id: str | None) -> subprocess.CompletedProcess:
    env = dict(fakes["env"])
    if task_id is not None:
        env["SLURM_ARRAY_TASK_ID"] = task_id
    return subprocess.run(
        ["bash", str(path)], cwd=fakes["work"], env=env, capture_output=True, text=True
    )


def _sweep_script(fakes, **fields) -> Path:
    path = fakes["tmp"] / "sweep.sbatch"
    fields.setdefault("run_dir", "runs/sweep")
    path.write_text(
        _render(
            launcher=f"{sys.executable} {fakes['tmp'] / 'argv_launcher.py'}",
            venv=str(fakes["venv"]),
            **fields,
        )
    )
    _bash_n(path)
    return path


def test_cli_renders_one_array_over_grid_and_seeds(tmp_path):
    done = _hpcrl_slurm("configs/cartpole-ppo.yaml", *SWEEP_ARGS, "--launcher", "srun")
    assert done.returncode == 0, done.stderr
    directives = _directive_lines_first(done.stdout)
    assert "#SBATCH --array=0-11" in directives
    assert "#SBATCH --output=%x-%A_%a.out" in directives
    assert "#SBATCH --ntasks-per-node=4" in directives
    expected = _render(
        config="configs/cartpole-ppo.yaml",
        job_name="hpcrl-cartpole-ppo",
        run_dir="runs/hpcrl-cartpole-ppo",
        launcher="srun",
        grid=SWEEP_GRID,
        seeds=3,
    )
    assert done.stdout == expected
    path = tmp_path / "sweep.sbatch"
    path.write_text(done.stdout)
    _bash_n(path)


def test_cli_max_running_throttles_the_sweep():
    done = _hpcrl_slurm(
        "configs/cartpole-ppo.yaml", *SWEEP_ARGS, "--max-running", "2", "--launcher", "srun"
    )
    assert done.returncode == 0, done.stderr
    arrays = [line for line in done.stdout.splitlines() if line.startswith("#SBATCH --array")]
    assert arrays == ["#SBATCH --array=0-11%2"]


def test_sweep_task_ids_map_to_grid_points_and_seeds(fakes):
    path = _sweep_script(fakes, grid=SWEEP_GRID, seeds=3, overrides=("gamma=0.9",))
    # Written out from the definition: points in grid order, the seed varying fastest.
    expected = [
        (lr, envs, seed) for lr in ("1e-3", "3e-4") for envs in ("4", "8") for seed in range(3)
    ]
    for task_id, (lr, envs, seed) in enumerate(expected):
        done = _run_task(path, fakes, str(task_id))
        assert done.returncode == 0, done.stderr
        argv = json.loads((fakes["log"] / "argv.json").read_text())
        run_dir = f"runs/sweep/learning_rate={lr},num_envs={envs}/seed-{seed}"
        assert argv == [
            "python", "-m", "hpcrl", "train", CONFIG, "--run-dir", run_dir, "--resume", "auto",
            "--set", "gamma=0.9", "--set", f"learning_rate={lr}", "--set", f"num_envs={envs}",
            "--seed", str(seed),
        ], task_id  # fmt: skip
        info = (fakes["log"] / "python.log").read_text().splitlines()
        assert info[-1] == f"-m hpcrl info {run_dir}"


@pytest.mark.parametrize("task_id", ["12", "-1", "x", ""])
def test_sweep_refuses_a_task_id_outside_the_table(task_id, fakes):
    path = _sweep_script(fakes, grid=SWEEP_GRID, seeds=3)
    done = _run_task(path, fakes, task_id)
    assert done.returncode != 0
    expected = "not a task of this sweep (0-11)" if task_id else "submit with sbatch"
    assert expected in done.stderr
    assert not (fakes["log"] / "argv.json").exists()


def test_sweep_needs_an_array_task_id(fakes):
    done = _run_task(_sweep_script(fakes, seeds=2), fakes, None)
    assert done.returncode != 0
    assert "submit with sbatch" in done.stderr
    assert not (fakes["log"] / "argv.json").exists()


def test_seeds_alone_is_one_task_per_seed(fakes):
    text = _render(seeds=3)
    assert "#SBATCH --array=0-2\n" in text
    path = _sweep_script(fakes, seeds=3)
    for seed in range(3):
        done = _run_task(path, fakes, str(seed))
        assert done.returncode == 0, done.stderr
        argv = json.loads((fakes["log"] / "argv.json").read_text())
        assert argv == [
            "python", "-m", "hpcrl", "train", CONFIG, "--run-dir", f"runs/sweep/seed-{seed}",
            "--resume", "auto", "--seed", str(seed),
        ]  # fmt: skip


def test_a_grid_alone_runs_seed_0(fakes):
    path = _sweep_script(fakes, grid=(("alpha", ("0.1", "0.2")),))
    assert "#SBATCH --array=0-1\n" in path.read_text()
    done = _run_task(path, fakes, "1")
    assert done.returncode == 0, done.stderr
    argv = json.loads((fakes["log"] / "argv.json").read_text())
    assert argv[argv.index("--run-dir") + 1] == "runs/sweep/alpha=0.2/seed-0"
    assert argv[-4:] == ["--set", "alpha=0.2", "--seed", "0"]


def test_grid_values_render_inert(fakes):
    """A grid value reaches `--set` unchanged; its directory name keeps safe characters."""
    hostile = """$(touch PWNED) `touch PWNED` 'q' "d" * ;x"""
    path = _sweep_script(fakes, grid=(("env_id", ("ALE/Pong-v5", hostile)),), seeds=1)
    _bash_n(path, "--exclude=SC2016")
    for task_id, value in enumerate(("ALE/Pong-v5", hostile)):
        done = _run_task(path, fakes, str(task_id))
        assert done.returncode == 0, done.stderr
        argv = json.loads((fakes["log"] / "argv.json").read_text())
        assert argv[-4:] == ["--set", f"env_id={value}", "--seed", "0"]
        run_dir = argv[argv.index("--run-dir") + 1]
        name = "env_id=ALE_Pong-v5" if task_id == 0 else "env_id=__touch_PWNED___touch_PWNED"
        assert run_dir.startswith(f"runs/sweep/{name}"), run_dir
        assert run_dir.endswith("/seed-0") and run_dir.count("/") == 3, run_dir
    assert not (fakes["work"] / "PWNED").exists()


def test_sweep_tasks_order_and_names():
    options = slurm.JobOptions(
        config=CONFIG, job_name="j", run_dir="r", grid=(("a", ("1", "2")), ("debug.b", ("x",))),
        seeds=2,
    )  # fmt: skip
    assert slurm.sweep_tasks(options) == [
        slurm.SweepTask("a=1,debug.b=x", 0, ("a=1", "debug.b=x")),
        slurm.SweepTask("a=1,debug.b=x", 1, ("a=1", "debug.b=x")),
        slurm.SweepTask("a=2,debug.b=x", 0, ("a=2", "debug.b=x")),
        slurm.SweepTask("a=2,debug.b=x", 1, ("a=2", "debug.b=x")),
    ]
    assert slurm.sweep_tasks(slurm.JobOptions(config=CONFIG, job_name="j", run_dir="r")) == []


def test_render_refuses_an_array_with_a_sweep():
    with pytest.raises(UserError, match="--array"):
        _render(array="0-2", seeds=3)


# Each: extra `hpcrl slurm` arguments for configs/cartpole-ppo.yaml (4 ranks by default)
# and a text the one error line must hold.
SWEEP_REFUSALS = {
    "repeated key": (
        ["--grid", "learning_rate=1e-3", "--grid", "learning_rate=3e-4"],
        "key 'learning_rate' is given twice",
    ),
    "no values": (["--grid", "learning_rate="], "expected at least one value"),
    "empty value": (["--grid", "learning_rate=1e-3,,3e-4"], "an empty value"),
    "trailing comma": (["--grid", "learning_rate=1e-3,"], "an empty value"),
    "duplicate value": (["--grid", "learning_rate=1e-3,3e-4,1e-3"], "'1e-3' is listed twice"),
    "same value twice": (["--grid", "learning_rate=1e-3,0.001"], "give the same config"),
    "no =": (["--grid", "learning_rate"], "expected KEY=VALUE1,VALUE2"),
    "odd key": (["--grid", "learning rate=1"], "KEY a config key"),
    "unknown key": (
        ["--grid", "lerning_rate=1e-3,3e-4"],
        "grid point lerning_rate=1e-3: unknown config key 'lerning_rate'",
    ),
    "seed in grid": (["--grid", "seed=0,1"], "use --seeds"),
    "run_dir in grid": (["--grid", "run_dir=a,b"], "use --run-dir"),
    "same directory name": (["--grid", "env_id=a/b,a_b"], "both give the run directory name"),
    "grid and set": (["--grid", "num_envs=4,8", "--set", "num_envs=2"], "also a --grid key"),
    "seed set in a sweep": (["--seeds", "2", "--set", "seed=4"], "its own --seed"),
    "seed set in an array": (["--array", "0-1", "--set", "seed=4"], "its own --seed"),
    "zero seeds": (["--seeds", "0"], "--seeds '0': expected a positive integer"),
    "seeds and array": (["--seeds", "3", "--array", "0-2"], "not with --grid or --seeds"),
    "grid and array": (["--grid", "num_envs=4,8", "--array", "0-2"], "not with --grid"),
    "throttle alone": (["--max-running", "2"], "expected --grid or --seeds as well"),
    "zero throttle": (["--seeds", "2", "--max-running", "0"], "--max-running '0'"),
    "bad --set key": (["--set", "lerning_rate=1"], "unknown config key 'lerning_rate'"),
    "bad --set value": (["--seeds", "2", "--set", "num_envs=two"], "expected an integer"),
    # 512 env steps per update over 4 ranks x 3 envs: the second point only.
    "second point": (
        ["--grid", "num_envs=4,3"],
        "grid point num_envs=3: env_steps_per_update 512 and minibatch_size 256 must split "
        "over 4 ranks x 3 env copies",
    ),
    "ranks": (["--ntasks-per-node", "3"], "must split over 3 ranks x 2 env copies"),
    "nodes": (["--nodes", "3", "--seeds", "2"], "must split over 12 ranks x 2 env copies"),
    "eval_interval": (["--set", "eval_interval=1000"], "does not evaluate during training"),
}


@pytest.mark.parametrize("case", SWEEP_REFUSALS)
def test_cli_refuses_a_bad_sweep_before_writing_anything(case, fakes):
    args, expected = SWEEP_REFUSALS[case]
    env = _fake_sbatch(fakes)
    out = fakes["tmp"] / "job.sbatch"
    done = _hpcrl_slurm(
        str(PPO_CONFIG), *args, "--submit", "--output", str(out), cwd=fakes["work"], env=env
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpcrl: error: "), done.stderr
    assert expected in lines[0]
    assert not out.exists()
    assert not (fakes["log"] / "sbatch.log").exists()


def test_cli_refuses_a_layout_the_world_cannot_hold(fakes):
    done = _hpcrl_slurm(
        str(REPO / "configs" / "cartpole-impala.yaml"), "--set", "learner_ranks=4",
        "--output", "job.sbatch", cwd=fakes["work"], env=fakes["env"],
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.startswith("hpcrl: error: config key 'learner_ranks': got 4")
    assert done.stderr.endswith("(the job's world: --nodes 1 x --ntasks-per-node 4 = 4 ranks)\n")
    assert not (fakes["work"] / "job.sbatch").exists()


def test_cli_submits_a_valid_sweep(fakes):
    """The control for the refusals above: the same command without the bad value."""
    env = _fake_sbatch(fakes)
    out = fakes["tmp"] / "job.sbatch"
    done = _hpcrl_slurm(
        str(PPO_CONFIG), *SWEEP_ARGS, "--submit", "--output", str(out), cwd=fakes["work"],
        env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == "42\n"
    assert (fakes["log"] / "sbatch.log").read_text() == f"{out}\n"
    assert "#SBATCH --array=0-11\n" in out.read_text()


def test_a_sweep_trains_and_analyse_groups_it_by_grid_point(tmp_path):
    """Four real one-rank runs through the rendered table; `analyse` makes one experiment
    per grid point, each holding its two seeds."""
    from hpcrl.analysis.runs import group_runs, read_runs

    done = _hpcrl_slurm(
        CONFIG, "--grid", "alpha=0.1,0.05", "--seeds", "2", "--ntasks-per-node", "1",
        "--launcher", "env", "--venv", sys.prefix, "--run-dir", str(tmp_path / "runs"),
        "--set", "layout=allreduce", "--set", "total_env_steps=4096", "--set", "eval_episodes=5",
        "--output", str(tmp_path / "sweep.sbatch"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI", "OMPI_"))}
    for task_id in ["0", "1", "2", "3", "0"]:  # task 0 twice: the second finds it completed
        env["SLURM_ARRAY_TASK_ID"] = task_id
        ran = subprocess.run(
            ["bash", str(tmp_path / "sweep.sbatch")], cwd=REPO, env=env, capture_output=True,
            text=True, timeout=120,
        )  # fmt: skip
        assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "already completed" in ran.stdout
    experiments = group_runs(read_runs([tmp_path / "runs"]))
    found = {
        experiment.label: sorted(
            (run.path.relative_to(tmp_path / "runs").as_posix(), run.config["seed"])
            for run in experiment.runs
        )
        for experiment in experiments
    }
    assert found == {
        "alpha=0.05": [("alpha=0.05/seed-0", 0), ("alpha=0.05/seed-1", 1)],
        "alpha=0.1": [("alpha=0.1/seed-0", 0), ("alpha=0.1/seed-1", 1)],
    }
    assert all(run.status == "completed" for e in experiments for run in e.runs)
