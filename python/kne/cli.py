"""Command line: ``kne demo | edit | eval | plot | info`` (also ``python -m kne``). The benchmarks are
scripts of a source checkout: ``benchmarks/speed/bench_edit.py`` and ``benchmarks/speed/bench_kernels.py``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

from ._extras import MissingDependency
from .io import check_output as _check_output, write_text

__all__ = ["main", "build_parser"]

DEMO_PROMPT = "The capital of France is"
DEMO_TARGET = "Rome"
DEMO_SUBJECT, DEMO_OLD = "France", "Paris"
DEMO_PARAPHRASE = "The capital city of France is called"
# What the edit should keep: other relations of the same subject, other countries' capitals, a fact
# about nothing of the kind.
DEMO_KEPT = (("same subject", "The official language of France is"), ("same subject", "The currency of France is"),
             ("other capital", "The capital of Japan is"), ("other capital", "The capital of Germany is"),
             ("unrelated", "The chemical symbol for gold is"))


# ------------------------------------------------------------------------------------------ setup
def _setup(args) -> None:
    import torch

    _check_device(args.device)
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


def _check_device(device: str) -> None:
    """``--device``: a torch device that exists here (a missing GPU is one line, not torch's
    ``AssertionError: Torch not compiled with CUDA enabled``)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"--device {device!r} is not a device: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ValueError(f"--device {device}: torch {torch.__version__} sees no CUDA device ({why}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: there are {torch.cuda.device_count()} CUDA device(s) here "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")


def _check_args(args) -> None:
    """What can be checked before torch is imported and the model loaded: numbers, input files and
    every output path (so no edit runs only to fail at saving its result)."""
    if getattr(args, "model", None) is not None:
        from .models import check_source

        check_source(args.model)  # offline: a mistyped name fails here, not after the hub's retries
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be a positive number of threads, got {threads}")
    ens = getattr(args, "ensemble", None)
    if ens:
        if Path(ens).is_dir():
            raise IsADirectoryError(f"--ensemble {ens}: is a directory; give the ensemble JSON file (Ensemble.save, or "
                                    "the authors' knb_dict)")
        if not Path(ens).is_file():
            raise FileNotFoundError(f"--ensemble {ens}: the file does not exist")
    _check_output(getattr(args, "save", None), "--save", create=True)
    model_dir = getattr(args, "save_model", None)
    if model_dir and Path(model_dir).exists() and not Path(model_dir).is_dir():
        raise NotADirectoryError(f"--save-model {model_dir}: is a file; give a folder for the edited model")
    for flag in ("out", "table"):
        _check_output(getattr(args, flag, None), f"--{flag}", create=False)
    if args.command == "apply":
        from .editfile import read_edit

        read_edit(args.file)  # a missing, damaged or hand-edited file fails before the model loads
    if args.command == "eval":
        if not 0 <= args.other_subjects <= 8:
            raise ValueError(f"--other-subjects must be 0..8 (the shipped templates hold 8 subjects each), got "
                             f"{args.other_subjects}")
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        if args.skip < 0:
            raise ValueError(f"--skip must be >= 0, got {args.skip}")
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")


def _load(args, quiet: bool = False):
    import torch

    import kne

    dtype = getattr(torch, args.dtype)
    t = time.perf_counter()
    model, tok = kne.load_model(args.model, dtype=dtype, device=args.device)
    args.phase = "run"
    n = sum(p.numel() for p in model.parameters())
    if not quiet:
        print(f"model   {args.model} ({model.config.model_type}, {kne.adapters.num_layers(model)} layers, "
              f"{n / 1e6:.1f}M parameters) on {args.device}, {args.dtype}, {torch.get_num_threads()} thread(s); "
              f"loaded in {time.perf_counter() - t:.1f} s")
    return model, tok


def _config_args(p: argparse.ArgumentParser) -> None:
    """One option per KNEConfig field (``--neuron-axis``, ``--preserve-weight``, ``--project`` /
    ``--no-project`` ...), its help from the field's metadata; given options override the preset
    (default ``kne.config.DEFAULT_PRESET``, whose values the help shows)."""
    import dataclasses

    from .config import _CHOICES, DEFAULT_PRESET, KNEConfig, PRESETS

    g = p.add_argument_group(f"KNE settings (kne.KNEConfig; the options given override --preset; the defaults shown "
                             f"are the {DEFAULT_PRESET} preset's)")
    g.add_argument("--preset", choices=tuple(PRESETS), default=DEFAULT_PRESET,
                   help=f"base settings (default {DEFAULT_PRESET}): " + "; ".join(f"{k}: {v[0]}" for k, v in PRESETS.items()))
    base = KNEConfig.preset(DEFAULT_PRESET)
    hints = {"target_modules": (str, "NAME"), "layers": (int, "L")}
    for f in dataclasses.fields(KNEConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(base, f.name)
        help_ = f.metadata["help"] + f" (default {default!r})"
        help_ = help_.replace("%", "%%")
        if f.name in hints:
            typ, metavar = hints[f.name]
            g.add_argument(flag, nargs="+", type=typ, default=None, metavar=metavar, help=help_)
        elif isinstance(default, bool):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif f.name in _CHOICES:
            g.add_argument(flag, choices=_CHOICES[f.name], default=None, help=help_)
        else:
            g.add_argument(flag, type=type(default), default=None, help=help_)


def _config(args):
    import dataclasses

    import kne

    over = {f.name: getattr(args, f.name) for f in dataclasses.fields(kne.KNEConfig)
            if getattr(args, f.name, None) is not None}
    for k in ("target_modules", "layers"):
        if k in over:
            over[k] = tuple(over[k])
    return kne.KNEConfig.preset(getattr(args, "preset", None) or kne.config.DEFAULT_PRESET, **over)


def _common(p: argparse.ArgumentParser, model_default: Optional[str] = "smollm2-135m") -> None:
    p.add_argument("--model", default=model_default,
                   help="'smollm2-135m' (embedded, offline) or a from_pretrained folder / hub id")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--threads", type=int, default=None, help="torch threads, a positive number (default on CPU: 1)")


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


# ------------------------------------------------------------------------------------------ demo
def cmd_demo(args) -> int:
    import kne
    from kne.runs import pct as _pct

    model, tok = _load(args)
    cfg = _config(args)
    probes = [("edited", args.prompt), ("paraphrase", args.paraphrase)] + list(DEMO_KEPT)
    before = {p: greedy(model, tok, p) for _, p in probes}
    kept = [p for kind, p in DEMO_KEPT]
    req = kne.EditRequest(prompt=args.prompt, target_new=args.target, subject=args.subject or None,
                          ground_truth=args.old or None, rephrase_prompt=args.paraphrase,
                          locality={"Kept": [{"prompt": u, "ground_truth": before[u].strip() or "?"} for u in kept]})
    pre = kne.evaluate(model, tok, [req])
    print(f"edit    {args.prompt!r} -> {args.target!r} (subject {args.subject!r}; preset {kne.config.describe(cfg)})")
    res = kne.fast_edit(model, tok, [req], cfg)
    st = res.stats
    post = kne.evaluate(model, tok, [req], pre=pre)
    after = {p: greedy(model, tok, p) for _, p in probes}
    width = max(len(p) for _, p in probes)
    print("\ngreedy completions (before -> after)")
    for kind, p in probes:
        print(f"  {kind:<13} {p:<{width}} {before[p]!r:<28} -> {after[p]!r}")
    s = post.summary()
    counts = res.ensemble.counts()
    layers_hit = sum(1 for per in counts.values() for c in per.values() if c)
    print(f"\nensemble  {st['neurons']} neurons in {layers_hit} layers ({', '.join(counts)}; axis "
          f"{res.ensemble.neuron_axis}); {st['params_edited']:,} parameters edited = "
          f"{100 * st['param_fraction']:.3f}% of the model, {100 * st['target_param_fraction']:.2f}% of the target modules")
    if "neighbours" in st:
        nb = st["neighbours"]
        how = "projected off their keys" if cfg.project else "held by the KL"
        print(f"kept      {len(nb)} neighbour prompts ({how}), e.g. " + "; ".join(repr(p) for p in nb[:4]))
        at = [w for w, on in (("the answer's end", cfg.preserve_answer_end),
                              ("the edit prompt's positions", cfg.preserve_prompt_positions)) if on]
        if at and cfg.preserve_weight > 0:
            print(f"          and the unedited prediction at {' and '.join(at)} held by the KL "
                  f"(weight {cfg.preserve_weight:g})")
        if st.get("neighbours_dropped"):
            print(f"          left out as the edited relation itself: "
                  + "; ".join(repr(p) for p in st["neighbours_dropped"][:3]))
    el = st.get("edit_losses") or st["losses"]  # the edit's own NLL (without the KL and L2 terms)
    print(f"edit      {st['steps']} steps, edit loss {el[0]:.3f} -> {el[-1]:.4f}")
    print(f"time      locate {st['locate_seconds']:.2f} s + edit {st['edit_seconds']:.2f} s = {st['total_seconds']:.2f} s")
    print(f"metrics   edit success {_pct(s['edit_succ'])}%, rephrase {_pct(s['rephrase'])}%, "
          f"locality {_pct(s['locality'])}% (the kept facts' answer tokens unchanged)")
    moved = [p for kind, p in DEMO_KEPT if kind == "other capital" and after[p] != before[p]]
    if moved and not cfg.preserve_others:
        print(f"note      {len(moved)} other subject(s) asked the edited relation moved (e.g. {moved[0]!r}): "
              "--preserve-others 4 keeps them (projected too), at some portability on KnowEdit "
              "(docs/local-edits.md)")
    if args.restore:
        res.restore()
        print("restored  the model is back to its original weights")
    ok = s["edit_succ"] == 1.0
    return 0 if ok else 1


# ------------------------------------------------------------------------------------------ edit
def cmd_edit(args) -> int:
    import kne
    from kne.runs import pct as _pct

    cfg = _config(args)
    req = kne.EditRequest(prompt=args.prompt, target_new=args.target, subject=args.subject)
    ens = kne.Ensemble.load(args.ensemble) if args.ensemble else None
    model, tok = _load(args)
    before = greedy(model, tok, args.prompt)
    pre = kne.evaluate(model, tok, [req])
    res = kne.fast_edit(model, tok, [req], cfg, ensemble=ens)
    post = kne.evaluate(model, tok, [req], pre=pre)
    st = res.stats
    print(f"preset  {kne.config.describe(cfg)}")
    print(f"before  {args.prompt!r} -> {before!r}")
    print(f"after   {args.prompt!r} -> {greedy(model, tok, args.prompt)!r}")
    print(f"edit    success {_pct(post.summary()['edit_succ'])}%, {st['steps']} steps, loss {st['losses'][-1]:.4f}, "
          f"{st['neurons']} neurons, {st['params_edited']:,} parameters ({100 * st['param_fraction']:.3f}%), "
          f"{st['total_seconds']:.2f} s")
    if args.save:
        path = res.save(args.save)
        args.wrote.append(str(path))
        print(f"saved   the edit ({path.stat().st_size / 1024:.0f} KB: indices, new and original rows) to {path}; "
              "apply it with kne.apply_edit(model, path), undo with kne.revert_edit")
    if args.save_model:
        out = Path(args.save_model)
        args.writing = str(out)
        _save_model(model, tok, out)
        res.ensemble.save(out / "kne_ensemble.json")
        meta = {"request": req.to_dict(), "config": cfg.to_dict(), "stats": st, "base_model": args.model}
        write_text(out / "kne_edit.json", json.dumps(meta, indent=1, default=str) + "\n")
        args.writing = None
        args.wrote.append(str(out))
        print(f"saved   the edited model, its ensemble and an edit record to {out}")
    return 0


def _save_model(model, tok, out: Path) -> None:
    """``save_pretrained`` of the model and tokenizer into ``out``; a full disk or a read-only folder
    is one ``OSError`` naming the folder (safetensors raises its own error type)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        tok.save_pretrained(out)
    except OSError as e:
        raise OSError(f"cannot write the model to {out}: {e.strerror or e}") from None
    except Exception as e:  # safetensors' SafetensorError: a full disk, a read-only folder
        if type(e).__name__ != "SafetensorError":
            raise
        raise OSError(f"cannot write the model to {out}: {e}") from None


# ------------------------------------------------------------------------------------------ apply
def cmd_apply(args) -> int:
    import kne

    model, tok = _load(args)
    fn = kne.revert_edit if args.revert else kne.apply_edit
    n = fn(model, args.file, force=args.force)
    print(f"{'reverted' if args.revert else 'applied'} {args.file} ({n} module(s) written)")
    out = Path(args.save_model)
    args.writing = str(out)
    _save_model(model, tok, out)
    args.writing = None
    args.wrote.append(str(out))
    print(f"saved   the model to {out}")
    return 0


# ------------------------------------------------------------------------------------------ eval


def cmd_eval(args) -> int:
    import kne
    from kne.datasets import data_files
    from kne.runs import distributed, format_table, merge_runs, run_edits

    files = data_files(args.data, args.all)  # --skip and --limit were checked by _check_args
    data = []  # every file's records, read (and checked) before the model loads
    for f in files:
        requests = kne.load_knowedit(f, limit=args.limit, skip=args.skip)  # warns of the records read only
        if not requests:
            raise ValueError(f"{f}: no records to evaluate (the file holds none)")
        if args.other_subjects:
            from kne.others import relation_template

            have = sum(relation_template(r) is not None for r in requests)
            if not have:
                raise ValueError(f"--other-subjects: no shipped template asks the relation of any of the {len(requests)} "
                                 f"records of {f.name} (or they have no subject), so no other subject can be asked; "
                                 "leave --other-subjects out for this file")
            print(f"other   subjects asked of {have} of {len(requests)} records of {f.name} (the others' relations "
                  "have no shipped template)", file=sys.stderr)
        data.append((f, requests))
    protocols = ("independent", "sequential") if args.protocol == "both" else (args.protocol,)
    rank, world = distributed()
    if world > 1:
        if "sequential" in protocols:
            raise ValueError("sequential edits build on each other and cannot be split across processes: run "
                             "--protocol sequential without torchrun")
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    model, tok = _load(args) if rank == 0 else _load(args, quiet=True)
    cfg = _config(args)
    runs = []
    for f, requests in data:
        mine = list(range(rank, len(requests), world))  # every world-th record, so shards stay balanced
        for method in args.method:
            for protocol in protocols:
                if rank == 0:
                    how = f" (preset {kne.config.describe(cfg)})" if method in ("kne", "reference") else ""
                    print(f"data    {f.name}: {len(requests)} records; method {method}{how}; {protocol} edits"
                          + (f"; {world} processes" if world > 1 else ""), file=sys.stderr)
                res = run_edits(model, tok, [requests[i] for i in mine], method, cfg, protocol=protocol,
                                fluency=args.fluency, progress=not args.no_progress and rank == 0,
                                indices=[args.skip + i for i in mine], keep_earlier=args.keep_earlier,
                                generate=args.generate, max_new_tokens=args.max_new_tokens,
                                other_subjects=args.other_subjects, drift=args.drift)
                if world > 1:
                    import torch.distributed as dist

                    parts = [None] * world
                    dist.all_gather_object(parts, res)
                    res = merge_runs(parts)
                res["data"] = f.name[:-3] if f.name.endswith(".gz") else f.name
                runs.append(res)
    if rank != 0:
        return 0
    table = format_table(runs)
    print()
    print(table)
    failed = sum(len(r["failures"]) for r in runs)
    if failed:
        print(f"\n{failed} edit(s) failed and are left out of the means (see the JSON output)")
    if args.table:
        _write_text(args, args.table, table + "\n")
        print(f"wrote {args.table}")
    if args.out:
        payload = {"model": args.model, "limit": args.limit, "skip": args.skip, "config": cfg.to_dict(),
                   "preset": kne.config.describe(cfg), "keep_earlier": args.keep_earlier,
                   "measures": {"generate": args.generate, "max_new_tokens": args.max_new_tokens,
                                "other_subjects": args.other_subjects, "drift": args.drift},
                   "processes": world,
                   "runs": runs}
        if len(runs) == 1:
            payload.update(runs[0])
        _write_text(args, args.out, json.dumps(payload, indent=1, default=str) + "\n")
        print(f"wrote {args.out}")
    return 0 if not failed else 1


def _write_text(args, path: str, text: str) -> None:
    """Write ``path`` whole or not at all (:func:`kne.io.write_text`)."""
    args.wrote.append(str(write_text(path, text)))


def cmd_info(args) -> int:
    """Versions, kernel backends, threads, devices, cache (kne.info)."""
    from kne.info import main as info_main

    return info_main()


def cmd_compare(args) -> int:
    """Paired differences of two kne eval results (kne.compare)."""
    from kne.compare import FEW, compare_runs, format_comparison, load_runs, pair_runs

    a_runs = load_runs(args.a)
    b_runs = load_runs(args.b) if args.b else a_runs
    if args.b is None and (args.a_method is None or args.b_method is None):
        raise ValueError("with one results file, name both methods: --a-method M --b-method M "
                         f"(it holds {', '.join(sorted({str(r['method']) for r in a_runs}))})")
    if args.boots < 1:
        raise ValueError(f"--boots must be >= 1, got {args.boots}")
    if not 0 < args.level < 1:
        raise ValueError(f"--level must be between 0 and 1 (0.95 for a 95% interval), got {args.level}")
    results = [(a, b, compare_runs(a, b, boots=args.boots, seed=args.seed, level=args.level))
               for a, b in pair_runs(a_runs, b_runs, args.a_method, args.b_method)]
    table = format_comparison(results, level=args.level)
    print(table)
    print(f"\npaired bootstrap over records, {args.boots} resamples, seed {args.seed}; * : the interval leaves out 0; "
          f"(few): fewer than {FEW} paired records, not a finding either way")
    if args.table:
        _write_text(args, args.table, table + "\n")
        print(f"wrote {args.table}")
    if args.out:
        rows = [{"data": a["data"], "protocol": a["protocol"], "a_method": a["method"], "b_method": b["method"], **r}
                for a, b, rs in results for r in rs]
        _write_text(args, args.out, json.dumps({"boots": args.boots, "seed": args.seed, "level": args.level,
                                                "rows": rows}, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


def cmd_plot(args) -> int:
    from kne.plots import plot_file

    out = plot_file(args.file, args.out, args.more)
    print(f"wrote {out}")
    return 0


# ------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kne", description="Fast KNE knowledge editing for Hugging Face models.",
                                epilog="A mistake ends in one line on stderr (exit status 2), a Ctrl-C in one line "
                                       "saying what was written (130).")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="edit a fact of the embedded model and show before/after",
                       description="Edit a fact the embedded model knows with the local preset and print greedy "
                                   "completions before and after (the edited prompt, a paraphrase, two other facts "
                                   "about the subject, two other countries' capitals, an unrelated fact), the "
                                   "neighbour prompts the edit kept, the metrics, the ensemble size, the share of "
                                   "parameters touched and the time. Try --preset authors to see an edit that "
                                   "also moves the subject's other facts.")
    _common(d)
    d.add_argument("--prompt", default=DEMO_PROMPT)
    d.add_argument("--target", default=DEMO_TARGET)
    d.add_argument("--subject", default=DEMO_SUBJECT, help="the subject the neighbour prompts are made from")
    d.add_argument("--old", default=DEMO_OLD, help="the old answer (neighbours predicting it are left out)")
    d.add_argument("--paraphrase", default=DEMO_PARAPHRASE)
    d.add_argument("--restore", action="store_true", help="restore the model at the end and say so")
    _config_args(d)
    d.set_defaults(func=cmd_demo)

    e = sub.add_parser("edit", help="edit one fact and optionally save the edited model",
                       description="Edit one fact with KNE and print the completion before and after.")
    _common(e)
    e.add_argument("--prompt", required=True)
    e.add_argument("--target", required=True, help="the new answer (target_new)")
    e.add_argument("--subject", default=None)
    e.add_argument("--ensemble", default=None, help="an ensemble JSON (kne or the authors' knb_dict) to use")
    e.add_argument("--save", default=None, metavar="FILE",
                   help="write the compact edit file (safetensors: indices, new and original rows, model fingerprint; "
                        "missing folders are made)")
    e.add_argument("--save-model", default=None, metavar="DIR",
                   help="folder for the whole edited model (save_pretrained), its ensemble and an edit record")
    _config_args(e)
    e.set_defaults(func=cmd_edit)

    a = sub.add_parser("apply", help="apply (or revert) an edit file and save the model",
                       description="Apply an edit file written by kne edit --save (or EditResult.save) to a model, or "
                                   "revert it, and save the result with save_pretrained. The file is verified first "
                                   "(content digest, the model's fingerprints, the current rows bit for bit) and "
                                   "written all or nothing.")
    _common(a)
    a.add_argument("file", help="the edit file (.safetensors)")
    a.add_argument("--save-model", required=True, metavar="DIR", help="folder for the model after the edit")
    a.add_argument("--revert", action="store_true", help="revert the edit instead of applying it")
    a.add_argument("--force", action="store_true",
                   help="apply even when the file's fingerprints do not match this model (with a warning; the rows "
                        "it writes must still hold the values it expects)")
    a.set_defaults(func=cmd_apply)

    v = sub.add_parser("eval", help="evaluate methods on KnowEdit files (EasyEdit's metrics)",
                       description="Independent edits (per record: evaluate, edit, evaluate again, restore) or "
                                   "sequential edits (all edits kept, evaluated at the end), with EasyEdit's "
                                   "metrics; prints a table like the KnowEdit papers'.")
    _common(v)
    v.add_argument("--data", nargs="+", default=None, metavar="NAME_OR_FILE",
                   help="KnowEdit data: the shipped sets zsre, counterfact, recent (kne.datasets), or KnowEdit JSON / "
                        "JSON-lines files (.gz too)")
    v.add_argument("--all", action="store_true",
                   help="the three shipped KnowEdit sets (zsre, counterfact, recent)")
    v.add_argument("--limit", type=int, default=None, help="N records of each file only (after --skip)")
    v.add_argument("--skip", type=int, default=0, help="leave out the first N records of each file")
    v.add_argument("--method", nargs="+", choices=("kne", "reference", "ft-m", "ft-m+kl"), default=["kne"],
                   help="one or more methods (default kne); ft-m+kl is FT-M with kne's neighbour KL (needs "
                        "--preserve-weight)")
    v.add_argument("--protocol", choices=("independent", "sequential", "both"), default="independent")
    v.add_argument("--no-keep-earlier", dest="keep_earlier", action="store_false",
                   help="sequential edits with the projection on (--preset local): do not keep the earlier edits "
                        "(by default one kne.Editor makes them, and each edit is kept off the earlier edits' prompt and "
                        "neighbour keys it holds)")
    v.add_argument("--fluency", action="store_true", help="also measure generation fluency (slower)")
    v.add_argument("--generate", action="store_true",
                   help="also grade generated answers, EasyEdit's protocol: the chat template, greedy until '.', "
                        "newline or EOS, SQuAD-normalised exact match (Gen. Succ./Rephrase/Portability/Locality), "
                        "and whether the answer states the truth once (the '(contains)' columns)")
    v.add_argument("--max-new-tokens", type=int, default=16, metavar="N",
                   help="with --generate: at most N new tokens per answer, more where a graded answer's truth is "
                        "longer (its length + 4) (default 16; EasyEdit: 512)")
    v.add_argument("--other-subjects", type=int, default=0, metavar="N",
                   help="also ask the edited relation of N other subjects from the shipped templates (at most 8): "
                        "Others moved, the share that answer the new target after the edit (lower is better)")
    v.add_argument("--drift", action="store_true",
                   help="also score a fixed held-out text: Drift, the mean NLL increase per token (nats), and the "
                        "share of its tokens whose argmax changed")
    v.add_argument("--out", default=None, help="write the results JSON here (its folder must exist)")
    v.add_argument("--table", default=None, help="write the markdown table here (its folder must exist)")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")
    _config_args(v)
    v.set_defaults(func=cmd_eval)

    pl = sub.add_parser("plot", help="picture of an ensemble JSON, of kne eval results or of lifelong runs",
                        description="An ensemble JSON (kne's or the authors' knb_dict) becomes a heatmap of ensemble "
                                    "density per layer and module with the counts; a results JSON from kne eval "
                                    "becomes bars of its metrics; the results of benchmarks/quality/lifelong.py "
                                    "become curves against the number of edits (several files in one picture).")
    pl.add_argument("file", help="ensemble JSON, results JSON or lifelong results JSON")
    pl.add_argument("more", nargs="*", help="more lifelong results JSON files drawn in the same picture")
    pl.add_argument("-o", "--out", default=None, help="PNG path (default: the input with .png)")
    pl.set_defaults(func=cmd_plot)

    c = sub.add_parser("compare", help="paired differences of two kne eval results, with bootstrap intervals",
                       description="Pair two kne eval --out results record by record (same data file, protocol and "
                                   "record indices) and print each metric's means, their difference (A - B) and a "
                                   "paired bootstrap interval of it: is a difference more than the choice of "
                                   "records? Metrics in points, as kne eval prints them; fluency as is.")
    c.add_argument("a", help="results JSON (kne eval --out) of method A")
    c.add_argument("b", nargs="?", default=None,
                   help="results JSON of method B (default: the same file, with --a-method and --b-method)")
    c.add_argument("--a-method", default=None, help="only A's runs of this method (as the results name it)")
    c.add_argument("--b-method", default=None, help="B's run of this method (needed when B holds several)")
    c.add_argument("--boots", type=int, default=10000, help="bootstrap resamples (default 10000)")
    c.add_argument("--level", type=float, default=0.95, help="interval level (default 0.95)")
    c.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    c.add_argument("--out", default=None, help="write the rows as JSON here (its folder must exist)")
    c.add_argument("--table", default=None, help="write the markdown table here (its folder must exist)")
    c.set_defaults(func=cmd_compare)

    i = sub.add_parser("info", help="versions, kernel backends, threads, devices, cache location")
    i.set_defaults(func=cmd_info)

    return p


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _interrupted(args) -> str:
    where = " during start-up" if args.phase == "start-up" else ""
    if args.command not in ("demo", "edit", "eval", "apply"):
        return f"kne {args.command}: interrupted{where}"
    if args.writing:
        files = f"; {args.writing} was being written and may be incomplete"
    elif args.wrote:
        files = f"; only {', '.join(args.wrote)} was written (complete)"
    else:
        files = "; nothing was written"
    return f"kne {args.command}: interrupted{where}{files}"


def main(argv: Optional[List[str]] = None) -> int:
    """Run one command; every error is one line on stderr (exit 2), a Ctrl-C one line too (130).
    The package is imported lazily, so a Ctrl-C while torch and the model load lands here."""
    args = build_parser().parse_args(argv)
    args.phase, args.wrote, args.writing = "start-up", [], None
    import warnings

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        text = getattr(message, "cli", None) or str(message)  # kne's warnings carry the CLI's wording
        print(f"kne {args.command}: warning: {' '.join(text.split())}", file=sys.stderr)

    shown, warnings.showwarning = warnings.showwarning, one_line_warning
    try:
        _check_args(args)
        # info and plot set (or report) threads and devices themselves; compare needs neither
        if args.command not in ("info", "plot", "compare"):
            _setup(args)
        return int(args.func(args) or 0)
    except (ValueError, OSError, RuntimeError, MissingDependency) as e:
        print(f"kne {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(_interrupted(args), file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = shown
        if "torch.distributed" in sys.modules:
            try:
                import torch.distributed as dist

                if dist.is_available() and dist.is_initialized():
                    dist.destroy_process_group()
            except Exception:  # pragma: no cover - best effort at exit
                pass
