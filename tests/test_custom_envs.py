"""Custom environments from a user's package (issue 15): gymnasium's `pkg.mod:Env-v0` id
and the `env_module` key, imported before the env is made; failures are one line."""

from __future__ import annotations

import json
import os
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
    for env_id in ("HpcrlChain-v0", "HpcrlBroken-v0"):
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


def _env_with_package() -> dict[str, str]:
    from conftest import subprocess_env

    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))
    return env


def _run(n: int, *args: str) -> subprocess.CompletedProcess:
    from conftest import hpcrl_command

    cmd = hpcrl_command(n, *args)
    return subprocess.run(cmd, capture_output=True, text=True, env=_env_with_package(), timeout=600)


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
def test_train_and_evaluate_a_custom_env_under_mpirun(tmp_path, args):
    run_dir = tmp_path / "run"
    env = ["--env", "hpcrl_test_envs:HpcrlChain-v0"]
    result = _run(2, "train", *env, "--run-dir", str(run_dir), "--set", "eval_episodes=5", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    with h5py.File(run_dir / "run.h5", "r") as f:
        assert f.attrs["status"] == "completed"
        config = json.loads(f.attrs["config"])
    assert config["env_id"] == "HpcrlChain-v0"
    assert config["env_module"] == "hpcrl_test_envs"
    # evaluate imports the module from the stored config
    result = _run(1, "evaluate", str(run_dir), "--episodes", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["episodes"] == 3


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
def test_bad_custom_env_is_one_line_under_mpirun(tmp_path, args, patterns):
    from conftest import one_error_line

    run_dir = tmp_path / "run"
    result = _run(2, "train", "--run-dir", str(run_dir), "--total-env-steps", "1000", *args)
    shown = result.stdout + result.stderr
    assert result.returncode == 2, shown
    one_error_line(result.stdout, result.stderr, patterns, shown)
    assert not run_dir.exists()
