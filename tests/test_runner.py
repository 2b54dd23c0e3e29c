"""`hpcrl.runner` pieces that need no launcher."""

from __future__ import annotations

import numpy as np

from hpcrl.runner import solved_line


def _episodes(returns) -> dict:
    n = len(returns)
    return {
        "return": np.asarray(returns, dtype=np.float64),
        "env_steps": np.arange(1, n + 1) * 100,
        "wall_time": np.arange(1, n + 1) * 0.5,
    }


def test_solved_line_shows_a_small_threshold_s_mean_without_rounding_it_below():
    """FrozenLake8x8's threshold is 0.85: a mean of 0.85 must not print as 0.8."""
    line = solved_line(_episodes([0.0] * 30 + [1.0] * 17 + [0.0] * 3), "FrozenLake8x8-v1")
    assert line.startswith("reached a mean return of 0.85 >= 0.85"), line
    assert "4,700 env steps" in line


def test_solved_line_when_not_reached_gives_the_best_window():
    line = solved_line(_episodes([100.0] * 25), "CartPole-v1")
    assert line == (
        "did not reach CartPole-v1's reward threshold 475: best mean return over 20 "
        "training episodes 100"
    )


def _reporter(stop_at_return):
    """A rank-0 Reporter over a stub context and run file (no MPI, no file)."""
    from types import SimpleNamespace

    from hpcrl.topologies.reporting import Reporter

    written = []
    run = SimpleNamespace(stop_at_return=stop_at_return, tensorboard=False, total_env_steps=10**6)
    ctx = SimpleNamespace(
        cfg=SimpleNamespace(run=run),
        run_file=SimpleNamespace(append_episodes=lambda **columns: written.append(columns)),
        resume=None,
        reporter=None,
    )
    return Reporter(ctx), ctx, written


def _rows(returns, first_env_steps):
    """(n, 5) episode rows: return, length, env steps (100 apart), wall time, rank."""
    n = len(returns)
    rows = np.zeros((n, 5))
    rows[:, 0] = returns
    rows[:, 2] = first_env_steps + 100 * np.arange(n)
    return rows


def test_reporter_marks_solved_where_the_first_20_episode_window_reaches_stop_at_return():
    """The first window reaching 150 spans two batches of rows: the first batch's 20
    episodes average 140, as does the window ending at the 21st; the one ending at the
    22nd (the second batch's second row, at 2,200 env steps) averages
    (16*100 + 2*500 + 100 + 500)/20 = 160."""
    reporter, ctx, written = _reporter(150.0)
    assert ctx.reporter is reporter and not reporter.solved
    reporter.add_episodes(_rows([100.0] * 18 + [500.0] * 2, 100))
    assert not reporter.solved  # mean 140
    reporter.add_episodes(_rows([100.0, 500.0, 500.0, 100.0], 2100))
    assert reporter.solved_at == (2200, 160.0)
    reporter.add_episodes(_rows([500.0] * 30, 2500))
    assert reporter.solved_at == (2200, 160.0)  # the first crossing is kept
    assert sum(len(columns["return"]) for columns in written) == 54  # every row written


def test_episode_columns_sort_stably_by_env_steps_and_cast_each_column():
    """Rows of two ranks, each in order, come out by env steps, rank 0's before rank 1's
    within a step and each rank's in its own order; rows already in order are unchanged.
    The integer columns get their dtypes with their exact values."""
    from hpcrl.storage.runfile import EPISODE_FIELDS
    from hpcrl.topologies.reporting import episode_columns

    def rank_rows(rank, steps):
        rows = np.zeros((len(steps), 5))
        rows[:, 0] = [10 * rank + i for i in range(len(steps))]  # return: identifies a row
        rows[:, 1] = 2**40 + np.arange(len(steps))  # length: exact beyond int32
        rows[:, 2] = steps
        rows[:, 3] = 0.25
        rows[:, 4] = rank
        return rows

    gathered = np.concatenate([rank_rows(0, [100, 200, 200, 300]), rank_rows(1, [200, 300])])
    columns = episode_columns(gathered)
    assert list(columns) == list(EPISODE_FIELDS)
    assert [columns[name].dtype for name in columns] == [
        np.dtype(t) for t in EPISODE_FIELDS.values()
    ]
    np.testing.assert_array_equal(columns["env_steps"], [100, 200, 200, 200, 300, 300])
    np.testing.assert_array_equal(columns["return"], [0, 1, 2, 10, 3, 11])
    np.testing.assert_array_equal(columns["rank"], [0, 0, 0, 1, 0, 1])
    assert columns["length"][3] == 2**40  # rank 1's first row, exact
    in_order = episode_columns(rank_rows(0, [100, 200, 200, 300]))
    np.testing.assert_array_equal(in_order["return"], [0, 1, 2, 3])
    assert all(column.flags.c_contiguous for column in in_order.values())


def test_reporter_without_stop_at_return_never_marks_solved():
    reporter, _, _ = _reporter(None)
    reporter.add_episodes(_rows([500.0] * 40, 100))
    assert not reporter.solved


def test_stop_at_return_ends_training_early_as_a_completed_run(tmp_path):
    """One process of A2C on CartPole-v1: a random policy's 20-episode mean is ~22, so a
    target of 40 is reached long before the 200,000 env-step budget. The run then stops
    at a sync point, is `completed` and evaluated, with fewer env steps than its budget."""
    import h5py
    from mpi4py import MPI

    from hpcrl import runner
    from hpcrl.storage import space

    values = {
        "algo": "a2c",
        "env_id": "CartPole-v1",
        "total_env_steps": 200_000,
        "num_envs": 8,
        "stop_at_return": 40.0,
        "eval_episodes": 4,
        "log_interval_s": 0.2,
        "record_trajectories": False,
    }
    outcome = runner.train(MPI.COMM_SELF, values, str(tmp_path / "run"))
    assert outcome.status == "completed" and outcome.result["episodes"] == 4
    with h5py.File(tmp_path / "run" / "run.h5", "r") as f:
        assert f.attrs["status"] == "completed"
        steps = int(f["metrics/env_steps"][-1])
        returns = f["episodes/return"][()]
    assert steps < 200_000
    assert np.convolve(returns, np.ones(20) / 20, mode="valid").max() >= 40.0
    assert not (tmp_path / "run" / space.RESERVE_NAME).exists()  # freed at the end


def test_episode_rows_count_what_they_hold():
    """`EpisodeRows.pending` (each rank's vote, `Vote.EPISODES`) counts the rows added
    either way and is back to 0 once they are taken."""
    from hpcrl.topologies.reporting import EpisodeRows

    episodes = EpisodeRows()
    episodes.add(np.arange(3.0), np.ones(3), 100, 0.5, 0)
    episodes.add(np.zeros(0), np.zeros(0), 200, 0.5, 0)  # no episode ended
    episodes.add_rows(np.zeros((4, 5)))
    assert episodes.pending == 7 and len(episodes.chunks) == 2
    assert episodes.take().shape == (7, 5)
    assert episodes.pending == 0 and episodes.chunks == []


def test_warm_env_leaves_the_generated_map_made_and_errors_to_rank_0():
    """`_warm_env` (a rank other than 0, while rank 0 probes the env) makes the env once,
    so a generated map is in this process's cache when training starts; an env that
    cannot be made raises nothing there (rank 0's probe says why)."""
    from hpcrl import frozen_lake
    from hpcrl.config import build_config
    from hpcrl.runner import _warm_env

    kwargs = {"size": 12, "p": 0.8, "map_seed": 123457}
    frozen_lake._seeded_map.cache_clear()
    _warm_env(
        build_config({"algo": "qlearning", "env_id": frozen_lake.ENV_ID, "env_kwargs": kwargs})
    )
    assert frozen_lake._seeded_map.cache_info().currsize == 1
    _warm_env(build_config({"algo": "qlearning", "env_id": "NoSuchEnv-v9"}))
