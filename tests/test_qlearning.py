"""Tabular Q-learning (`hpcrl.algos.qlearning`): the update against its definition, ε-greedy,
greedy tie-breaking and Boltzmann exploration."""

from __future__ import annotations

import numpy as np
import pytest

from hpcrl.algos.qlearning import boltzmann, epsilon_greedy, greedy_actions, q_learning_update

SEEDS = list(range(8))


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
