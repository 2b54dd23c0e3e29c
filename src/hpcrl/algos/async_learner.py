"""What the asynchronous actor-learner algorithms' torch learners (IMPALA, A3C,
asynchronous Q-learning) share: the optimizer and the base of the learner interface
(`hpcrl.contracts.AsyncLearner`) the loop in `hpcrl.topologies.actor_learner` calls. Their
common keys (`AsyncConfig`) and the torch-free `SendsUnrolls` are in `async_base`.

What an actor sends is the learner's choice, declared by a mixin, not a message-kind switch:
`SendsUnrolls` (IMPALA: the unroll itself) or `SendsGradients` (A3C, asynchronous
Q-learning: the gradient the actor computed on it). Either offers `message_schema(unroll)`,
`pack(unroll, message)` and the `payload` fields the learner's `update` batch holds.

Interface (one object per learner rank, and per actor rank where the algorithm has no
torch-free actor, `Algorithm.make_actor`; algorithms never see ranks):

    act(obs, progress)      behaviour actions (B, ...) and their log-probabilities (B,)
    values(obs)             bootstrap values (B,) of final observations at a time limit
    pack(unroll, message)   fill the message an actor sends (see above)
    update(batch, group, progress)   one optimizer step on the learner group's gradient
    published() / load_published(flat)   the flat float32 vector learners send to actors
    shared_arrays() / load_shared(arrays) / greedy_actions(obs) / to(device)
"""

from __future__ import annotations

import numpy as np
import torch

from hpcrl.algos.async_base import UNROLL_FIELDS, AsyncConfig
from hpcrl.comm import protocol as P
from hpcrl.models import LazyOptimizer
from hpcrl.schedules import set_learning_rate
from hpcrl.state import load_module_arrays, load_optimizer_arrays, module_arrays, optimizer_arrays


class AsyncLearnerBase(LazyOptimizer):
    """The parts of the interface above every algorithm shares; a subclass sets `model`
    (and, for Q-learning, more networks), and implements
    `_backward(batch)`, which leaves this learner's gradient in `p.grad`."""

    model: torch.nn.Module

    def __init__(self, cfg: AsyncConfig):
        self.cfg = cfg
        self.learner_updates = 0
        # `solved_lr_decay` ** (evaluations that reached the threshold); set by the layout.
        self.lr_scale = 1.0
        self.device = torch.device("cpu")

    def _new_optimizer(self) -> torch.optim.Optimizer:
        """RMSprop or Adam over `model` (made by a learner only: `LazyOptimizer`)."""
        cfg, params = self.cfg, self.model.parameters()
        if cfg.optimizer == "rmsprop":
            return torch.optim.RMSprop(
                params, lr=cfg.learning_rate, alpha=cfg.rmsprop_alpha, eps=cfg.optimizer_eps
            )
        return torch.optim.Adam(
            params,
            lr=cfg.learning_rate,
            betas=(0.9, cfg.adam_beta2),
            eps=cfg.optimizer_eps,
            fused=True,
        )

    def to(self, device: torch.device) -> AsyncLearnerBase:
        self.device = device
        self.model.to(device)
        return self

    def loss(self, unroll: dict[str, np.ndarray]) -> tuple[torch.Tensor, dict[str, float]]:
        """The algorithm's scalar loss (with gradients) of an unroll, and its parts."""
        raise NotImplementedError

    def gradient(self, unroll: dict[str, np.ndarray]) -> np.ndarray:
        """(`SendsGradients`) An actor's gradient of `loss` on its own parameters, flat
        float32 in the order of `model.parameters()`."""
        self.model.zero_grad(set_to_none=True)
        loss, _ = self.loss(unroll)
        loss.backward()
        return self.flat_gradient()

    def _backward(self, batch: dict[str, np.ndarray]) -> dict[str, float]:
        """This learner's gradient into `p.grad`: by default (`SendsGradients`) the mean
        of the batch's actor gradients ((n_parameters, N))."""
        self.set_flat_gradient(torch.from_numpy(batch["gradient"].mean(axis=1)))
        return {}

    def update(self, batch: dict[str, np.ndarray] | None, group, progress: float) -> dict:
        """One optimizer step on the learner group's averaged gradient.

        Args:
            batch: this learner's actor messages side by side, or None when it has none
                this round (it contributes zeros; `group` divides by the learners that had
                one).
            group: the learner group's collectives (`average_gradients()`).
            progress: fraction of the run's budget done, in [0, 1] (annealing).

        Returns:
            This learner's losses ({} without a batch) and the learning rate.
        """
        metrics: dict[str, float] = {}
        self.optimizer.zero_grad(set_to_none=False)  # keeps `group`'s flat gradient views
        if batch is not None:
            metrics = self._backward(batch)
        group.average_gradients()
        group.clip_gradients(self.cfg.max_grad_norm)
        metrics["learning_rate"] = set_learning_rate(
            self.optimizer, self.cfg.learning_rate * self.lr_scale, self.cfg.anneal_lr, progress
        )
        self.optimizer.step()
        self.learner_updates += 1
        self._after_update()
        return metrics

    def _after_update(self) -> None:
        """Hook after every optimizer step (Q-learning's target network)."""

    def synced_modules(self) -> list[torch.nn.Module]:
        """The network every learner rank holds identically: the model."""
        return [self.model]

    def published(self) -> np.ndarray:
        """What learners send to actors: the model's parameters, flat float32."""
        return torch.nn.utils.parameters_to_vector(self.model.parameters()).detach().cpu().numpy()

    def load_published(self, flat: np.ndarray) -> None:
        """Copy a `published()` vector into the model (the vector's buffer may be reused
        at once, e.g. by the next posted receive: nothing aliases it)."""
        copy_into(self.model.parameters(), flat)

    def shared_arrays(self) -> dict[str, np.ndarray]:
        """What every learner rank holds identically: parameters and optimizer state."""
        return module_arrays(self.model) | optimizer_arrays(self.optimizer)

    def load_shared(self, arrays: dict[str, np.ndarray]) -> None:
        load_module_arrays(self.model, arrays)
        load_optimizer_arrays(self.optimizer, arrays)

    def set_flat_gradient(self, flat: torch.Tensor) -> None:
        """Put a flat gradient (the order of `model.parameters()`) into every `p.grad`."""
        offset = 0
        for p in self.model.parameters():
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.device).clone()
            offset += n

    def flat_gradient(self) -> np.ndarray:
        """Every `p.grad` (zeros where None) as one flat float32 vector."""
        return np.concatenate(
            [
                (p.grad if p.grad is not None else torch.zeros_like(p))
                .detach()
                .cpu()
                .reshape(-1)
                .numpy()
                for p in self.model.parameters()
            ]
        ).astype(np.float32, copy=False)


class SendsGradients:
    """Actors send the gradient of the loss on their unroll, computed with their own copy of
    the parameters; the learner applies it (A3C, asynchronous Q-learning: the learner is a
    parameter server)."""

    payload = ("gradient",)

    def message_schema(self, unroll: P.Schema) -> P.Schema:
        rows = int(np.prod(unroll.fields["rewards"][1]))
        return P.gradient_schema(sum(p.numel() for p in self.model.parameters()), rows)

    def pack(self, unroll: P.Message, message: P.Message) -> None:
        """The actor's gradient on a full unroll; zeros for its last, partial one (counted,
        not learned from)."""
        full = unroll["header"][P.ActorHeader.ROWS] == unroll["rewards"].size
        fields = {name: unroll[name] for name in UNROLL_FIELDS}
        message["gradient"][:, 0] = self.gradient(fields) if full else 0.0


def copy_into(parameters, flat: np.ndarray) -> int:
    """Copy the first values of `flat` into `parameters` in order (not
    `vector_to_parameters`, which makes them views of `flat`); returns the values used."""
    offset = 0
    with torch.no_grad():
        for p in parameters:
            n = p.numel()
            p.copy_(torch.from_numpy(flat[offset : offset + n]).view_as(p))
            offset += n
    return offset


def unroll_targets(batch: dict[str, np.ndarray], gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-step discounts and rewards of an unroll with time limits folded in: where a
    time limit cut the episode at step t, rewards[t] += γ·truncation_values[t] and the
    discount is 0; where it terminated, the discount is 0; elsewhere γ.

    Returns:
        (discounts, rewards), each (T, N) float32.
    """
    truncated = batch["truncated"] != 0
    discounts = (gamma * (1.0 - batch["terminated"]) * ~truncated).astype(np.float32)
    rewards = (batch["rewards"] + gamma * truncated * batch["truncation_values"]).astype(np.float32)
    return discounts, rewards
