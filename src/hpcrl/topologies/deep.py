"""What the deep layouts (`data_parallel`, `actor_learner`) share: the checks of an env
and device, and the greedy policy of a learner rebuilt from a checkpoint."""

from __future__ import annotations

from hpcrl.algos import make_learner
from hpcrl.contracts import Topology
from hpcrl.storage.checkpoints import read_shared
from hpcrl.topologies.collective_eval import LearnerGreedy


class DeepTopology(Topology):
    """A layout whose learner is a torch model (`hpcrl.contracts.DeepLearner`)."""

    def check_env(self, env, world_size: int, shapes: dict) -> None:
        """Raises:
        UserError: `cuda` where torch sees no GPU, observations no model reads, or spaces
            the algorithm does not handle."""
        from hpcrl.models import check_device, custom_encoder, make_encoder

        check_device(self.cfg.run.device)
        if self.cfg.algo.custom_network:
            custom_encoder(env.observation_space)  # the user's module, on a sample batch
        else:
            make_encoder(env.observation_space)
        self.cfg.algo.check_spaces(env.observation_space, env.action_space)

    def checkpoint_policy(self, path, meta: dict, shapes: dict, arrays: dict) -> LearnerGreedy:
        """Every rank rebuilds the learner and loads the checkpoint rank 0 verified."""
        from hpcrl.envs import checkpoint_spaces

        spaces = checkpoint_spaces(meta, self.cfg.run)
        learner = make_learner(self.cfg, *spaces, int(meta["world_size"]))
        learner.load_shared(read_shared(path))
        return LearnerGreedy(learner)
