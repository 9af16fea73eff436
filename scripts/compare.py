"""Compare fashion_exp runs: the same as the fashion-exp-compare command (see --help)."""

import sys

from fashion_exp.compare import main

if __name__ == "__main__":
    sys.exit(main())
