"""A trained policy in your own code: `hpcrl.load_policy(run_dir)` (issue 15).

It reads a checkpoint of a run directory in a plain `python` process (no `mpirun`): the
run's config is stored in the checkpoint, so the config file may be gone. The policy is
what `hpcrl evaluate` runs: the greedy action of the Q-table (tabular Q-learning) or of
the network (argmax of the logits, the Gaussian mean, argmax of Q); actor-critic policies
can also be sampled.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hpcrl.errors import UserError


class Policy:
    """A policy loaded from a checkpoint.

    Attributes:
        algo: the run's algorithm, e.g. "ppo".
        env_id: the gymnasium id it was trained on (its module already imported).
        observation_space, action_space: the env's spaces.
        checkpoint: the checkpoint file it was loaded from.
        config: the run's `hpcrl.config.Config` (its env_kwargs, env options, network).
    """

    def __init__(self, config, observation_space, action_space, checkpoint, greedy):
        self.config = config
        self.algo, self.env_id = config.run.algo, config.run.env_id
        self.observation_space, self.action_space = observation_space, action_space
        self.checkpoint = checkpoint
        self._greedy = greedy  # TableGreedy, ActionsGreedy (`sharded`) or LearnerGreedy

    def act(self, obs, deterministic: bool = True) -> np.ndarray:
        """Actions for one observation or a batch.

        Args:
            obs: one observation, shaped as `observation_space` (an int for Discrete), or a
                batch (B, *observation_space.shape).
            deterministic: the greedy action (what `evaluate` takes; a Q-table's ties go
                to the lowest action, as in `evaluate`); False
                samples from the policy (actor-critic algorithms only: PPO, A2C, IMPALA,
                A3C).

        Returns:
            The action (a numpy scalar or array shaped as `action_space`) for one
            observation, or (B, *action_shape) actions for a batch: int64 for Discrete,
            float32 for Box.

        Raises:
            UserError: an observation of the wrong shape, or `deterministic=False` for a
                policy that is a Q-function (tabular Q-learning, DQN, asynchronous Q).
        """
        obs = np.asarray(obs)
        shape = self.observation_space.shape or ()
        single = obs.shape == shape
        if not single and obs.shape[1:] != shape:
            raise UserError(
                f"observation of shape {obs.shape}: expected {shape} (one) or "
                f"(B, *{shape}) (a batch) for {self.env_id}"
            )
        batch = obs[None] if single else obs
        actions = self._actions(batch, deterministic)
        return actions[0] if single else actions

    def _actions(self, batch: np.ndarray, deterministic: bool) -> np.ndarray:
        learner = getattr(self._greedy, "learner", None)
        if learner is None:  # a Q-table, or (`sharded`) its greedy actions
            if not deterministic:
                raise UserError(f"{self.algo}: a Q-table has no stochastic policy")
            return self._greedy.greedy_actions(batch.astype(np.int64).reshape(-1))
        if deterministic:
            return np.asarray(learner.greedy_actions(batch))
        sample = getattr(learner, "sample_actions", None)
        if sample is None:
            raise UserError(
                f"{self.algo}: a Q-function has no stochastic policy; use deterministic=True"
            )
        return np.asarray(sample(batch))


def load_policy(run_dir: str | Path, checkpoint: str = "latest", *, network_fn=None) -> Policy:
    """The policy of a checkpoint in `run_dir`, for use in your own code.

    The env's spaces come from the checkpoint's meta, so neither the env nor its
    `env_module` is needed: a run of an `env_fn` or of a simulator that is not installed
    here loads too (an older checkpoint without stored spaces makes one env instead).

    Args:
        run_dir: a run directory written by `train`.
        checkpoint: "latest" (the newest intact step file), "best" (`best.h5`, kept by the
            periodic evaluation) or "step-N" (`checkpoints/step-N.h5`).
        network_fn: the `network_fn` the run was trained with (`hpcrl.train`), if any.

    Raises:
        UserError: no run directory there, a bad `checkpoint`, a missing file, a run
            trained with a `network_fn` loaded without one, or (an older checkpoint) an env
            that cannot be made. `hpcrl.storage.checkpoints.CheckpointError`: a damaged checkpoint.
    """
    from hpcrl.api import custom_network
    from hpcrl.config import config_from_json
    from hpcrl.envs import checkpoint_spaces
    from hpcrl.runner import read_policy_checkpoint
    from hpcrl.topologies import make_topology

    arrays, meta, path, shapes = read_policy_checkpoint(run_dir, checkpoint)
    # The simulator's module is imported only if the spaces must come from an env.
    cfg = config_from_json(json.dumps(meta["config"]), import_env=False)
    run = cfg.run
    spaces = checkpoint_spaces(meta, run)
    with custom_network(network_fn):
        greedy = make_topology(cfg).checkpoint_policy(path, meta, shapes, arrays)
    return Policy(cfg, *spaces, path, greedy)
