"""V-trace against brute-force sums written from the IMPALA paper's definition.

Espeholt et al. 2018, "IMPALA", §4.1, Eq. 1, with the λ-scaled traces c_i = λ·min(c̄, ρ_i) of
DeepMind's scalable_agent vtrace.py and rlax. The reference below evaluates the double sum term
by term with explicit loops, never through the backward recursion that `vtrace` uses.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hpcrl.returns import n_step_returns, vtrace

SHAPES = [(1, 1), (5, 3), (17, 2)]
SEEDS = range(4)
GAMMAS = [0.9, 1.0]
# (clip_rho_threshold, clip_pg_rho_threshold, clip_c_threshold)
THRESHOLDS = [(1.0, 1.0, 1.0), (2.0, 1.5, 0.5), (0.5, 2.0, 2.0), (None, None, None)]
LAMBDAS = [1.0, 0.9, 0.5]
TOL = {"rtol": 1e-10, "atol": 1e-10}
KEYS = ("log_rhos", "discounts", "rewards", "values")


def _unroll(seed: int, T: int, B: int, gamma: float) -> dict[str, np.ndarray]:
    """Random float64 (T, B) unroll with terminal steps (discount 0) inside it.

    log_rhos ~ N(0, 1), so the ratios fall on both sides of every clip threshold. Besides
    random terminal steps, for T >= 5 column 0 terminates at t = 2; the last step of column
    B-1 is terminal for odd seeds.
    """
    rng = np.random.default_rng(seed)
    terminated = rng.random((T, B)) < 0.2
    if T >= 5:
        terminated[2, 0] = True
    terminated[-1, -1] = seed % 2 == 1
    return {
        "log_rhos": rng.normal(size=(T, B)),
        "discounts": gamma * (1.0 - terminated),
        "rewards": rng.normal(size=(T, B)),
        "values": rng.normal(size=(T, B)),
        "bootstrap_value": rng.normal(size=B),
    }


def _clip(threshold: float | None, x: float) -> float:
    return x if threshold is None else min(threshold, x)


def brute_vtrace(u, rho_bar=1.0, pg_rho_bar=1.0, c_bar=1.0, lambda_=1.0):
    """Eq. 1 as written: v_s = V(x_s) + Σ_{t=s}^{T-1} (Π_{i=s}^{t-1} γ_i c_i) δ_t with
    δ_t = ρ_t (r_t + γ_t V(x_{t+1}) − V(x_t)), and the §4.2 advantage
    ρ^pg_s (r_s + γ_s v_{s+1} − V(x_s)), where V(x_T) = v_T = bootstrap_value."""
    T, B = u["rewards"].shape
    vs, pg = np.zeros((T, B)), np.zeros((T, B))
    for b in range(B):
        gammas, rewards = u["discounts"][:, b], u["rewards"][:, b]
        ratios = [math.exp(x) for x in u["log_rhos"][:, b]]
        V = [*u["values"][:, b], u["bootstrap_value"][b]]
        for s in range(T):
            total = V[s]
            for t in range(s, T):
                weight = 1.0
                for i in range(s, t):
                    weight *= gammas[i] * lambda_ * _clip(c_bar, ratios[i])
                delta = _clip(rho_bar, ratios[t]) * (rewards[t] + gammas[t] * V[t + 1] - V[t])
                total += weight * delta
            vs[s, b] = total
        next_vs = [*vs[1:, b], V[T]]
        for s in range(T):
            target = rewards[s] + gammas[s] * next_vs[s] - V[s]
            pg[s, b] = _clip(pg_rho_bar, ratios[s]) * target
    return vs, pg


def brute_n_step(u: dict[str, np.ndarray]) -> np.ndarray:
    """v_s = Σ_{k=s}^{T-1} (Π_{j=s}^{k-1} γ_j) r_k + (Π_{j=s}^{T-1} γ_j) bootstrap_value."""
    T, B = u["rewards"].shape
    returns = np.zeros((T, B))
    for b in range(B):
        for s in range(T):
            for k in range(s, T):
                returns[s, b] += math.prod(u["discounts"][s:k, b]) * u["rewards"][k, b]
            returns[s, b] += math.prod(u["discounts"][s:, b]) * u["bootstrap_value"][b]
    return returns


@pytest.mark.parametrize("lambda_", LAMBDAS)
@pytest.mark.parametrize("thresholds", THRESHOLDS)
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("T,B", SHAPES)
def test_vtrace_matches_brute_force_sum(T, B, gamma, thresholds, lambda_):
    rho_bar, pg_rho_bar, c_bar = thresholds
    for seed in SEEDS:
        u = _unroll(seed, T, B, gamma)
        before = {k: v.copy() for k, v in u.items()}
        vs, pg = vtrace(
            **u,
            clip_rho_threshold=rho_bar,
            clip_pg_rho_threshold=pg_rho_bar,
            clip_c_threshold=c_bar,
            lambda_=lambda_,
        )
        expected_vs, expected_pg = brute_vtrace(u, rho_bar, pg_rho_bar, c_bar, lambda_)
        np.testing.assert_allclose(vs, expected_vs, **TOL)
        np.testing.assert_allclose(pg, expected_pg, **TOL)
        for k in u:
            np.testing.assert_array_equal(u[k], before[k], err_msg=f"{k} was modified")


def test_every_threshold_and_lambda_changes_the_result():
    # Guards the comparison above from being vacuous: on these unrolls each knob is active.
    u = _unroll(0, 17, 2, 0.9)
    base = vtrace(**u)
    for knob in ["clip_rho_threshold", "clip_pg_rho_threshold", "clip_c_threshold", "lambda_"]:
        for value in (0.5, 2.0) if knob != "lambda_" else (0.5,):
            changed = vtrace(**u, **{knob: value})
            assert any(np.abs(a - b).max() > 1e-3 for a, b in zip(base, changed, strict=True))


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("T,B", SHAPES)
def test_on_policy_vs_are_n_step_returns(T, B, gamma):
    for seed in SEEDS:
        u = dict(_unroll(seed, T, B, gamma), log_rhos=np.zeros((T, B)))
        vs, pg = vtrace(**u)
        expected = brute_n_step(u)
        np.testing.assert_allclose(vs, expected, **TOL)
        # On policy with λ = 1, r_s + γ_s v_{s+1} is v_s itself.
        np.testing.assert_allclose(pg, expected - u["values"], **TOL)

        terminated = u["discounts"] == 0
        next_values = np.concatenate([u["values"][1:], u["bootstrap_value"][None]])
        truncated = np.zeros_like(terminated)
        returns = n_step_returns(u["rewards"], next_values, terminated, truncated, gamma)
        np.testing.assert_allclose(vs, returns, **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_inputs_match_numpy_and_keep_their_type(dtype):
    u = _unroll(1, 17, 3, 0.9)
    tensors = {k: torch.from_numpy(v).to(dtype) for k, v in u.items()}
    # Compare with numpy on the same (rounded) numbers.
    rounded = {k: v.to(torch.float64).numpy() for k, v in tensors.items()}
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12}
    outs = vtrace(**tensors, clip_c_threshold=0.5, lambda_=0.9)
    expected = vtrace(**rounded, clip_c_threshold=0.5, lambda_=0.9)
    for out, exp in zip(outs, expected, strict=True):
        assert isinstance(out, torch.Tensor)
        assert out.dtype == dtype
        assert out.shape == (17, 3)
        np.testing.assert_allclose(out.numpy(), exp, **tol)


def test_torch_inputs_with_grad_give_detached_results():
    u = _unroll(3, 5, 3, 0.9)
    tensors = {k: torch.tensor(v, dtype=torch.float32, requires_grad=True) for k, v in u.items()}
    vs, pg = vtrace(**tensors)
    assert not vs.requires_grad and not pg.requires_grad
    expected_vs, expected_pg = vtrace(**{k: v.detach() for k, v in tensors.items()})
    torch.testing.assert_close(vs, expected_vs)
    torch.testing.assert_close(pg, expected_pg)


@pytest.mark.parametrize("shape", [(), (4,), (1, 3), (5, 3)])
def test_bootstrap_value_of_wrong_shape_raises(shape):
    u = _unroll(0, 5, 3, 0.9)
    with pytest.raises(ValueError, match="bootstrap_value"):
        vtrace(**dict(u, bootstrap_value=np.zeros(shape)))


@pytest.mark.parametrize("rows_cols", [np.s_[:1], np.s_[:-1], np.s_[:, :1]])
@pytest.mark.parametrize("key", KEYS)
def test_mismatched_shapes_raise(key, rows_cols):
    # (1, B) and (T, 1) inputs would broadcast silently: the check must catch them.
    u = _unroll(0, 5, 3, 0.9)
    with pytest.raises(ValueError, match="share one"):
        vtrace(**dict(u, **{key: u[key][rows_cols]}))


def test_no_time_axis_raises():
    with pytest.raises(ValueError, match="time axis"):
        vtrace(0.0, 0.9, 1.0, 1.0, np.zeros(()))


def test_truncation_by_folding_the_bootstrap_into_the_reward():
    """The caller's convention for a time-limit cut at step k (vtrace takes no final
    observations): rewards[k] += γ·V(final_obs) and discounts[k] = 0. Steps up to k then get the
    brute-force targets of the unroll cut after k with bootstrap_value = V(final_obs), later
    steps those of the rest of the unroll with its own bootstrap."""
    T, B, gamma = 9, 3, 0.9
    knobs = {"rho_bar": 2.0, "pg_rho_bar": 1.5, "c_bar": 0.5, "lambda_": 0.9}
    u = _unroll(2, T, B, gamma)
    cuts = [2, 5, T - 1]  # the last column is cut at the unroll's final step
    final_values = np.array([3.0, -2.0, 5.0])
    folded = {k: v.copy() for k, v in u.items()}
    for b, k in enumerate(cuts):
        u["discounts"][k, b] = gamma  # truncated, not terminated
        folded["rewards"][k, b] += gamma * final_values[b]
        folded["discounts"][k, b] = 0.0
    vs, pg = vtrace(
        **folded,
        clip_rho_threshold=2.0,
        clip_pg_rho_threshold=1.5,
        clip_c_threshold=0.5,
        lambda_=0.9,
    )

    for b, k in enumerate(cuts):
        pieces = [(slice(0, k + 1), final_values[b]), (slice(k + 1, T), u["bootstrap_value"][b])]
        for rows, bootstrap in pieces:
            if rows.start == rows.stop:
                continue
            piece = {key: u[key][rows, b : b + 1] for key in KEYS}
            piece["bootstrap_value"] = np.array([bootstrap])
            expected_vs, expected_pg = brute_vtrace(piece, **knobs)
            np.testing.assert_allclose(vs[rows, b], expected_vs[:, 0], **TOL)
            np.testing.assert_allclose(pg[rows, b], expected_pg[:, 0], **TOL)
