"""hpcrl: MPI-native distributed reinforcement learning.

The command line is `python -m hpcrl` (see the README); from Python:

- `train(config, *, comm=None, env_fn=None, network_fn=None, **overrides)`: one run, as
  `hpcrl train` makes it, from a script under `mpirun` or a notebook (`hpcrl.api`).
- `load_policy(run_dir, checkpoint="latest")`: a trained policy with `act(obs)`, in a
  plain process (`hpcrl.policy`).
- `load_runs(paths)`: run directories as pandas tables (`hpcrl.analysis.runs`).

Each is imported on first use, so `import hpcrl` loads neither MPI nor torch.
"""

import importlib

__version__ = "0.1.0"
__all__ = ["__version__", "train", "load_policy", "load_runs"]

_LAZY = {
    "train": "hpcrl.api",
    "load_policy": "hpcrl.policy",
    "load_runs": "hpcrl.analysis.runs",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hpcrl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
