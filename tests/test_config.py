"""`hpcrl.config`: defaults, YAML files, `--set` overrides, one-line validation errors."""

from __future__ import annotations

import dataclasses

import pytest

from conftest import single_line
from hpcrl.algos import qlearning
from hpcrl.config import (
    DebugConfig,
    RunConfig,
    build_config,
    config_from_json,
    load_yaml,
    parse_override,
)
from hpcrl.errors import ConfigError


def test_build_config_defaults():
    cfg = build_config({})
    assert cfg.run == RunConfig()
    assert cfg.algo == qlearning.QLearningConfig()
    assert cfg.run.debug == DebugConfig()
    assert cfg.run.algo == "qlearning"
    assert cfg.run.env_id == "FrozenLake8x8-v1"
    assert cfg.algo.alpha == 0.1
    assert cfg.run.debug.fail_rank == -1


def test_load_yaml_flattens_and_builds(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "alpha: 0.5\n"
        "layout: allreduce\n"
        "num_envs: 8\n"
        "total_env_steps: 1000\n"
        "env_kwargs:\n"
        "  is_slippery: false\n"
        "debug:\n"
        "  fail_rank: 2\n"
        "  fail_after_env_steps: 100\n"
    )
    values = load_yaml(path)
    assert values == {
        "alpha": 0.5,
        "layout": "allreduce",
        "num_envs": 8,
        "total_env_steps": 1000,
        "env_kwargs": {"is_slippery": False},
        "debug.fail_rank": 2,
        "debug.fail_after_env_steps": 100,
    }
    cfg = build_config(values)
    assert cfg.algo.alpha == 0.5
    assert cfg.layout == "allreduce"
    assert cfg.run.num_envs == 8
    assert cfg.run.env_kwargs == {"is_slippery": False}
    assert cfg.run.debug.fail_rank == 2
    assert cfg.run.debug.fail_after_env_steps == 100


def test_load_yaml_empty_file_is_empty(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_yaml(path) == {}


def test_load_yaml_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_yaml(tmp_path / "missing.yaml")
    assert "missing.yaml" in single_line(exc)

    bad = tmp_path / "bad.yaml"
    bad.write_text("alpha: [0.1,\n  gamma: : 3\n")
    with pytest.raises(ConfigError) as exc:
        load_yaml(bad)
    assert "not valid YAML" in single_line(exc)

    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError) as exc:
        load_yaml(listing)
    assert "mapping" in single_line(exc)


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ("alpha=0.5", "alpha", 0.5),
        ("num_envs=8", "num_envs", 8),
        ("record_trajectories=false", "record_trajectories", False),
        ("layout=allreduce", "layout", "allreduce"),
        ("debug.fail_rank=2", "debug.fail_rank", 2),
        ("env_kwargs={is_slippery: false}", "env_kwargs", {"is_slippery": False}),
        (" seed = 3 ", "seed", 3),
    ],
)
def test_parse_override_types(text, key, value):
    parsed_key, parsed = parse_override(text)
    assert parsed_key == key
    assert parsed == value
    assert type(parsed) is type(value)


def test_parse_override_needs_equals():
    with pytest.raises(ConfigError) as exc:
        parse_override("alpha")
    assert "KEY=VALUE" in single_line(exc)


def test_overrides_build_a_config():
    cfg = build_config(dict(parse_override(t) for t in ["alpha=1", "debug.fail_rank=3"]))
    assert cfg.algo.alpha == 1.0 and isinstance(cfg.algo.alpha, float)
    assert cfg.run.debug.fail_rank == 3


@pytest.mark.parametrize(
    ("key", "closest"),
    [("alpah", "alpha"), ("num_env", "num_envs"), ("debug.fail_rnak", "debug.fail_rank")],
)
def test_unknown_key_suggests_closest(key, closest):
    with pytest.raises(ConfigError) as exc:
        build_config({key: 1})
    message = single_line(exc)
    assert f"'{key}'" in message
    assert f"did you mean '{closest}'" in message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("alpha", "abc"),
        ("alpha", True),
        ("gamma", [0.9]),
        ("num_envs", 1.5),
        ("num_envs", True),
        ("total_env_steps", "100"),
        ("record_trajectories", 1),
        ("layout", 3),
        ("env_kwargs", [1, 2]),
        ("debug.fail_rank", 0.5),
        ("alpha", float("nan")),
    ],
)
def test_wrong_type_names_the_key(key, value):
    with pytest.raises(ConfigError) as exc:
        build_config({key: value})
    assert f"'{key}'" in single_line(exc)


def test_integral_float_is_accepted_for_int():
    assert build_config({"num_envs": 8.0}).run.num_envs == 8
    assert isinstance(build_config({"num_envs": 8.0}).run.num_envs, int)


def test_exponent_notation_override_is_accepted():
    key, value = parse_override("total_env_steps=1e6")
    assert build_config({key: value}).run.total_env_steps == 1_000_000


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("alpha", 0.0),
        ("alpha", 1.5),
        ("alpha_end", 0.0),
        ("gamma", -0.1),
        ("gamma", 1.1),
        ("epsilon_start", 1.5),
        ("tau_start", 0.0),
        ("tau_end", -1.0),
        ("epsilon_decay_fraction", 1.2),
        ("sync_interval", 0),
        ("total_env_steps", 0),
        ("total_env_steps", -1),
        ("num_envs", 0),
        ("seed", -1),
        ("keep_checkpoints", 0),
        ("watchdog_s", 0.0),
        ("layout", "pss"),
        ("exploration", "softmax"),
        ("env_id", ""),
        ("debug.fail_after_env_steps", -5),
        ("debug.preempt_after_env_steps", -1),
    ],
)
def test_out_of_range_names_the_key(key, value):
    with pytest.raises(ConfigError) as exc:
        build_config({key: value})
    message = single_line(exc)
    assert f"'{key}'" in message
    assert repr(value) in message


def test_in_range_edges_are_accepted():
    cfg = build_config({"alpha": 1.0, "gamma": 0.0, "epsilon_decay_fraction": 0.0})
    assert (cfg.algo.alpha, cfg.algo.gamma) == (1.0, 0.0)
    assert build_config({"gamma": 1.0}).algo.gamma == 1.0


def test_unknown_algo():
    with pytest.raises(ConfigError) as exc:
        build_config({"algo": "qlearnin"})
    message = single_line(exc)
    assert "'qlearnin'" in message
    assert "did you mean 'qlearning'" in message


def test_config_json_round_trip():
    cfg = build_config(
        {
            "alpha": 0.3,
            "layout": "allreduce",
            "exploration": "boltzmann",
            "env_id": "FrozenLake-v1",
            "env_kwargs": {"is_slippery": False, "map_name": "4x4"},
            "num_envs": 5,
            "debug.fail_rank": 1,
            "debug.fail_after_env_steps": 7,
        }
    )
    text = cfg.to_json()
    again = config_from_json(text)
    assert again == cfg
    assert again.to_json() == text
    assert again.run.debug.fail_rank == 1
    assert dataclasses.asdict(again.algo)["exploration"] == "boltzmann"


@pytest.mark.parametrize(
    "values,key",
    [
        ({"algo": [1]}, "algo"),
        ({"total_env_steps": 10**20}, "total_env_steps"),
    ],
)
def test_config_rejects_non_string_algo_and_huge_budgets(values, key):
    with pytest.raises(ConfigError, match=key):
        build_config(values)


def _shipped_configs() -> list:
    from pathlib import Path

    from hpcrl.config import DEFAULT_JOB

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    return [("default job", dict(DEFAULT_JOB))] + [(p.name, load_yaml(p)) for p in configs]


@pytest.mark.parametrize("name, values", _shipped_configs(), ids=lambda v: str(v)[:40])
def test_shipped_configs_checkpoint_often(name, values):
    """Issue 18, case 6: a hard kill (no signal to checkpoint on) loses at most a few
    minutes or a few percent of the budget; the IMPALA config checkpointed every 600 s,
    so a kill in its first ten minutes lost the whole run."""
    run = build_config(values).run
    by_time = 0 < run.checkpoint_interval_s <= 300
    by_steps = 0 < run.checkpoint_interval_env_steps <= 0.05 * run.total_env_steps
    assert by_time or by_steps, (name, run.checkpoint_interval_s, run.checkpoint_interval_env_steps)


def test_stop_at_return_is_a_number_or_null():
    assert build_config({"stop_at_return": 475}).run.stop_at_return == 475.0
    assert build_config({"stop_at_return": None}).run.stop_at_return is None
    with pytest.raises(ConfigError) as exc:
        build_config({"stop_at_return": "solved"})
    assert "stop_at_return" in single_line(exc) and "'solved'" in single_line(exc)
