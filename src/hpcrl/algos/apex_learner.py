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

`Apex` is the learner (and, with the parameters it publishes, every actor's policy); the
config and registry entry are `hpcrl.algos.apex` (torch-free), the layout
`hpcrl.topologies.apex`, the shard's buffer `hpcrl.replay.PrioritizedReplay`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from hpcrl.models import LazyOptimizer, q_network
from hpcrl.schedules import set_learning_rate
from hpcrl.state import (
    load_module_arrays,
    load_optimizer_arrays,
    module_arrays,
    optimizer_arrays,
)

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


class Apex(LazyOptimizer):
    """Ape-X's dueling double DQN: the learner's update on prioritized batches, and the
    ε-greedy policy and initial priorities of an actor holding its published parameters.

    Call sequence:
        learner:  priorities, metrics = update(batch, weights, progress)   # per batch
                  published()                                  # to the actors, versioned
        actor:    load_published(flat)                         # when parameters arrive
                  actions = act(obs, epsilon)                  # per vector step
                  initial_priorities(transitions)              # per message to replay

    Args:
        cfg: `ApexConfig`.
        observation_space, action_space: the env's spaces (Discrete actions).
        num_envs, world_size: unused (the `make_learner` signature).
        seed: the ε-greedy generator's seed.
    """

    def __init__(self, cfg, observation_space, action_space, num_envs, world_size, seed):
        self.cfg = cfg
        self.n_actions = int(action_space.n)
        self.model = q_network(cfg, observation_space, action_space, dueling=cfg.dueling)
        self.target = q_network(cfg, observation_space, action_space, dueling=cfg.dueling)
        self.target.load_state_dict(self.model.state_dict())
        self.device = torch.device("cpu")
        self.rng = np.random.default_rng(seed)
        self.learner_updates = 0
        self._params = list(self.model.parameters()) + list(self.target.parameters())

    def _new_optimizer(self) -> torch.optim.Adam:
        """Adam over the online network (made by the learner only: `LazyOptimizer`)."""
        return torch.optim.Adam(
            self.model.parameters(), lr=self.cfg.learning_rate, eps=self.cfg.adam_eps
        )

    def act(self, obs: np.ndarray, epsilon: float) -> np.ndarray:
        """ε-greedy actions: (B, *obs_shape) observations -> (B,) int64."""
        greedy = self.greedy_actions(obs)
        explore = self.rng.random(len(obs)) < epsilon
        return np.where(explore, self.rng.integers(0, self.n_actions, len(obs)), greedy)

    def initial_priorities(self, transitions: dict[str, np.ndarray]) -> np.ndarray:
        """(k,) float64 |δ| + ε of n-step transitions under the parameters held
        (`actor_priorities`)."""
        return actor_priorities(self.model, self.target, transitions)

    def update(
        self, batch: dict[str, np.ndarray], weights: np.ndarray, progress: float
    ) -> tuple[np.ndarray, dict[str, float]]:
        """One gradient step on a prioritized batch; the target network is copied every
        `target_update_interval` updates (Horgan et al. 2018, Algorithm 2).

        Args:
            batch: {"obs": (k, ...), "action": (k,) int64, "reward": (k,) n-step returns,
                "next_obs": (k, ...), "discount": (k,) γ^m or 0}.
            weights: (k,) float64 importance weights.
            progress: fraction of the budget done (`anneal_lr`).

        Returns:
            ((k,) float64 new priorities |δ| + ε, metrics).
        """
        cfg = self.cfg

        def tensor(name):
            return torch.as_tensor(batch[name], device=self.device)

        lr = set_learning_rate(self.optimizer, cfg.learning_rate, cfg.anneal_lr, progress)
        targets = double_q_targets(
            self.model,
            self.target,
            tensor("next_obs"),
            tensor("reward").float(),
            tensor("discount").float(),
        )
        q = self.model(tensor("obs")).gather(1, tensor("action").long().unsqueeze(1)).squeeze(1)
        loss, priorities = prioritized_loss(
            q, targets, torch.as_tensor(weights, device=self.device)
        )
        self.optimizer.zero_grad(set_to_none=False)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        self.learner_updates += 1
        if self.learner_updates % cfg.target_update_interval == 0:
            self.target.load_state_dict(self.model.state_dict())
        return priorities, {
            "losses/td": float(loss.item()),
            "grad_norm": float(norm),
            "q_mean": float(q.detach().mean()),
            "learning_rate": lr,
        }

    def greedy_actions(self, obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            q = self.model(torch.as_tensor(obs, device=self.device))
            return q.argmax(dim=1).cpu().numpy()

    def published(self) -> np.ndarray:
        """The online then the target network's parameters, one flat float32 vector."""
        with torch.no_grad():
            return torch.cat([p.detach().reshape(-1).float().cpu() for p in self._params]).numpy()

    def load_published(self, flat: np.ndarray) -> None:
        with torch.no_grad():
            start = 0
            for p in self._params:
                n = p.numel()
                p.copy_(torch.as_tensor(flat[start : start + n]).view_as(p))
                start += n

    def synced_modules(self) -> list[torch.nn.Module]:
        return [self.model, self.target]

    def to(self, device: torch.device) -> Apex:
        self.device = device
        self.model.to(device)
        self.target.to(device)
        return self

    def shared_arrays(self) -> dict[str, np.ndarray]:
        """Online and target networks and the optimizer state, for a checkpoint."""
        return (
            module_arrays(self.model)
            | module_arrays(self.target, "target")
            | optimizer_arrays(self.optimizer)
        )

    def load_shared(self, arrays: dict[str, np.ndarray]) -> None:
        load_module_arrays(self.model, arrays)
        if any(name.startswith("target/") for name in arrays):
            load_module_arrays(self.target, arrays, "target")
        else:  # a policy-only file (best.h5)
            self.target.load_state_dict(self.model.state_dict())
        if any(name.startswith("optimizer/") for name in arrays):
            load_optimizer_arrays(self.optimizer, arrays)
