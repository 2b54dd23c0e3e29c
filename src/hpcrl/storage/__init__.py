"""Run directories: `run.h5` (rank 0), per-rank trajectory files, checkpoints. No MPI here."""
