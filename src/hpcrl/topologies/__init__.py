"""The layouts: one module each, named as the layout is, holding its `Topology` subclass
and its settings dataclass. A layout registers itself here; the runner and the config
builder find it by name and nothing else.

    ps              rank 0 parameter server, ranks 1..N-1 actors (tabular)
    allreduce       every rank acts and learns on its own table; tables averaged (tabular)
    sharded         every rank acts and owns a shard of the Q-table (tabular)
    async           every rank learns on its own table at once; merges overlapped (tabular)
    data_parallel   every rank acts and learns; gradients averaged (PPO, A2C, DQN)
    actor_learner   ranks 0..k-1 learn, the others act (IMPALA, A3C, asynchronous Q)
    distributed_replay  rank 0 learns, ranks 1..R hold prioritized replay, the others act (Ape-X)

The modules are imported lazily (a tabular run never imports torch).
"""

from __future__ import annotations

import importlib

from hpcrl.errors import ConfigError

# Layout name -> the module whose `TOPOLOGY` is its `hpcrl.contracts.Topology` subclass.
TOPOLOGIES: dict[str, str] = {
    "ps": "hpcrl.topologies.ps",
    "allreduce": "hpcrl.topologies.allreduce",
    "sharded": "hpcrl.topologies.sharded",
    "async": "hpcrl.topologies.async",
    "data_parallel": "hpcrl.topologies.data_parallel",
    "actor_learner": "hpcrl.topologies.actor_learner",
    "distributed_replay": "hpcrl.topologies.distributed_replay",
}


def topology_class(name: str) -> type:
    """The `Topology` subclass of the layout called `name`.

    Raises:
        ConfigError: not a registered layout.
    """
    if name not in TOPOLOGIES:
        raise ConfigError(f"unknown layout {name!r}: expected one of {sorted(TOPOLOGIES)}")
    return importlib.import_module(TOPOLOGIES[name]).TOPOLOGY


def make_topology(cfg):
    """The run's topology (`cfg`: an `hpcrl.config.Config`)."""
    return topology_class(cfg.layout)(cfg)
