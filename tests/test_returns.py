"""GAE and n-step returns against brute-force sums written from the papers' definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpcrl.returns import gae, n_step_returns

SEEDS = range(6)
TS = [1, 5, 17]
BS = [1, 3]
GAMMAS = [0.0, 0.9, 1.0]
LAMBDAS = [0.0, 0.5, 0.95, 1.0]


def _rollout(seed: int, T: int, B: int) -> dict[str, np.ndarray]:
    """Random (T, B) float64 rollout with episode ends inside it and at its last step.

    Besides random ends (some both terminated and truncated, as gymnasium allows), for T >= 5
    column 0 terminates at t = 1 and column B-1 is truncated at t = 3; the last step of
    column 0 is open, terminated or truncated depending on `seed % 3`.
    """
    rng = np.random.default_rng(seed)
    terminated = rng.random((T, B)) < 0.2
    truncated = rng.random((T, B)) < 0.2
    if T >= 5:
        terminated[1, 0], truncated[1, 0] = True, False
        terminated[3, B - 1], truncated[3, B - 1] = False, True
    terminated[-1, 0] = seed % 3 == 1
    truncated[-1, 0] = seed % 3 == 2
    return {
        "rewards": rng.normal(size=(T, B)),
        "values": rng.normal(size=(T, B)),
        "next_values": rng.normal(size=(T, B)),
        "terminated": terminated,
        "truncated": truncated,
    }


def _episode_end(done: np.ndarray, t: int, b: int) -> int:
    """The first k >= t where column b's episode ended, or T - 1 if none does."""
    for k in range(t, done.shape[0]):
        if done[k, b]:
            return k
    return done.shape[0] - 1


def _td_error(ro: dict[str, np.ndarray], k: int, b: int, gamma: float) -> float:
    """delta_k = r_k + gamma * V(s_{k+1}) - V(s_k), with V(s_{k+1}) = 0 if terminated at k."""
    next_value = 0.0 if ro["terminated"][k, b] else ro["next_values"][k, b]
    return ro["rewards"][k, b] + gamma * next_value - ro["values"][k, b]


def brute_gae(ro: dict[str, np.ndarray], gamma: float, gae_lambda: float) -> np.ndarray:
    """Schulman et al. 2016, Eq. 16: A_t = sum_{l=0}^{end-t} (gamma lambda)^l delta_{t+l}."""
    T, B = ro["rewards"].shape
    done = ro["terminated"] | ro["truncated"]
    advantages = np.zeros((T, B))
    for b in range(B):
        for t in range(T):
            end = _episode_end(done, t, b)
            advantages[t, b] = sum(
                (gamma * gae_lambda) ** lag * _td_error(ro, t + lag, b, gamma)
                for lag in range(end - t + 1)
            )
    return advantages


def brute_n_step(ro: dict[str, np.ndarray], gamma: float) -> np.ndarray:
    """Mnih et al. 2016, Alg. S3: sum_{k=t}^{end} gamma^{k-t} r_k + gamma^{end-t+1} V(s_{end+1})."""
    T, B = ro["rewards"].shape
    done = ro["terminated"] | ro["truncated"]
    returns = np.zeros((T, B))
    for b in range(B):
        for t in range(T):
            end = _episode_end(done, t, b)
            discounted = sum(gamma ** (k - t) * ro["rewards"][k, b] for k in range(t, end + 1))
            bootstrap = 0.0 if ro["terminated"][end, b] else ro["next_values"][end, b]
            returns[t, b] = discounted + gamma ** (end - t + 1) * bootstrap
    return returns


def _consistent(ro: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`ro` with next_values[t] = values[t+1] inside episodes, as in a real rollout, where
    s_{t+1} is the observation acted on at t + 1 unless the episode ended at t."""
    done = ro["terminated"] | ro["truncated"]
    next_values = ro["next_values"].copy()
    next_values[:-1] = np.where(done[:-1], next_values[:-1], ro["values"][1:])
    return dict(ro, next_values=next_values)


def _n_step_args(ro: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in ro.items() if k != "values"}


@pytest.mark.parametrize("gae_lambda", LAMBDAS)
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("B", BS)
@pytest.mark.parametrize("T", TS)
def test_gae_matches_brute_force_sum(T, B, gamma, gae_lambda):
    for seed in SEEDS:
        ro = _rollout(seed, T, B)
        before = {k: v.copy() for k, v in ro.items()}
        advantages, returns = gae(**ro, gamma=gamma, gae_lambda=gae_lambda)
        expected = brute_gae(ro, gamma, gae_lambda)
        np.testing.assert_allclose(advantages, expected, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(returns, expected + ro["values"], rtol=1e-12, atol=1e-12)
        for k in ro:
            np.testing.assert_array_equal(ro[k], before[k], err_msg=f"{k} was modified")


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("B", BS)
@pytest.mark.parametrize("T", TS)
def test_n_step_returns_match_brute_force_sum(T, B, gamma):
    for seed in SEEDS:
        ro = _rollout(seed, T, B)
        returns = n_step_returns(**_n_step_args(ro), gamma=gamma)
        np.testing.assert_allclose(returns, brute_n_step(ro, gamma), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("T", TS)
def test_gae_lambda_one_returns_are_n_step_returns(T, gamma):
    # The TD errors telescope only when V(s_{t+1}) is the same number at t and at t + 1.
    for seed in SEEDS:
        ro = _consistent(_rollout(seed, T, 3))
        _, returns = gae(**ro, gamma=gamma, gae_lambda=1.0)
        expected = n_step_returns(**_n_step_args(ro), gamma=gamma)
        np.testing.assert_allclose(returns, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gamma", GAMMAS)
def test_gae_lambda_zero_is_td_error(gamma):
    ro = _rollout(0, 17, 3)
    advantages, _ = gae(**ro, gamma=gamma, gae_lambda=0.0)
    delta = (
        ro["rewards"] + gamma * np.where(ro["terminated"], 0.0, ro["next_values"]) - ro["values"]
    )
    np.testing.assert_allclose(advantages, delta, rtol=1e-12, atol=1e-12)


def test_truncated_bootstraps_terminated_does_not():
    # Columns: episode open at t = 0, terminated at t = 0, truncated at t = 0; all open at t = 1.
    gamma, gae_lambda = 0.9, 0.5
    rewards = np.array([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    values = np.array([[0.5, 0.5, 0.5], [3.0, 3.0, 3.0]])
    next_values = np.array([[10.0, 10.0, 10.0], [4.0, 4.0, 4.0]])
    terminated = np.array([[False, True, False], [False, False, False]])
    truncated = np.array([[False, False, True], [False, False, False]])

    returns = n_step_returns(rewards, next_values, terminated, truncated, gamma)
    g1 = 2.0 + gamma * 4.0
    np.testing.assert_allclose(returns[0], [1.0 + gamma * g1, 1.0, 1.0 + gamma * 10.0])
    np.testing.assert_allclose(returns[1], [g1, g1, g1])

    advantages, _ = gae(rewards, values, next_values, terminated, truncated, gamma, gae_lambda)
    delta0_open = 1.0 + gamma * 10.0 - 0.5
    delta1 = 2.0 + gamma * 4.0 - 3.0
    np.testing.assert_allclose(
        advantages[0],
        [delta0_open + gamma * gae_lambda * delta1, 1.0 - 0.5, delta0_open],
    )
    np.testing.assert_allclose(advantages[1], [delta1, delta1, delta1])


def test_rollout_end_bootstraps_from_last_next_value():
    rewards = np.array([[1.0], [2.0], [3.0]])
    values = np.array([[0.25], [0.5], [0.75]])
    open_ = np.zeros((3, 1), dtype=bool)
    # Inside the episode the n-step return follows the rewards, not next_values.
    next_values = np.array([[100.0], [200.0], [7.0]])
    returns = n_step_returns(rewards, next_values, open_, open_, gamma=1.0)
    np.testing.assert_allclose(returns[:, 0], [1 + 2 + 3 + 7.0, 2 + 3 + 7.0, 3 + 7.0])
    consistent = np.array([[0.5], [0.75], [7.0]])
    _, gae_returns = gae(rewards, values, consistent, open_, open_, 1.0, 1.0)
    np.testing.assert_allclose(gae_returns, returns)


@pytest.mark.parametrize("end_kind", ["terminated", "truncated", "both"])
def test_nothing_crosses_an_episode_end(end_kind):
    T, B, end, gamma, gae_lambda = 17, 3, 6, 0.9, 0.95
    rng = np.random.default_rng(1)
    ro = {
        "rewards": rng.normal(size=(T, B)),
        "values": rng.normal(size=(T, B)),
        "next_values": rng.normal(size=(T, B)),
        "terminated": np.zeros((T, B), dtype=bool),
        "truncated": np.zeros((T, B), dtype=bool),
    }
    changed = {k: v.copy() for k, v in ro.items()}
    for key in ("rewards", "values", "next_values"):
        changed[key][end + 1 :] += rng.normal(size=(T - end - 1, B))

    def targets(rollout):
        advantages, returns = gae(**rollout, gamma=gamma, gae_lambda=gae_lambda)
        return advantages, returns, n_step_returns(**_n_step_args(rollout), gamma=gamma)

    # With no episode end at `end`, the change after it does reach step `end`.
    for a, b in zip(targets(ro), targets(changed), strict=True):
        assert np.all(np.abs(a[: end + 1] - b[: end + 1]) > 1e-9)

    for rollout in (ro, changed):
        if end_kind in ("terminated", "both"):
            rollout["terminated"][end] = True
        if end_kind in ("truncated", "both"):
            rollout["truncated"][end] = True
    for a, b in zip(targets(ro), targets(changed), strict=True):
        np.testing.assert_array_equal(a[: end + 1], b[: end + 1])
        assert np.all(a[end + 1 :] != b[end + 1 :])


def test_next_value_at_terminated_step_is_ignored():
    ro = _rollout(0, 17, 3)
    nan_ro = dict(ro, next_values=np.where(ro["terminated"], np.nan, ro["next_values"]))
    advantages, returns = gae(**ro, gamma=0.9, gae_lambda=0.95)
    nan_advantages, nan_returns = gae(**nan_ro, gamma=0.9, gae_lambda=0.95)
    np.testing.assert_array_equal(nan_advantages, advantages)
    np.testing.assert_array_equal(nan_returns, returns)
    n_step = n_step_returns(**_n_step_args(ro), gamma=0.9)
    np.testing.assert_array_equal(n_step_returns(**_n_step_args(nan_ro), gamma=0.9), n_step)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_inputs_match_numpy_and_keep_their_type(dtype, mask_dtype):
    ro = _rollout(2, 17, 3)
    tensors = {k: torch.from_numpy(v).to(dtype) for k, v in ro.items()}
    for key in ("terminated", "truncated"):
        tensors[key] = tensors[key].to(mask_dtype)
    # Compare with numpy on the same (rounded) numbers.
    rounded = {k: v.to(torch.float64).numpy() for k, v in tensors.items()}
    rounded["terminated"] = ro["terminated"]
    rounded["truncated"] = ro["truncated"]
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12}

    advantages, returns = gae(**tensors, gamma=0.9, gae_lambda=0.95)
    expected_adv, expected_ret = gae(**rounded, gamma=0.9, gae_lambda=0.95)
    n_step = n_step_returns(**_n_step_args(tensors), gamma=0.9)
    expected_n_step = n_step_returns(**_n_step_args(rounded), gamma=0.9)
    for out, expected in [
        (advantages, expected_adv),
        (returns, expected_ret),
        (n_step, expected_n_step),
    ]:
        assert isinstance(out, torch.Tensor)
        assert out.dtype == dtype
        assert out.shape == (17, 3)
        np.testing.assert_allclose(out.numpy(), expected, **tol)


def test_torch_inputs_with_grad_give_detached_targets():
    ro = _rollout(3, 5, 3)
    tensors = {k: torch.tensor(v, dtype=torch.float32) for k, v in ro.items()}
    tensors["values"].requires_grad_(True)
    advantages, returns = gae(**tensors, gamma=0.9, gae_lambda=0.95)
    assert not advantages.requires_grad and not returns.requires_grad


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("T,B", [(1, 1), (5, 3), (17, 1)])
def test_numpy_shapes_and_dtypes(T, B, dtype):
    ro = _rollout(4, T, B)
    cast = {k: v.astype(dtype) if v.dtype != bool else v for k, v in ro.items()}
    advantages, returns = gae(**cast, gamma=0.9, gae_lambda=0.95)
    n_step = n_step_returns(**_n_step_args(cast), gamma=0.9)
    for out in (advantages, returns, n_step):
        assert isinstance(out, np.ndarray)
        assert out.shape == (T, B)
        assert out.dtype == dtype


def test_float_masks_give_the_same_result_as_bool_masks():
    ro = _rollout(5, 17, 3)
    as_float = dict(
        ro,
        terminated=ro["terminated"].astype(np.float32),
        truncated=ro["truncated"].astype(np.float64),
    )
    for a, b in zip(
        gae(**ro, gamma=0.9, gae_lambda=0.95),
        gae(**as_float, gamma=0.9, gae_lambda=0.95),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        n_step_returns(**_n_step_args(ro), gamma=0.9),
        n_step_returns(**_n_step_args(as_float), gamma=0.9),
    )


def test_integer_inputs_give_float64():
    ro = _rollout(0, 5, 3)
    ints = {k: np.arange(15).reshape(5, 3) for k in ("rewards", "values", "next_values")}
    advantages, returns = gae(**dict(ro, **ints), gamma=0.5, gae_lambda=0.5)
    n_step = n_step_returns(**_n_step_args(dict(ro, **ints)), gamma=0.5)
    assert advantages.dtype == returns.dtype == n_step.dtype == np.float64
    np.testing.assert_allclose(n_step, brute_n_step(dict(ro, **ints), 0.5))


def test_mismatched_shapes_raise():
    # (1, B) values would broadcast silently against (T, B) rewards: the check must catch it.
    ro = _rollout(0, 5, 3)
    with pytest.raises(ValueError, match="share one"):
        gae(**dict(ro, values=ro["values"][:1]), gamma=0.9, gae_lambda=0.95)
    with pytest.raises(ValueError, match="share one"):
        n_step_returns(**dict(_n_step_args(ro), truncated=ro["truncated"][:, :1]), gamma=0.9)
    with pytest.raises(ValueError, match="time axis"):
        n_step_returns(1.0, 1.0, False, False, gamma=0.9)
