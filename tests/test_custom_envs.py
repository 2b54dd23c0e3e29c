"""Custom environments from a user's package (issue 15): gymnasium's `pkg.mod:Env-v0` id
and the `env_module` key, imported before the env is made; failures are one line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import h5py
import pytest

from hpcrl.config import build_config
from hpcrl.envs import make_env
from hpcrl.errors import ConfigError, UserError

PACKAGE_ROOT = Path(__file__).parent / "fixtures" / "custom_envs"


@pytest.fixture(autouse=True)
def user_package(monkeypatch):
    """The fixture package importable, as if the user had installed it."""
    monkeypatch.syspath_prepend(str(PACKAGE_ROOT))
    yield
    for name in [m for m in sys.modules if m.startswith("hpcrl_test_envs")]:
        del sys.modules[name]  # each test imports (and registers) afresh
    for env_id in ("HpcrlChain-v0", "HpcrlBroken-v0", "HpcrlDiverges-v0"):
        gym.registry.pop(env_id, None)


def test_module_colon_id_imports_the_module_and_keeps_the_bare_id():
    assert "HpcrlChain-v0" not in gym.registry
    cfg = build_config({"env_id": "hpcrl_test_envs:HpcrlChain-v0"})
    assert (cfg.run.env_id, cfg.run.env_module) == ("HpcrlChain-v0", "hpcrl_test_envs")
    assert "HpcrlChain-v0" in gym.registry
    env = make_env(cfg.run.env_id)
    assert env.observation_space == gym.spaces.Discrete(6)
    # The stored config rebuilds the same (a resume, `evaluate`).
    again = build_config(cfg.flat())
    assert (again.run.env_id, again.run.env_module) == ("HpcrlChain-v0", "hpcrl_test_envs")


def test_env_module_key_alone_registers_the_envs():
    cfg = build_config({"env_id": "HpcrlChain-v0", "env_module": "hpcrl_test_envs"})
    assert cfg.run.env_module == "hpcrl_test_envs"
    assert make_env("HpcrlChain-v0").spec.max_episode_steps == 50


@pytest.mark.parametrize(
    "values,patterns",
    [
        (
            {"env_id": "no_such_pkg_xyz:Chain-v0"},
            ["'no_such_pkg_xyz'", "ModuleNotFoundError", "No module named 'no_such_pkg_xyz'"],
        ),
        (
            {"env_module": "hpcrl_test_envs.broken_import"},
            ["'hpcrl_test_envs.broken_import'", "hpcrl_no_such_dependency"],
        ),
        (
            {"env_id": "other_pkg:Chain-v0", "env_module": "hpcrl_test_envs"},
            ["'env_id'", "'other_pkg:Chain-v0'", "env_module 'hpcrl_test_envs'"],
        ),
        ({"env_id": ":Chain-v0"}, ["'env_id'", "'package.module:EnvId'"]),
    ],
    ids=["missing-module", "module-raises", "two-modules", "no-module"],
)
def test_bad_env_modules_are_one_line(values, patterns):
    with pytest.raises(ConfigError) as info:
        build_config(values)
    message = str(info.value)
    assert "\n" not in message
    for pattern in patterns:
        assert pattern in message, message


def test_env_whose_constructor_raises_is_one_line():
    build_config({"env_module": "hpcrl_test_envs"})
    with pytest.raises(UserError) as info:
        make_env("HpcrlBroken-v0")
    message = str(info.value)
    assert "\n" not in message
    assert "'HpcrlBroken-v0'" in message and "licence server is unreachable" in message


# ---------------------------------------------------------------- the real CLI (e2e)


@pytest.fixture(scope="module")
def user_venv(tmp_path_factory) -> Path:
    """A virtual environment of the user's own, in the test's temporary directory, with
    the fixture package installed editable (`pip install -e`) as a user installs theirs;
    it sees this venv's packages (hpcrl, torch, mpi4py) through a `.pth` file. Returns
    its python."""
    import shutil
    import sysconfig

    root = tmp_path_factory.mktemp("user")
    package = root / "hpcrl-test-envs"
    shutil.copytree(PACKAGE_ROOT, package, ignore=shutil.ignore_patterns("__pycache__"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    parent = sysconfig.get_paths()["purelib"]  # this venv's: hpcrl, torch, mpi4py, pip
    Path(site, "hpcrl_parent_venv.pth").write_text(f"import site; site.addsitedir({parent!r})\n")
    for lib in Path(sys.prefix, "lib").glob("*mpi*"):  # MPI as `pip install mpich` puts it
        (venv / "lib" / lib.name).symlink_to(lib)
    install = [str(python), "-m", "pip", "install", "--quiet", "--no-build-isolation"]
    result = subprocess.run(
        [*install, "--no-deps", "--no-index", "-e", str(package)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return python


def _run(python: Path, n: int, *args: str) -> subprocess.CompletedProcess:
    from conftest import BIN, subprocess_env

    env = subprocess_env()
    env.pop("PYTHONPATH", None)  # the package is found because it is installed
    cmd = [str(python), "-m", "hpcrl", *args]
    if n > 1:
        cmd = [str(BIN / "mpiexec"), "-n", str(n), *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.e2e
def test_the_package_is_installed_not_on_the_path(user_venv):
    code = "import hpcrl_test_envs, hpcrl; print(hpcrl_test_envs.__file__, hpcrl.__file__)"
    result = subprocess.run([str(user_venv), "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    package_file, hpcrl_file = result.stdout.split()
    assert Path(package_file).parent.parent.name == "hpcrl-test-envs"  # the editable copy
    assert Path(hpcrl_file).is_relative_to(Path(__file__).parents[1] / "src")
    here = subprocess.run([sys.executable, "-c", "import hpcrl_test_envs"], capture_output=True)
    assert here.returncode != 0  # not importable from this venv without the install


@pytest.mark.e2e
@pytest.mark.parametrize(
    "args",
    [
        ["--algo", "qlearning", "--total-env-steps", "4000", "--set", "num_envs=4"],
        [
            "--algo",
            "ppo",
            "--total-env-steps",
            "2048",
            "--set",
            "num_envs=2",
            "--set",
            "env_steps_per_update=256",
            "--set",
            "minibatch_size=64",
        ],
    ],  # fmt: skip
    ids=["qlearning", "ppo"],
)
def test_train_and_evaluate_a_custom_env_under_mpirun(tmp_path, user_venv, args):
    run_dir = tmp_path / "run"
    env = ["--env", "hpcrl_test_envs:HpcrlChain-v0"]
    options = ["--run-dir", str(run_dir), "--set", "eval_episodes=5"]
    result = _run(user_venv, 2, "train", *env, *options, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    with h5py.File(run_dir / "run.h5", "r") as f:
        assert f.attrs["status"] == "completed"
        config = json.loads(f.attrs["config"])
    assert config["env_id"] == "HpcrlChain-v0"
    assert config["env_module"] == "hpcrl_test_envs"
    # evaluate imports the module from the stored config
    result = _run(user_venv, 1, "evaluate", str(run_dir), "--episodes", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["episodes"] == 3
    # The policy loads where the simulator is not installed: the spaces are in the checkpoint.
    code = "import sys, hpcrl\np = hpcrl.load_policy(sys.argv[1])\n"
    code += "print(p.observation_space, p.act(2))"
    result = subprocess.run(
        [sys.executable, "-c", code, str(run_dir)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "Discrete(6)" and result.stdout.split()[1] in ("0", "1")


@pytest.mark.e2e
@pytest.mark.parametrize(
    "args,patterns",
    [
        (["--env", "no_such_pkg_xyz:Chain-v0"], [r"'no_such_pkg_xyz'", r"ModuleNotFoundError"]),
        (["--env-module", "hpcrl_test_envs.broken_import"], [r"hpcrl_no_such_dependency"]),
        (["--env", "hpcrl_test_envs:HpcrlBroken-v0"], [r"'HpcrlBroken-v0'", r"licence server"]),
    ],
    ids=["missing-module", "module-raises", "constructor-raises"],
)
def test_bad_custom_env_is_one_line_under_mpirun(tmp_path, user_venv, args, patterns):
    from conftest import one_error_line

    run_dir = tmp_path / "run"
    options = ["--run-dir", str(run_dir), "--total-env-steps", "1000"]
    result = _run(user_venv, 2, "train", *options, *args)
    shown = result.stdout + result.stderr
    assert result.returncode == 2, shown
    one_error_line(result.stdout, result.stderr, patterns, shown)
    assert not run_dir.exists()


@pytest.mark.e2e
def test_env_raising_in_step_mid_run_aborts_with_that_ranks_traceback(tmp_path, user_venv):
    run_dir = tmp_path / "run"
    env = ["--env", "hpcrl_test_envs:HpcrlDiverges-v0", "--algo", "qlearning"]
    options = ["--run-dir", str(run_dir), "--total-env-steps", "100000", "--set", "num_envs=2"]
    result = _run(user_venv, 2, "train", *env, *options)
    assert result.returncode != 0, result.stdout + result.stderr
    assert "FloatingPointError: the simulator diverged at step 101" in result.stderr
    assert re.search(r"\[rank [01]\] .*FloatingPointError", result.stderr), result.stderr
