"""``kne info`` (also ``python -m kne.info``): versions, threads, devices, the model cache, the
supported model types, then the kernel backends (:mod:`kne_kernels.info`)."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
from typing import List, Optional

__all__ = ["main"]


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def main(argv: Optional[List[str]] = None) -> int:
    """Print the report; the exit status of :func:`kne_kernels.info.main`."""
    import torch

    import kne
    import kne_kernels.info
    from kne.models import _CACHE_NAME, cache_dir

    print(f"kne {kne.__version__}   kne_kernels {kne_kernels.__version__}   Python {platform.python_version()} "
          f"({platform.machine()}, {platform.system()})")
    print("packages: " + ", ".join(f"{d} {_version(d)}" for d in ("torch", "transformers", "accelerate", "triton",
                                                                   "safetensors", "numpy")))
    print(f"threads: torch {torch.get_num_threads()} (interop {torch.get_num_interop_threads()}), "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')} (the CLI uses 1 thread on CPU unless --threads)")
    devs = [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    print("devices: cpu" + ("".join(f", {d}" for d in devs)))
    cached = (cache_dir() / _CACHE_NAME / "config.json").is_file()
    print(f"cache: {cache_dir()} (KNE_CACHE overrides); embedded model {'cached' if cached else 'not converted yet'}")
    print(f"supported model types: {', '.join(kne.supported_model_types())}")
    print()
    return kne_kernels.info.main([])


if __name__ == "__main__":
    raise SystemExit(main())
