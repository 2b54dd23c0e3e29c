"""`python -m hpcrl`: the SPMD entry point (see hpcrl.cli)."""

import sys

from hpcrl.cli import main

if __name__ == "__main__":
    sys.exit(main())
