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
    on_gpu: ClassVar[bool] = False  # whether `device: cuda` runs it on GPUs (hpcrl.table_torch)

    def check_env(self, env, world_size: int, shapes: dict) -> None:
        """Raises:
        UserError: a device this layout or node cannot use (`check_device`), `n_step`
            > 1 for a one-step layout,
            spaces that are not both `Discrete`, or a resumed checkpoint whose `q_table`
            has another shape than the env's."""
        run = self.cfg.run
        if run.device != "cpu":
            self.check_device(env)
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

    def check_device(self, env) -> None:
        """`device: cuda` runs a layout with `on_gpu` (`allreduce`) on GPUs
        (`hpcrl.table_torch`), its envs stepped from their transition table.

        Raises:
            UserError: another layout, an env stepped otherwise (`vector_env` sync or
                async), an env without a table, or no CUDA GPU seen by torch.
        """
        run = self.cfg.run
        if not self.on_gpu:
            raise UserError(
                f"device {run.device!r}: tabular layout {self.name!r} runs on the CPU; the "
                "tabular GPU path is layout allreduce (one process or many)"
            )
        if run.vector_env not in ("auto", "table"):
            raise UserError(
                f"vector_env {run.vector_env!r}: with device {run.device!r} the tabular "
                "envs are stepped from their transition table; use vector_env auto or table"
            )
        from hpcrl.table_vector import check_table

        check_table(env, run.env_id)  # the probe env
        import torch

        if not torch.cuda.is_available():
            raise UserError(
                f"device {run.device!r}: torch sees no CUDA GPU on this node for the tabular "
                f"GPU path (torch {torch.__version__}, built with CUDA {torch.version.cuda}); "
                "use --device cpu or run on a GPU node"
            )

    def checkpoint_policy(self, path, meta: dict, shapes: dict, arrays: dict) -> TableGreedy:
        """The checkpoint's table (rank 0's; the evaluation broadcasts it)."""
        return TableGreedy(arrays.get("q_table", np.zeros(tuple(shapes["q_table"]))))
