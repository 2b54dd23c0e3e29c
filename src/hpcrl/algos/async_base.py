"""What the asynchronous actor-learner algorithms (IMPALA, A3C, asynchronous Q-learning)
share without torch: their common keys and checks (`AsyncConfig`), the fields of an unroll,
and `SendsUnrolls`. Actor ranks that act with a numpy policy (`hpcrl.numpy_policy`) import
this module and never torch; the torch learners' shared base is `async_learner`.
"""

from __future__ import annotations

from dataclasses import dataclass

from hpcrl.algos.network import NetworkConfig
from hpcrl.comm import protocol as P
from hpcrl.errors import ConfigError

OPTIMIZERS = ("adam", "rmsprop")
# The fields of an unroll (`protocol.unroll_schema`) a loss is computed from.
UNROLL_FIELDS = (
    "obs",
    "actions",
    "behaviour_log_probs",
    "rewards",
    "terminated",
    "truncated",
    "truncation_values",
)


@dataclass
class AsyncConfig(NetworkConfig):
    """Keys of every actor-learner algorithm. `unrolls_per_update` counts actor messages
    (unrolls, or gradients computed on one, of `unroll_length` × `num_envs` env steps) per
    update, over the whole learner group. The layout's own keys (`learner_ranks`,
    `max_policy_lag`, `publish_interval`, `max_unrolls_in_flight`, `actor_nice`) are
    `hpcrl.topologies.actor_learner`'s."""

    unroll_length: int = 20  # T, vector steps per actor message
    unrolls_per_update: int = 1  # actor messages per learner update, all learner ranks
    # The most per update when more are queued (a learner that is behind takes larger
    # batches); null: unrolls_per_update (fixed batches).
    max_unrolls_per_update: int | None = None
    learning_rate: float = 1e-3
    anneal_lr: bool = True  # linearly to 0 over the budget
    optimizer: str = "adam"  # or rmsprop
    rmsprop_alpha: float = 0.99
    optimizer_eps: float = 1e-5
    # Adam's β2 (torch's 0.999). A smaller one bounds the step after a quiet phase: once the
    # losses have been ~0 for long, the first large gradient makes a step of up to
    # (1 - β1^k)/sqrt(1 - β2^k) learning rates (~6.5 with 0.999, ~2.1 with 0.99).
    adam_beta2: float = 0.999
    # Each periodic greedy evaluation (`eval_interval`) whose mean return reaches the env's
    # reward threshold multiplies the learning rate by this, on top of `anneal_lr`
    # (1: off): a policy that solved keeps what it reached (RESULTS.md, issue 14).
    solved_lr_decay: float = 1.0
    gamma: float = 0.99
    max_grad_norm: float = 40.0  # on the learner group's averaged gradient

    def check(self, ok: bool, key: str, expected: str) -> None:
        if not ok:
            raise ConfigError(
                f"config key '{key}': got {getattr(self, key)!r}, expected {expected}"
            )

    def validate(self) -> None:
        check = self.check
        check(self.unroll_length >= 1, "unroll_length", "an integer >= 1")
        check(self.unrolls_per_update >= 1, "unrolls_per_update", "an integer >= 1")
        check(
            self.max_unrolls_per_update is None
            or self.max_unrolls_per_update >= self.unrolls_per_update,
            "max_unrolls_per_update",
            f"null or an integer >= unrolls_per_update ({self.unrolls_per_update})",
        )
        check(self.learning_rate > 0, "learning_rate", "a number > 0")
        check(self.optimizer in OPTIMIZERS, "optimizer", f"one of {list(OPTIMIZERS)}")
        check(0.0 <= self.rmsprop_alpha < 1.0, "rmsprop_alpha", "a decay in [0, 1)")
        check(self.optimizer_eps > 0, "optimizer_eps", "a number > 0")
        check(0.0 < self.adam_beta2 < 1.0, "adam_beta2", "a decay in (0, 1)")
        check(0.0 < self.solved_lr_decay <= 1.0, "solved_lr_decay", "a factor in (0, 1]")
        check(0.0 <= self.gamma <= 1.0, "gamma", "a discount γ in [0, 1]")
        check(self.max_grad_norm > 0, "max_grad_norm", "a number > 0")
        self.validate_network()


class SendsUnrolls:
    """Actors send their unrolls; the learner learns from them (IMPALA)."""

    payload = UNROLL_FIELDS

    def message_schema(self, unroll: P.Schema) -> P.Schema:
        return unroll

    def pack(self, unroll: P.Message, message: P.Message) -> None:
        for name in UNROLL_FIELDS:
            message[name][...] = unroll[name]
