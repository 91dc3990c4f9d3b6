"""kne.fast_edit side by side with the authors' KNB trainer (their EasyEdit fork), and the trace
``tests/test_knb_parity.py`` checks.

Their code: https://github.com/leonz-z/EasyEdit (the KNE authors' EasyEdit fork, where the method
is called KNB), commit 5d49c472bd4b8447a70d276fb577d28088588e62, files
``easyeditor/models/knb/knb_main.py`` (``execute_knb``: the training loop, ``knb_forward``: one
step), ``easyeditor/models/knb/knb_hparams.py``, their PEFT fork under
``easyeditor/models/knb/peft/`` (the adapter: ``peft/tuners/knb/layer.py``) and
``easyeditor/util/hparams.py``. Their PEFT fork imports base classes from PEFT itself, 0.10.0
(their fork says 0.10.1.dev0). Nothing of their code is written to this repository: this script
reads it from a folder given on the command line and runs it as it is. It is a tool for people,
not needed by CI.

Set-up (once, outside the repository or under the ignored build/)::

    git clone https://github.com/leonz-z/EasyEdit /tmp/EasyEdit      # or any copy of that commit
    python tools/knb_parity.py setup --repo /tmp/EasyEdit --dest build/knb-authors
    pip install --no-deps --target build/knb-authors/site peft==0.10.0

``setup`` extracts the two folders above with ``git archive`` (so a bare mirror works too) and adds
empty ``easyeditor/__init__.py`` / ``easyeditor/models/__init__.py`` / ``easyeditor/util/__init__.py``:
EasyEdit's own ``__init__`` files import dozens of packages their KNB trainer does not use.

Then (one thread; ``--authors`` defaults to build/knb-authors)::

    python tools/knb_parity.py compare              # agreement, float32 and float64, both axes
    python tools/knb_parity.py floor                # float32 noise: their code on 1 vs 2 threads
    python tools/knb_parity.py bench --repeats 5    # per-step seconds, alternating kne and theirs
    python tools/knb_parity.py memory               # peak RSS added by each edit (fresh processes)
    python tools/knb_parity.py trace --out tests/data/knb_parity.json

How their code runs here, unchanged: their loop hard-codes ``cuda:{hparams.device}``, so
``knb_main.knb_forward`` is wrapped to pass the CPU instead (the wrapper also times each step and
reads the loss it prints); ``knb_main.get_peft_model`` is wrapped to record the start values their
``kaiming_uniform_`` drew (their bound, checked against kne's ``delta_init="authors"``) and then to
set the start to kne's seeded ``initial_delta``, so both runs start from the same numbers. The
tokenizer's padding side is set to ``left`` as EasyEdit's editor sets it for GPT-2/Llama
tokenizers (their label mask is right only with left padding). Their ``merge()`` cannot run
(``get_delta_weight`` is called without its ``dtype`` argument), so their edited weight is taken
as EasyEdit evaluates it, the adapter active: ``W + scaling * get_delta_weight(active, W.dtype)``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
AUTHORS_REPO = "https://github.com/leonz-z/EasyEdit"
AUTHORS_COMMIT = "5d49c472bd4b8447a70d276fb577d28088588e62"
AUTHORS_FILES = ("easyeditor/models/knb", "easyeditor/util/hparams.py")
PEFT_VERSION = "0.10.0"

# The benchmark fact (README, Performance) and a 3-request batch of unequal answer lengths.
FACT = [{"prompt": "The capital of France is", "target_new": " Rome"}]
BATCH = [{"prompt": "The capital of France is", "target_new": "Rome"},
         {"prompt": "The Eiffel Tower is located in the city of", "target_new": "New York City"},
         {"prompt": "Angela Merkel is a citizen of", "target_new": "the United Kingdom of Great Britain"}]


def _write(path, text: str) -> None:
    """``--out`` written whole or not at all (an interrupted run leaves the last file as it was)."""
    from kne.io import write_text

    write_text(path, text)


# ------------------------------------------------------------------------------------------- set-up
def setup(repo: str, dest: str, commit: str) -> None:
    dest_p = Path(dest)
    dest_p.mkdir(parents=True, exist_ok=True)
    got = subprocess.run(["git", "-C", repo, "rev-parse", commit], capture_output=True, text=True, check=True)
    sha = got.stdout.strip()
    arch = subprocess.run(["git", "-C", repo, "archive", sha, *AUTHORS_FILES], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest_p)], input=arch.stdout, check=True)
    for sub in ("easyeditor", "easyeditor/models", "easyeditor/util"):
        _write(dest_p / sub / "__init__.py", "")  # their package __init__s import all of EasyEdit
    _write(dest_p / "SOURCE", f"{AUTHORS_REPO} {sha}\n")
    print(f"their KNB trainer ({sha}) in {dest_p}; now: pip install --no-deps --target {dest_p / 'site'} "
          f"peft=={PEFT_VERSION}")


def load_authors(folder: str):
    """Their ``knb_main`` module (and ``KNBHyperParams``), importable from ``folder``."""
    f = Path(folder).resolve()
    if not (f / "easyeditor" / "models" / "knb" / "knb_main.py").is_file():
        sys.exit(f"{f} does not hold their trainer: run `python tools/knb_parity.py setup --repo <EasyEdit fork>` "
                 "first (see this script's docstring)")
    site = f / "site"
    if not (site / "peft").is_dir():
        sys.exit(f"PEFT {PEFT_VERSION} is missing: pip install --no-deps --target {site} peft=={PEFT_VERSION}")
    sys.path[:0] = [str(site), str(f)]
    from easyeditor.models.knb import knb_main
    from easyeditor.models.knb.knb_hparams import KNBHyperParams

    return knb_main, KNBHyperParams


# ------------------------------------------------------------------------------------- their run
class Theirs:
    """Runs their ``execute_knb`` with the wrappers the module docstring describes."""

    def __init__(self, folder: str):
        import torch

        self.torch = torch
        self.main, self.HP = load_authors(folder)
        self._forward = self.main.knb_forward
        self._get_peft_model = self.main.get_peft_model
        self.main.knb_forward = self._step
        self.main.get_peft_model = self._peft
        self.start = None  # {(suffix, layer): start tensor} to set, or None: keep their draw
        self.step_seconds: List[float] = []
        self.losses: List[float] = []
        self.drawn: Dict[Any, float] = {}

    def _step(self, peft_model, txt, tgt, device, tok, loss_meter, opt):
        buf = io.StringIO()
        t = time.perf_counter()
        with contextlib.redirect_stdout(buf):
            self._forward(peft_model, txt, tgt, self.torch.device("cpu"), tok, loss_meter, opt)
        self.step_seconds.append(time.perf_counter() - t)
        self.losses += [float(x) for x in re.findall(r"Batch loss ([-+0-9.eEnaif]+)", buf.getvalue())]

    def _peft(self, model, peft_config, *a, **kw):
        pm = self._get_peft_model(model, peft_config, *a, **kw)
        for key, mod in knb_modules(pm):
            w = mod.knb_W["default"].weight
            self.drawn[key] = (float(w.detach().abs().max()), tuple(w.shape))
            if self.start is not None:
                with self.torch.no_grad():
                    w.copy_(self.start[key])
        return pm

    def edit(self, model, tok, requests, knb_dict, *, axis: str, steps: int, t_loss: float, lr: float = 5e-3,
             start=None, padding_side: str = "left", seed: int = 0):
        """Their edit of ``model`` (changed in place: wrapped by PEFT). Returns the PEFT model and a summary."""
        suffixes = sorted(knb_dict)
        hp = self.HP(layers=[], num_steps=steps, lr=lr, weight_decay=0.0, kl_factor=0, norm_constraint=False,
                     target_modules=suffixes, knb_alpha=1, knb_dropout=0.0, device=0, alg_name="KNB",
                     model_name="smollm2-135m", batch_size=len(requests), use_rsknb=True, t_loss=t_loss,
                     knb_layer="this_layer" if axis == "out" else "last_layer")
        self.start, self.step_seconds, self.losses, self.drawn = start, [], [], {}
        tok.padding_side = padding_side
        random.seed(seed)  # their loop shuffles the batch each step
        self.torch.manual_seed(seed)
        t = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            pm = self.main.execute_knb(0, model, tok, [dict(r) for r in requests], hp,
                                       knb_dict={s: {str(k): list(v) for k, v in d.items()}
                                                 for s, d in knb_dict.items()})
        seconds = time.perf_counter() - t
        tok.padding_side = "right"
        return pm, {"losses": list(self.losses), "steps": len(self.step_seconds), "seconds": seconds,
                    "step_seconds": list(self.step_seconds), "drawn": dict(self.drawn)}


def knb_modules(peft_model):
    """``((suffix, layer), module)`` of every KNB-wrapped module that holds an adapter."""
    out = []
    for name, mod in peft_model.named_modules():
        if hasattr(mod, "knb_W") and "default" in mod.knb_W:
            m = re.search(r"\.layers\.(\d+)\.(.+)$", name)
            out.append(((m.group(2), int(m.group(1))), mod))
    return out


def their_weights(peft_model):
    """``{(suffix, layer): (W, W + scaling * delta_W, knb_W, scaling)}`` as their adapter computes them."""
    import torch

    out = {}
    with torch.no_grad():
        for key, mod in knb_modules(peft_model):
            W = mod.get_base_layer().weight.detach()
            dW = mod.get_delta_weight("default", dtype=W.dtype)
            out[key] = (W.clone(), W + mod.scaling["default"] * dW, mod.knb_W["default"].weight.detach().clone(),
                        mod.scaling["default"])
    return out


# ------------------------------------------------------------------------------------- kne's run
def kne_config(axis: str, steps: int, t_loss: float, lr: float = 5e-3, **over):
    import kne

    return kne.KNEConfig.preset("knb", neuron_axis=axis, steps=steps, stop_loss=t_loss, lr=lr, **over)


def kne_start(model, ensemble, cfg) -> Dict[Any, Any]:
    """kne's seeded starting delta of every ensemble module instance, keyed ``(suffix, layer)``."""
    from kne.editing import initial_delta

    return {(site.suffix, site.layer): initial_delta(cfg, site, ensemble.neuron_axis, idx.numel(), "cpu")
            for site, idx in ensemble.sites(model)}


def greedy(model, tok, prompt: str, n: int = 8) -> List[int]:
    """``n`` greedy tokens after ``prompt`` (no cache: the same arithmetic for any wrapper)."""
    import torch

    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for _ in range(n):
            nxt = model(input_ids=ids, use_cache=False).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
    return ids[0, -n:].tolist()


# ------------------------------------------------------------------------------------------ checks
def side_by_side(theirs: Theirs, model, tok, requests, *, axis: str, dtype: str, steps: int, t_loss: float,
                 lr: float = 5e-3, seed: int = 0, ensemble=None) -> Dict[str, Any]:
    """One edit each from the same model, ensemble and start; what agrees and by how much."""
    import torch

    import kne

    base = copy.deepcopy(model).to(getattr(torch, dtype))
    cfg = kne_config(axis, steps, t_loss, lr, seed=seed)
    if ensemble is None:
        ensemble = kne.locate(base, tok, requests, cfg)
    start = kne_start(base, ensemble, cfg)
    orig = {k: v.clone() for k, v in base.state_dict().items()}

    ours = copy.deepcopy(base)
    res = kne.fast_edit(ours, tok, requests, cfg, ensemble=ensemble)
    pm, th = theirs.edit(copy.deepcopy(base), tok, requests, ensemble.to_knb_dict(), axis=axis, steps=steps,
                         t_loss=t_loss, lr=lr, start=start, seed=seed)
    tw = their_weights(pm)

    lo, lt = res.stats["losses"], th["losses"]
    n = min(len(lo), len(lt))
    rel = [abs(a - b) / max(abs(b), 1e-30) for a, b in zip(lo[:n], lt[:n])]
    dim = 0 if axis == "out" else 1
    bit_delta = bit_weight = True
    max_w = 0.0
    for site, idx in ensemble.sites(ours):
        key = (site.suffix, site.layer)
        W0, Weff, knb_W, s = tw[key]
        assert torch.equal(W0, orig[site.path + ".weight"]), "their base weight moved"
        mine = site.weight().detach()
        max_w = max(max_w, float((mine - Weff).abs().max()))
        bit_weight &= torch.equal(mine, Weff)
        # kne's trained delta, recovered exactly as the merge wrote it, against theirs
        d_ours = (mine.index_select(dim, idx) - orig[site.path + ".weight"].index_select(dim, idx))
        d_theirs = (Weff.index_select(dim, idx) - W0.index_select(dim, idx))
        bit_delta &= torch.equal(d_ours, d_theirs)
    # nothing outside the ensemble: kne's whole state dict, and their adapter's zero rows/columns
    touched = {site.path + ".weight": idx for site, idx in ensemble.sites(ours)}
    outside_ours = outside_theirs = True
    for k, v in ours.state_dict().items():
        if k not in touched:
            outside_ours &= torch.equal(v, orig[k])
            continue
        keep = torch.ones(v.shape[dim], dtype=torch.bool)
        keep[touched[k]] = False
        outside_ours &= torch.equal(v.index_select(dim, keep.nonzero()[:, 0]),
                                    orig[k].index_select(dim, keep.nonzero()[:, 0]))
    for (suffix, layer), (W0, Weff, _, _) in tw.items():
        idx = ensemble.indices[suffix][layer]
        keep = torch.ones(W0.shape[dim], dtype=torch.bool)
        keep[idx] = False
        outside_theirs &= torch.equal(Weff.index_select(dim, keep.nonzero()[:, 0]),
                                      W0.index_select(dim, keep.nonzero()[:, 0]))
    prompts = [r["prompt"] for r in requests] + ["The capital of Japan is"]
    comp_ours = [greedy(ours, tok, p) for p in prompts]
    comp_theirs = [greedy(pm, tok, p) for p in prompts]
    bounds = {}
    for key, (mx, shape) in th["drawn"].items():
        bounds[key] = (mx, 1.0 / math.sqrt(shape[1]))  # their draw's max |x| and 1/sqrt(fan_in)
    kb = [float(start[k].abs().max()) / (1.0 / math.sqrt(start[k].shape[1])) for k in start]
    return {"axis": axis, "dtype": dtype, "requests": len(requests), "neurons": len(ensemble),
            "steps_kne": res.stats["steps"], "steps_theirs": th["steps"], "losses_kne": lo, "losses_theirs": lt,
            "max_rel_loss": max(rel), "losses_bit_equal": lo[:n] == lt[:n], "deltas_bit_equal": bit_delta,
            "weights_bit_equal": bit_weight, "max_abs_weight_diff": max_w,
            "outside_untouched_kne": outside_ours, "outside_untouched_theirs": outside_theirs,
            "greedy_equal": comp_ours == comp_theirs,
            "greedy_kne": [tok.decode(c) for c in comp_ours],
            "their_draw_max_over_bound": max(mx / b for mx, b in bounds.values()),
            "their_draw_min_over_bound": min(mx / b for mx, b in bounds.values()),
            "kne_start_max_over_bound": max(kb), "seconds_kne": res.stats["edit_seconds"],
            "seconds_theirs": th["seconds"]}


def batch_losses(theirs: Theirs, model, tok) -> Dict[str, float]:
    """The unedited model's loss on the 3-request batch: theirs with left and with right padding,
    kne's ``loss_reduction="token"`` and ``"request"`` (one step of each, zero start)."""
    import kne

    out = {}
    cfg = kne_config("out", 1, 0.0, delta_init="zeros")
    ens = kne.locate(model, tok, BATCH, cfg)
    zero = {k: v.zero_() for k, v in kne_start(model, ens, cfg).items()}
    for side in ("left", "right"):
        _, th = theirs.edit(copy.deepcopy(model), tok, BATCH, ens.to_knb_dict(), axis="out", steps=1, t_loss=0.0,
                            start=zero, padding_side=side)
        out[f"theirs_{side}_padding"] = th["losses"][0]
    for red in ("token", "request"):
        m = copy.deepcopy(model)
        res = kne.fast_edit(m, tok, BATCH, cfg.replace(loss_reduction=red, steps=0), ensemble=ens)
        out[f"kne_{red}"] = res.stats["losses"][0]
    return out


def cmd_compare(args) -> None:
    import kne

    theirs = Theirs(args.authors)
    model, tok = kne.load_model()
    bl = batch_losses(theirs, model, tok)
    print("3-request batch, unedited model: " + ", ".join(f"{k} {v:.4f}" for k, v in bl.items()), flush=True)
    rows: List[Any] = [{"case": "batch3 loss", **bl}]
    for dtype in ("float32", "float64"):
        for axis in ("out", "in"):
            for name, reqs, t_loss in (("fact", FACT, 1e-2), ("batch3", BATCH, 1e-1)):
                r = side_by_side(theirs, model, tok, reqs, axis=axis, dtype=dtype, steps=args.steps, t_loss=t_loss)
                r["case"] = name
                rows.append(r)
                print(f"{dtype} {axis:<3} {name:<6} steps kne/theirs {r['steps_kne']}/{r['steps_theirs']}  "
                      f"max rel loss diff {r['max_rel_loss']:.2e}  losses bit-equal {r['losses_bit_equal']}  "
                      f"deltas bit-equal {r['deltas_bit_equal']}  weights bit-equal {r['weights_bit_equal']} "
                      f"(max |diff| {r['max_abs_weight_diff']:.2e})  outside untouched "
                      f"{r['outside_untouched_kne']}/{r['outside_untouched_theirs']}  greedy equal {r['greedy_equal']}  "
                      f"their init max/bound {r['their_draw_min_over_bound']:.3f}-{r['their_draw_max_over_bound']:.3f}",
                      flush=True)
            # forced 30 steps, the float64 bit-identity check
            r = side_by_side(theirs, model, tok, FACT, axis=axis, dtype=dtype, steps=30, t_loss=0.0)
            r["case"] = "fact/30 forced"
            rows.append(r)
            print(f"{dtype} {axis:<3} 30 forced steps: max rel loss diff {r['max_rel_loss']:.2e}  losses bit-equal "
                  f"{r['losses_bit_equal']}  deltas bit-equal {r['deltas_bit_equal']}  weights bit-equal "
                  f"{r['weights_bit_equal']} (max |diff| {r['max_abs_weight_diff']:.2e})  greedy equal "
                  f"{r['greedy_equal']}", flush=True)
    if args.out:
        _write(args.out, json.dumps(rows, indent=1, default=str))


def cmd_floor(args) -> None:
    """Float32 noise of their own code: the same edit on one thread and on two (their GEMMs then sum
    in another order), against kne's difference from them on one thread."""
    import torch

    import kne

    theirs = Theirs(args.authors)
    model, tok = kne.load_model()
    rows = []
    for axis in ("out", "in"):
        for name, reqs, t_loss in (("fact", FACT, 1e-2), ("batch3", BATCH, 1e-1)):
            cfg = kne_config(axis, args.steps, t_loss)
            ens = kne.locate(model, tok, reqs, cfg)
            start = kne_start(model, ens, cfg)
            runs = []
            for threads in (1, 2):
                torch.set_num_threads(threads)
                _, th = theirs.edit(copy.deepcopy(model), tok, reqs, ens.to_knb_dict(), axis=axis, steps=args.steps,
                                    t_loss=t_loss, start=start)
                runs.append(th["losses"])
            torch.set_num_threads(1)
            ours = kne.fast_edit(copy.deepcopy(model), tok, reqs, cfg, ensemble=ens).stats["losses"]

            def rel(a, b):
                return max(abs(x - y) / abs(y) for x, y in zip(a, b))

            r = {"axis": axis, "case": name, "theirs_1_vs_2_threads": rel(runs[1], runs[0]),
                 "kne_vs_theirs": rel(ours, runs[0]), "steps": [len(runs[0]), len(runs[1]), len(ours)]}
            rows.append(r)
            print(f"{axis:<3} {name:<6} max rel loss diff: theirs 1 vs 2 threads {r['theirs_1_vs_2_threads']:.2e}, "
                  f"kne vs theirs {r['kne_vs_theirs']:.2e}; losses {r['steps']}", flush=True)
    if args.out:
        _write(args.out, json.dumps(rows, indent=1))


def cmd_bench(args) -> None:
    import torch

    import kne

    theirs = Theirs(args.authors)
    model, tok = kne.load_model()
    out = {}
    for axis in ("out", "in"):
        cfg = kne_config(axis, args.steps, 0.0)
        ens = kne.locate(model, tok, FACT, cfg)
        start = kne_start(model, ens, cfg)
        per = {"kne": [], "theirs": []}
        tot = {"kne": [], "theirs": []}
        for rep in range(args.repeats):
            for who in (("kne", "theirs") if rep % 2 == 0 else ("theirs", "kne")):
                m = copy.deepcopy(model)
                if who == "kne":
                    marks = [time.perf_counter()]
                    res = kne.fast_edit(m, tok, FACT, cfg, ensemble=ens,
                                        on_step=lambda i, v: marks.append(time.perf_counter()))
                    steps = [b - a for a, b in zip(marks, marks[1:])][1:]  # the first includes the set-up
                    per[who].append(statistics.median(steps))
                    tot[who].append(res.stats["edit_seconds"])
                else:
                    _, th = theirs.edit(m, tok, FACT, ens.to_knb_dict(), axis=axis, steps=args.steps, t_loss=0.0,
                                        start=start)
                    per[who].append(statistics.median(th["step_seconds"][1:]))
                    tot[who].append(th["seconds"])
                del m
        med = {k: statistics.median(v) for k, v in per.items()}
        medt = {k: statistics.median(v) for k, v in tot.items()}
        pair = sorted(t / k for t, k in zip(per["theirs"], per["kne"]))  # each repeat's own ratio
        out[axis] = {"per_step": per, "edit_seconds": tot, "median_step": med, "median_edit": medt,
                     "ratio_step": med["theirs"] / med["kne"], "ratio_edit": medt["theirs"] / medt["kne"],
                     "ratio_step_per_repeat": pair}
        print(f"axis {axis}: per step kne {med['kne']:.3f} s, theirs {med['theirs']:.3f} s -> "
              f"{med['theirs'] / med['kne']:.2f}x (per repeat {pair[0]:.2f}-{pair[-1]:.2f}x, median "
              f"{statistics.median(pair):.2f}x);  {args.steps}-step edit kne {medt['kne']:.2f} s, theirs "
              f"{medt['theirs']:.2f} s -> {medt['theirs'] / medt['kne']:.2f}x  (medians of {args.repeats}; "
              f"load {os.getloadavg()[0]:.1f})", flush=True)
    out["threads"] = torch.get_num_threads()
    if args.out:
        _write(args.out, json.dumps(out, indent=1))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def peak_rss():
    box = SimpleNamespace(peak=_rss(), on=True)

    def sample():
        while box.on:
            box.peak = max(box.peak, _rss())
            time.sleep(0.001)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        yield box
    finally:
        box.on = False
        th.join()
        box.peak = max(box.peak, _rss())


def cmd_memory_probe(args) -> None:
    """In a fresh process: RSS added by one forward, and the peak RSS added by one edit of ``--steps``."""
    import torch

    import kne

    model, tok = kne.load_model()
    cfg = kne_config(args.axis, args.steps, 0.0)
    ens = kne.Ensemble.load(args.ensemble)
    start = kne_start(model, ens, cfg)
    b = tok(FACT[0]["prompt"] + FACT[0]["target_new"], return_tensors="pt")
    with torch.no_grad():
        model(**b)
    base = _rss()
    with peak_rss() as fwd:
        with torch.no_grad():
            model(**b)
    base = min(base, _rss())
    theirs = Theirs(args.authors) if args.impl == "theirs" else None
    before = _rss()
    with peak_rss() as p:
        if args.impl == "kne":
            kne.fast_edit(model, tok, FACT, cfg, ensemble=ens)
        else:
            theirs.edit(model, tok, FACT, ens.to_knb_dict(), axis=args.axis, steps=args.steps, t_loss=0.0,
                        start=start)
    print(json.dumps({"impl": args.impl, "axis": args.axis, "forward_mb": (fwd.peak - base) / 1e6,
                      "edit_mb": (p.peak - before) / 1e6}))


def state_bytes(model, ens) -> Dict[str, float]:
    """What each edit keeps per step, in MB, counted from the shapes. kne: compact delta, its
    gradient, two moments, merged rows and the original rows (float32 model). Theirs: ``knb_W``,
    its gradient, two moments, and the dense ``[out, in]`` delta each forward builds per module and
    autograd keeps for the backward."""
    kne_b = theirs_b = 0
    for site, idx in ens.sites(model):
        k = idx.numel()
        compact = k * (site.in_features if ens.neuron_axis == "out" else site.out_features) * 4
        kne_b += 6 * compact
        theirs_b += 4 * compact + site.in_features * site.out_features * 4
    return {"kne_mb": kne_b / 1e6, "theirs_mb": theirs_b / 1e6}


def cmd_memory(args) -> None:
    import kne

    model, tok = kne.load_model()
    out = {}
    tmp = ROOT / "build" / "knb-parity"
    tmp.mkdir(parents=True, exist_ok=True)
    for axis in ("out", "in"):
        cfg = kne_config(axis, args.steps, 0.0)
        ens = kne.locate(model, tok, FACT, cfg)
        path = tmp / f"ensemble-{axis}.json"
        ens.save(path)
        runs = {"kne": [], "theirs": []}
        for rep in range(args.repeats):
            for impl in (("kne", "theirs") if rep % 2 == 0 else ("theirs", "kne")):
                cmd = [sys.executable, __file__, "--authors", args.authors, "memory-probe", "--impl", impl,
                       "--axis", axis, "--ensemble", str(path), "--steps", str(args.steps)]
                got = subprocess.run(cmd, capture_output=True, text=True, check=True)
                runs[impl].append(json.loads(got.stdout.strip().splitlines()[-1])["edit_mb"])
        med = {k: statistics.median(v) for k, v in runs.items()}
        out[axis] = {"runs": runs, "median_mb": med, "counted": state_bytes(model, ens), "neurons": len(ens)}
        print(f"axis {axis}: peak RSS added by a {args.steps}-step edit, median of {args.repeats} fresh processes: "
              f"kne {med['kne']:.1f} MB, theirs {med['theirs']:.1f} MB; counted from the shapes: "
              f"kne {out[axis]['counted']['kne_mb']:.1f} MB, theirs {out[axis]['counted']['theirs_mb']:.1f} MB",
              flush=True)
    if args.out:
        _write(args.out, json.dumps(out, indent=1))


def cmd_trace(args) -> None:
    """The checked-in trace: their losses with kne's seeded start, per case (see tests/test_knb_parity.py)."""
    import torch

    import kne

    theirs = Theirs(args.authors)
    model, tok = kne.load_model()
    source = Path(args.authors, "SOURCE")
    cases = []
    for name, reqs, axis, t_loss in (("fact-rows", FACT, "out", 1e-2), ("batch3-columns", BATCH, "in", 1e-1)):
        cfg = kne_config(axis, args.steps, t_loss)
        ens = kne.locate(model, tok, reqs, cfg)
        start = kne_start(model, ens, cfg)
        pm, th = theirs.edit(copy.deepcopy(model), tok, reqs, ens.to_knb_dict(), axis=axis, steps=args.steps,
                             t_loss=t_loss, start=start)
        tw = their_weights(pm)
        change = {f"{s}.{l}": float((Weff - W0).double().norm()) for (s, l), (W0, Weff, _, _) in sorted(tw.items())}
        cases.append({"name": name, "requests": reqs, "neuron_axis": axis, "stop_loss": t_loss, "steps": args.steps,
                      "seed": 0, "knb_dict": ens.to_knb_dict(),
                      "start_sum": float(sum(v.double().sum() for v in start.values())),
                      "losses": th["losses"], "their_steps": th["steps"], "weight_change_norm": change,
                      "their_init_max_over_bound": [min(m / (1 / math.sqrt(sh[1])) for m, sh in th["drawn"].values()),
                                                    max(m / (1 / math.sqrt(sh[1])) for m, sh in th["drawn"].values())]})
        print(f"{name}: {th['steps']} steps, losses {th['losses'][0]:.4f} -> {th['losses'][-1]:.4f}", flush=True)
    import transformers

    doc = {"made_by": "tools/knb_parity.py trace",
           "authors_code": (source.read_text().strip() if source.is_file() else f"{AUTHORS_REPO} (unknown commit)")
           + " easyeditor/models/knb/knb_main.py execute_knb + peft/tuners/knb/layer.py, peft " + PEFT_VERSION,
           "model": "embedded SmolLM2-135M-Instruct, float32, CPU, 1 thread",
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
           "settings": "their KNBHyperParams: lr 5e-3, weight_decay 0, knb_alpha 1, use_rsknb, knb_dropout 0, "
                       "batch_size = requests, padding_side left; start = kne initial_delta(delta_init='authors', "
                       "seed 0)",
           "cases": cases}
    _write(args.out, json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--authors", default=str(ROOT / "build" / "knb-authors"),
                   help="folder with their easyeditor/ package and site/ (peft), made by `setup`")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup", help="extract their trainer from a clone of their fork")
    s.add_argument("--repo", required=True)
    s.add_argument("--dest", default=str(ROOT / "build" / "knb-authors"))
    s.add_argument("--commit", default=AUTHORS_COMMIT)
    c = sub.add_parser("compare", help="agreement: losses, weights, greedy completions, untouched weights")
    c.add_argument("--steps", type=int, default=30)
    c.add_argument("--out")
    f = sub.add_parser("floor", help="float32 noise of their own code (1 vs 2 threads) against kne's difference")
    f.add_argument("--steps", type=int, default=30)
    f.add_argument("--out")
    b = sub.add_parser("bench", help="per-step seconds, kne and theirs alternating in this process")
    b.add_argument("--steps", type=int, default=12)
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--out")
    m = sub.add_parser("memory", help="peak RSS added by each edit, each in fresh processes")
    m.add_argument("--steps", type=int, default=5)
    m.add_argument("--repeats", type=int, default=3)
    m.add_argument("--out")
    mp = sub.add_parser("memory-probe")
    mp.add_argument("--impl", choices=("kne", "theirs"), required=True)
    mp.add_argument("--axis", choices=("out", "in"), required=True)
    mp.add_argument("--ensemble", required=True)
    mp.add_argument("--steps", type=int, default=5)
    t = sub.add_parser("trace", help="write the trace tests/test_knb_parity.py checks")
    t.add_argument("--steps", type=int, default=30)
    t.add_argument("--out", default=str(ROOT / "tests" / "data" / "knb_parity.json"))
    args = p.parse_args(argv)
    if args.cmd == "setup":
        return setup(args.repo, args.dest, args.commit)
    import torch

    torch.set_num_threads(1)
    {"compare": cmd_compare, "floor": cmd_floor, "bench": cmd_bench, "memory": cmd_memory, "memory-probe": cmd_memory_probe,
     "trace": cmd_trace}[args.cmd](args)


if __name__ == "__main__":
    main()
