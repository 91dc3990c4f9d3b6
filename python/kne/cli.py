"""Command line: ``kne demo | edit | eval`` (also ``python -m kne``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

__all__ = ["main", "build_parser"]

DEMO_PROMPT = "The capital of France is"
DEMO_TARGET = "Rome"
DEMO_PARAPHRASE = "The capital city of France is called"
DEMO_UNRELATED = ("The capital of Japan is", "The chemical symbol for gold is")


# ------------------------------------------------------------------------------------------ setup
def _setup(args) -> None:
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif str(args.device).startswith("cpu"):
        # Small ops with several OpenMP threads are pathologically slow on small CPUs; one thread is
        # the measured fast setting for a 135M model. --threads overrides.
        torch.set_num_threads(1)
    if os.environ.get("HF_HUB_OFFLINE") is None and args.model == "smollm2-135m":
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass


def _load(args):
    import torch

    import kne

    dtype = getattr(torch, args.dtype)
    t = time.perf_counter()
    model, tok = kne.load_model(args.model, dtype=dtype, device=args.device)
    n = sum(p.numel() for p in model.parameters())
    print(f"model   {args.model} ({model.config.model_type}, {kne.adapters.num_layers(model)} layers, "
          f"{n / 1e6:.1f}M parameters) on {args.device}, {args.dtype}, {torch.get_num_threads()} thread(s); "
          f"loaded in {time.perf_counter() - t:.1f} s")
    return model, tok


def _config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("KNE settings (see kne.KNEConfig)")
    g.add_argument("--target-modules", nargs="+", default=None, metavar="NAME",
                   help="FFN modules to score: aliases ffn_in/ffn_gate/ffn_out or suffixes like mlp.down_proj "
                        "(default: ffn_out)")
    g.add_argument("--neuron-axis", choices=("out", "in"), default=None, help="rows (out, default) or columns (in)")
    g.add_argument("--layers", nargs="+", type=int, default=None, help="decoder layers to score (default: all)")
    g.add_argument("--ig-steps", type=int, default=None, help="integrated-gradient steps (default 1)")
    g.add_argument("--ig-path", choices=("layerwise", "joint"), default=None)
    g.add_argument("--percentile", type=float, default=None, help="global percentile threshold (default 99)")
    g.add_argument("--aggregate", choices=("max", "mean"), default=None)
    g.add_argument("--steps", type=int, default=None, help="maximum optimizer steps (default 30)")
    g.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 5e-3)")
    g.add_argument("--dropout", type=float, default=None, help="dropout on the delta path (default 0.1)")
    g.add_argument("--stop-loss", type=float, default=None, help="stop when the loss is below this (default 1e-2)")
    g.add_argument("--seed", type=int, default=None)


def _config(args):
    import kne

    over = {k: getattr(args, k) for k in ("target_modules", "neuron_axis", "layers", "ig_steps", "ig_path",
                                          "percentile", "aggregate", "steps", "lr", "dropout", "stop_loss", "seed")
            if getattr(args, k, None) is not None}
    if "target_modules" in over:
        over["target_modules"] = tuple(over["target_modules"])
    if "layers" in over:
        over["layers"] = tuple(over["layers"])
    return kne.KNEConfig(**over)


def _common(p: argparse.ArgumentParser, model_default: Optional[str] = "smollm2-135m") -> None:
    p.add_argument("--model", default=model_default,
                   help="'smollm2-135m' (embedded, offline) or a from_pretrained folder / hub id")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default on CPU: 1)")


def greedy(model, tok, prompt: str, n: int = 6, add_special_tokens: bool = False) -> str:
    """Greedy continuation of ``prompt`` (``n`` new tokens), first line only."""
    import torch

    from ._utils import input_device

    ids = tok(prompt, return_tensors="pt", add_special_tokens=add_special_tokens).to(input_device(model))
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id
                             if tok.pad_token_id is not None else tok.eos_token_id)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    return text.split("\n")[0]


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def format_table(rows: List[Dict[str, Any]]) -> str:
    """Markdown table of evaluation summaries (percentages; fluency x100 as in the KnowEdit tables)."""
    head = "| method | data | n | Edit Succ. | Rephrase | Portability | Locality | Fluency | s/edit |"
    sep = "|---|---|---:|---:|---:|---:|---:|---:|---:|"
    lines = [head, sep]
    for r in rows:
        s = r["summary"]
        lines.append(f"| {r['method']} | {r['data']} | {s['n']} | {_pct(s['edit_succ'])} | {_pct(s['rephrase'])} | "
                     f"{_pct(s['portability'])} | {_pct(s['locality'])} | {_pct(s['fluency'])} | "
                     f"{r['seconds_per_edit']:.2f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ demo
def cmd_demo(args) -> int:
    import kne

    model, tok = _load(args)
    cfg = _config(args)
    unrelated = list(DEMO_UNRELATED)
    probes = [("edited", args.prompt), ("paraphrase", args.paraphrase)] + [("unrelated", u) for u in unrelated]
    before = {p: greedy(model, tok, p) for _, p in probes}
    req = kne.EditRequest(prompt=args.prompt, target_new=args.target, rephrase_prompt=args.paraphrase,
                          locality={"Unrelated": [{"prompt": u, "ground_truth": before[u].strip() or "?"}
                                                  for u in unrelated]})
    pre = kne.evaluate(model, tok, [req])
    print(f"edit    {args.prompt!r} -> {args.target!r}")
    res = kne.fast_edit(model, tok, [req], cfg)
    st = res.stats
    post = kne.evaluate(model, tok, [req], pre=pre)
    after = {p: greedy(model, tok, p) for _, p in probes}
    width = max(len(p) for _, p in probes)
    print("\ngreedy completions (before -> after)")
    for kind, p in probes:
        print(f"  {kind:<10} {p:<{width}} {before[p]!r:<28} -> {after[p]!r}")
    s = post.summary()
    counts = res.ensemble.counts()
    layers_hit = sum(1 for per in counts.values() for c in per.values() if c)
    print(f"\nensemble  {st['neurons']} neurons in {layers_hit} layers ({', '.join(counts)}; axis "
          f"{res.ensemble.neuron_axis}); {st['params_edited']:,} parameters edited = "
          f"{100 * st['param_fraction']:.3f}% of the model, {100 * st['target_param_fraction']:.2f}% of the target modules")
    print(f"edit      {st['steps']} steps, loss {st['losses'][0]:.3f} -> {st['losses'][-1]:.4f}")
    print(f"time      locate {st['locate_seconds']:.2f} s + edit {st['edit_seconds']:.2f} s = {st['total_seconds']:.2f} s")
    print(f"metrics   edit success {_pct(s['edit_succ'])}%, rephrase {_pct(s['rephrase'])}%, "
          f"locality {_pct(s['locality'])}%")
    if args.restore:
        res.restore()
        print("restored  the model is back to its original weights")
    ok = s["edit_succ"] == 1.0
    return 0 if ok else 1


# ------------------------------------------------------------------------------------------ edit
def cmd_edit(args) -> int:
    import kne

    model, tok = _load(args)
    cfg = _config(args)
    req = kne.EditRequest(prompt=args.prompt, target_new=args.target, subject=args.subject)
    ens = kne.Ensemble.load(args.ensemble) if args.ensemble else None
    before = greedy(model, tok, args.prompt)
    pre = kne.evaluate(model, tok, [req])
    res = kne.fast_edit(model, tok, [req], cfg, ensemble=ens)
    post = kne.evaluate(model, tok, [req], pre=pre)
    st = res.stats
    print(f"before  {args.prompt!r} -> {before!r}")
    print(f"after   {args.prompt!r} -> {greedy(model, tok, args.prompt)!r}")
    print(f"edit    success {_pct(post.summary()['edit_succ'])}%, {st['steps']} steps, loss {st['losses'][-1]:.4f}, "
          f"{st['neurons']} neurons, {st['params_edited']:,} parameters ({100 * st['param_fraction']:.3f}%), "
          f"{st['total_seconds']:.2f} s")
    if args.save:
        out = Path(args.save)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        res.ensemble.save(out / "kne_ensemble.json")
        meta = {"request": req.to_dict(), "config": cfg.to_dict(), "stats": st, "base_model": args.model}
        (out / "kne_edit.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
        print(f"saved   edited model, ensemble and edit record to {out}")
    return 0


# ------------------------------------------------------------------------------------------ eval
def run_eval(model, tok, requests, method: str, cfg, *, fluency: bool = False, progress: bool = True,
             desc: str = "eval") -> Dict[str, Any]:
    """Independent edits: for each request evaluate, edit, evaluate again, restore."""
    from tqdm.auto import tqdm

    import kne

    records, seconds, failures = [], [], []
    bar = tqdm(requests, desc=desc, unit="edit", disable=not progress, file=sys.stderr)
    for i, req in enumerate(bar):
        pre = kne.evaluate(model, tok, [req])
        try:
            if method == "kne":
                res = kne.fast_edit(model, tok, [req], cfg)
            elif method == "reference":
                res = kne.reference.edit(model, tok, [req], cfg)
            elif method == "ft-m":
                res = kne.baselines.ft_m(model, tok, [req], add_special_tokens=cfg.add_special_tokens)
            else:
                raise ValueError(f"unknown method {method!r}: use kne, reference or ft-m")
        except kne.EditError as e:
            failures.append({"index": i, "error": str(e)})
            print(f"warning: record {i} failed and was skipped from the means: {e}", file=sys.stderr)
            continue
        try:
            post = kne.evaluate(model, tok, [req], pre=pre, fluency=fluency, seed=cfg.seed)
        finally:
            res.restore()
        rec = dict(post.records[0])
        rec.pop("locality_output", None)
        rec.update(index=i, prompt=req.prompt, target_new=req.target_new, steps=res.stats["steps"],
                   seconds=res.stats["total_seconds"], final_loss=res.stats["losses"][-1])
        records.append(rec)
        seconds.append(res.stats["total_seconds"])
        s = kne.EvalResult(records).summary()
        bar.set_postfix(succ=f"{_pct(s['edit_succ'])}", loc=_pct(s["locality"]))
    summary = kne.EvalResult(records).summary() if records else {"n": 0}
    return {"method": method, "summary": summary, "seconds_per_edit": sum(seconds) / max(1, len(seconds)),
            "failures": failures, "records": records}


def cmd_eval(args) -> int:
    import kne

    model, tok = _load(args)
    cfg = _config(args)
    requests = kne.load_knowedit(args.data, limit=args.limit)
    print(f"data    {args.data}: {len(requests)} records; method {args.method}; independent edits")
    res = run_eval(model, tok, requests, args.method, cfg, fluency=args.fluency, progress=not args.no_progress)
    res["data"] = Path(args.data).name
    print()
    print(format_table([res]))
    if res["failures"]:
        print(f"\n{len(res['failures'])} record(s) failed to edit (see the JSON output)")
    if args.out:
        payload = {"model": args.model, "data": str(args.data), "limit": args.limit, "method": args.method,
                   "config": cfg.to_dict() if args.method != "ft-m" else None, **res}
        Path(args.out).write_text(json.dumps(payload, indent=1, default=str) + "\n")
        print(f"\nwrote {args.out}")
    return 0 if not res["failures"] else 1


# ------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kne", description="Fast KNE knowledge editing for Hugging Face models.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="edit a fact of the embedded model and show before/after",
                       description="Edit a fact the embedded model knows and print greedy completions before and "
                                   "after (edited prompt, a paraphrase, two unrelated facts), the metrics, the "
                                   "ensemble size, the share of parameters touched and the time. The demo stops "
                                   "at loss 0.1 (--stop-loss; KNEConfig's default is the authors' 1e-2, which on "
                                   "this 135M model also rewrites 'The capital of Japan is').")
    _common(d)
    d.add_argument("--prompt", default=DEMO_PROMPT)
    d.add_argument("--target", default=DEMO_TARGET)
    d.add_argument("--paraphrase", default=DEMO_PARAPHRASE)
    d.add_argument("--restore", action="store_true", help="restore the model at the end and say so")
    _config_args(d)
    # The demo stops at loss 0.1 (answer probability about 0.9) instead of KNEConfig's 1e-2 (the
    # authors' t_loss for Llama-2-7B): on the 135M model, driving the loss to 1e-2 also rewrites the
    # neighbouring fact "The capital of Japan is". Pass --stop-loss 0.01 to see it.
    d.set_defaults(func=cmd_demo, stop_loss=0.1)

    e = sub.add_parser("edit", help="edit one fact and optionally save the edited model",
                       description="Edit one fact with KNE and print the completion before and after.")
    _common(e)
    e.add_argument("--prompt", required=True)
    e.add_argument("--target", required=True, help="the new answer (target_new)")
    e.add_argument("--subject", default=None)
    e.add_argument("--ensemble", default=None, help="an ensemble JSON (kne or the authors' knb_dict) to use")
    e.add_argument("--save", default=None, metavar="DIR",
                   help="folder for the edited model (save_pretrained), its ensemble and an edit record")
    _config_args(e)
    e.set_defaults(func=cmd_edit)

    v = sub.add_parser("eval", help="evaluate a method on a KnowEdit file (independent edits)",
                       description="For each record: evaluate, edit, evaluate again (EasyEdit's metrics), restore.")
    _common(v)
    v.add_argument("--data", required=True, help="KnowEdit JSON or JSON-lines file")
    v.add_argument("--limit", type=int, default=None, help="first N records only")
    v.add_argument("--method", choices=("kne", "reference", "ft-m"), default="kne")
    v.add_argument("--fluency", action="store_true", help="also measure generation fluency (slower)")
    v.add_argument("--out", default=None, help="write the results JSON here")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")
    _config_args(v)
    v.set_defaults(func=cmd_eval)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    _setup(args)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"kne {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kne {args.command}: interrupted (the model in memory was restored; nothing was saved)", file=sys.stderr)
        return 130
