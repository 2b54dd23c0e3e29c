"""Greedy evaluation during training, keeping the best parameters (RL Zoo's `EvalCallback`:
evaluate every `eval_interval` env steps, save the best model).

Rank 0 (which holds the learner's parameters in the deep layouts) runs
`periodic_eval_episodes` greedy episodes side by side (`evaluation.batched_policy_returns`,
episode i from `reset(seed=seed + 2_000_003 + i)`, the same episodes every time, so two
evaluations differ only by the policy) whenever `eval_interval` env steps have passed since
the last one, and once more at the end of training. A mean return higher than every
earlier one writes the learner's arrays to `checkpoints/best.h5`
(`storage.checkpoints.write_best`), which `hpcrl evaluate --checkpoint best` reads.
`/metrics` gets `eval/mean_return`, `eval/std_return`, `eval/best_mean_return` and
`eval/seconds` in the next row, which the layout logs right after an evaluation. A resumed
run continues from the best mean recorded in `best.h5`. `solved` counts the evaluations
whose mean reached the env's reward threshold while the training episodes' mean did too
(the layout scales the learning rate by `solved_lr_decay` ** solved; checkpointed by the
layout). Both, because 10 greedy episodes reach 475 on CartPole by luck long before the
policy holds it: counting those froze runs at returns ~280.

The evaluation pauses this rank's learning, and its actors once they reach their
flow-control limit: with 10 CartPole episodes and a 64x64 MLP it takes ~0.1-0.5 s.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np

from hpcrl.errors import CheckpointError
from hpcrl.evaluation import batched_policy_returns
from hpcrl.storage.checkpoints import BEST, load_checkpoint, write_best
from hpcrl.topologies.checkpointing import checkpoint_identity

SEED_OFFSET = 2_000_003  # periodic evaluation episodes' seeds: seed + this + i


def reward_threshold(env_id: str) -> float | None:
    """The registered env's `reward_threshold` (CartPole-v1: 475), or None."""
    import gymnasium as gym

    spec = gym.registry.get(env_id)
    return None if spec is None else spec.reward_threshold


class PeriodicEval:
    """Rank 0's periodic greedy evaluation (see the module doc); `active` is False when
    `eval_interval` is 0.

    Call sequence (rank 0, in the training loop):
        if peval.due(env_steps):
            peval.run(env_steps, learner.greedy_actions, learner.shared_arrays, updates)
        ... at the next log row: extra |= peval.take()
    """

    def __init__(self, ctx, env_steps: int = 0):
        run = ctx.cfg.run
        self.ctx = ctx
        self.interval = run.eval_interval
        self.episodes = run.periodic_eval_episodes
        self.best_mean = -math.inf
        self.best_env_steps: int | None = None
        self.pending: dict[str, float] = {}
        self.next_at = self._next(env_steps)
        self.last_at = env_steps  # env steps of the last evaluation (or the start)
        self.threshold = reward_threshold(run.env_id)
        self.solved = 0  # evaluations whose mean reached `threshold`
        if ctx.resume is not None:
            self.solved = int(ctx.resume.meta.get("solved_evaluations", 0))
        best = ctx.run_dir / "checkpoints" / BEST
        if self.active and ctx.resume is not None and best.exists():
            try:
                _, meta = load_checkpoint(best)
                self.best_mean = float(meta["eval_mean_return"])
                self.best_env_steps = int(meta["env_steps"])
            except (CheckpointError, KeyError):
                pass  # a damaged best.h5 is overwritten by the next better evaluation

    @property
    def active(self) -> bool:
        return self.interval > 0

    def _next(self, env_steps: int) -> int:
        return (env_steps // self.interval + 1) * self.interval if self.active else 0

    def due(self, env_steps: int, final: bool = False) -> bool:
        """`eval_interval` env steps since the last evaluation, or (`final`) the run's end
        with parameters not evaluated yet."""
        if not self.active:
            return False
        return env_steps >= self.next_at or (final and env_steps != self.last_at)

    def run(
        self,
        env_steps: int,
        greedy_actions: Callable[[np.ndarray], np.ndarray],
        arrays: Callable[[], dict[str, np.ndarray]],
        learner_updates: int,
        training_mean: float = float("inf"),
    ) -> float:
        """Evaluate now; write `best.h5` if this is the best mean so far. Returns the mean.
        `training_mean`: the training episodes' recent mean return (for `solved`)."""
        run = self.ctx.cfg.run
        t0 = time.perf_counter()
        returns = batched_policy_returns(
            run.env_id,
            run.env_kwargs,
            greedy_actions,
            self.episodes,
            run.seed + SEED_OFFSET,
            run.env_options(),
        )
        mean = float(returns.mean())
        self.next_at, self.last_at = self._next(env_steps), env_steps
        if self.threshold is not None and min(mean, training_mean) >= self.threshold:
            self.solved += 1
        if mean > self.best_mean:
            self.best_mean, self.best_env_steps = mean, int(env_steps)
            self._write(arrays(), env_steps, learner_updates, returns)
        self.pending = {
            "eval/mean_return": mean,
            "eval/std_return": float(returns.std()),
            "eval/best_mean_return": self.best_mean,
            "eval/seconds": time.perf_counter() - t0,
        }
        return mean

    def _write(self, arrays, env_steps: int, learner_updates: int, returns) -> None:
        meta = {
            **checkpoint_identity(self.ctx, env_steps, learner_updates),
            "eval_mean_return": float(returns.mean()),
            "eval_std_return": float(returns.std()),
            "eval_episodes": int(returns.size),
        }
        write_best(self.ctx.run_dir / "checkpoints", arrays, meta)

    def take(self) -> dict[str, float]:
        """The last evaluation's metrics, once (for the next `/metrics` row)."""
        out, self.pending = self.pending, {}
        return out

    def summary(self) -> dict | None:
        """{"best_eval_mean_return", "best_eval_env_steps"}, or None before any."""
        if self.best_env_steps is None:
            return None
        return {"best_eval_mean_return": self.best_mean, "best_eval_env_steps": self.best_env_steps}
