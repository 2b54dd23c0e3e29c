"""Ape-X DQN (Horgan et al. 2018, "Distributed Prioritized Experience Replay"): its
hyperparameters and registry entry, importable without torch, so replay ranks never load it.

The learning rule and the torch learner are in `hpcrl.algos.apex_learner`; the layout that
runs it (one learner, `replay_ranks` replay shards, actors) is
`hpcrl.topologies.distributed_replay`, and the shard's buffer is
`hpcrl.replay.PrioritizedReplay`.

Defaults are the paper's (Appendix C, Atari), except the optimizer (Adam instead of
centered RMSProp; see `learning_rate`) and the flow control `env_steps_per_update`, which
the paper does not have (its actors never wait): the configs in `configs/` set it where a
small budget must be learned from efficiently.
"""

from __future__ import annotations

from dataclasses import dataclass

from hpcrl.algos.network import NetworkConfig
from hpcrl.contracts import Algorithm
from hpcrl.errors import ConfigError, UserError


@dataclass
class ApexConfig(NetworkConfig):
    """Ape-X hyperparameters. Sizes in transitions are global (all replay ranks)."""

    learning_rate: float = 0.00025 / 4  # the paper's, for its centered RMSProp; Adam here
    anneal_lr: bool = False  # linearly to 0 over the budget
    adam_eps: float = 1.5e-4  # Dopamine's Rainbow value
    buffer_size: int = 2_000_000  # transitions, split evenly over the replay ranks
    minibatch_size: int = 512  # transitions per learner update (from one shard)
    learning_starts: int = 50_000  # transitions in replay (all shards) before learning
    n_step: int = 3  # steps per return
    gamma: float = 0.99
    priority_alpha: float = 0.6  # α: P(i) ∝ p_i^α
    importance_beta_start: float = 0.4  # β at the start, annealed linearly ...
    importance_beta_end: float = 1.0  # ... to this at the end of the budget
    target_update_interval: int = 2_500  # learner updates between target copies
    max_grad_norm: float = 40.0
    actor_epsilon: float = 0.4  # ε of ε_i = ε^(1 + i α_ε / (N - 1)), Section 4.1
    actor_epsilon_alpha: float = 7.0  # α_ε of the same formula
    send_interval: int = 50  # vector steps an actor batches before sending (paper: 50)
    # Flow control: once learning has started, actors together take at most this many env
    # steps per learner update (they wait for newer parameters beyond it); null: actors
    # never wait (the paper's Ape-X, whose replay ratio is set by the hardware).
    env_steps_per_update: float | None = None
    dueling: bool = True
    activation: str = "relu"

    def validate(self) -> None:
        def check(ok: bool, key: str, expected: str) -> None:
            if not ok:
                raise ConfigError(
                    f"config key '{key}': got {getattr(self, key)!r}, expected {expected}"
                )

        check(self.learning_rate > 0, "learning_rate", "a number > 0")
        check(self.adam_eps > 0, "adam_eps", "a number > 0")
        check(self.buffer_size >= 1, "buffer_size", "an integer >= 1")
        check(self.minibatch_size >= 1, "minibatch_size", "an integer >= 1")
        check(self.learning_starts >= 1, "learning_starts", "an integer >= 1")
        check(self.n_step >= 1, "n_step", "an integer >= 1")
        check(0.0 <= self.gamma <= 1.0, "gamma", "a discount γ in [0, 1]")
        check(0.0 <= self.priority_alpha <= 1.0, "priority_alpha", "an exponent α in [0, 1]")
        for key in ("importance_beta_start", "importance_beta_end"):
            check(0.0 <= getattr(self, key) <= 1.0, key, "an exponent β in [0, 1]")
        check(self.target_update_interval >= 1, "target_update_interval", "an integer >= 1")
        check(self.max_grad_norm > 0, "max_grad_norm", "a number > 0")
        check(0.0 <= self.actor_epsilon <= 1.0, "actor_epsilon", "a probability in [0, 1]")
        check(self.actor_epsilon_alpha >= 0, "actor_epsilon_alpha", "a number >= 0")
        check(self.send_interval >= 1, "send_interval", "an integer >= 1")
        check(
            self.env_steps_per_update is None or self.env_steps_per_update > 0,
            "env_steps_per_update",
            "null (actors never wait) or a number > 0",
        )
        self.validate_network()

    def check_spaces(self, observation_space, action_space) -> None:
        """Raises UserError unless the action space is `Discrete`."""
        import gymnasium as gym

        if not isinstance(action_space, gym.spaces.Discrete):
            raise UserError(
                f"apex needs a Discrete action space (Q-values per action), got {action_space}"
            )

    def beta(self, progress: float) -> float:
        """β at this fraction of the budget, linear from start to end."""
        p = min(max(progress, 0.0), 1.0)
        return self.importance_beta_start + p * (
            self.importance_beta_end - self.importance_beta_start
        )


def make_learner(cfg: ApexConfig, observation_space, action_space, *args):
    """The torch learner (`apex_learner.Apex`); the arguments are `make_learner`'s."""
    from hpcrl.algos.apex_learner import Apex

    return Apex(cfg, observation_space, action_space, *args)


ALGORITHM = Algorithm(
    "apex", ApexConfig, ("distributed_replay",), make_learner, run_defaults={"num_envs": 1}
)
