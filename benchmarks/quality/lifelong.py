"""Lifelong editing: a long sequence of single-fact (or batched) edits, scored over every edit so far
at each checkpoint.

Methods (``--method``, one process may run several, one after the other, the model put back in
between):

* ``editor``: kne ``local`` on :class:`kne.Editor` (kept keys in a bounded sketch);
* ``keep``: kne ``local`` with ``fast_edit(..., keep=[every earlier result])`` (re-reads every earlier
  edit's keys at each edit) -- stopped once an edit takes more than ``--keep-budget`` seconds;
* ``tuned``: kne ``tuned``, no keep;
* ``ft-m``: kne's FT-M baseline (EasyEdit's settings), sequential;
* ``batch``: the ``editor`` with ``--batch`` facts per ``Editor.edit`` call.

At each checkpoint (``--checkpoints``) every edit so far is evaluated (EasyEdit's teacher-forced
metrics, the generated answers with the contains grade, other subjects, and drift on
``--drift-sequences`` held-out sequences), and the run records seconds per edit (wall clock and
the process's CPU seconds), RSS, the state's bytes and the capacity. Records: the shipped KnowEdit file's records from ``--first`` on (default
100: records 0-99 are the tuning and report records) that fed none of ``kne/data/preservation.json``
(neither one of its prompts nor one of its subjects), in file order.

    python benchmarks/quality/lifelong.py --data counterfact --checkpoints 10,25,50,100 \\
        --method editor ft-m tuned --out benchmarks/results/lifelong_counterfact.json

A sequence longer than one sitting: ``--state DIR`` keeps, at every checkpoint, what the run needs to
go on (for ``editor`` and ``batch`` the :meth:`kne.Editor.save` folder, for ``tuned`` and ``ft-m``
the weights the edits changed, and the run so far), written all or nothing; the same command with
later checkpoints added goes on from the last checkpoint reached, on a freshly loaded model (the
unedited model's measures are cached there too). ``keep`` cannot go on (its earlier results live only
in the process).

Embedded model, CPU, one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

#: other subjects asked of each edited relation: the unedited measures and every checkpoint's alike
OTHER_SUBJECTS = 4


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def lifelong_records(data: str, first: int):
    """``(indices, requests)``: the records from ``first`` on that fed nothing shipped."""
    from importlib import resources

    import kne

    shipped = json.loads(resources.files("kne").joinpath("data/preservation.json").read_text())
    prompts = set(shipped["prompts"])
    subjects = {s for subs in shipped["subjects"].values() for s in subs}
    reqs = kne.datasets.knowedit(data)
    out = [(i, r) for i, r in enumerate(reqs) if i >= first and r.prompt not in prompts and r.subject not in subjects]
    return [i for i, _ in out], [r for _, r in out]


def _fingerprints(model) -> dict:
    """sha256 of every parameter's bytes: which weights a method's edits changed."""
    import hashlib

    import torch

    out = {}
    for name, p in model.named_parameters():
        t = p.detach().contiguous().view(torch.uint8) if p.dtype != torch.uint8 else p.detach().contiguous()
        out[name] = hashlib.sha256(t.reshape(-1).numpy().tobytes()).hexdigest()
    return out


def _unedited_measures(model, tok, reqs, indices, drift_rows, cache):
    """``(pre, base, text, rows)``: the unedited model's records for ``reqs`` and its drift scores,
    read from (and added to) ``cache`` (a file, or ``None``), keyed by record index."""
    import torch

    import kne
    from kne import drift as driftmod
    from kne.evaluation import EvalResult, measure_before

    doc = torch.load(cache, weights_only=False) if cache is not None and cache.is_file() else {"records": {}}
    todo = [j for j, i in enumerate(indices) if i not in doc["records"]]
    changed = bool(todo)
    if todo:
        sub = [reqs[j] for j in todo]
        before = measure_before(model, tok, sub, generate=True, other_subjects=OTHER_SUBJECTS)
        pre = kne.evaluate(model, tok, sub)
        for j, rec, extra in zip(todo, pre.records, before):
            rec.update(extra)
            doc["records"][indices[j]] = rec
    text = driftmod.drift_text(model, tok, progress=False)
    rows = list(range(min(drift_rows, len(text.sequences))))
    if doc.get("drift_rows") != rows:
        doc["base"], doc["drift_rows"] = driftmod.token_scores(model, tok, text, rows), rows
        changed = True
    if changed and cache is not None:
        _write_atomic(cache, lambda f: torch.save(doc, f))
    return EvalResult([doc["records"][i] for i in indices]), doc["base"], text, rows


def _write_atomic(path, write, mode="wb"):
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run(method: str, model, tok, reqs, indices, checkpoints, *, batch: int, keep_budget: float, drift_rows: int,
        progress: bool, sketch_rank=None, save=None, overrides=None, state=None):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    import kne
    from kne import drift as driftmod
    from kne.evaluation import EvalResult
    from kne.metrics import record_value
    from kne.runs import edit_with

    n = max(checkpoints)
    reqs, indices = reqs[:n], indices[:n]
    local = kne.KNEConfig.preset("local", **(overrides or {}))
    tuned = kne.KNEConfig.preset("tuned")
    t0 = time.perf_counter()
    sdir = None if state is None else Path(state) / method
    if sdir is not None:
        sdir.mkdir(parents=True, exist_ok=True)
    pre, base, text, rows = _unedited_measures(model, tok, reqs, indices, drift_rows,
                                               None if state is None else Path(state) / "unedited.pt")
    setup = time.perf_counter() - t0
    editor = None
    results, seconds, failures, points, segments = [], [], [], [], []
    cpu_seconds = []  # the process's CPU seconds per edit: unlike the wall clock, blind to other processes
    done = 0  # records edited (or attempted)
    stopped = None
    originals = {}  # resumed ft-m / tuned: the unedited tensors of the weights put back from the state
    prior = None if sdir is None else _read_run(sdir)
    # ft-m and tuned keep the weights their edits changed: those that differ from the unedited model's
    unedited = _fingerprints(model) if sdir is not None and method not in ("editor", "batch", "keep") else None
    if prior is not None:
        if method == "keep":
            raise SystemExit(f"{sdir}: method keep cannot go on from a saved state (its earlier results live "
                             "only in the process that made them); start it without --state")
        if prior["indices"] != indices[:prior["done"]]:
            raise SystemExit(f"{sdir}: the saved run edited other records (another --data, --first or --set?); "
                             "give a new --state folder")
        if prior["done"] >= n:
            raise SystemExit(f"{sdir}: the saved run already has {prior['done']} edits; add a later checkpoint "
                             f"(the last is {n})")
        done, seconds, failures, points = prior["done"], prior["seconds"], prior["failures"], prior["points"]
        segments, setup = prior["segments"], prior["setup_seconds"]
        cpu_seconds = prior.get("cpu_seconds") or [None] * done  # a run saved before they were recorded
        ck = sdir / prior["checkpoint"]
        if method in ("editor", "batch"):
            editor = kne.Editor.load(model, tok, ck)
        else:
            saved = load_file(str(ck / "weights.safetensors"))
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, t in saved.items():
                    originals[name] = params[name].detach().clone()
                    params[name].copy_(t)
        if progress:
            print(f"{method}: went on from {ck} ({done} edits)", file=sys.stderr, flush=True)
    elif method in ("editor", "batch"):
        editor = kne.Editor(model, tok, local, sketch_rank=sketch_rank)
    rss0 = rss_mb()
    segments.append({"from_edit": done, "rss_mb_at_start": rss0, "cpu": _cpu()})

    def record():
        return {"method": method, "batch": batch if method == "batch" else 1, "setup_seconds": setup,
                "seconds": seconds, "cpu_seconds": cpu_seconds, "failures": failures, "stopped": stopped, "points": points,
                "indices": indices[:done], "segments": segments}

    def keep_state():  # all or nothing: a new checkpoint folder, then run.json names it, then the old one goes
        ck = sdir / f"ckpt-{done}"
        if ck.exists():
            shutil.rmtree(ck)
        if editor is not None:
            editor.save(ck)
        else:
            now = _fingerprints(model)
            changed = {k: p.detach().contiguous() for k, p in model.named_parameters() if now[k] != unedited[k]}
            ck.mkdir()
            save_file(changed, str(ck / "weights.safetensors"))
        doc = dict(record(), done=done, checkpoint=ck.name)
        _write_atomic(sdir / "run.json", lambda f: json.dump(doc, f), mode="w")
        for old in sdir.glob("ckpt-*"):
            if old != ck:
                shutil.rmtree(old)

    try:
        while done < n:
            step = batch if method == "batch" else 1
            chunk = list(range(done, min(n, done + step)))
            t, c = time.perf_counter(), time.process_time()
            try:
                if editor is not None:
                    res = editor.edit([reqs[i] for i in chunk])
                elif method == "keep":
                    res = edit_with("kne", model, tok, [reqs[chunk[0]]], local, keep=list(results))
                elif method == "tuned":
                    res = edit_with("kne", model, tok, [reqs[chunk[0]]], tuned)
                else:
                    res = edit_with("ft-m", model, tok, [reqs[chunk[0]]], local)
                results.append(res)
            except kne.EditError as e:
                failures.append({"index": [indices[i] for i in chunk], "error": str(e)[:300]})
            dt = time.perf_counter() - t
            seconds.extend([dt / len(chunk)] * len(chunk))
            cpu_seconds.extend([(time.process_time() - c) / len(chunk)] * len(chunk))
            done += len(chunk)
            if progress:
                print(f"{method} {done}/{n} {dt:.1f}s failures={len(failures)}", file=sys.stderr, flush=True)
            if method == "keep" and dt > keep_budget:
                stopped = (f"edit {done} took {dt:.0f} s, over the {keep_budget:.0f} s budget: re-reading the keys of "
                           f"{len(results)} earlier edits at every edit")
            if done in checkpoints or stopped or done == n:
                te = time.perf_counter()
                post = kne.evaluate(model, tok, reqs[:done], pre=EvalResult(pre.records[:done]), generate=True,
                                    other_subjects=OTHER_SUBJECTS)
                d, flips = driftmod.compare(base, driftmod.token_scores(model, tok, text, rows))
                s = post.summary()
                point = {"edits": done, "summary": s, "drift": d, "drift_flips": flips,
                         "seconds_per_edit_window": sum(seconds[-min(len(seconds), 10):]) / min(len(seconds), 10),
                         "seconds_per_edit_mean": sum(seconds) / len(seconds), "rss_mb": rss_mb(),
                         "rss_growth_mb": rss_mb() - rss0, "failures": len(failures),
                         "eval_seconds": time.perf_counter() - te,
                         # each edit's own scores, oldest first: what the sequence forgets, by the edit's age
                         "by_edit": {f: [record_value(r, f) for r in post.records]
                                     for f in ("rewrite_acc", "locality")}}
                if editor is not None:
                    st = editor.stats
                    caps = list(st["capacity"].values())
                    point.update(state_bytes=st["state_bytes"], sketch_rank=st["sketch_rank"],
                                 capacity_max=st["capacity_max"], capacity_mean=sum(caps) / len(caps),
                                 undo_bytes=st["undo_bytes"], state_ops=st["state_ops"])
                points.append(point)
                if sdir is not None and method != "keep":
                    keep_state()
                if save is not None:  # what the run has so far, after every checkpoint
                    save(dict(record(), partial=True))
                if progress:
                    print(method, json.dumps({k: v for k, v in point.items() if k != "summary"}),
                          {k: s.get(k) for k in ("edit_succ", "locality", "gen_edit_contains", "others_moved")},
                          file=sys.stderr, flush=True)
            if stopped:
                break
    finally:
        if editor is not None:
            editor.undo_all()
            editor.close()
        else:
            for res in reversed(results):
                res.restore()
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, t in originals.items():
                    params[name].copy_(t)
    return dict(record(), torch_threads=torch.get_num_threads())


def _read_run(sdir):
    path = sdir / "run.json"
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    if not (sdir / doc["checkpoint"]).is_dir():
        raise SystemExit(f"{sdir}: run.json names {doc['checkpoint']}, which is missing: the state folder was "
                         "changed by hand; give a new --state folder")
    return doc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="counterfact", help="a shipped KnowEdit set: zsre, counterfact or recent")
    p.add_argument("--first", type=int, default=100, help="first record that may be used (default 100)")
    p.add_argument("--checkpoints", default="10,25,50,100", help="edit counts to evaluate at (the last: the length)")
    p.add_argument("--method", nargs="+", default=["editor", "ft-m"],
                   choices=["editor", "keep", "tuned", "ft-m", "batch"])
    p.add_argument("--batch", type=int, default=10, help="facts per Editor.edit call of method batch")
    p.add_argument("--keep-budget", type=float, default=60.0, help="seconds per edit at which method keep stops")
    p.add_argument("--drift-sequences", type=int, default=64, help="held-out sequences drift is scored on")
    p.add_argument("--sketch-rank", type=int, default=None, help="Editor sketch rank (default: 10%% of model bytes)")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="KNEConfig fields changed from the local preset (values as JSON: project_corpus=true)")
    p.add_argument("--state", default=None, metavar="DIR",
                   help="keep what the run needs to go on in DIR at every checkpoint, and go on from it when it "
                        "holds a run (the same command with later checkpoints added)")
    p.add_argument("--out", required=True, help="write the run as JSON here")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    import torch

    import kne

    torch.set_num_threads(1)
    checkpoints = sorted({int(x) for x in a.checkpoints.split(",")})
    overrides = {}
    for item in a.set:
        k, _, v = item.partition("=")
        try:
            overrides[k] = json.loads(v)
        except json.JSONDecodeError:
            overrides[k] = v
    indices, reqs = lifelong_records(a.data, a.first)
    if len(reqs) < max(checkpoints):
        raise SystemExit(f"{a.data}: only {len(reqs)} records from {a.first} on fed nothing shipped; "
                         f"the last checkpoint asks {max(checkpoints)}")
    if a.state is not None:  # a state folder holds one sequence: the same records, settings and scoring
        os.makedirs(a.state, exist_ok=True)
        args = {"data": a.data, "first": a.first, "overrides": overrides, "sketch_rank": a.sketch_rank,
                "batch": a.batch, "drift_sequences": a.drift_sequences}
        path = os.path.join(a.state, "args.json")
        if os.path.isfile(path):
            with open(path) as f:
                was = json.load(f)
            if was != args:
                diff = ", ".join(f"{k}: {was.get(k)!r} there, {v!r} here" for k, v in args.items() if was.get(k) != v)
                raise SystemExit(f"{a.state} holds a run with other settings ({diff}); give a new --state folder")
        else:  # atomically: two methods may start on one folder at once
            _write_atomic(Path(path), lambda f: f.write(json.dumps(args).encode()))
    model, tok = kne.load_model()
    runs = []

    def save(partial=None):
        doc = {"data": a.data, "first": a.first, "available": len(reqs), "checkpoints": checkpoints,
               "command": "python benchmarks/quality/lifelong.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "kne": kne.__version__, "torch": torch.__version__, "cpu": _cpu(), "overrides": overrides,
               "runs": runs + ([partial] if partial else [])}
        with open(a.out, "w") as f:  # a long run keeps what it has
            json.dump(doc, f, indent=1)

    for m in a.method:
        runs.append(run(m, model, tok, reqs, indices, checkpoints, batch=a.batch, keep_budget=a.keep_budget,
                        drift_rows=a.drift_sequences, progress=not a.quiet, sketch_rank=a.sketch_rank, save=save,
                        overrides=overrides, state=a.state))
        save()
    return 0


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
