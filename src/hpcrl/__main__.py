"""`python -m hpcrl`: the SPMD entry point (see hpcrl.cli)."""

import sys

from hpcrl import preemption
from hpcrl.cli import main

if __name__ == "__main__":
    code = main()
    # The command is over (a run's state is on disk): a late SIGUSR1/SIGTERM must not turn
    # its exit status into death by signal during the interpreter's teardown. Here, not in
    # `main`, which tests and scripts call in a process that goes on (and whose children
    # would inherit the ignored signals).
    preemption.ignore()
    sys.exit(code)
