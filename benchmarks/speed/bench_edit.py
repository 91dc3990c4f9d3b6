"""End-to-end edit benchmark: ``kne.fast_edit`` against ``kne.reference`` and FT-M, one process.

Same model, same request, same settings; the implementations alternate, medians of
``--repeats`` runs after one warm-up each, threads fixed and printed. Measured:

* localisation (``kne.locate`` vs ``kne.reference.locate``) with ``ig_steps=1`` and with the
  paper's integrated gradients (``--ig-steps``, default 8, layerwise), checking that the ensembles
  are identical;
* the edit loop with every step forced (``stop_loss=0``, ``--steps``) on one shared ensemble, and
  the floor of one step measured beside it: a forward plus a backward that only reaches a small
  delta at the lowest edited layer (no weight gradients);
* an edit with early stopping (the section "default edit") with the authors' settings
  (``KNEConfig.preset("authors")``; the providers ``kne.fast_edit`` and ``kne.reference.edit``) and
  FT-M, plus ``fast_edit`` with ``KNEConfig.preset("tuned")`` and ``KNEConfig.preset("local")`` (the
  preset an edit takes when given no config): seconds for localisation, for the edit loop, and in
  total (FT-M has no localisation);
* peak memory added by each edit over a plain forward pass (CPU: resident-set growth, each method
  in a fresh subprocess so allocator caches do not blur it; GPU: ``max_memory_allocated``).

    python benchmarks/speed/bench_edit.py                 # embedded model, CPU, 1 thread
    python benchmarks/speed/bench_edit.py --device cuda --model llama-7b-shaped   # random 7B-shaped Llama, bf16
    python benchmarks/speed/bench_edit.py --out benchmarks/results                 # how the README's table was made

Writes ``edit_<device>.csv``, ``edit_<device>.txt`` (the printed table) and ``edit_<device>.png``
(a bar chart; needs matplotlib, ``pip install 'kne[plots]'``, else skipped with a note) into the
folder ``--out`` (default: the current folder). ``llama-7b-shaped`` needs no download: its
tokenizer is a word-level one built in memory (see :func:`offline_tokenizer`). A method that runs
out of GPU memory is reported as such and the benchmark goes on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch

PROMPT, TARGET = "The capital of France is", "Rome"
SUBJECT, OLD = "France", "Paris"  # the subject names the neighbours of the local preset
LONG_PROMPT = ("In the summer of that year the committee met in the old town hall and decided that the capital of "
               "France is")  # about 20 tokens (the GPU target's prompt length)


# ----------------------------------------------------------------------------------------------- models
def offline_tokenizer():
    """A word-level tokenizer over the benchmark's own words, built in memory (no file, no network;
    ``<pad>`` 0, ``<eos>`` 1, ``[UNK]`` 2): the prompt's tokens are a prefix of the tokens of
    ``prompt + " " + target``, as EasyEdit's rule needs, one token per word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for text in (PROMPT, LONG_PROMPT, TARGET) for w in text.split()})
    vocab = {"<pad>": 0, "<eos>": 1, "[UNK]": 2, **{w: i + 3 for i, w in enumerate(words)}}
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="<eos>", unk_token="[UNK]")


def load(name: str, device: str, dtype: torch.dtype):
    import kne

    if name != "llama-7b-shaped":
        return kne.load_model(name, dtype=dtype, device=device)
    # A randomly initialised Llama with Llama-2-7B's shapes and vocabulary size (32000), and a
    # tokenizer built in memory: nothing to download, no embedded-model package needed.
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = offline_tokenizer()
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                      tie_word_embeddings=False)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.eval(), tok


# ----------------------------------------------------------------------------------------------- timing
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str):
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t, out


def med(xs: List[float]) -> float:
    return statistics.median(xs)


def q(xs: List[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p * (len(xs) - 1))))]


# ----------------------------------------------------------------------------------------------- memory
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's resident set every millisecond while active; ``peak`` in bytes."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.peak = _rss_bytes()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_bytes())


def memory_probe(method: str, model_name: str, device: str, dtype: torch.dtype, prompt: str) -> Dict[str, float]:
    """Peak memory of one edit with ``method``, and of a plain forward pass, in this process."""
    import kne
    from kne.objective import encode, forward_logits

    model, tok = load(model_name, device, dtype)
    req = {"prompt": prompt, "target_new": TARGET, "subject": SUBJECT, "ground_truth": OLD}
    batch = encode(tok, [prompt], [TARGET], device=device)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    authors = kne.KNEConfig.preset("authors")
    fns = {"kne.fast_edit": lambda: kne.fast_edit(model, tok, req, authors),
           "kne.fast_edit tuned": lambda: kne.fast_edit(model, tok, req, kne.KNEConfig.preset("tuned")),
           "kne.fast_edit local": lambda: kne.fast_edit(model, tok, req, kne.KNEConfig.preset("local")),
           "kne.reference.edit": lambda: kne.reference.edit(model, tok, req, authors),
           "ft-m": lambda: kne.baselines.ft_m(model, tok, req)}
    with torch.no_grad():
        forward_logits(model, batch)  # warm-up: allocator pools, lazy init
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            forward_logits(model, batch)
        fwd = torch.cuda.max_memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()
        try:
            fns[method]().restore()
        except torch.cuda.OutOfMemoryError:
            del model
            torch.cuda.empty_cache()
            return {"method": method, "skipped": "out of GPU memory"}
        edit = torch.cuda.max_memory_allocated() - base
    else:
        base = _rss_bytes()
        with PeakRSS() as p:
            with torch.no_grad():
                forward_logits(model, batch)
        fwd = p.peak - base
        with PeakRSS() as p:
            fns[method]().restore()
        edit = p.peak - base
    return {"method": method, "model_bytes": model_bytes, "forward_bytes": fwd, "edit_bytes": edit,
            "added_over_forward_bytes": edit - fwd}


def memory_table(args) -> List[Dict[str, float]]:
    rows = []
    for method in ("kne.fast_edit", "kne.fast_edit tuned", "kne.fast_edit local", "kne.reference.edit", "ft-m"):
        if args.device.startswith("cuda"):
            rows.append(memory_probe(method, args.model, args.device, getattr(torch, args.dtype), args.prompt_text))
            torch.cuda.empty_cache()
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", method, "--model", args.model, "--device",
               args.device, "--dtype", args.dtype, "--threads", str(args.threads), "--prompt", args.prompt]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


# ----------------------------------------------------------------------------------------------- benchmark
def floor_step(model, tok, layer: int, prompt: str, device: str) -> Callable[[], None]:
    """A forward plus a backward reaching only a small delta at ``layer``'s FFN output (the floor of
    one edit step: no weight gradients, nothing else trained)."""
    from kne.adapters import resolve_sites
    from kne.objective import edit_loss, encode, forward_logits, frozen

    site = resolve_sites(model, ["ffn_out"], [layer])["ffn_out"][0]
    batch = encode(tok, [prompt], [TARGET], device=device)
    w = site.weight()
    delta = torch.zeros(8, w.shape[1], device=w.device, dtype=torch.float32, requires_grad=True)
    idx = torch.arange(8, device=w.device)

    def hook(module, args, out):
        return out.index_add(-1, idx, args[0] @ delta.to(args[0].dtype).t())

    def step():
        with frozen(model):
            h = site.module.register_forward_hook(hook)
            try:
                loss = edit_loss(forward_logits(model, batch), batch)
                torch.autograd.grad(loss, [delta])
            finally:
                h.remove()

    return step


def run(args) -> List[Dict[str, Any]]:
    import kne

    dtype = getattr(torch, args.dtype)
    if not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads)
    model, tok = load(args.model, args.device, dtype)
    req = {"prompt": args.prompt_text, "target_new": TARGET, "subject": SUBJECT, "ground_truth": OLD}
    dev_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else (
        platform.processor() or platform.machine())
    rows: List[Dict[str, Any]] = []
    skipped: Dict[str, str] = {}

    def attempt(name: str, fn: Callable[[], Any]) -> Any:
        """``fn()``, or ``None`` once ``name`` has run out of GPU memory (then it is skipped for good)."""
        if name in skipped:
            return None
        try:
            return fn()
        except torch.cuda.OutOfMemoryError:
            skipped[name] = "out of GPU memory"
            torch.cuda.empty_cache()
            print(f"{name:<45} skipped: out of GPU memory", flush=True)
            return None

    def row(section, provider, metric, xs, ref=None, **extra):
        m = med(xs)
        r = {"section": section, "provider": provider, "metric": metric, "unit": "s", "median": m, "p20": q(xs, .2),
             "p80": q(xs, .8), "vs_reference": (ref / m) if ref else None, "model": args.model, "device": dev_name,
             "dtype": args.dtype, "threads": torch.get_num_threads(), "torch": torch.__version__,
             "date": datetime.date.today().isoformat(), **extra}
        rows.append(r)
        ratio = f"x{ref / m:6.2f}" if ref else ""
        print(f"{section:<22} {provider:<22} {metric:<16} {m:9.3f} s  (p20 {r['p20']:.3f}, p80 {r['p80']:.3f})  {ratio}"
              + "".join(f"  {k}={v}" for k, v in extra.items()), flush=True)

    # 1. localisation
    for m_ in sorted({1, args.ig_steps}):
        cfg = kne.KNEConfig(ig_steps=m_, ig_path="layerwise")
        fast, ref = [], []
        ens_f = kne.locate(model, tok, req, cfg)  # warm-up
        ens_r = attempt("kne.reference.locate", lambda: kne.reference.locate(model, tok, req, cfg))
        same = None if ens_r is None else ens_f.to_knb_dict() == ens_r.to_knb_dict()
        for _ in range(args.repeats if m_ == 1 else max(1, args.repeats // 2)):
            fast.append(timed(lambda: kne.locate(model, tok, req, cfg), args.device)[0])
            t = attempt("kne.reference.locate", lambda: timed(lambda: kne.reference.locate(model, tok, req, cfg),
                                                              args.device)[0])
            if t is not None:
                ref.append(t)
        if ref:
            row(f"locate ig_steps={m_}", "kne.reference.locate", "seconds", ref)
        row(f"locate ig_steps={m_}", "kne.locate", "seconds", fast, ref=med(ref) if ref else None,
            identical_ensembles=same)

    # 2. the edit loop, every step forced, one shared ensemble
    ens = kne.locate(model, tok, req)
    cfg = kne.KNEConfig(steps=args.steps, stop_loss=0.0)
    lowest = min(layer for _, layer, _ in ens.items())
    floor = floor_step(model, tok, lowest, args.prompt_text, args.device)
    floor()
    fast, ref, fl = [], [], []
    kne.fast_edit(model, tok, req, cfg, ensemble=ens).restore()
    for _ in range(args.repeats):
        r = kne.fast_edit(model, tok, req, cfg, ensemble=ens)
        fast.append(r.stats["edit_seconds"] / r.stats["steps"])
        r.restore()
        r = attempt("kne.reference.edit", lambda: kne.reference.edit(model, tok, req, cfg, ensemble=ens))
        if r is not None:
            ref.append(r.stats["edit_seconds"] / r.stats["steps"])
            r.restore()
        fl.append(min(timed(floor, args.device)[0] for _ in range(3)))
    row(f"edit loop ({args.steps} steps)", "floor (fwd+bwd to delta)", "seconds/step", fl)
    if ref:
        row(f"edit loop ({args.steps} steps)", "kne.reference.edit", "seconds/step", ref)
    row(f"edit loop ({args.steps} steps)", "kne.fast_edit", "seconds/step", fast, ref=med(ref) if ref else None,
        vs_floor=round(med(fast) / med(fl), 3))

    # 3. an edit with early stopping: the authors' settings (kne.fast_edit, kne.reference.edit), the
    # "tuned" preset (columns, no dropout, stop at 0.1) and the "local" preset (an edit's default)
    authors, tuned, local = (kne.KNEConfig.preset(p) for p in ("authors", "tuned", "local"))
    providers = {"kne.fast_edit": lambda: kne.fast_edit(model, tok, req, authors),
                 "kne.fast_edit tuned": lambda: kne.fast_edit(model, tok, req, tuned),
                 "kne.fast_edit local": lambda: kne.fast_edit(model, tok, req, local),
                 "kne.reference.edit": lambda: kne.reference.edit(model, tok, req, authors),
                 "ft-m": lambda: kne.baselines.ft_m(model, tok, req)}
    times = {k: {"locate": [], "edit": [], "total": [], "steps": []} for k in providers}
    for name, fn in providers.items():
        res = attempt(name, fn)
        if res is not None:
            res.restore()
    for _ in range(args.repeats):
        for name, fn in providers.items():
            out = attempt(name, lambda: timed(fn, args.device))
            if out is None:
                continue
            wall, res = out
            res.restore()
            times[name]["locate"].append(res.stats["locate_seconds"])
            times[name]["edit"].append(res.stats["edit_seconds"])
            times[name]["total"].append(wall)
            times[name]["steps"].append(res.stats["steps"])
    ref_total = med(times["kne.reference.edit"]["total"]) if times["kne.reference.edit"]["total"] else None
    for name, t in times.items():
        if not t["total"]:
            continue
        row("default edit", name, "locate seconds", t["locate"])
        row("default edit", name, "edit seconds", t["edit"])
        row("default edit", name, "total seconds", t["total"], ref=ref_total if name != "kne.reference.edit" else None,
            steps=med(t["steps"]))

    # 4. memory
    if not args.no_memory:
        del model
        for m in memory_table(args):
            if "skipped" in m:
                print(f"{'peak memory':<22} {m['method']:<22} skipped: {m['skipped']}", flush=True)
                continue
            r = {"section": "peak memory", "provider": m["method"], "metric": "added over forward", "unit": "MB",
                 "median": m["added_over_forward_bytes"] / 2**20, "p20": None, "p80": None, "vs_reference": None,
                 "model": args.model, "device": dev_name, "dtype": args.dtype, "threads": args.threads,
                 "torch": torch.__version__, "date": datetime.date.today().isoformat(),
                 "share_of_model": round(m["added_over_forward_bytes"] / m["model_bytes"], 4),
                 "peak_over_model_MB": round(m["edit_bytes"] / 2**20, 1)}
            rows.append(r)
            print(f"{'peak memory':<22} {m['method']:<22} {'added over fwd':<16} {r['median']:9.1f} MB  "
                  f"({100 * r['share_of_model']:.1f}% of the model's {m['model_bytes'] / 2**20:.0f} MB; forward itself "
                  f"{m['forward_bytes'] / 2**20:.1f} MB)", flush=True)
    return rows


def plot(rows: List[Dict[str, Any]], path: Path) -> bool:
    """The bar chart; ``False`` (nothing written) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [("default edit", "total seconds", "seconds per default edit"),
              (None, "seconds/step", "seconds per edit step (30 forced)"),
              (None, "seconds", "localisation seconds"),
              ("peak memory", "added over forward", "MB added over a forward pass")]
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6))
    for ax, (section, metric, title) in zip(axes, groups):
        sel = [r for r in rows if r["metric"] == metric and (section is None or r["section"] == section)]
        labels = [(r["section"].replace("locate ", "") + "\n" if section is None else "") + r["provider"] for r in sel]
        ax.barh(range(len(sel)), [r["median"] for r in sel], color=["#3b7dd8" if "kne." in r["provider"] and
                                                                     "reference" not in r["provider"] else "#999999"
                                                                     for r in sel])
        ax.set_yticks(range(len(sel)), labels, fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.invert_yaxis()
        for i, r in enumerate(sel):
            ax.text(r["median"], i, f" {r['median']:.3g}", va="center", fontsize=7)
    dev = rows[0]["device"] if rows else ""
    fig.suptitle(f"kne on {rows[0]['model'] if rows else ''} ({dev}, {rows[0]['dtype'] if rows else ''})", fontsize=10)
    fig.tight_layout()
    from kne.io import write_atomic

    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120))  # whole or not at all
    return True


class _Tee:
    """Writes to the terminal and keeps a copy (the ``.txt`` table)."""

    def __init__(self, stream):
        self.stream, self.lines = stream, []

    def write(self, text):
        self.lines.append(text)
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench_edit.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="'smollm2-135m', 'llama-7b-shaped' or a from_pretrained id")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30, help="forced steps of the edit-loop section")
    ap.add_argument("--ig-steps", type=int, default=8, help="IG steps of the second localisation row")
    ap.add_argument("--prompt", choices=("short", "long"), default="short",
                    help="short: 'The capital of France is' (6 tokens); long: a ~20-token prompt")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--out", default=".", metavar="DIR",
                    help="folder for edit_<device>.csv/.txt/.png (default: the current folder)")
    ap.add_argument("--no-chart", action="store_true", help="write no .png")
    ap.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    args.prompt_text = LONG_PROMPT if args.prompt == "long" else PROMPT
    if not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except Exception:  # pragma: no cover
        pass
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.model, args.device, getattr(torch, args.dtype),
                                      args.prompt_text)))
        return 0
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"edit_{torch.device(args.device).type}.csv"
    tee = _Tee(sys.stdout)
    sys.stdout = tee
    try:
        print(f"# kne edit benchmark: {args.model} on {args.device} ({args.dtype}), {torch.get_num_threads()} "
              f"thread(s), torch {torch.__version__}, {platform.machine()}; prompt {args.prompt_text!r} -> {TARGET!r}; "
              f"median of {args.repeats}", flush=True)
        rows = run(args)
    finally:
        sys.stdout = tee.stream
    from kne.io import csv_text, write_text

    # each file whole or not at all: an interrupted write leaves the last run's table as it was
    write_text(out.with_suffix(".txt"), "".join(tee.lines))
    keys = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
    write_text(out, csv_text(rows, keys))
    png = out.with_suffix(".png")
    drawn = not args.no_chart and plot(rows, png)
    print(f"wrote {out}, {out.with_suffix('.txt')}" + (f" and {png}" if drawn else
                                                      " (no chart: --no-chart, or matplotlib is not installed)"),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
