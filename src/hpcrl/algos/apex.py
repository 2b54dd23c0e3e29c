"""Ape-X DQN's learning rule (Horgan et al. 2018, "Distributed Prioritized Experience
Replay", Section 3.1 and Appendix C): n-step double-Q targets, the importance-weighted
loss, and the priorities the actors and the learner compute from the same TD errors.

For an n-step transition (s, a, R, s', discount) from `hpcrl.replay.NStepTransitions`
(R = Σ_{k<m} γ^k r_{t+k}, discount = γ^m, or 0 after a terminal step):

    y = R + discount · Q_target(s', argmax_a' Q(s', a'))          (double Q, van Hasselt
                                                                    et al. 2016, Eq. 4)
    δ = y − Q(s, a)
    loss = mean_i w_i · Huber(δ_i)                                (w: importance weights,
                                                                    Schaul et al. 2016)
    priority p_i = |δ_i| + ε                                      (proportional variant)

Actors compute the same |δ| with the parameters they hold, so transitions enter replay
with a priority instead of the buffer's maximum (Section 3, "we compute the priorities
in the actors").

Not registered as an algorithm yet: the Ape-X layout (learner, replay ranks, actors) that
runs it is issue 17's remaining work; `hpcrl.replay` holds the shard's buffer.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

PRIORITY_EPSILON = 1e-6  # added to |δ| so no transition's priority is 0


def double_q_targets(
    online: torch.nn.Module,
    target: torch.nn.Module,
    next_obs: torch.Tensor,
    rewards: torch.Tensor,
    discounts: torch.Tensor,
) -> torch.Tensor:
    """y = R + discount · Q_target(s', argmax_a' Q_online(s', a')), without gradients.

    Args:
        online, target: Q-networks, (k, *obs_shape) -> (k, A).
        next_obs: (k, *obs_shape) s'.
        rewards: (k,) float n-step returns R.
        discounts: (k,) float γ^m, 0 where the episode terminated.

    Returns:
        (k,) float targets y (the dtype of `rewards`).
    """
    with torch.no_grad():
        choice = online(next_obs).argmax(dim=1, keepdim=True)
        bootstrap = target(next_obs).gather(1, choice).squeeze(1)
        return rewards + discounts * bootstrap.to(rewards.dtype)


def prioritized_loss(
    q_taken: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, np.ndarray]:
    """The importance-weighted Huber loss and the new priorities.

    Args:
        q_taken: (k,) Q(s, a) of the batch (with gradients).
        targets: (k,) y (no gradients).
        weights: (k,) importance weights w in (0, 1].

    Returns:
        (loss, a scalar tensor; priorities (k,) float64 |y − Q(s, a)| + PRIORITY_EPSILON).
    """
    per_sample = F.smooth_l1_loss(q_taken, targets.to(q_taken.dtype), reduction="none")
    loss = (weights.to(q_taken.dtype) * per_sample).mean()
    return loss, priorities_of(q_taken, targets)


def priorities_of(q_taken: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """(k,) float64 |y − Q(s, a)| + PRIORITY_EPSILON, on the host."""
    delta = (targets.detach().double() - q_taken.detach().double()).abs()
    return delta.cpu().numpy() + PRIORITY_EPSILON


def actor_priorities(
    online: torch.nn.Module, target: torch.nn.Module, transitions: dict[str, np.ndarray]
) -> np.ndarray:
    """An actor's initial priorities for n-step transitions (`NStepTransitions.push`
    output) from the parameters it holds.

    Returns:
        (k,) float64 priorities.
    """
    obs = torch.as_tensor(transitions["obs"])
    actions = torch.as_tensor(transitions["action"]).long().unsqueeze(1)
    targets = double_q_targets(
        online,
        target,
        torch.as_tensor(transitions["next_obs"]),
        torch.as_tensor(transitions["reward"]),
        torch.as_tensor(transitions["discount"]),
    )
    with torch.no_grad():
        q_taken = online(obs).gather(1, actions).squeeze(1)
    return priorities_of(q_taken, targets)
