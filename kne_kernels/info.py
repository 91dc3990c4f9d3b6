"""``python -m kne_kernels.info``: which backends are live here, and why the others are not."""

from __future__ import annotations

import json
import platform
import sys

import torch


def report() -> dict:
    import kne_kernels
    from kne_kernels import _backends, _extension

    rows = []
    for device in ("cpu", "cuda"):
        for backend in _backends.BACKENDS:
            live, why = _backends.status(backend, device)
            rows.append({"device": device, "backend": backend, "live": live, "reason": why})
    auto = {}
    for device in ("cpu", "cuda"):
        try:
            auto[device] = _backends.resolve("auto", torch.device(device))
        except Exception as e:  # pragma: no cover
            auto[device] = f"error: {e}"
    return {
        "kne_kernels": kne_kernels.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "threads": torch.get_num_threads(),
        "KNE_BACKEND": _backends.default_backend(),
        "auto": auto,
        "library": _extension._STATE.get("path"),
        "library_error": _extension._STATE.get("error"),
        "build": _extension.build_info(),
        "registered_keys": list(_extension.registered_keys()),
        "backends": rows,
    }


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    r = report()
    if "--json" in argv:
        print(json.dumps(r, indent=1))
        return 0
    print(f"kne_kernels {r['kne_kernels']}  torch {r['torch']} (CUDA {r['torch_cuda']})  Python {r['python']}  "
          f"threads {r['threads']}")
    print(f"CUDA devices: {', '.join(r['cuda_devices']) or 'none'}")
    print(f"C++ library: {r['library'] or 'not built'}" + (f"  (built for torch {r['build'].get('torch')})" if r["build"] else ""))
    print(f"dispatch keys with kernels for kne::neuron_attribution_: {', '.join(r['registered_keys'])}")
    print(f"default backend (KNE_BACKEND): {r['KNE_BACKEND']}; auto picks: cpu -> {r['auto']['cpu']}, "
          f"cuda -> {r['auto']['cuda']}")
    for row in r["backends"]:
        mark = "live" if row["live"] else "off "
        print(f"  {row['device']:<5} {row['backend']:<7} {mark}  {row['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
