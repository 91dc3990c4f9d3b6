"""End-to-end edit benchmark (fast_edit vs reference vs FT-M); see ``kne.bench`` (also
``kne bench edit``). Run ``python benchmarks/bench_edit.py --help``."""

import sys

from kne.bench import main

if __name__ == "__main__":
    sys.exit(main())
