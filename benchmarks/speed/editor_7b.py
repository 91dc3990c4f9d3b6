"""Ten sequential edits on a randomly initialised Llama-2-7B-shaped model (bf16) through kne.Editor:
the state's bytes against the formula, the process's peak memory, and the seconds of each edit.

The model is ``bench_edit.py``'s ``llama-7b-shaped`` (32 layers, ``down_proj`` 11008 -> 4096,
vocabulary 32000, random weights, a word-level tokenizer built in memory). The edits use the
``local`` preset with ``ig_steps=1`` and ``--steps`` optimizer steps (a random model does not land:
``require_landed=False``), two neighbour prompts each. What is measured is the editor's footprint,
not edit quality.

    python benchmarks/speed/editor_7b.py --edits 10 --steps 2 --out editor_7b.json

CPU, one thread: each edit is several forward and backward passes of a 7B model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def status(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--edits", type=int, default=10)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out")
    a = p.parse_args(argv)
    import torch

    import kne
    from bench_edit import load

    torch.set_num_threads(1)
    t = time.perf_counter()
    model, tok = load("llama-7b-shaped", "cpu", torch.bfloat16)
    load_s = time.perf_counter() - t
    model_bytes = sum(q.numel() * q.element_size() for q in model.parameters())
    rss_model = status("VmRSS")
    cfg = kne.KNEConfig.preset("local", ig_steps=1, steps=a.steps)
    ed = kne.Editor(model, tok, cfg, require_landed=False)
    rss_editor = status("VmRSS")
    words = "The capital of France is Rome in the summer of that year committee met old town hall".split()
    seconds, rows = [], []
    for i in range(a.edits):
        prompt = " ".join(words[(i + j) % len(words)] for j in range(6))
        req = {"prompt": prompt, "target_new": "Rome", "subject": words[i % len(words)]}
        t = time.perf_counter()
        res = ed.edit(req, preserve_prompts=["The capital of France is", "in the old town hall"])
        seconds.append(time.perf_counter() - t)
        rows.append({"edit": i + 1, "seconds": seconds[-1], "steps": res.stats["steps"],
                     "neurons": res.stats["neurons"], "rss_mb": status("VmRSS"), "peak_mb": status("VmHWM"),
                     "undo_bytes": ed.stats["undo_bytes"]})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    st = ed.stats
    n, d = len(ed.state.widths), next(iter(ed.state.widths.values()))
    doc = {"model": "llama-7b-shaped (random weights), bfloat16, CPU", "model_bytes": model_bytes,
           "load_seconds": load_s, "sketch_rank": st["sketch_rank"], "modules": n, "width": d,
           "formula_bytes": 8 * st["sketch_rank"] * d * n, "state_bytes": st["state_bytes"],
           "state_share_of_model": st["state_bytes"] / model_bytes, "rss_model_mb": rss_model,
           "rss_with_editor_mb": rss_editor, "editor_rss_mb": rss_editor - rss_model, "peak_mb": status("VmHWM"),
           "edits": rows, "seconds_per_edit_mean": sum(seconds) / len(seconds), "capacity_max": st["capacity_max"],
           "undo_bytes": st["undo_bytes"], "steps": a.steps, "torch": torch.__version__,
           "command": "python benchmarks/speed/editor_7b.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    ed.undo_all()
    print(json.dumps({k: v for k, v in doc.items() if k != "edits"}, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
