"""Every kne_kernels op against its plain torch expression; see ``kne_kernels.bench`` (also
``kne bench kernels``). Run ``python benchmarks/bench_kernels.py --help``."""

import sys

from kne_kernels.bench import main

if __name__ == "__main__":
    sys.exit(main())
