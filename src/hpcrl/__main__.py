"""`python -m hpcrl` and the `hpcrl` script: the SPMD entry point (see hpcrl.cli)."""

import gc
import sys

from hpcrl import preemption
from hpcrl.cli import main


def run() -> None:
    """Run the command line's command in this process, then exit with its status."""
    code = main()
    # The command is over (a run's state is on disk): a late SIGUSR1/SIGTERM must not turn
    # its exit status into death by signal during the interpreter's teardown. Here, not in
    # `main`, which tests and scripts call in a process that goes on (and whose children
    # would inherit the ignored signals).
    preemption.ignore()
    # The interpreter's last garbage collection walks every object the imports made: about
    # 1 s of CPU per rank once torch is loaded, for memory the exit returns anyway. Frozen
    # objects are left out of it; files and MPI are closed by then, and MPI_Finalize (an
    # atexit handler) still runs.
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
