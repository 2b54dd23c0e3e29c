"""Rank 0's progress output: a tqdm bar on a terminal, plain periodic lines in batch logs."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    def __init__(self, total_env_steps: int, stream=None):
        self.stream = stream or sys.stderr
        self.total = total_env_steps
        self.bar = None
        if self.stream.isatty():
            self.bar = tqdm(
                total=total_env_steps,
                unit="step",
                unit_scale=True,
                file=self.stream,
                dynamic_ncols=True,
            )
        self.shown = 0

    def update(
        self,
        env_steps: int,
        env_steps_per_s: float,
        episodes: int,
        mean_return: float,
        extra: str = "",
    ) -> None:
        if self.bar is not None:
            self.bar.update(env_steps - self.shown)
            self.bar.set_postfix_str(f"return {mean_return:.3f} | {extra}".rstrip(" |"))
        else:
            pct = 100.0 * env_steps / max(self.total, 1)
            line = (
                f"[hpcrl] env_steps {env_steps:,}/{self.total:,} ({pct:.0f}%) | "
                f"{env_steps_per_s:,.0f} steps/s | episodes {episodes:,} | "
                f"mean return (last 100) {mean_return:.3f}"
            )
            print(line + (f" | {extra}" if extra else ""), file=sys.stdout, flush=True)
        self.shown = env_steps

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
