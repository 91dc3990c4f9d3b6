"""The kept-key state of kne.Editor at a model's shape, measured: bytes, RSS, seconds per edit.

A :class:`kne.nullspace.KeySketch` for every ``down_proj`` of the shape (Llama-2-7B: 32 of width
11008; the embedded SmolLM2-135M: 30 of width 1536), at the rank the Editor picks by default (its
buffers fit 10% of the model's bytes), fed ``--edits`` edits of ``--rows`` key rows per module
instance (a local edit of the embedded model adds about 27: its prompt + answer and the last token
of its neighbours). Random keys with a decaying spectrum stand in for the model's: the sketch's
memory and work do not depend on their values. Reports the formula, the bytes the buffers hold, the
process's RSS before and after, and the seconds of each edit's update (the shrinks included), for
the staggered shrink schedule the Editor uses and the plain one (every instance shrinks when full).

    python benchmarks/speed/editor_state.py --shape llama-7b --edits 40 --out state.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# the process's RSS and the CPU's name, read as the lifelong runs read them
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "quality"))
from lifelong import _cpu, rss_mb  # noqa: E402

os.environ.setdefault("OMP_NUM_THREADS", "1")

SHAPES = {  # name -> (modules, width, model parameters, bytes per parameter)
    "llama-7b": (32, 11008, 6_738_415_616, 2),  # Llama-2-7B, bf16
    "smollm2-135m": (30, 1536, 134_515_008, 4),  # the embedded model, float32
}


def measure(KeySketch, n, d, rank, edits, rows, stagger):
    """Feed one sketch per module instance ``edits`` edits of ``rows`` random key rows each."""
    import torch

    rss0 = rss_mb()
    t = time.perf_counter()
    sk = KeySketch({f"layers.{i}.mlp.down_proj": d for i in range(n)}, rank, stagger=stagger)
    for buf in sk._buf.values():  # touch every page: RSS shows the allocation
        buf.fill_(0)
    alloc_s = time.perf_counter() - t
    rss1 = rss_mb()
    gen = torch.Generator().manual_seed(0)
    scale = torch.linspace(1.0, 0.01, d) ** 2
    seconds, shrinks = [], []
    for e in range(edits):
        keys = [torch.randn(rows, d, generator=gen) * scale for _ in range(n)]
        before = sk.shrinks
        t = time.perf_counter()
        for i, k in enumerate(keys):
            sk.add(f"layers.{i}.mlp.down_proj", k)
        seconds.append(time.perf_counter() - t)
        shrinks.append(sk.shrinks - before)
        print(f"{'staggered' if stagger else 'plain'} edit {e + 1}: {seconds[-1]:.3f} s, {shrinks[-1]} shrinks",
              file=sys.stderr, flush=True)
    rss2 = rss_mb()
    out = {"state_bytes": sk.nbytes, "rss_before_mb": rss0, "rss_allocated_mb": rss1, "rss_after_mb": rss2,
           "rss_growth_allocation_mb": rss1 - rss0, "rss_growth_edits_mb": rss2 - rss1, "alloc_seconds": alloc_s,
           "seconds_per_edit": seconds, "seconds_per_edit_mean": sum(seconds) / len(seconds),
           "shrinks_per_edit": shrinks, "shrinks": sk.shrinks, "ops": sk.ops}
    del sk
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama-7b", choices=sorted(SHAPES))
    p.add_argument("--edits", type=int, default=40)
    p.add_argument("--rows", type=int, default=27, help="key rows per edit per module instance")
    p.add_argument("--budget", type=float, default=0.1, help="share of the model's bytes (the Editor's default)")
    p.add_argument("--schedule", default="both", choices=["staggered", "plain", "both"],
                   help="the sketch's shrink schedule: staggered across instances (the Editor's), all at once "
                        "when full, or both one after the other in this process")
    p.add_argument("--out")
    a = p.parse_args(argv)
    import torch

    from kne.nullspace import KeySketch, sketch_rank

    torch.set_num_threads(1)
    n, d, params, nbytes = SHAPES[a.shape]
    model_bytes = params * nbytes
    rank = sketch_rank([d] * n, a.budget * model_bytes)
    doc = {"shape": a.shape, "modules": n, "width": d, "model_bytes": model_bytes, "budget": a.budget,
           "sketch_rank": rank, "formula_bytes": 8 * rank * d * n, "edits": a.edits, "rows_per_edit": a.rows,
           "torch": torch.__version__, "cpu": _cpu(), "command": "python benchmarks/speed/editor_state.py "
           + " ".join(argv if argv is not None else sys.argv[1:]), "schedules": {}}
    for schedule in (["staggered", "plain"] if a.schedule == "both" else [a.schedule]):
        run = measure(KeySketch, n, d, rank, a.edits, a.rows, schedule == "staggered")
        doc["schedules"][schedule] = run
        run.update(state_share_of_model=run["state_bytes"] / model_bytes)
    doc.update(doc["schedules"]["staggered" if "staggered" in doc["schedules"] else "plain"])
    print(json.dumps({k: v for k, v in doc.items() if k not in ("seconds_per_edit", "shrinks_per_edit", "schedules")},
                     indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
