"""Hyperparameter schedules as functions of training progress (fraction of the env-step budget)."""


def linear_schedule(start: float, end: float, decay_fraction: float, progress: float) -> float:
    """Linear interpolation from `start` to `end` over the first `decay_fraction` of training.

    Args:
        start: value at progress 0.
        end: value from progress `decay_fraction` on.
        decay_fraction: in [0, 1]; 0 means `end` from the first step.
        progress: env steps taken / env-step budget, in [0, 1].

    Returns:
        The scheduled value (float).
    """
    if decay_fraction <= 0.0 or progress >= decay_fraction:
        return end
    return start + (end - start) * (progress / decay_fraction)


def set_learning_rate(optimizer, learning_rate: float, anneal: bool, progress: float) -> float:
    """Set every param group's lr: `learning_rate`, or annealed linearly to 0 over the
    budget when `anneal`. Returns the lr set."""
    lr = learning_rate * (1.0 - progress) if anneal else learning_rate
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
