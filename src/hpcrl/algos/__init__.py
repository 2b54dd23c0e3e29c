"""The algorithms, one module each. A module registers itself here by name and offers an
`ALGORITHM` (`hpcrl.contracts.Algorithm`): its config dataclass, the layouts it runs in,
and `make_learner`. Modules are imported lazily, so a tabular run never imports torch.
"""

from __future__ import annotations

import difflib
import importlib

from hpcrl.errors import ConfigError

# Algorithm name -> the module that holds it.
ALGOS: dict[str, str] = {
    "qlearning": "hpcrl.algos.qlearning",
    "ppo": "hpcrl.algos.ppo",
    "a2c": "hpcrl.algos.a2c",
    "dqn": "hpcrl.algos.dqn",
    "impala": "hpcrl.algos.impala",
    "a3c": "hpcrl.algos.a3c",
    "async_q": "hpcrl.algos.async_q",
    "async_nstep_q": "hpcrl.algos.async_nstep_q",
    "apex": "hpcrl.algos.apex",
}


def algorithm(name: str):
    """The `Algorithm` entry of the algorithm called `name`.

    Raises:
        ConfigError: `name` is not a known algorithm (the closest one is suggested).
    """
    if name not in ALGOS:
        hint = difflib.get_close_matches(str(name), ALGOS, n=1)
        near = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ConfigError(f"unknown algo {name!r}{near}: expected one of {sorted(ALGOS)}")
    return importlib.import_module(ALGOS[name]).ALGORITHM


def make_learner(cfg, observation_space, action_space, world_size: int, seed: int = 0):
    """The one place a learner is built: the run's algorithm's `make_learner`.

    Args:
        cfg: the run's `hpcrl.config.Config`.
        observation_space, action_space: the env's gymnasium spaces.
        world_size: ranks in the run (data-parallel learners split their batches over it).
        seed: this rank's seed for the learner's own random streams.
    """
    spec = algorithm(cfg.run.algo)
    return spec.make_learner(
        cfg.algo, observation_space, action_space, cfg.run.num_envs, world_size, seed
    )
