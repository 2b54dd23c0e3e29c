"""The Python API (issue 15): `hpcrl.train` with `env_fn` and `network_fn`, the network
keys (`hidden_sizes`, `activation`), and what the package exports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np
import pytest
import torch
from torch import nn

import hpcrl
from conftest import BIN, subprocess_env
from hpcrl import api, models
from hpcrl.config import build_config
from hpcrl.errors import ConfigError, UserError

CARTPOLE = gym.make("CartPole-v1")
SPACES = CARTPOLE.observation_space, CARTPOLE.action_space


def test_the_package_exports_its_api_lazily():
    assert set(hpcrl.__all__) == {"__version__", "train", "load_policy", "load_runs"}
    assert {"train", "load_policy", "load_runs"} <= set(dir(hpcrl))
    assert hpcrl.train is api.train and "env_fn" in hpcrl.train.__doc__
    from hpcrl.analysis.runs import load_runs

    assert hpcrl.load_runs is load_runs
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        hpcrl.trian  # noqa: B018
    code = "import sys, hpcrl; print('mpi4py' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.split() == ["False", "False"], out.stderr


# ------------------------------------------------------------------- config values


def test_config_values_from_each_kind_of_config(tmp_path):
    from hpcrl.config import DEFAULT_JOB

    assert api.config_values(None, {}) == DEFAULT_JOB
    assert api.config_values(None, {"algo": "ppo"}) == {"algo": "ppo"}
    path = tmp_path / "c.yaml"
    path.write_text("algo: ppo\ndebug:\n  fail_rank: 1\n")
    assert api.config_values(str(path), {"seed": 3}) == {
        "algo": "ppo",
        "debug.fail_rank": 1,
        "seed": 3,
    }
    assert api.config_values({"debug": {"fail_rank": 2}}, {}) == {"debug.fail_rank": 2}
    cfg = build_config({"algo": "ppo", "learning_rate": 1e-3})
    assert api.config_values(cfg, {})["learning_rate"] == 1e-3
    with pytest.raises(ConfigError, match="expected a YAML file path, a dict"):
        api.config_values(42, {})


def _make_chain(**kwargs):
    return gym.make("CartPole-v1", **kwargs)


def test_env_fn_is_registered_under_its_name_or_the_given_id():
    env_id = api.register_env_fn(_make_chain, None)
    assert env_id == "hpcrl_env_fn/make_chain"
    assert gym.make(env_id).observation_space == SPACES[0]
    assert api.register_env_fn(_make_chain, None) == env_id  # again: the same, no error
    assert api.register_env_fn(lambda: None, "MySim-v3") == "MySim-v3"
    assert api.register_env_fn(lambda: None, None) == "hpcrl_env_fn/lambda"
    with pytest.raises(ConfigError, match="'CartPole-v1' is a registered gymnasium env"):
        api.register_env_fn(_make_chain, "CartPole-v1")
    with pytest.raises(ConfigError, match="env_fn 3: expected a callable"):
        api.register_env_fn(3, None)


# ------------------------------------------------------------------ network keys


def test_hidden_sizes_and_activation_shape_every_deep_network():
    cfg = build_config({"algo": "ppo", "hidden_sizes": [32, 16, 8], "activation": "relu"}).algo
    net = models.actor_critic(cfg, *SPACES)
    linear = [m.out_features for m in net.actor_trunk.modules() if isinstance(m, nn.Linear)]
    assert linear == [32, 16, 8]
    assert {type(m) for m in net.critic_trunk.modules()} >= {nn.ReLU}
    assert nn.Tanh not in {type(m) for m in net.modules()}
    q = models.q_network(build_config({"algo": "dqn", "hidden_size": 12}).algo, *SPACES)
    assert [m.out_features for m in q.encoder.modules() if isinstance(m, nn.Linear)] == [12, 12]
    assert nn.ReLU in {type(m) for m in q.modules()}  # DQN's default activation
    default = models.actor_critic(build_config({"algo": "impala"}).algo, *SPACES)
    assert nn.Tanh in {type(m) for m in default.modules()}


@pytest.mark.parametrize(
    "key,value,pattern",
    [
        ("hidden_sizes", [64, 0], r"'hidden_sizes': got \[64, 0\], expected a list of integers"),
        ("hidden_sizes", 64, r"'hidden_sizes': got 64, expected a list"),
        ("hidden_sizes", ["a"], r"'hidden_sizes': got 'a', expected an integer"),
        ("activation", "sigmoid", r"'activation': got 'sigmoid', expected one of \['tanh'"),
        ("hidden_size", 0, r"'hidden_size': got 0, expected an integer >= 1"),
    ],
)
def test_bad_network_keys_are_one_line(key, value, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        build_config({"algo": "a2c", key: value})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("activation", ["relu", "elu", "silu"])
def test_numpy_actor_follows_hidden_sizes_and_activation(activation):
    from hpcrl.algos.impala import make_actor

    cfg = build_config({"algo": "impala", "hidden_sizes": [16, 8], "activation": activation})
    torch.manual_seed(0)
    net = models.actor_critic(cfg.algo, *SPACES)
    actor = make_actor(cfg.algo, *SPACES, seed=0)
    actor.load_published(nn.utils.parameters_to_vector(net.parameters()).detach().numpy())
    obs = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    with torch.no_grad():
        want = torch.log_softmax(net.actor_head(net.actor_trunk(torch.as_tensor(obs))), -1)
        values = net.value(obs)
    np.testing.assert_allclose(actor.log_probabilities(obs), want.numpy(), atol=1e-5)
    np.testing.assert_allclose(actor.values(obs), values.numpy(), atol=1e-5)


def test_numpy_actor_steps_aside_for_gelu_and_a_custom_network():
    from hpcrl.algos.impala import make_actor

    gelu = build_config({"algo": "impala", "activation": "gelu"}).algo
    assert make_actor(gelu, *SPACES, seed=0) is None  # its actors keep the torch model
    custom = build_config({"algo": "impala", "custom_network": True}).algo
    assert make_actor(custom, *SPACES, seed=0) is None


# -------------------------------------------------------------------- network_fn


def _mlp(space):
    return nn.Sequential(nn.Linear(space.shape[0], 24), nn.ReLU())


@pytest.fixture
def network_fn():
    def use(fn):
        previous = models.set_network_fn(fn)
        used.append(previous)

    used: list = []
    yield use
    if used:
        models.set_network_fn(used[0])


def test_network_fn_becomes_the_encoder_under_the_heads(network_fn):
    network_fn(_mlp)
    cfg = build_config({"algo": "ppo", "custom_network": True}).algo
    net = models.actor_critic(cfg, *SPACES)
    assert isinstance(net.encoder.net, nn.Sequential) and net.encoder.out_dim == 24
    assert net.actor_head.in_features == 24 and net.critic_head.in_features == 24
    actions, log_probs, values = net.act(np.zeros((3, 4), np.float32))
    assert actions.shape == log_probs.shape == values.shape == (3,)
    dqn = build_config({"algo": "dqn", "custom_network": True, "dueling": True}).algo
    q = models.q_network(dqn, *SPACES, dueling=True)
    assert q(np.zeros((5, 4), np.float32)).shape == (5, 2)


@pytest.mark.parametrize(
    "fn,pattern",
    [
        (lambda space: "mlp", r"returned a str: expected a torch.nn.Module"),
        (lambda space: nn.Linear(3, 8), r"failed on a batch of 2 observations \(2, 4\).*mat1"),
        (lambda space: nn.Flatten(0), r"maps observations \(2, 4\) to \(8,\): expected"),
        (lambda space: nn.Sequential(), r"\(2, 4\) to \(2, 4\)|returns"),
    ],
    ids=["not-a-module", "raises", "wrong-shape", "identity"],
)
def test_bad_network_fn_is_one_line(network_fn, fn, pattern):
    network_fn(fn)
    cfg = build_config({"algo": "a2c", "custom_network": True}).algo
    if pattern.startswith(r"\(2, 4\) to \(2, 4\)"):  # an identity is a valid encoder
        assert models.actor_critic(cfg, *SPACES).encoder.out_dim == 4
        return
    with pytest.raises(UserError, match=pattern) as info:
        models.actor_critic(cfg, *SPACES)
    assert "\n" not in str(info.value)


def test_integer_features_are_refused(network_fn):
    class Floor(nn.Module):
        def forward(self, obs):
            return obs.long()

    network_fn(lambda space: Floor())
    cfg = build_config({"algo": "ppo", "custom_network": True}).algo
    with pytest.raises(UserError, match="returns torch.int64: expected floats"):
        models.actor_critic(cfg, *SPACES)


def test_a_custom_network_run_without_its_network_fn_is_one_line(network_fn):
    network_fn(None)
    cfg = build_config({"algo": "ppo", "custom_network": True}).algo
    with pytest.raises(UserError, match="custom_network: true .* pass the same network_fn"):
        models.actor_critic(cfg, *SPACES)


# --------------------------------------------------- a script under mpirun (e2e)

# The scripts write each rank's outcome to a file of its own: lines that several ranks
# print can interleave in the launcher's merged stdout.
WRITE_OUTCOME = r"""
def write_outcome(directory, record):
    from pathlib import Path
    from mpi4py import MPI

    rank = MPI.COMM_WORLD.Get_rank()
    Path(directory, f"outcome-{rank}.json").write_text(json.dumps(record))
"""


def read_outcomes(directory) -> list[dict]:
    """The records `write_outcome` left in `directory`, in rank order."""
    files = sorted(Path(directory).glob("outcome-*.json"), key=lambda p: int(p.stem[8:]))
    return [json.loads(p.read_text()) for p in files]


SCRIPT = r"""
import json, sys
import gymnasium as gym
import numpy as np
import torch
import hpcrl


class Corridor(gym.Env):
    '''Not registered anywhere: walk right to the end of a 1-D corridor.'''

    def __init__(self, length=5):
        self.length = length
        self.observation_space = gym.spaces.Box(0.0, 1.0, (1,), np.float32)
        self.action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.x = 0
        return np.array([0.0], np.float32), {}

    def step(self, action):
        self.x = max(0, self.x + (1 if action == 1 else -1))
        done = self.x >= self.length
        obs = np.array([self.x / self.length], np.float32)
        return obs, float(done), done, False, {}


def make_corridor(length=5):
    return gym.wrappers.TimeLimit(Corridor(length), 30)


def network(space):
    return torch.nn.Sequential(torch.nn.Linear(space.shape[0], 16), torch.nn.Tanh())


run_dir, algo = sys.argv[1], sys.argv[2]
outcome = hpcrl.train(
    {"algo": algo, "env_kwargs": {"length": 4}},
    env_fn=make_corridor,
    network_fn=network if algo == "ppo" else None,
    run_dir=run_dir,
    total_env_steps=4096,
    num_envs=2,
    env_steps_per_update=256,
    eval_episodes=4,
    **({"minibatch_size": 64} if algo == "ppo" else {}),
)
write_outcome(sys.argv[3], {"status": outcome.status, "run_dir": outcome.run_dir,
                            "result": outcome.result, "exit_code": outcome.exit_code})
"""


@pytest.mark.e2e
@pytest.mark.parametrize("algo", ["ppo", "a2c"])
def test_train_with_env_fn_from_a_script_under_mpirun(tmp_path, algo):
    script = tmp_path / "my_script.py"
    script.write_text(WRITE_OUTCOME + SCRIPT)
    run_dir = tmp_path / "run"
    cmd = [str(BIN / "mpiexec"), "-n", "2", sys.executable, str(script), str(run_dir), algo]
    cmd.append(str(tmp_path))
    result = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = read_outcomes(tmp_path)
    assert len(lines) == 2  # every rank returns the outcome
    assert {x["status"] for x in lines} == {"completed"}
    assert {x["run_dir"] for x in lines} == {str(run_dir)}
    results = [x["result"] for x in lines if x["result"] is not None]
    assert len(results) == 1 and results[0]["episodes"] == 4  # rank 0's evaluation
    with h5py.File(run_dir / "run.h5", "r") as f:
        assert f.attrs["status"] == "completed"
        config = json.loads(f.attrs["config"])
        assert len(f["episodes"]["return"]) > 0
    assert config["env_id"] == "hpcrl_env_fn/make_corridor"
    assert config["env_kwargs"] == {"length": 4}
    assert config["custom_network"] is (algo == "ppo")
    # The policy loads in a plain process that has neither the env nor (a2c) anything but
    # the checkpoint; the custom network needs its network_fn, and says so without it.
    check = (
        "import sys, numpy as np, torch, hpcrl\n"
        "net = lambda s: torch.nn.Sequential(torch.nn.Linear(s.shape[0], 16), torch.nn.Tanh())\n"
        "try:\n"
        "    hpcrl.load_policy(sys.argv[1])\n"
        "    print('loaded without network_fn')\n"
        "except hpcrl.errors.UserError as exc:\n"
        "    print('refused:', exc)\n"
        "p = hpcrl.load_policy(sys.argv[1], network_fn=net)\n"
        "print(p.observation_space, p.act(np.array([[0.0], [0.5]], np.float32)).tolist())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", check, str(run_dir)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()
    if algo == "ppo":
        assert first.startswith("refused:") and "network_fn" in first
    else:
        assert first == "loaded without network_fn"
    assert second.startswith("Box(0.0, 1.0, (1,), float32)")
    assert set(json.loads(second.split(" ", 4)[-1])) <= {0, 1}


@pytest.mark.e2e
def test_an_exception_on_one_rank_of_a_script_aborts_the_job(tmp_path):
    """A failure on one rank of `hpcrl.train` must not leave the other ranks waiting."""
    script = tmp_path / "fails.py"
    script.write_text(
        "import sys, hpcrl\n"
        "hpcrl.train({'algo': 'ppo', 'env_id': 'CartPole-v1', 'debug': {'fail_rank': 1}},\n"
        "            run_dir=sys.argv[1], total_env_steps=4096, num_envs=2)\n"
    )
    cmd = [str(BIN / "mpiexec"), "-n", "2", sys.executable, str(script), str(tmp_path / "run")]
    result = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert result.returncode != 0
    assert "[rank 1]" in result.stderr, result.stderr


def test_preemption_handlers_are_the_runs_only():
    import signal

    from hpcrl import preemption

    before = {sig: signal.getsignal(sig) for sig in preemption.SIGNALS}
    with preemption.installed():
        assert signal.getsignal(signal.SIGUSR1) is preemption._handler
        signal.raise_signal(signal.SIGUSR1)  # a flag, not the default (terminate)
        assert preemption.requested()
    assert {sig: signal.getsignal(sig) for sig in preemption.SIGNALS} == before
    assert not preemption.requested()  # a later train starts with a clear flag


PREEMPTED = r"""
import json, sys
import hpcrl

outcome = hpcrl.train(
    {"algo": "ppo", "env_id": "CartPole-v1", "num_envs": 2, "env_steps_per_update": 512,
     "minibatch_size": 128, "log_interval_s": 0.2, "eval_episodes": 2},
    run_dir=sys.argv[1], resume="auto", total_env_steps=int(sys.argv[2]),
)
write_outcome(sys.argv[3], {"status": outcome.status, "exit_code": outcome.exit_code})
sys.exit(outcome.exit_code)
"""


@pytest.mark.e2e
def test_a_script_is_preempted_and_resumed(tmp_path):
    """SIGUSR1 to `mpiexec -n 2 python script.py`: `train` checkpoints and returns
    `interrupted` (exit_code 3); the same script again resumes the run to its end."""
    import signal

    script = tmp_path / "job.py"
    script.write_text(WRITE_OUTCOME + PREEMPTED)
    run_dir = tmp_path / "run"
    cmd = [str(BIN / "mpiexec"), "-n", "2", sys.executable, str(script), str(run_dir)]
    proc = subprocess.Popen(
        [*cmd, "60000", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    for line in proc.stdout:
        if line.startswith("[hpcrl] env_steps"):
            break
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, out + err
    assert read_outcomes(tmp_path) == [{"status": "interrupted", "exit_code": 3}] * 2
    with h5py.File(run_dir / "run.h5", "r") as f:
        assert f.attrs["status"] == "interrupted"
    # The job script runs again, as a requeued job does: the run continues to its end.
    again = subprocess.run(
        [*cmd, "60000", str(tmp_path)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert "[hpcrl] resuming" in again.stdout
    assert read_outcomes(tmp_path) == [{"status": "completed", "exit_code": 0}] * 2
    with h5py.File(run_dir / "run.h5", "r") as f:
        assert f.attrs["status"] == "completed"
        assert len(f["resumes"]["env_steps"]) == 1
        assert f["metrics"]["env_steps"][-1] == 60000


@pytest.mark.e2e
def test_two_runs_side_by_side_on_halves_of_the_world(tmp_path):
    """`comm` is the run's communicator: `mpiexec -n 4` split in two trains two seeds at
    once, each on 2 ranks, into its own run directory."""
    script = tmp_path / "halves.py"
    script.write_text(
        WRITE_OUTCOME + "import json, sys\n"
        "from mpi4py import MPI\n"
        "import hpcrl\n"
        "seed = MPI.COMM_WORLD.Get_rank() % 2\n"
        "half = MPI.COMM_WORLD.Split(seed)\n"
        "out = hpcrl.train({'algo': 'ppo', 'env_id': 'CartPole-v1', 'num_envs': 2,\n"
        "                   'env_steps_per_update': 512, 'minibatch_size': 128},\n"
        "                  comm=half, seed=seed, run_dir=f'{sys.argv[1]}/seed-{seed}',\n"
        "                  total_env_steps=2048, eval_episodes=2)\n"
        "write_outcome(sys.argv[1], [seed, half.Get_size(), out.status])\n"
    )
    cmd = [str(BIN / "mpiexec"), "-n", "4", sys.executable, str(script), str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    outcomes = read_outcomes(tmp_path)  # ranks 0-3: seeds 0, 1, 0, 1
    assert outcomes == [[0, 2, "completed"], [1, 2, "completed"]] * 2
    for seed in (0, 1):
        with h5py.File(tmp_path / f"seed-{seed}" / "run.h5", "r") as f:
            assert f.attrs["status"] == "completed" and int(f.attrs["world_size"]) == 2
            assert json.loads(f.attrs["config"])["seed"] == seed
