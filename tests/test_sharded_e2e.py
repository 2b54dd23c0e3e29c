"""The `sharded` layout through the real CLI: a run interrupted on 4 ranks and resumed on
2 (the shards redistributed) completes its exact budget; the memory cap refuses a table
that does not fit one rank in one line and lets four ranks run it; `evaluate` (1 and 2
ranks) and `hpcrl.load_policy` read the greedy actions from the shard files; `n_step`
where it cannot run (a one-step layout, an `async` merge inside a rollout) is one line.
(Bit-exact resume on the same world size, `sharded` and `async`:
`tests/test_exact_resume_e2e.py`; optimality: `tests/test_policies.py`.)"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from conftest import one_error_line, run_hpcrl, train_until_interrupted

pytestmark = pytest.mark.e2e

ARGS = [
    "--set",
    "layout=sharded",
    "--set",
    "vector_env=table",
    "--set",
    "eval_episodes=200",
    "--set",
    "log_interval_s=0.5",
]
QUARTER = 64 * 4 * 8 // 4  # FrozenLake 8x8: 64 states x 4 actions of float64, on 4 ranks


def _shards(run_dir):
    ckpt = run_dir / "checkpoints"
    with h5py.File(ckpt / "latest.h5", "r") as f:
        meta = json.loads(f.attrs["meta"])
    step = (ckpt / "latest.h5").resolve()
    names = sorted(p.name for p in ckpt.glob(f"{step.stem}.shard-*.h5"))
    return meta, names


def test_interrupted_on_4_ranks_resumed_on_2_completes_the_budget(tmp_path, cli_env):
    budget = 1_200_000
    run_dir = tmp_path / "run"
    train_until_interrupted(
        cli_env,
        4,
        *("--run-dir", str(run_dir), "--total-env-steps", str(budget), *ARGS),
        after_env_steps=budget // 4 // 3,
    )
    meta, names = _shards(run_dir)
    assert meta["shards"] == 4 and 0 < meta["env_steps"] < budget
    assert names == [f"step-{meta['env_steps']}.shard-{k}.h5" for k in range(4)]

    done = run_hpcrl(cli_env, 2, "train", "--resume", str(run_dir))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "not bit-exact" in done.stdout  # another world size: a new segment
    meta, names = _shards(run_dir)
    assert meta["shards"] == 2 and meta["env_steps"] == budget
    assert len(names) == 2
    with h5py.File(run_dir / "run.h5", "r") as f:
        assert str(f.attrs["status"]) == "completed"
        assert int(f["episodes"]["env_steps"][-1]) <= budget
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["mean_return"] >= 0.7  # the optimum is about 0.87

    # evaluate and load_policy read the greedy actions from the two shard files; on 2
    # ranks rank 0 broadcasts them, and the episodes are the same
    results = []
    for ranks in (1, 2):
        evaluated = run_hpcrl(cli_env, ranks, "evaluate", str(run_dir), "--episodes", "200")
        assert evaluated.returncode == 0, evaluated.stderr
        results.append(json.loads(evaluated.stdout))
    assert results[0] == results[1]
    assert results[0]["mean_return"] >= 0.7
    from hpcrl import load_policy

    policy = load_policy(run_dir)
    table = np.zeros((64, 4))
    for k in range(2):
        with h5py.File(run_dir / "checkpoints" / names[k], "r") as f:
            table[k::2] = f["q_shard"][()]
    assert np.array_equal(policy.act(np.arange(64)), table.argmax(axis=1))
    assert policy.act(np.arange(64)).dtype == np.int64
    # no process holds the table: the policy is (S,) int32 actions
    assert not hasattr(policy._greedy, "q_table")
    assert policy._greedy.actions.dtype == np.int32


def test_the_cap_refuses_one_rank_in_one_line_and_four_ranks_run(tmp_path, cli_env):
    args = [*ARGS, "--set", f"max_table_bytes_per_rank={QUARTER}", "--total-env-steps", "40000"]
    one = run_hpcrl(cli_env, 1, "train", "--run-dir", str(tmp_path / "one"), *args)
    assert one.returncode == 2
    one_error_line(
        one.stdout,
        one.stderr,
        [rf"max_table_bytes_per_rank={QUARTER}\b", r"on 1 ranks", r"at least 4 ranks"],
        one.stdout + one.stderr,
    )
    assert not (tmp_path / "one").exists()
    four = run_hpcrl(cli_env, 4, "train", "--run-dir", str(tmp_path / "four"), *args)
    assert four.returncode == 0, four.stderr
    _, names = _shards(tmp_path / "four")
    for name in names:  # every shard a quarter of the table
        with h5py.File(tmp_path / "four" / "checkpoints" / name, "r") as f:
            assert f["q_shard"].nbytes == QUARTER


@pytest.mark.parametrize(
    ("sets", "patterns"),
    [
        (["layout=ps", "n_step=3"], [r"n_step=3", r"layout 'ps'", r"need layout async"]),
        (["layout=async", "n_step=3"], [r"'sync_interval': got 64", r"multiple of n_step=3"]),
        (["layout=async", "n_step=0"], [r"'n_step': got 0", r"integer >= 1"]),
    ],
)
def test_n_step_where_it_cannot_run_is_one_line(tmp_path, cli_env, sets, patterns):
    args = [arg for s in sets for arg in ("--set", s)]
    done = run_hpcrl(cli_env, 2, "train", "--run-dir", str(tmp_path / "run"), *args)
    assert done.returncode == 2
    one_error_line(done.stdout, done.stderr, patterns, done.stdout + done.stderr)
    assert not (tmp_path / "run").exists()


def test_a_million_states_train_on_4_ranks_under_a_quarter_cap_and_not_on_one(tmp_path, cli_env):
    """Acceptance 4 of issue 16: a generated FrozenLake of 1000 x 1000 cells (10^6 states,
    a 32 MB table; `hpcrl/FrozenLake-v0` builds no transition table) with a per-rank cap
    of a quarter of the table: refused on one rank in one line, trained on four, each
    shard exactly the cap. Peak memory per rank: `benchmarks/tabular_scale.py --million`."""
    cap = 10**6 * 4 * 8 // 4
    env_kwargs = json.dumps({"size": 1000, "p": 0.8, "map_seed": 3, "max_episode_steps": 2000})
    args = [
        "--env",
        "hpcrl/FrozenLake-v0",
        "--env-kwargs",
        env_kwargs,
        "--total-env-steps",
        "200000",
        *ARGS,
        "--set",
        f"max_table_bytes_per_rank={cap}",
        "--set",
        "num_envs=256",
        "--set",
        "eval_episodes=4",
        "--set",
        "record_trajectories=false",
    ]
    one = run_hpcrl(cli_env, 1, "train", "--run-dir", str(tmp_path / "one"), *args)
    assert one.returncode == 2
    one_error_line(
        one.stdout,
        one.stderr,
        [rf"max_table_bytes_per_rank={cap}\b", r"1000000 states x 4 actions", r"at least 4"],
        one.stdout + one.stderr,
    )
    four = run_hpcrl(cli_env, 4, "train", "--run-dir", str(tmp_path / "four"), *args)
    assert four.returncode == 0, four.stdout + four.stderr
    meta, names = _shards(tmp_path / "four")
    assert meta["env_steps"] == 200_000 and meta["shapes"]["q_table"] == [10**6, 4]
    for name in names:
        with h5py.File(tmp_path / "four" / "checkpoints" / name, "r") as f:
            assert f["q_shard"].nbytes == cap
