"""The contracts between the layers (`hpcrl.contracts`), the two registries (algorithms,
layouts), the topology checks that run before any communication, the defaults of every
algorithm, and the rule that the topologies and the runner never name an algorithm."""

from __future__ import annotations

import ast
import dataclasses
import json
import signal
from pathlib import Path

import pytest

from conftest import REPO
from hpcrl import cli
from hpcrl.algos import ALGOS, algorithm
from hpcrl.config import DEFAULT_JOB, build_config, config_from_json, resume_conflicts
from hpcrl.contracts import LayoutError, Topology
from hpcrl.envs import make_env
from hpcrl.errors import ConfigError
from hpcrl.topologies import TOPOLOGIES, make_topology, topology_class

SRC = REPO / "src" / "hpcrl"
DEEP_ALGOS = [a for a in ALGOS if a != "qlearning"]


@pytest.mark.parametrize("name", sorted(ALGOS))
def test_every_algorithm_registers_its_config_layouts_and_learner(name):
    spec = algorithm(name)
    assert spec.name == name
    assert dataclasses.is_dataclass(spec.config) and spec.config.__name__ != "Config"
    assert spec.config.__name__.endswith("Config")
    assert set(spec.layouts) <= set(TOPOLOGIES)
    assert callable(spec.make_learner)
    cfg = build_config({"algo": name})
    assert cfg.layout == spec.layouts[0] and isinstance(cfg.algo, spec.config)


@pytest.mark.parametrize("layout", sorted(TOPOLOGIES))
def test_every_layout_is_a_topology_module_named_as_the_layout(layout):
    cls = topology_class(layout)
    assert issubclass(cls, Topology) and cls.name == layout
    assert TOPOLOGIES[layout] == f"hpcrl.topologies.{layout}"
    assert dataclasses.is_dataclass(cls.Config)


def test_no_key_belongs_to_two_parts_of_a_config():
    """Flat keys are routed to the shared, the layout's or the algorithm's dataclass: a key
    in two of them would be ambiguous."""
    from hpcrl.config import RunConfig

    run = {f.name for f in dataclasses.fields(RunConfig)}
    for name in ALGOS:
        spec = algorithm(name)
        algo = {f.name for f in dataclasses.fields(spec.config)}
        for layout in spec.layouts:
            topology = {f.name for f in dataclasses.fields(topology_class(layout).Config)}
            assert not (run & algo or run & topology or algo & topology), (name, layout)


def test_topology_settings_live_in_the_topology_config():
    ppo, a2c = build_config({"algo": "ppo"}), build_config({"algo": "a2c"})
    assert ppo.topology.sync_frac == 0.6 and a2c.topology.sync_frac == 1.0  # DD-PPO's
    impala = build_config({"algo": "impala", "learner_ranks": 2, "max_policy_lag": 5})
    assert impala.topology.learner_ranks == 2 and impala.topology.max_policy_lag == 5
    ps = build_config({"algo": "qlearning", "sync_interval": 8})
    assert ps.topology.sync_interval == 8 and not hasattr(ps.algo, "sync_interval")
    assert build_config({"algo": "qlearning", "layout": "allreduce"}).layout == "allreduce"
    with pytest.raises(ConfigError, match=r"'layout': got 'ps', expected 'data_parallel'"):
        build_config({"algo": "ppo", "layout": "ps"})


@pytest.mark.parametrize(
    "algo,new",
    [("ppo", "env_steps_per_update"), ("dqn", "minibatch_size"), ("impala", "unrolls_per_update")],
)
def test_batch_size_is_renamed_by_its_unit(algo, new):
    """`batch_size` meant env steps (PPO), samples (DQN) and messages (IMPALA); a config
    that still says it is told the new name, a stored config of an older run is read."""
    with pytest.raises(ConfigError, match=rf"'batch_size' is now '{new}'"):
        build_config({"algo": algo, "batch_size": 512})
    old = build_config({"algo": algo, new: 512}).to_dict()
    old["batch_size"] = old.pop(new)
    cfg = config_from_json(json.dumps(old))
    assert getattr(cfg.algo, new) == 512
    assert resume_conflicts(old, cfg) == []


def _probe(cfg):
    env = make_env(cfg.run.env_id, cfg.run.env_kwargs, **cfg.run.env_options())
    return env


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("algo", DEEP_ALGOS)
def test_every_deep_algorithm_s_defaults_fit_1_2_and_4_ranks(algo, world):
    """`train --algo X --env CartPole-v1` is not refused on 1, 2 or 4 ranks (the e2e test
    trains them); Ape-X needs a learner, a replay rank and an actor, so 3 ranks or one."""
    if algo == "apex" and world == 2:
        world = 3
    cfg = build_config({"algo": algo, "env_id": "CartPole-v1"})
    topology = make_topology(cfg)
    topology.check_world(world)
    env = _probe(cfg)
    topology.check_env(env, world, {})
    env.close()


@pytest.mark.parametrize(
    "replay,world,ok",
    [(1, 1, True), (2, 1, False), (1, 2, False), (1, 3, True), (2, 3, False), (2, 4, True)],
)
def test_an_apex_world_without_a_role_is_refused_by_the_topology(replay, world, ok):
    """Ape-X needs rank 0 to learn, `replay_ranks` replay ranks and at least one actor
    (one process: every role, with one shard)."""
    topology = make_topology(build_config({"algo": "apex", "replay_ranks": replay}))
    if ok:
        topology.check_world(world)
        return
    with pytest.raises(LayoutError, match="replay_ranks"):
        topology.check_world(world)


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("layout", ["ps", "allreduce"])
def test_tabular_defaults_fit_1_2_and_4_ranks(layout, world):
    cfg = build_config({"algo": "qlearning", "layout": layout})
    topology = make_topology(cfg)
    topology.check_world(world)
    env = _probe(cfg)
    topology.check_env(env, world, {})
    env.close()


@pytest.mark.parametrize(
    "learners,world,ok", [(1, 1, True), (2, 1, False), (2, 2, False), (2, 3, True), (3, 3, False)]
)
def test_an_actor_learner_world_without_actors_is_refused_by_the_topology(learners, world, ok):
    """`check_world` needs no communicator: it runs on every rank before any message."""
    topology = make_topology(build_config({"algo": "impala", "learner_ranks": learners}))
    assert topology.min_world_size() == (1 if learners == 1 else learners + 1)
    if ok:
        topology.check_world(world)
        return
    with pytest.raises(LayoutError, match=r"'learner_ranks'") as raised:
        topology.check_world(world)
    assert "\n" not in str(raised.value)
    assert f"needs at least {learners + 1} ranks" in str(raised.value)


def test_roles_say_who_does_what():
    impala = make_topology(build_config({"algo": "impala", "learner_ranks": 2}))
    assert impala.roles(5) == "ranks 0-1 learners, ranks 2-4 actors"
    assert impala.acting_ranks(5) == range(2, 5)
    ps = make_topology(build_config({"algo": "qlearning"}))
    assert ps.roles(4) == "rank 0 parameter server, ranks 1-3 actors"
    assert ps.acting_ranks(4) == range(1, 4) and ps.acting_ranks(1) == range(1)
    assert make_topology(build_config({"algo": "ppo"})).acting_ranks(3) == range(3)


def _code_of(path: Path) -> ast.Module:
    """The module's AST with every docstring removed (prose may name papers)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            body[0] = ast.Pass()
    return tree


LAYER_MODULES = sorted((SRC / "topologies").glob("*.py")) + [SRC / "runner.py"]


@pytest.mark.parametrize("path", LAYER_MODULES, ids=lambda p: p.name)
def test_topologies_and_runner_never_name_an_algorithm_nor_probe_one(path):
    """Adding an algorithm is one module under algos/: the layouts and the runner reach it
    only through `hpcrl.contracts` (no algorithm module, learner class or name; no
    `getattr`/`hasattr`; no message-kind strings)."""
    learner_classes = {"PPO", "A2C", "DQN", "Impala", "A3C", "AsyncQ", "QLearningLearner"}
    banned_strings = set(ALGOS) | {"unroll", "gradient"}
    for node in ast.walk(_code_of(path)):
        if isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            assert not (parts[:2] == ["hpcrl", "algos"] and len(parts) > 2 and parts[2] in ALGOS), (
                f"{path.name} imports {node.module}"
            )
        if isinstance(node, ast.Name):
            assert node.id not in learner_classes, f"{path.name} names {node.id}"
            assert node.id not in ("getattr", "hasattr"), f"{path.name} probes with {node.id}"
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            assert node.value not in banned_strings, f"{path.name} says {node.value!r}"


def test_train_alone_runs_the_default_job(monkeypatch):
    """`python -m hpcrl train` with nothing else is the bare `python -m hpcrl`."""
    from hpcrl import runner

    seen = []

    def fake_train(comm, values, *args):
        seen.append(values)
        return runner.TrainOutcome("completed")

    monkeypatch.setattr(runner, "train", fake_train)
    assert cli.main(["train"]) == 0
    assert cli.main([]) == 0
    assert seen == [DEFAULT_JOB, DEFAULT_JOB]
    assert cli.main(["train", "--algo", "ppo"]) == 0
    assert seen[-1] == {"algo": "ppo"}
    # `main` in a process that goes on leaves no signal ignored (children inherit SIG_IGN:
    # a batch shell started later could not trap SIGUSR1)
    assert signal.SIG_IGN not in {signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    help_text = cli.build_parser().format_help()
    assert "default job" in help_text and "IMPALA on CartPole-v1" in help_text


def test_the_tabular_layouts_and_qlearning_never_import_torch():
    """A tabular run stays torch-free (startup time and ~180 MiB per rank): the modules of
    every tabular layout and of Q-learning, imported in a fresh interpreter."""
    import subprocess
    import sys

    modules = [TOPOLOGIES[layout] for layout in ("ps", "allreduce", "sharded", "async")]
    code = (
        "import importlib, sys\n"
        f"for name in {modules + ['hpcrl.algos.qlearning', 'hpcrl.runner']!r}:\n"
        "    importlib.import_module(name)\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
