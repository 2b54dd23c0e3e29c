"""Unit tests without a launcher: Q-learning math, exploration, schedules, config, wire
schemas, checkpoints, run files, envs and greedy evaluation. Nothing here imports mpi4py."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpcrl.algos import qlearning
from hpcrl.algos.qlearning import boltzmann, epsilon_greedy, greedy_actions, q_learning_update
from hpcrl.comm.protocol import Schema, q_table_schema, tabular_experience_schema
from hpcrl.config import (
    DebugConfig,
    RunConfig,
    build_config,
    config_from_json,
    load_yaml,
    parse_override,
)
from hpcrl.envs import EnvStepper, discrete_sizes, make_env, make_vector_env
from hpcrl.errors import CheckpointError, ConfigError, UserError
from hpcrl.evaluation import greedy_episode_returns
from hpcrl.schedules import linear_schedule
from hpcrl.storage.checkpoints import (
    LATEST,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    remove_stale_temporaries,
    write_checkpoint,
)
from hpcrl.storage.runfile import RUN_FILE, RunFile, prepare_run_dir, read_status
from hpcrl.storage.trajectories import CHUNK_ROWS, TrajectoryWriter, tabular_fields

SEEDS = list(range(8))


# --------------------------------------------------------------------------- Q-learning update


def reference_update(q, obs, actions, rewards, next_obs, terminated, alpha, gamma):
    """Batched Watkins update from the definition, one transition at a time.

    Every TD error uses the pre-batch table; each distinct (s, a) moves by α times the mean
    of its copies' TD errors.
    """
    td_errors: dict[tuple[int, int], list[float]] = {}
    for s, a, r, s_next, term in zip(obs, actions, rewards, next_obs, terminated, strict=True):
        bootstrap = 0.0 if term else max(q[s_next, b] for b in range(q.shape[1]))
        td = r + gamma * bootstrap - q[s, a]
        td_errors.setdefault((int(s), int(a)), []).append(td)
    out = q.copy()
    for (s, a), tds in td_errors.items():
        out[s, a] = q[s, a] + alpha * (sum(tds) / len(tds))
    return out


def random_batch(rng, n_states, n_actions, batch):
    return (
        rng.integers(0, n_states, batch),
        rng.integers(0, n_actions, batch),
        rng.normal(size=batch),
        rng.integers(0, n_states, batch),
        rng.random(batch) < 0.3,
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_q_learning_update_matches_definition(seed):
    rng = np.random.default_rng(seed)
    n_states, n_actions, batch = 12, 4, 40  # 48 entries, 40 rows: duplicates and gaps
    q = rng.normal(size=(n_states, n_actions))
    obs, actions, rewards, next_obs, terminated = random_batch(rng, n_states, n_actions, batch)
    alpha, gamma = rng.uniform(0.05, 1.0), rng.uniform(0.0, 1.0)
    pairs = set(zip(obs.tolist(), actions.tolist(), strict=True))
    assert len(pairs) < batch  # the batch does hold duplicates

    expected = reference_update(q, obs, actions, rewards, next_obs, terminated, alpha, gamma)
    before = q.copy()
    q_learning_update(q, obs, actions, rewards, next_obs, terminated, alpha, gamma)

    np.testing.assert_allclose(q, expected, rtol=1e-12, atol=1e-12)
    untouched = np.ones_like(q, dtype=bool)
    for s, a in pairs:
        untouched[s, a] = False
    assert untouched.any()
    np.testing.assert_array_equal(q[untouched], before[untouched])


def test_duplicates_move_by_alpha_times_mean_td_error():
    q = np.zeros((2, 2))
    # Two copies of (0, 1) with TD errors 1 and 3 (terminated: no bootstrap).
    q_learning_update(
        q,
        np.array([0, 0]),
        np.array([1, 1]),
        np.array([1.0, 3.0]),
        np.array([1, 1]),
        np.array([True, True]),
        alpha=0.5,
        gamma=0.9,
    )
    assert q[0, 1] == pytest.approx(0.5 * 2.0)
    assert np.count_nonzero(q) == 1


def test_no_bootstrap_past_terminated_but_bootstrap_past_truncated():
    q = np.zeros((3, 2))
    q[2] = [10.0, 4.0]  # next state worth max 10
    alpha, gamma = 0.5, 0.9
    args = (np.array([0]), np.array([1]), np.array([1.0]), np.array([2]))

    terminated = q.copy()
    q_learning_update(terminated, *args, np.array([True]), alpha, gamma)
    assert terminated[0, 1] == pytest.approx(alpha * 1.0)

    truncated = q.copy()  # a time limit: terminated is False, so the bootstrap stays
    q_learning_update(truncated, *args, np.array([False]), alpha, gamma)
    assert truncated[0, 1] == pytest.approx(alpha * (1.0 + gamma * 10.0))


@pytest.mark.parametrize("seed", SEEDS)
def test_single_transition_is_watkins_update_exactly(seed):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(5, 4))
    s, a, s_next = int(rng.integers(5)), int(rng.integers(4)), int(rng.integers(5))
    r, term = float(rng.normal()), bool(seed % 2)
    alpha, gamma = 0.3, 0.95
    target = r + gamma * (0.0 if term else float(q[s_next].max()))
    expected = q.copy()
    expected[s, a] = q[s, a] + alpha * (target - q[s, a])

    q_learning_update(
        q,
        np.array([s]),
        np.array([a]),
        np.array([r]),
        np.array([s_next]),
        np.array([term]),
        alpha,
        gamma,
    )
    np.testing.assert_array_equal(q, expected)


def test_update_applies_to_a_non_contiguous_table():
    q = np.asfortranarray(np.zeros((3, 2)))
    q_learning_update(
        q,
        np.array([0]),
        np.array([1]),
        np.array([1.0]),
        np.array([2]),
        np.array([True]),
        alpha=0.5,
        gamma=0.9,
    )
    assert q[0, 1] == 0.5


# --------------------------------------------------------------------------- exploration


def test_epsilon_zero_is_always_greedy():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(500, 5))  # continuous values: no ties
    for _ in range(5):
        np.testing.assert_array_equal(epsilon_greedy(q, 0.0, rng), q.argmax(axis=1))


def test_epsilon_one_is_uniform():
    rng = np.random.default_rng(1)
    n, n_actions = 40_000, 4
    q = np.tile([0.0, 5.0, 1.0, 2.0], (n, 1))  # a clear greedy action that must not dominate
    counts = np.bincount(epsilon_greedy(q, 1.0, rng), minlength=n_actions)
    expected = n / n_actions
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 30.0, counts  # 3 dof: p < 1e-5 under uniform


def test_epsilon_half_mixes_greedy_and_uniform():
    rng = np.random.default_rng(2)
    n = 40_000
    q = np.tile([0.0, 5.0, 1.0, 2.0], (n, 1))
    frac_greedy = np.mean(epsilon_greedy(q, 0.5, rng) == 1)
    assert frac_greedy == pytest.approx(1 - 0.5 + 0.5 / 4, abs=0.015)


def test_greedy_actions_break_ties_uniformly_and_only_among_maxima():
    rng = np.random.default_rng(3)
    n = 20_000
    q = np.tile([1.0, 3.0, 3.0, 0.0, 2.999], (n, 1))
    actions = greedy_actions(q, rng)
    assert set(np.unique(actions).tolist()) == {1, 2}
    assert np.mean(actions == 1) == pytest.approx(0.5, abs=0.02)


def test_greedy_actions_per_row():
    rng = np.random.default_rng(4)
    q = np.array([[0.0, 1.0, 0.5], [2.0, -1.0, 0.0], [0.0, 0.0, 7.0]])
    for _ in range(20):
        np.testing.assert_array_equal(greedy_actions(q, rng), [1, 0, 2])


def softmax(x):
    z = np.exp(x - x.max())
    return z / z.sum()


@pytest.mark.parametrize("tau", [0.3, 1.0, 4.0])
def test_boltzmann_frequencies_match_softmax(tau):
    rng = np.random.default_rng(5)
    n = 100_000
    row = np.array([1.0, 2.0, 0.5, 1.5])
    freq = np.bincount(boltzmann(np.tile(row, (n, 1)), tau, rng), minlength=4) / n
    np.testing.assert_allclose(freq, softmax(row / tau), atol=0.01)


def test_boltzmann_rows_are_independent():
    rng = np.random.default_rng(6)
    n = 50_000
    q = np.zeros((2 * n, 3))
    q[:n] = [0.0, 1.0, 0.0]
    q[n:] = [2.0, 0.0, 0.0]
    actions = boltzmann(q, 0.5, rng)
    np.testing.assert_allclose(
        np.bincount(actions[:n], minlength=3) / n, softmax(q[0] / 0.5), atol=0.01
    )
    np.testing.assert_allclose(
        np.bincount(actions[n:], minlength=3) / n, softmax(q[n] / 0.5), atol=0.01
    )


def test_boltzmann_tiny_tau_is_greedy():
    rng = np.random.default_rng(7)
    q = np.tile([1.0, 1.1, 0.9, -3.0], (10_000, 1))
    np.testing.assert_array_equal(boltzmann(q, 1e-6, rng), 1)


def test_boltzmann_huge_tau_is_uniform():
    rng = np.random.default_rng(8)
    n = 40_000
    q = np.tile([0.0, 10.0, -5.0, 3.0], (n, 1))
    freq = np.bincount(boltzmann(q, 1e6, rng), minlength=4) / n
    np.testing.assert_allclose(freq, 0.25, atol=0.015)


def test_boltzmann_large_q_values_do_not_overflow():
    rng = np.random.default_rng(9)
    n = 50_000
    row = np.array([1e6, 1e6 - 0.01, 1e6 - 0.02, 0.0])
    tau = 0.01
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        actions = boltzmann(np.tile(row, (n, 1)), tau, rng)
    freq = np.bincount(actions, minlength=4) / n
    np.testing.assert_allclose(freq, softmax((row - row.max()) / tau), atol=0.01)
    assert freq[3] == 0.0


# --------------------------------------------------------------------------- schedules


def test_linear_schedule():
    assert linear_schedule(1.0, 0.1, 0.5, 0.0) == pytest.approx(1.0)
    assert linear_schedule(1.0, 0.1, 0.5, 0.25) == pytest.approx(0.55)
    assert linear_schedule(1.0, 0.1, 0.5, 0.5) == pytest.approx(0.1)
    assert linear_schedule(1.0, 0.1, 0.5, 1.0) == pytest.approx(0.1)
    assert linear_schedule(1.0, 0.1, 1.0, 1.0) == pytest.approx(0.1)
    assert linear_schedule(1.0, 0.1, 0.0, 0.0) == pytest.approx(0.1)
    assert linear_schedule(1.0, 0.1, 0.0, 0.7) == pytest.approx(0.1)


def test_linear_schedule_is_monotone_between_ends():
    values = [linear_schedule(2.0, 0.5, 0.6, p) for p in np.linspace(0.0, 1.0, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert values[0] == pytest.approx(2.0)
    assert values[-1] == pytest.approx(0.5)


# --------------------------------------------------------------------------- config


def single_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert message and "\n" not in message, message
    return message


def test_build_config_defaults():
    cfg = build_config({})
    assert cfg.run == RunConfig()
    assert cfg.algo == qlearning.Config()
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
    assert cfg.algo.layout == "allreduce"
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


# --------------------------------------------------------------------------- wire schemas


def byte_ranges(schema: Schema):
    for name, (offset, shape, dtype) in schema.fields.items():
        yield name, offset, offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def fill_pattern(view: np.ndarray, index: int) -> np.ndarray:
    """Values unique to field `index` (bools: a phase-shifted stripe)."""
    if view.dtype == np.bool_:
        return (np.arange(view.size) + index) % 3 == 0
    return (np.arange(view.size) + 1000 * (index + 1)).astype(view.dtype)


SCHEMAS = {
    "experience-5": tabular_experience_schema(5),
    "experience-1": tabular_experience_schema(1),
    "q-table-3x5": q_table_schema(3, 5),
    "odd": Schema(
        [
            ("flags", (3,), np.bool_),
            ("small", (5,), np.int8),
            ("f32", (3,), np.float32),
            ("scalar", (), np.int64),
            ("grid", (2, 3), np.int16),
            ("empty", (0,), np.float64),
            ("tail", (7,), np.uint8),
        ]
    ),
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_fields_are_aligned_and_disjoint(name):
    schema = SCHEMAS[name]
    ranges = sorted((start, end, field) for field, start, end in byte_ranges(schema))
    for start, _, field in ranges:
        assert start % 8 == 0, field
    for (_, end, field), (start, _, other) in zip(ranges, ranges[1:], strict=False):
        assert end <= start, (field, other)
    assert ranges[-1][1] <= schema.nbytes
    assert schema.nbytes % 8 == 0


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_message_views_do_not_overlap(name):
    schema = SCHEMAS[name]
    msg = schema.allocate()
    assert msg.buffer.nbytes == schema.nbytes
    patterns = {}
    for index, field in enumerate(schema.fields):
        view = msg[field]
        offset, shape, dtype = schema.fields[field]
        assert view.shape == shape and view.dtype == dtype
        assert view.ctypes.data % 8 == 0
        patterns[field] = fill_pattern(view, index).reshape(shape)
        view[...] = patterns[field]
    for field, pattern in patterns.items():
        np.testing.assert_array_equal(msg[field], pattern, err_msg=field)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_message_views_share_the_buffer(name):
    schema = SCHEMAS[name]
    sent = schema.allocate()
    for index, field in enumerate(schema.fields):
        sent[field][...] = fill_pattern(sent[field], index).reshape(sent[field].shape)
        if sent[field].size:
            assert np.shares_memory(sent[field], sent.buffer)
    received = schema.allocate()
    received.buffer[:] = sent.buffer  # what a buffer Recv does
    for field in schema.fields:
        np.testing.assert_array_equal(received[field], sent[field], err_msg=field)
    received.buffer[:] = 0
    for field in schema.fields:
        assert not received[field].any(), field


def test_schema_docstring_size():
    schema = Schema([("header", (4,), np.int64), ("q", (3, 2), np.float64)])
    assert schema.nbytes == 80
    assert schema.fields["q"][0] == 32


# --------------------------------------------------------------------------- checkpoints


def some_arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "q_table": rng.normal(size=(16, 4)),
        "visits": rng.integers(0, 100, size=(16, 4)),
        "flags": rng.random(5) < 0.5,
    }


def test_checkpoint_round_trip(tmp_path):
    arrays = some_arrays()
    meta = {"algo": "qlearning", "env_steps": 100, "policy_version": 7, "config": {"a": [1, 2]}}
    path = write_checkpoint(tmp_path, 100, arrays, meta, keep=3)
    assert path == tmp_path / "step-100.h5"
    loaded, loaded_meta = load_checkpoint(path)
    assert set(loaded) == set(arrays)
    for name, array in arrays.items():
        np.testing.assert_array_equal(loaded[name], array)
        assert loaded[name].dtype == array.dtype
    assert loaded_meta == {"format_version": 1, **meta}


def test_latest_points_to_newest_and_keep_prunes(tmp_path):
    for env_steps in (100, 200, 300):
        write_checkpoint(
            tmp_path, env_steps, some_arrays(env_steps), {"env_steps": env_steps}, keep=2
        )
        assert os.readlink(tmp_path / LATEST) == f"step-{env_steps}.h5"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-200.h5", "step-300.h5"]
    assert not (tmp_path / "step-100.h5").exists()
    assert not list(tmp_path.glob("*.tmp.*"))
    arrays, meta, path = load_latest(tmp_path)
    assert path == (tmp_path / "step-300.h5").resolve()
    assert meta == {"format_version": 1, "env_steps": 300}
    np.testing.assert_array_equal(arrays["q_table"], some_arrays(300)["q_table"])


def test_list_checkpoints_sorts_numerically(tmp_path):
    for env_steps in (1000, 20, 300):
        write_checkpoint(tmp_path, env_steps, some_arrays(), {}, keep=10)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "step-20.h5",
        "step-300.h5",
        "step-1000.h5",
    ]


def test_load_latest_without_link_uses_newest_step(tmp_path):
    write_checkpoint(tmp_path, 5, some_arrays(5), {"n": 5}, keep=3)
    write_checkpoint(tmp_path, 40, some_arrays(40), {"n": 40}, keep=3)
    (tmp_path / LATEST).unlink()
    _, meta, path = load_latest(tmp_path)
    assert meta == {"format_version": 1, "n": 40}
    assert path.name == "step-40.h5"


def test_load_checkpoint_rejects_truncated_file(tmp_path):
    path = write_checkpoint(tmp_path, 1, some_arrays(), {"x": 1}, keep=1)
    raw = path.read_bytes()
    damaged = tmp_path / "truncated.h5"
    damaged.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(damaged)
    assert "truncated.h5" in single_line(exc)


def test_load_checkpoint_rejects_flipped_data_byte(tmp_path):
    arrays = some_arrays()
    path = write_checkpoint(tmp_path, 1, arrays, {"x": 1}, keep=1)
    raw = bytearray(path.read_bytes())
    start = bytes(raw).find(arrays["q_table"].tobytes())
    assert start >= 0  # the table is stored contiguously, so its bytes are in the file
    raw[start + 77] ^= 0x10
    damaged = tmp_path / "flipped.h5"
    damaged.write_bytes(bytes(raw))
    with h5py.File(damaged, "r") as f:  # still a readable HDF5 file: only the data changed
        assert not np.array_equal(f["q_table"][()], arrays["q_table"])
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(damaged)
    assert "checksum" in single_line(exc)


def test_load_checkpoint_rejects_incomplete_file(tmp_path):
    path = tmp_path / "step-9.h5"
    with h5py.File(path, "w") as f:
        f["q_table"] = np.zeros((2, 2))
        f.attrs["meta"] = "{}"
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    assert "incomplete" in single_line(exc)


def test_load_checkpoint_missing_file(tmp_path):
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path / "step-1.h5")
    assert "step-1.h5" in single_line(exc)


def test_load_latest_on_empty_dir(tmp_path):
    with pytest.raises(CheckpointError) as exc:
        load_latest(tmp_path)
    assert "no checkpoint" in single_line(exc)


def test_remove_stale_temporaries(tmp_path):
    keep = write_checkpoint(tmp_path, 10, some_arrays(), {}, keep=3)
    stale = [tmp_path / "step-20.h5.tmp.1234", tmp_path / "latest.h5.tmp.99"]
    stale[0].write_bytes(b"half a checkpoint")
    os.symlink("step-20.h5", stale[1])  # a dangling link left mid-swap
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted(stale)
    for path in stale:
        assert not path.is_symlink() and not path.exists()
    assert keep.exists()
    assert (tmp_path / LATEST).is_symlink()
    assert remove_stale_temporaries(tmp_path) == []


# --------------------------------------------------------------------------- run file


def write_rank_trajectories(path: Path, first_obs: int, chunks: list[int]) -> dict:
    """Write `sum(chunks)` rows in appends of the given sizes; returns the columns written."""
    n = sum(chunks)
    rng = np.random.default_rng(first_obs)
    columns = {
        "obs": np.arange(first_obs, first_obs + n, dtype=np.int64),
        "action": rng.integers(0, 4, n),
        "reward": rng.normal(size=n),
        "next_obs": np.arange(first_obs + 1, first_obs + n + 1, dtype=np.int64),
        "terminated": rng.random(n) < 0.1,
        "truncated": rng.random(n) < 0.05,
        "env": rng.integers(0, 8, n).astype(np.int32),
    }
    writer = TrajectoryWriter(path, tabular_fields())
    done = 0
    for size in chunks:
        writer.append(**{k: v[done : done + size] for k, v in columns.items()})
        done += size
        if done == chunks[0]:
            writer.flush()
    assert writer.rows == n
    writer.close()
    return columns


def episode_rows(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "return": rng.normal(size=n),
        "length": rng.integers(1, 100, n),
        "env_steps": np.sort(rng.integers(0, 10_000, n)),
        "wall_time": np.sort(rng.random(n) * 10),
        "rank": rng.integers(0, 4, n).astype(np.int32),
    }


def test_run_file_with_trajectories(tmp_path):
    run_dir = tmp_path / "run"
    prepare_run_dir(run_dir, overwrite=False)
    assert (run_dir / "traj").is_dir() and (run_dir / "checkpoints").is_dir()

    run = RunFile(
        run_dir / RUN_FILE,
        {"algo": "qlearning", "env_id": "FrozenLake-v1", "world_size": 3, "config": "{}"},
    )
    assert read_status(run_dir) == "running"
    batches = [episode_rows(3, 0), episode_rows(2, 1)]
    for batch in batches:
        run.append_episodes(**batch)
    run.append_episodes(**episode_rows(0, 2))
    run.append_metrics({"env_steps": 100, "perf/env_steps_per_s": 12.5})
    run.append_metrics({"env_steps": 250, "perf/env_steps_per_s": 30.0})

    rank0 = write_rank_trajectories(
        run_dir / "traj" / "rank-0.h5", 0, [1000, 3000, 1000, 97]
    )  # crosses CHUNK_ROWS
    rank1 = write_rank_trajectories(run_dir / "traj" / "rank-1.h5", 100_000, [300])
    assert len(rank0["obs"]) > CHUNK_ROWS
    rows = {0: len(rank0["obs"]), 1: len(rank1["obs"]), 2: 0}
    run.link_trajectories({0: 10, 1: 10}, tabular_fields())  # an earlier flush, replaced
    run.link_trajectories(rows, tabular_fields())
    run.set_status("completed")
    run.close()

    with h5py.File(run_dir / RUN_FILE, "r") as f:
        assert f.attrs["status"] == "completed"
        assert f.attrs["algo"] == "qlearning" and f.attrs["world_size"] == 3
        assert "hpcrl_version" in f.attrs
        for name in batches[0]:
            expected = np.concatenate([b[name] for b in batches])
            np.testing.assert_array_equal(f["episodes"][name][()], expected, err_msg=name)
        np.testing.assert_array_equal(f["metrics/env_steps"][()], [100, 250])
        np.testing.assert_array_equal(f["metrics/perf/env_steps_per_s"][()], [12.5, 30.0])
        traj = f["trajectories"]
        np.testing.assert_array_equal(traj["ranks"][()], [0, 1])
        np.testing.assert_array_equal(traj["rows"][()], [rows[0], rows[1]])
        for name in tabular_fields():
            assert traj[name].is_virtual
            assert traj[name].shape == (rows[0] + rows[1],)
            expected = np.concatenate([rank0[name], rank1[name]])
            np.testing.assert_array_equal(traj[name][()], expected, err_msg=name)
    assert read_status(run_dir) == "completed"

    moved = tmp_path / "moved"  # relative source paths: the directory can move
    run_dir.rename(moved)
    with h5py.File(moved / RUN_FILE, "r") as f:
        np.testing.assert_array_equal(f["trajectories/obs"][-300:], rank1["obs"])


def test_run_file_rejects_bad_columns_and_status(tmp_path):
    run = RunFile(tmp_path / RUN_FILE, {})
    try:
        rows = episode_rows(2, 0)
        del rows["rank"]
        with pytest.raises(ValueError):
            run.append_episodes(**rows)
        with pytest.raises(ValueError):
            run.set_status("done")
    finally:
        run.close()


def test_prepare_run_dir_refuses_then_overwrites(tmp_path):
    run_dir = tmp_path / "run"
    prepare_run_dir(run_dir, overwrite=False)
    RunFile(run_dir / RUN_FILE, {}).close()
    (run_dir / "traj" / "rank-0.h5").write_bytes(b"old")
    (run_dir / "checkpoints" / "step-1.h5").write_bytes(b"old")
    (run_dir / "notes.txt").write_text("keep me")

    with pytest.raises(UserError) as exc:
        prepare_run_dir(run_dir, overwrite=False)
    assert "--overwrite" in single_line(exc)
    assert (run_dir / RUN_FILE).exists()

    prepare_run_dir(run_dir, overwrite=True)
    assert not (run_dir / RUN_FILE).exists()
    assert list((run_dir / "traj").iterdir()) == []
    assert list((run_dir / "checkpoints").iterdir()) == []
    assert (run_dir / "notes.txt").read_text() == "keep me"
    assert read_status(run_dir) is None


def test_prepare_run_dir_refuses_a_file(tmp_path):
    path = tmp_path / "not-a-dir"
    path.write_text("")
    with pytest.raises(UserError) as exc:
        prepare_run_dir(path, overwrite=True)
    assert "not a directory" in single_line(exc)


# --------------------------------------------------------------------------- envs


def test_make_env_unknown_id():
    with pytest.raises(UserError) as exc:
        make_env("NoSuch-v0")
    assert "'NoSuch-v0'" in single_line(exc)


def test_make_env_suggests_close_ids():
    with pytest.raises(UserError) as exc:
        make_env("FrozenLake-v2")
    assert "'FrozenLake-v1'" in single_line(exc)


def test_make_env_rejected_kwargs():
    with pytest.raises(UserError) as exc:
        make_env("FrozenLake-v1", {"bogus_kwarg": 1})
    assert "bogus_kwarg" in single_line(exc)


def test_discrete_sizes():
    env = make_env("CartPole-v1")
    try:
        with pytest.raises(UserError) as exc:
            discrete_sizes(env)
        assert "Box" in single_line(exc)
    finally:
        env.close()
    env = make_env("FrozenLake-v1")
    try:
        assert discrete_sizes(env) == (16, 4)
    finally:
        env.close()


FROZEN_LAKE_HOLES = {5, 7, 11, 12}
FROZEN_LAKE_GOAL = 15


def test_env_stepper_bookkeeping():
    num_envs, steps = 4, 2000
    stepper = EnvStepper(make_vector_env("FrozenLake-v1", {"is_slippery": False}, num_envs), seed=0)
    rng = np.random.default_rng(0)
    finished_lengths = np.zeros(num_envs, dtype=np.int64)
    running_return = np.zeros(num_envs)
    ends = {"goal": 0, "hole": 0}
    previous = None
    try:
        for _ in range(steps):
            batch = stepper.step(rng.integers(0, 4, num_envs))
            if previous is not None:  # transitions chain, and a finished copy restarts at 0
                expected_obs = np.where(
                    previous.terminated | previous.truncated, 0, previous.next_obs
                )
                np.testing.assert_array_equal(batch.obs, expected_obs)
            done = batch.terminated | batch.truncated
            np.testing.assert_array_equal(batch.done_envs, np.flatnonzero(done))
            np.testing.assert_array_equal(batch.rewards == 1.0, batch.next_obs == FROZEN_LAKE_GOAL)
            assert set(np.unique(batch.rewards).tolist()) <= {0.0, 1.0}
            for k in np.flatnonzero(batch.terminated):
                assert batch.next_obs[k] in FROZEN_LAKE_HOLES | {FROZEN_LAKE_GOAL}
                ends["goal" if batch.next_obs[k] == FROZEN_LAKE_GOAL else "hole"] += 1
            for k in np.flatnonzero(~batch.terminated):
                assert batch.next_obs[k] not in FROZEN_LAKE_HOLES | {FROZEN_LAKE_GOAL}
            running_return += batch.rewards
            np.testing.assert_array_equal(batch.episode_returns, running_return[batch.done_envs])
            running_return[batch.done_envs] = 0.0
            for k, length in zip(batch.done_envs, batch.episode_lengths, strict=True):
                if batch.truncated[k]:
                    assert length == 100  # FrozenLake-v1's time limit
                finished_lengths[k] += length
            previous = batch
        np.testing.assert_array_equal(finished_lengths + stepper.lengths, steps)
        np.testing.assert_array_equal(stepper.returns, running_return)
        assert ends["goal"] > 0 and ends["hole"] > 0  # both kinds of ending were exercised
    finally:
        stepper.close()


# --------------------------------------------------------------------------- evaluation


def frozen_lake_optimal_q(gamma: float = 0.99, sweeps: int = 500) -> np.ndarray:
    """Q* of slippery FrozenLake 4x4 by value iteration over the env's own transition table."""
    env = make_env("FrozenLake-v1")
    transitions = env.unwrapped.P
    env.close()
    q = np.zeros((16, 4))
    for _ in range(sweeps):
        v = q.max(axis=1)
        for s in range(16):
            for a in range(4):
                q[s, a] = sum(
                    p * (r + gamma * (0.0 if term else v[s2]))
                    for p, s2, r, term in transitions[s][a]
                )
    return q


def test_greedy_returns_do_not_depend_on_the_split():
    q = frozen_lake_optimal_q()
    ids = np.arange(20)
    together = greedy_episode_returns("FrozenLake-v1", {}, q, ids, seed=11)
    evens = greedy_episode_returns("FrozenLake-v1", {}, q, ids[0::2], seed=11)
    odds = greedy_episode_returns("FrozenLake-v1", {}, q, ids[1::2], seed=11)
    reassembled = np.empty(len(ids))
    reassembled[0::2], reassembled[1::2] = evens, odds
    np.testing.assert_array_equal(reassembled, together)
    reversed_ids = greedy_episode_returns("FrozenLake-v1", {}, q, ids[::-1], seed=11)
    np.testing.assert_array_equal(reversed_ids[::-1], together)
    # A slippery lake under a good policy: some episodes reach the goal, some do not.
    assert set(together.tolist()) == {0.0, 1.0}


# --------------------------------------------------------- fixes found in review


def test_greedy_evaluation_of_a_looping_policy_ends():
    """CliffWalking has no time limit; an all-zero table keeps choosing UP at the start and
    never terminates, so evaluation must cut each episode at `max_episode_steps`."""
    q_table = np.zeros((48, 4))
    returns = greedy_episode_returns(
        "CliffWalking-v1", {}, q_table, np.arange(2), 0, max_episode_steps=50
    )
    assert returns.tolist() == [-50.0, -50.0]


def test_prepare_run_dir_refuses_leftover_checkpoints(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step-100.h5").write_bytes(b"someone else's")
    with pytest.raises(UserError, match="--overwrite"):
        prepare_run_dir(tmp_path, overwrite=False)
    assert (tmp_path / "checkpoints" / "step-100.h5").exists()
    prepare_run_dir(tmp_path, overwrite=True)
    assert not any((tmp_path / "checkpoints").iterdir())


def test_prepare_run_dir_unusable_path_is_a_user_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot be used"):
        prepare_run_dir(tmp_path / "file" / "run", overwrite=False)


def test_run_file_is_never_created_over_an_existing_one(tmp_path):
    RunFile(tmp_path / RUN_FILE, {"algo": "qlearning"}).close()
    with pytest.raises(FileExistsError):
        RunFile(tmp_path / RUN_FILE, {"algo": "qlearning"})


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


def test_trajectory_writer_rejects_missing_columns(tmp_path):
    writer = TrajectoryWriter(tmp_path / "t.h5", tabular_fields())
    with pytest.raises(ValueError, match="env"):
        writer.append(obs=np.zeros(2, dtype=np.int64))
    writer.close()
