"""`python -m spinlm ...`: the same command line as the `spinlm` console script."""

import sys

from spinlm.cli import main

if __name__ == "__main__":
    sys.exit(main())
