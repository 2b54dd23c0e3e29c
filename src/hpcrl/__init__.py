"""hpcrl: MPI-native distributed reinforcement learning.

The command line is `python -m hpcrl` (see the README); from Python:

- `load_policy(run_dir, checkpoint="latest")`: a trained policy with `act(obs)`.
"""

__version__ = "0.1.0"
__all__ = ["__version__", "load_policy"]


def load_policy(run_dir, checkpoint: str = "latest"):
    """See `hpcrl.policy.load_policy` (imported on first use: `import hpcrl` stays light)."""
    from hpcrl.policy import load_policy as _load

    return _load(run_dir, checkpoint)
