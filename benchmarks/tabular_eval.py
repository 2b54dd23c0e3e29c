"""The tabular greedy evaluation: episodes side by side from the transition table
(`hpcrl.evaluation.actions_episode_returns`, what `train`'s final evaluation and `hpcrl
evaluate` run for the envs `hpcrl.table_vector.steps_exactly` names) against the
episode-by-episode loop over gymnasium's env (`policy_episode_returns`, what they ran
before), on the same episodes and seeds, alternating over `--repeats` rounds; prints the
median seconds of each and their ratio as a Markdown table, and checks the returns are
bit-identical.

    .venv/bin/python benchmarks/tabular_eval.py [--episodes 1000] [--repeats 3]

Cases: FrozenLake 8x8 under a random policy (most episodes run to the 200-step time limit),
FrozenLake 8x8 under the greedy policy of Q* (value iteration on `P`), and a generated
slippery 50x50 FrozenLake (`hpcrl/FrozenLake-v0`, 1,000-step limit) under a random policy.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from hpcrl.envs import make_env
from hpcrl.evaluation import actions_episode_returns, policy_episode_returns


def optimal_actions(env_id: str, env_kwargs: dict, gamma: float = 0.99) -> np.ndarray:
    """argmax_a Q*(s, a) by value iteration over `env.unwrapped.P`, (S,) int64."""
    env = make_env(env_id, env_kwargs)
    n_s, n_a = int(env.observation_space.n), int(env.action_space.n)
    rows = [(s, a, p, s2, r, d) for s in range(n_s) for a in range(n_a)
            for p, s2, r, d in env.unwrapped.P[s][a]]  # fmt: skip
    env.close()
    s, a, p, s2, r, d = (np.array(c) for c in zip(*rows, strict=True))
    q = np.zeros((n_s, n_a))
    for _ in range(1000):
        target = np.zeros((n_s, n_a))
        np.add.at(target, (s, a), p * (r + gamma * (1 - d) * q.max(axis=1)[s2]))
        q = target
    return np.argmax(q, axis=1)


def cases() -> list[tuple[str, str, dict, np.ndarray]]:
    rng = np.random.default_rng(0)
    big = {"size": 50, "p": 0.9, "map_seed": 3, "max_episode_steps": 1000}
    return [
        ("FrozenLake 8x8, random policy", "FrozenLake8x8-v1", {}, rng.integers(4, size=64)),
        ("FrozenLake 8x8, greedy in Q*", "FrozenLake8x8-v1", {},
         optimal_actions("FrozenLake8x8-v1", {})),
        ("generated 50x50, random policy", "hpcrl/FrozenLake-v0", big,
         rng.integers(4, size=2500)),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ids = np.arange(args.episodes, dtype=np.int64)
    print("| case | episodes | loop (s) | from the table (s) | speed-up | identical |")
    print("|---|---|---|---|---|---|")
    for name, env_id, kwargs, actions in cases():
        loop_s, table_s, same = [], [], True
        policy = actions.__getitem__  # one observation -> its action
        for _ in range(args.repeats):
            t = time.perf_counter()
            one = policy_episode_returns(env_id, kwargs, policy, ids, 0)
            loop_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            side = actions_episode_returns(env_id, kwargs, actions, ids, 0)
            table_s.append(time.perf_counter() - t)
            same &= bool(np.array_equal(one, side))
        loop, table = statistics.median(loop_s), statistics.median(table_s)
        print(
            f"| {name} | {args.episodes:,} | {loop:.2f} | {table:.3f} | {loop / table:.1f}x "
            f"| {'yes' if same else 'NO'} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
