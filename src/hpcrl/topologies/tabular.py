"""What the tabular layouts (`ps`, `allreduce`, `sharded`, `async`) share: the checks of
a Q-table's env and checkpoint, and the greedy policy of a table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from hpcrl.contracts import Topology
from hpcrl.envs import discrete_sizes
from hpcrl.errors import ConfigError, UserError
from hpcrl.topologies.collective_eval import TableGreedy


@dataclass
class TabularConfig:
    """What the tabular layouts' settings share."""

    sync_interval: int = 64  # vector steps between exchanges with the learner / peers

    def validate(self) -> None:
        if self.sync_interval < 1:
            raise ConfigError(
                f"config key 'sync_interval': got {self.sync_interval!r}, expected an integer >= 1"
            )


class TabularTopology(Topology):
    """A layout whose learner is a Q-table (`hpcrl.contracts.TabularLearner`)."""

    multi_step: ClassVar[bool] = False  # whether it learns from n-step returns (n_step > 1)

    def check_env(self, env, world_size: int, shapes: dict) -> None:
        """Raises:
        UserError: a device other than the CPU, `n_step` > 1 for a one-step layout,
            spaces that are not both `Discrete`, or a resumed checkpoint whose `q_table`
            has another shape than the env's."""
        run = self.cfg.run
        if run.device != "cpu":
            raise UserError(
                f"device {run.device!r}: {run.algo} is tabular and runs on the CPU; "
                "the device applies to the deep learners (ppo, a2c, dqn)"
            )
        if self.cfg.algo.n_step != 1 and not self.multi_step:
            raise UserError(
                f"n_step={self.cfg.algo.n_step}: layout {self.name!r} learns from one-step "
                "targets; n-step returns need layout async"
            )
        sizes = discrete_sizes(env)
        if "q_table" in shapes and tuple(shapes["q_table"]) != sizes:
            raise UserError(
                f"the checkpoint's q_table has shape {tuple(shapes['q_table'])}, env "
                f"{run.env_id!r} now has {sizes[0]} states x {sizes[1]} actions"
            )

    def checkpoint_policy(self, path, meta: dict, shapes: dict, arrays: dict) -> TableGreedy:
        """The checkpoint's table (rank 0's; the evaluation broadcasts it)."""
        return TableGreedy(arrays.get("q_table", np.zeros(tuple(shapes["q_table"]))))
