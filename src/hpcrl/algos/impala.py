"""IMPALA (Espeholt et al. 2018, "IMPALA: Scalable Distributed Deep-RL with Importance
Weighted Actor-Learner Architectures"): its hyperparameters and registry entry, importable
without torch, so actor ranks never load it.

The V-trace loss and the torch learner are in `hpcrl.algos.impala_learner` (built only on
learner ranks, `make_learner`); an actor of an MLP policy acts with `hpcrl.numpy_policy.
NumpyActorCritic` on the flat parameters its learner publishes (`make_actor`), while an
image policy's actors keep the torch model.
"""

from __future__ import annotations

from dataclasses import dataclass

from hpcrl.algos.async_base import AsyncConfig
from hpcrl.contracts import Algorithm


@dataclass
class ImpalaConfig(AsyncConfig):
    """IMPALA hyperparameters (the layout keys are `AsyncConfig`'s). `unrolls_per_update` counts
    unrolls per update over the whole learner group."""

    unroll_length: int = 20
    unrolls_per_update: int = 2
    clip_rho_threshold: float | None = 1.0  # ρ̄ (null: no clipping)
    clip_pg_rho_threshold: float | None = 1.0  # ρ̄ of the policy-gradient term
    clip_c_threshold: float | None = 1.0  # c̄
    vtrace_lambda: float = 1.0
    ent_coef: float = 0.01
    vf_coef: float = 0.5  # the paper's baseline cost

    def validate(self) -> None:
        super().validate()
        for key in ("clip_rho_threshold", "clip_pg_rho_threshold", "clip_c_threshold"):
            value = getattr(self, key)
            self.check(value is None or value > 0, key, "a number > 0, or null for no clipping")
        self.check(0.0 <= self.vtrace_lambda <= 1.0, "vtrace_lambda", "λ in [0, 1]")

    def check_spaces(self, observation_space, action_space) -> None:
        """Raises UserError unless the action space is `Discrete` or `Box`."""
        from hpcrl.algos.rollout import check_actor_critic_spaces

        check_actor_critic_spaces("impala", False, observation_space, action_space)


def make_learner(cfg: ImpalaConfig, observation_space, action_space, *args):
    """The torch learner (`impala_learner.Impala`); the arguments are `make_learner`'s."""
    from hpcrl.algos.impala_learner import Impala

    return Impala(cfg, observation_space, action_space, *args)


def make_actor(cfg: ImpalaConfig, observation_space, action_space, seed: int):
    """An actor's torch-free policy (`NumpyActorCritic`), or None where the model has a
    CNN, the user's `network_fn` or an activation numpy lacks (those actors keep the
    torch model)."""
    from hpcrl.numpy_policy import NumpyActorCritic

    if cfg.custom_network or not NumpyActorCritic.supports(
        observation_space, action_space, cfg.activation
    ):
        return None
    return NumpyActorCritic(observation_space, action_space, cfg.hidden(), seed, cfg.activation)


ALGORITHM = Algorithm(
    "impala",
    ImpalaConfig,
    ("actor_learner",),
    make_learner,
    make_actor=make_actor,
    renamed_keys={"batch_size": "unrolls_per_update"},
)
