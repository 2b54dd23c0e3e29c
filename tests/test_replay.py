"""`hpcrl.replay`: the sum tree's sampling against brute-force proportional sampling
(chi-square), its sums exact after any updates, the importance weights against Schaul
et al. 2016's formula, FIFO eviction, and a buffer's state round trip."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from hpcrl.replay import (
    NStepTransitions,
    PrioritizedReplay,
    SumTree,
    actor_epsilons,
    importance_weights,
)


def brute_force_find(leaves: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The first leaf whose running sum exceeds each value (the definition)."""
    return np.searchsorted(np.cumsum(leaves), values, side="right")


@pytest.mark.parametrize("capacity", [1, 2, 5, 8, 1000])
def test_find_matches_the_running_sum(capacity):
    rng = np.random.default_rng(capacity)
    tree = SumTree(capacity)
    leaves = rng.integers(0, 5, capacity).astype(np.float64)  # zeros included
    leaves[0] = max(leaves[0], 1.0)
    tree.update(np.arange(capacity), leaves)
    values = rng.random(2000) * leaves.sum()
    np.testing.assert_array_equal(tree.find(values), brute_force_find(leaves, values))
    assert (tree.leaves(tree.find(values)) > 0).all()


def test_sampling_distribution_matches_proportional_sampling_chi_square():
    """200,000 draws from a tree of 50 leaves (some 0) against p_i / Σp: chi-square over
    the positive leaves, and no draw of a zero leaf; the same test on the brute-force
    sampler as a control."""
    rng = np.random.default_rng(0)
    leaves = rng.gamma(0.7, size=50)
    leaves[[3, 17, 40]] = 0.0
    tree = SumTree(50)
    tree.update(np.arange(50), leaves)
    probabilities = leaves / leaves.sum()
    positive = probabilities > 0
    draws = np.concatenate([tree.sample(1000, rng) for _ in range(200)])
    brute = rng.choice(50, size=len(draws), p=probabilities)
    for sample in (draws, brute):
        counts = np.bincount(sample, minlength=50)
        assert counts[~positive].sum() == 0
        expected = probabilities[positive] * len(sample)
        chi2 = ((counts[positive] - expected) ** 2 / expected).sum()
        assert stats.chi2.sf(chi2, positive.sum() - 1) > 1e-3, chi2


def test_updates_keep_the_sums_exact():
    """After 5,000 random batched updates (repeated leaves included), every inner node
    equals the float sum of its two children, the root equals a tree built afresh from
    the same leaves bit for bit, and the leaves' math.fsum to 1e-12."""
    import math

    rng = np.random.default_rng(1)
    capacity = 777
    tree = SumTree(capacity)
    for _ in range(5000):
        k = int(rng.integers(1, 40))
        tree.update(
            rng.integers(0, capacity, k), rng.gamma(1.0, size=k) * 10.0 ** rng.integers(-6, 6)
        )
    inner = np.arange(1, tree.first_leaf)
    np.testing.assert_array_equal(tree.tree[inner], tree.tree[2 * inner] + tree.tree[2 * inner + 1])
    fresh = SumTree(capacity)
    fresh.update(np.arange(capacity), tree.leaves())
    assert fresh.total == tree.total
    assert tree.total == pytest.approx(math.fsum(tree.leaves()), rel=1e-12)


def test_a_repeated_leaf_takes_its_last_value():
    tree = SumTree(4)
    tree.update(np.array([2, 1, 2]), np.array([5.0, 1.0, 3.0]))
    np.testing.assert_array_equal(tree.leaves(), [0.0, 1.0, 3.0, 0.0])
    assert tree.total == 4.0


@pytest.mark.parametrize(
    "indices,values,match",
    [
        ([4], [1.0], r"\[0, 4\)"),
        ([-1], [1.0], r"\[0, 4\)"),
        ([0], [-1.0], ">= 0"),
        ([0], [np.nan], "finite"),
    ],
)
def test_bad_updates_are_refused(indices, values, match):
    with pytest.raises(ValueError, match=match):
        SumTree(4).update(np.array(indices), np.array(values))


def test_an_empty_tree_refuses_to_sample():
    with pytest.raises(ValueError, match="total is 0"):
        SumTree(3).sample(2, np.random.default_rng(0))


def test_importance_weights_are_the_papers_formula():
    """w_i = (N P(i))^-β / max_j w_j, computed by hand for 3 samples."""
    p = np.array([0.5, 0.1, 0.02])
    n, beta = 40, 0.6
    raw = [(40 * 0.5) ** -0.6, (40 * 0.1) ** -0.6, (40 * 0.02) ** -0.6]
    np.testing.assert_allclose(importance_weights(p, n, beta), np.array(raw) / max(raw), rtol=1e-15)
    np.testing.assert_array_equal(importance_weights(p, n, 0.0), np.ones(3))  # β 0: none


def fields():
    return {"obs": ((2,), np.float32), "action": ((), np.int64), "reward": ((), np.float32)}


def batch(start: int, k: int) -> dict[str, np.ndarray]:
    ids = np.arange(start, start + k)
    return {
        "obs": np.stack([ids, -ids], axis=1).astype(np.float32),
        "action": ids,
        "reward": ids.astype(np.float32),
    }


def test_replay_samples_by_priority_to_the_alpha_with_the_papers_weights():
    """A shard with α 0.6: P(i) ∝ p_i^0.6 (chi-square over 100,000 draws), each draw's
    weight (N P(i))^-β / max over its batch, and the transitions the slots hold."""
    rng = np.random.default_rng(2)
    replay = PrioritizedReplay(20, fields(), alpha=0.6)
    priorities = rng.gamma(1.0, size=20) + 0.01
    replay.add(batch(0, 20), priorities)
    probabilities = priorities**0.6 / (priorities**0.6).sum()
    counts = np.zeros(20)
    for _ in range(100):
        slots, weights, data = replay.sample(1000, beta=0.4, rng=rng)
        counts += np.bincount(slots, minlength=20)
        np.testing.assert_allclose(weights, importance_weights(probabilities[slots], 20, 0.4))
        np.testing.assert_array_equal(data["action"], slots)
        np.testing.assert_array_equal(data["obs"][:, 1], -slots)
    expected = probabilities * counts.sum()
    assert stats.chi2.sf(((counts - expected) ** 2 / expected).sum(), 19) > 1e-3


def test_fifo_eviction_and_priority_updates():
    replay = PrioritizedReplay(5, fields(), alpha=1.0)
    np.testing.assert_array_equal(replay.add(batch(0, 3), np.ones(3)), [0, 1, 2])
    np.testing.assert_array_equal(replay.add(batch(3, 4), np.full(4, 2.0)), [3, 4, 0, 1])
    assert (replay.size, replay.cursor, replay.added) == (5, 2, 7)
    # the two oldest (0 and 1) were overwritten by transitions 5 and 6
    np.testing.assert_array_equal(replay.data["action"], [5, 6, 2, 3, 4])
    np.testing.assert_array_equal(replay.tree.leaves(), [2.0, 2.0, 1.0, 2.0, 2.0])
    replay.update_priorities(np.array([2, 2]), np.array([7.0, 3.0]))  # last wins
    assert replay.tree.total == 11.0
    with pytest.raises(ValueError, match="> 0"):
        replay.update_priorities(np.array([0]), np.array([0.0]))
    with pytest.raises(ValueError, match="> 0"):
        replay.add(batch(0, 1), np.array([-1.0]))
    with pytest.raises(ValueError, match="alpha"):
        PrioritizedReplay(5, fields(), alpha=1.5)
    with pytest.raises(ValueError, match="beta"):
        replay.sample(2, beta=-0.1, rng=np.random.default_rng(0))


def test_state_round_trip_gives_the_same_buffer_and_draws():
    rng = np.random.default_rng(3)
    a = PrioritizedReplay(64, fields(), alpha=0.6)
    a.add(batch(0, 50), rng.gamma(1.0, size=50) + 0.1)
    state = a.state_dict()
    b = PrioritizedReplay(64, fields(), alpha=0.6)
    b.load_state_dict(state)
    assert (b.size, b.cursor, b.added) == (50, 50, 50)
    assert b.tree.total == a.tree.total
    x = a.sample(32, 0.5, np.random.default_rng(9))
    y = b.sample(32, 0.5, np.random.default_rng(9))
    for u, v in zip(x[:2], y[:2], strict=True):
        np.testing.assert_array_equal(u, v)
    np.testing.assert_array_equal(a.ids, b.ids)
    with pytest.raises(ValueError, match="capacity"):
        PrioritizedReplay(10, fields(), alpha=0.6).load_state_dict(state)


def test_a_priority_update_skips_transitions_evicted_since_sampled():
    """FIFO eviction reuses slots: the learner's priority for a sampled transition must
    not land on the one that replaced it (the ids tell them apart)."""
    replay = PrioritizedReplay(4, fields(), alpha=1.0)
    replay.add(batch(0, 4), np.ones(4))
    slots = np.array([0, 1, 2, 3])
    ids = replay.ids[slots].copy()
    replay.add(batch(4, 2), np.ones(2))  # slots 0 and 1 now hold transitions 4 and 5
    applied = replay.update_priorities(slots, np.full(4, 7.0), ids)
    assert applied == 2
    np.testing.assert_array_equal(replay.tree.leaves(), [1.0, 1.0, 7.0, 7.0])


def test_memory_is_capacity_times_bytes_per_transition():
    replay = PrioritizedReplay(100_000, fields(), alpha=0.6)
    per_transition = 2 * 4 + 8 + 4 + 8  # the fields, then the id
    tree = 2 * 131_072 * 8
    assert replay.nbytes == 100_000 * per_transition + tree


@pytest.mark.parametrize("n", [1, 3, 5])
def test_n_step_transitions_match_their_definition(n):
    """Random episode ends (terminated or truncated) over 4 copies and 300 steps: every
    step starts exactly one transition, with R = Σ γ^k r over up to n steps of its own
    episode, s' the observation m steps on (the final one at an end), and discount γ^m,
    0 after a terminal step. Observations are unique ids (copy, t) so each transition is
    found by its first observation."""
    rng = np.random.default_rng(n)
    gamma, copies, steps = 0.9, 4, 300
    builder = NStepTransitions(n, gamma, copies)
    rewards = rng.normal(size=(steps, copies))
    terminated = rng.random((steps, copies)) < 0.08
    truncated = ~terminated & (rng.random((steps, copies)) < 0.05)
    ids = lambda t, c: np.stack([np.full_like(c, t), c], axis=-1).astype(np.float32)  # noqa: E731
    got = {}
    every = np.arange(copies)
    for t in range(steps):
        final = ids(10_000 + t, every)  # s_{t+1}, a "final" id where the episode ended
        out = builder.push(
            ids(t, every), every * 10 + t % 7, rewards[t], terminated[t], truncated[t], final
        )
        for i in range(len(out["action"])):
            key = tuple(out["obs"][i])
            assert key not in got
            got[key] = (
                out["action"][i],
                out["reward"][i],
                tuple(out["next_obs"][i]),
                out["discount"][i],
            )
    expected = {}
    for c in range(copies):
        for t in range(steps):
            ret, m = 0.0, 0
            while m < n and t + m < steps:
                ret += gamma**m * rewards[t + m, c]
                m += 1
                if terminated[t + m - 1, c] or truncated[t + m - 1, c]:
                    break
            end = t + m - 1
            ended = terminated[end, c] or truncated[end, c]
            if m < n and not ended:
                continue  # the run stopped before its n steps were known
            discount = 0.0 if terminated[end, c] else gamma**m
            expected[(float(t), float(c))] = (
                c * 10 + t % 7,
                ret,
                (float(10_000 + end), float(c)),
                discount,
            )
    assert set(got) == set(expected)
    for key, (action, ret, next_obs, discount) in expected.items():
        g = got[key]
        assert g[0] == action and g[2] == next_obs
        assert g[1] == pytest.approx(ret, rel=1e-12, abs=1e-12)
        assert g[3] == pytest.approx(discount, rel=1e-12)


def test_actor_epsilons_are_the_papers():
    """ε_i = 0.4^(1 + 7i/(N-1)): the first actor 0.4, the last 0.4^8."""
    eps = actor_epsilons(8)
    assert eps[0] == pytest.approx(0.4) and eps[-1] == pytest.approx(0.4**8)
    assert eps[3] == pytest.approx(0.4 ** (1 + 3 * 7 / 7))
    assert (np.diff(eps) < 0).all()
    np.testing.assert_array_equal(actor_epsilons(1), [0.4])
