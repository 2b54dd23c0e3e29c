"""Advantage and return targets for a time-major rollout: GAE, bootstrapped n-step returns
and V-trace.

torch is not imported here: an input can only be a tensor if its caller imported torch,
so the tabular layouts (`async`'s n-step returns) stay torch-free.
"""

from __future__ import annotations

import sys
from functools import reduce
from typing import TYPE_CHECKING, Union

import numpy as np

if TYPE_CHECKING:
    import torch

Array = Union[np.ndarray, "torch.Tensor"]  # noqa: UP007 - a string member needs Union


def _is_tensor(x) -> bool:
    """Whether `x` is a torch tensor (False without importing torch when nobody has)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def gae(
    rewards: Array,
    values: Array,
    next_values: Array,
    terminated: Array,
    truncated: Array,
    gamma: float,
    gae_lambda: float,
) -> tuple[Array, Array]:
    """Generalized advantage estimates and their value targets for a (T, B) rollout.

    Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
    Estimation", Eq. 16: A_t = sum_l (gamma * lambda)^l delta_{t+l}, with the TD error
    delta_t = r_t + gamma * (1 - terminated_t) * V(s_{t+1}) - V(s_t) (Eq. 10), the sum cut at the
    end of the episode or of the rollout, whichever comes first. Computed by the recursion
    A_t = delta_t + gamma * lambda * (1 - done_t) * A_{t+1}, A_T = 0, in a backward loop over t.

    Truncation follows gymnasium: a `terminated` step does not bootstrap (its next value counts
    as 0); a `truncated` step bootstraps from `next_values[t]` (a time limit is not part of the
    MDP), but the episode still ends there, so no later TD error flows back across it. The
    rollout end needs no special case: `next_values[T-1]` already bootstraps the last step.

    Inputs may be numpy arrays or torch tensors. Tensors are converted at the boundary: the
    math runs in numpy float64 on detached CPU copies (no gradient flows through the targets)
    and the outputs are converted back.

    Args:
        rewards: (T, B) float, r_t, the reward returned with step t.
        values: (T, B) float, V(s_t) for the observation acted on at step t.
        next_values: (T, B) float, V(s_{t+1}): the value of the next observation, or of the
            episode's final observation (gymnasium's `final_obs`) when it ended at step t.
            Ignored (may be anything, even NaN) where `terminated` is set.
        terminated: (T, B) bool or 0/1 float, the episode reached a terminal state at step t.
        truncated: (T, B) bool or 0/1 float, the episode was cut (e.g. time limit) at step t.
        gamma: discount factor gamma in [0, 1].
        gae_lambda: GAE lambda in [0, 1]; 0 gives the one-step TD error, 1 the n-step return
            minus V(s_t).

    Returns:
        (advantages, returns), each (T, B), with returns = advantages + values (the value
        targets). Numpy arrays of the promoted float dtype of `rewards`, `values`,
        `next_values` (float64 if none is floating); if any of those three is a torch tensor,
        torch tensors of the promoted dtype of those that are, on the first one's device.

    Raises:
        ValueError: the inputs do not all have the same shape, or have no time axis.
    """
    floats = (rewards, values, next_values)
    r, v, nv, term, trunc = _as_float64(
        ("rewards", rewards),
        ("values", values),
        ("next_values", next_values),
        ("terminated", terminated),
        ("truncated", truncated),
    )
    terminal = term != 0
    done = terminal | (trunc != 0)
    deltas = r + gamma * np.where(terminal, 0.0, nv) - v
    advantages = np.empty_like(deltas)
    next_advantage = np.zeros_like(deltas[0])
    for t in reversed(range(len(deltas))):
        next_advantage = deltas[t] + gamma * gae_lambda * np.where(done[t], 0.0, next_advantage)
        advantages[t] = next_advantage
    return _like(advantages, floats), _like(advantages + v, floats)


def n_step_returns(
    rewards: Array,
    next_values: Array,
    terminated: Array,
    truncated: Array,
    gamma: float,
) -> Array:
    """Discounted returns to the end of the episode or the rollout, bootstrapped from V there.

    The A2C/A3C target (Mnih et al. 2016, "Asynchronous Methods for Deep Reinforcement
    Learning", Algorithm S3): for each step t, with `end` the first k >= t where the episode
    ended (`terminated` or `truncated`), or T - 1 if none does,
    R_t = sum_{k=t}^{end} gamma^{k-t} r_k + gamma^{end-t+1} V(s_{end+1}),
    where the bootstrap term is 0 if the episode was terminated at `end`. Computed by the
    recursion G_t = r_t + gamma * [(1 - terminated_t) V(s_{t+1}) if done_t or t = T-1
    else G_{t+1}] in a backward loop over t. Equals the returns of `gae` with lambda = 1
    when next_values[t] = values[t+1] inside episodes (the TD errors then telescope).

    Inputs may be numpy arrays or torch tensors, converted at the boundary as in `gae`.

    Args:
        rewards: (T, B) float, r_t, the reward returned with step t.
        next_values: (T, B) float, V(s_{t+1}), or V(final observation) where the episode ended
            at step t. Ignored (may be anything, even NaN) where `terminated` is set.
        terminated: (T, B) bool or 0/1 float, the episode reached a terminal state at step t.
        truncated: (T, B) bool or 0/1 float, the episode was cut (e.g. time limit) at step t.
        gamma: discount factor gamma in [0, 1].

    Returns:
        (T, B) returns. Numpy array of the promoted float dtype of `rewards` and `next_values`
        (float64 if neither is floating); if either is a torch tensor, a torch tensor of the
        promoted dtype of those that are, on the first one's device.

    Raises:
        ValueError: the inputs do not all have the same shape, or have no time axis.
    """
    floats = (rewards, next_values)
    r, nv, term, trunc = _as_float64(
        ("rewards", rewards),
        ("next_values", next_values),
        ("terminated", terminated),
        ("truncated", truncated),
    )
    terminal = term != 0
    done = terminal | (trunc != 0)
    bootstrap = np.where(terminal, 0.0, nv)
    returns = np.empty_like(r)
    for t in reversed(range(len(r))):
        if t == len(r) - 1:
            future = bootstrap[t]
        else:
            future = np.where(done[t], bootstrap[t], returns[t + 1])
        returns[t] = r[t] + gamma * future
    return _like(returns, floats)


def vtrace(
    log_rhos: Array,
    discounts: Array,
    rewards: Array,
    values: Array,
    bootstrap_value: Array,
    clip_rho_threshold: float | None = 1.0,
    clip_pg_rho_threshold: float | None = 1.0,
    clip_c_threshold: float | None = 1.0,
    lambda_: float = 1.0,
) -> tuple[Array, Array]:
    """V-trace value targets and policy-gradient advantages for a (T, B) off-policy unroll.

    Espeholt et al. 2018, "IMPALA", §4.1, Eq. 1: with importance ratios
    ρ_t = min(ρ̄, π(a_t|x_t)/μ(a_t|x_t)) and traces c_i = λ·min(c̄, π(a_i|x_i)/μ(a_i|x_i)),

        v_s = V(x_s) + Σ_{t=s}^{T-1} (Π_{i=s}^{t-1} γ_i c_i) δ_t,
        δ_t = ρ_t (r_t + γ_t V(x_{t+1}) − V(x_t)),   V(x_T) = bootstrap_value,

    where γ_t = `discounts[t]` (γ·(1 − terminated_t): a terminal step cuts both the
    bootstrap and the trace). Computed by the recursion v_s − V(x_s) = δ_s + γ_s c_s
    (v_{s+1} − V(x_{s+1})) (§4.1, Remark 1), v_T = V(x_T), backwards over s. The
    policy-gradient advantage (§4.2) is ρ^pg_s (r_s + γ_s v_{s+1} − V(x_s)) with
    ρ^pg_s = min(ρ̄_pg, π/μ). λ < 1 is the λ-mixture of the paper's Remark 2 (as in the
    authors' `scalable_agent` vtrace.py and rlax).

    Truncated episodes: this signature has no final observations; a caller bootstraps a
    time-limit cut at step t by adding γ·V(final obs) to `rewards[t]` and setting
    `discounts[t] = 0`.

    Inputs may be numpy arrays or torch tensors, converted at the boundary as in `gae`
    (float64 numpy math on detached CPU copies; no gradient flows through the outputs).

    Args:
        log_rhos: (T, B) float, log π(a_t|x_t) − log μ(a_t|x_t): target (learner) minus
            behaviour (actor) log-probabilities of the actions taken.
        discounts: (T, B) float, γ_t = γ·(1 − terminated_t).
        rewards: (T, B) float, r_t.
        values: (T, B) float, V(x_t) under the learner's current parameters.
        bootstrap_value: (B,) float, V(x_T), the value of the observation after the unroll.
        clip_rho_threshold: ρ̄ (None: no clipping).
        clip_pg_rho_threshold: ρ̄ of the policy-gradient advantage (None: no clipping).
        clip_c_threshold: c̄ (None: no clipping).
        lambda_: λ in [0, 1], scales every trace c_i.

    Returns:
        (vs, pg_advantages), each (T, B): the V-trace targets v_s and the advantages
        ρ^pg_s (r_s + γ_s v_{s+1} − V(x_s)). Numpy arrays or torch tensors as for `gae`
        (the kind and dtype promoted from `rewards`, `values` and `bootstrap_value`).

    Raises:
        ValueError: the (T, B) inputs do not share one shape, have no time axis, or
            `bootstrap_value` is not (B,).
    """
    floats = (rewards, values, bootstrap_value)
    lr, disc, r, v = _as_float64(
        ("log_rhos", log_rhos),
        ("discounts", discounts),
        ("rewards", rewards),
        ("values", values),
    )
    boot = bootstrap_value
    if _is_tensor(boot):
        boot = boot.detach().cpu().double().numpy()
    boot = np.asarray(boot, dtype=np.float64)
    if boot.shape != v.shape[1:]:
        raise ValueError(
            f"bootstrap_value must have shape {v.shape[1:]} (values without the time axis), "
            f"got {boot.shape}"
        )
    rhos = np.exp(lr)

    def clipped(threshold: float | None) -> np.ndarray:
        return rhos if threshold is None else np.minimum(threshold, rhos)

    clipped_rhos = clipped(clip_rho_threshold)
    cs = lambda_ * clipped(clip_c_threshold)
    next_values = np.concatenate([v[1:], boot[None]], axis=0)
    deltas = clipped_rhos * (r + disc * next_values - v)
    vs_minus_v = np.empty_like(v)
    carry = np.zeros_like(boot)
    for t in reversed(range(len(v))):
        carry = deltas[t] + disc[t] * cs[t] * carry
        vs_minus_v[t] = carry
    vs = vs_minus_v + v
    next_vs = np.concatenate([vs[1:], boot[None]], axis=0)
    pg_advantages = clipped(clip_pg_rho_threshold) * (r + disc * next_vs - v)
    return _like(vs, floats), _like(pg_advantages, floats)


def _as_float64(*named: tuple[str, Array]) -> list[np.ndarray]:
    """Float64 numpy copies of the named inputs, after checking they share one (T, ...) shape."""
    arrays = []
    for name, x in named:
        if _is_tensor(x):
            x = x.detach().cpu().double().numpy()
        x = np.asarray(x, dtype=np.float64)
        if x.ndim == 0:
            raise ValueError(f"{name} has no time axis: expected shape (T, B), got ()")
        arrays.append(x)
    shapes = {name: a.shape for (name, _), a in zip(named, arrays, strict=True)}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"inputs must share one (T, B) shape, got {shapes}")
    return arrays


def _like(out: np.ndarray, inputs: tuple[Array, ...]) -> Array:
    """`out` (float64) cast back to the kind of `inputs`: a torch tensor on the first tensor's
    device with torch's promoted dtype if any input is a tensor, else numpy's promoted dtype."""
    tensors = [x for x in inputs if _is_tensor(x)]
    if tensors:
        import torch

        dtype = reduce(torch.promote_types, (x.dtype for x in tensors))
        if not dtype.is_floating_point:
            dtype = torch.float64
        return torch.from_numpy(out).to(device=tensors[0].device, dtype=dtype)
    dtype = np.result_type(*(np.asarray(x) for x in inputs))
    if not np.issubdtype(dtype, np.floating):
        dtype = np.float64
    return out.astype(dtype)
