"""Pictures: ensemble density per layer and module, and evaluation tables as bars."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from .io import check_input, write_atomic
from .metrics import METRICS, check_results

__all__ = ["plot_ensemble", "plot_results", "plot_lifelong", "plot_file"]


def _plt():
    """matplotlib.pyplot on the Agg backend; the ``plots`` extra (``pip install 'kne[plots]'``)."""
    from ._extras import require

    matplotlib = require("matplotlib", "plots", "plotting (kne plot, kne.plots)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, out: Union[str, Path]) -> Path:
    """Write ``fig`` as a PNG at ``out`` (whole or not at all; special files in place) and close it."""
    out = Path(out)
    try:
        write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=130))
    finally:
        plt.close(fig)
    return out


def plot_ensemble(ensemble, out: Union[str, Path], *, n_layers: Optional[int] = None,
                  n_neurons: Optional[Dict[str, int]] = None, title: Optional[str] = None) -> Path:
    """Heatmap: one row per module, one column per layer, colour = share of that module instance's
    neurons in the ensemble, number = neuron count."""
    import numpy as np

    plt = _plt()
    mods = list(ensemble.indices)
    counts = ensemble.counts()
    L = n_layers or max([max(ensemble.n_layers.values(), default=0)] +
                        [max(per, default=-1) + 1 for per in ensemble.indices.values()])
    L = max(L, 1)
    grid = np.zeros((max(1, len(mods)), L))
    share = np.zeros_like(grid)
    for r, m in enumerate(mods):
        width = (n_neurons or {}).get(m) or ensemble.n_neurons.get(m)
        for layer, c in counts[m].items():
            grid[r, layer] = c
            share[r, layer] = c / width if width else c
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * L + 2), 1.0 + 0.7 * max(1, len(mods))))
    im = ax.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(L), [str(i) for i in range(L)], fontsize=7)
    ax.set_yticks(range(len(mods)), mods, fontsize=8)
    ax.set_xlabel("layer")
    for r in range(len(mods)):
        for c in range(L):
            if grid[r, c]:
                ax.text(c, r, f"{int(grid[r, c])}", ha="center", va="center", fontsize=6,
                        color="white" if share[r, c] < share.max() * 0.6 else "black")
    cb = fig.colorbar(im, ax=ax, fraction=0.03)
    cb.set_label("share of neurons" if (n_neurons or ensemble.n_neurons) else "neurons", fontsize=8)
    ax.set_title(title or f"KNE ensemble: {len(ensemble)} neurons (axis {ensemble.neuron_axis})", fontsize=9)
    fig.tight_layout()
    return _save(plt, fig, out)




def plot_results(runs: List[Dict[str, Any]], out: Union[str, Path], *, title: Optional[str] = None) -> Path:
    """Grouped bars, one panel per data file: one group per metric, one bar per (method, protocol)
    run of that file, the same colour for a method in every panel; percentages (fluency as EasyEdit's
    entropy x 100, as the KnowEdit tables print it; drift in nats x 100)."""
    plt = _plt()
    metrics = [(k, name) for k, name, _ in METRICS if any(r["summary"].get(k) is not None for r in runs)]
    if not metrics:
        raise ValueError("the results hold no metric to plot (no run has a summary)")
    def label(r):
        return f"{r.get('method', '?')} {r.get('protocol', '')}".strip()

    files = list(dict.fromkeys(r.get("data", "") for r in runs))
    colours = {lab: f"C{i % 10}" for i, lab in enumerate(dict.fromkeys(label(r) for r in runs))}
    per_file = max(sum(1 for r in runs if r.get("data", "") == f) for f in files)
    fig, axes = plt.subplots(len(files), 1, squeeze=False,
                             figsize=(max(8.0, 0.2 * len(metrics) * (per_file + 1) + 3.5), 1.2 + 2.8 * len(files)))
    for ax, f in zip(axes[:, 0], files):
        mine = [r for r in runs if r.get("data", "") == f]
        # a metric no run of this file has (no rephrase prompts, fluency not measured) gets no group,
        # and a metric a run lacks gets no bar, not a zero
        shown = [(k, n) for k, n in metrics if any(r["summary"].get(k) is not None for r in mine)]
        width = 0.8 / len(mine)
        for i, r in enumerate(mine):
            have = [(j, 100 * r["summary"][k]) for j, (k, _) in enumerate(shown) if r["summary"].get(k) is not None]
            xs = [j + (i - (len(mine) - 1) / 2) * width for j, _ in have]
            bars = ax.bar(xs, [v for _, v in have], width, label=label(r), color=colours[label(r)])
            for b, (_, v) in zip(bars, have):
                ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.0f}", ha="center", va="bottom", fontsize=6)
        ax.set_xticks(range(len(shown)), [n for _, n in shown], fontsize=7, rotation=20, ha="right")
        ax.set_ylabel("%", fontsize=8)
        ax.set_title(f or "results", fontsize=8, loc="left")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle((title or "KnowEdit evaluation") + "  (fluency: entropy x 100; drift: nats x 100)", fontsize=9)
    fig.tight_layout()
    return _save(plt, fig, out)


#: the curves of a lifelong run: (point key or summary key, panel title, scale)
LIFELONG_PANELS = (("edit_succ", "retention: edit success of every edit so far (%)", 100),
                   ("locality", "locality (%)", 100), ("drift", "drift (nats per token)", 1),
                   ("seconds_per_edit_window", "seconds per edit (last 10)", 1))


def _is_lifelong(data: Any) -> bool:
    runs = data.get("runs") if isinstance(data, dict) else None
    return isinstance(runs, list) and bool(runs) and all(isinstance(r, dict) and isinstance(r.get("points"), list)
                                                         for r in runs)


def plot_lifelong(docs: List[Dict[str, Any]], out: Union[str, Path], *, title: Optional[str] = None) -> Path:
    """Curves of lifelong runs (``benchmarks/quality/lifelong.py``): one row of panels per data file
    (retention, locality, drift, seconds per edit against the number of edits so far), one line per
    run, the same colour for a method in every panel."""
    plt = _plt()

    def label(run: Dict[str, Any]) -> str:
        rank = next((p.get("sketch_rank") for p in run["points"] if p.get("sketch_rank") is not None), None)
        more = ", ".join(f"{k}={v}" for k, v in (run.get("overrides") or {}).items())
        return run["method"] + (f" (rank {rank})" if rank is not None else "") + (f" ({more})" if more else "")

    files = list(dict.fromkeys(d.get("data", "") for d in docs))
    # a file's settings changed from the preset (lifelong.py --set) name its runs apart
    runs = [(d.get("data", ""), dict(r, overrides=d.get("overrides"))) for d in docs for r in d["runs"] if r["points"]]
    if not runs:
        raise ValueError("the lifelong results hold no checkpoint to plot")
    colours = {lab: f"C{i % 10}" for i, lab in enumerate(dict.fromkeys(label(r) for _, r in runs))}
    fig, axes = plt.subplots(len(files), len(LIFELONG_PANELS), squeeze=False,
                             figsize=(3.4 * len(LIFELONG_PANELS), 0.8 + 2.6 * len(files)))
    for row, f in zip(axes, files):
        for ax, (key, name, scale) in zip(row, LIFELONG_PANELS):
            for data, r in runs:
                if data != f:
                    continue
                pts = [(p["edits"], p.get(key, p["summary"].get(key))) for p in r["points"]]
                pts = [(x, scale * y) for x, y in pts if y is not None]
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", ms=3, label=label(r),
                        color=colours[label(r)])
            ax.set_title(f"{f}: {name}", fontsize=7, loc="left")
            ax.set_xlabel("edits so far", fontsize=7)
            ax.tick_params(labelsize=6)
        row[-1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(title or "lifelong editing", fontsize=9)
    fig.tight_layout()
    return _save(plt, fig, out)


def _read_json(path: Path, what: str, kind: Optional[str] = None) -> Any:
    """The JSON in ``path``; a folder, a missing or unreadable file, or not JSON: an error naming
    ``what`` to give (``kind``: the short name :func:`kne.io.check_input` says)."""
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory: give {what}")
    check_input(path, kind or what)  # missing, a symlink loop, unreadable: said as such
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a JSON file ({e}); give {what}") from None


def plot_file(path: Union[str, Path], out: Optional[Union[str, Path]] = None, more=()) -> Path:
    """Plot an ensemble JSON (kne's or a bare knb_dict), a results JSON written by ``kne eval``, or
    the curves of lifelong runs (``benchmarks/quality/lifelong.py``; ``more`` adds other such files
    to the same picture)."""
    from .ensemble import Ensemble

    path = Path(path)
    data = _read_json(path, "an ensemble JSON or a results JSON of kne eval", "ensemble or results JSON")
    out = Path(out) if out else path.with_suffix(".png")
    if out.is_dir():
        raise IsADirectoryError(f"{out} is a directory: give the picture a file name, e.g. {out / 'plot.png'}")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"the folder of {out} does not exist: create it first")
    if _is_lifelong(data):
        docs = [data]
        for m in more:
            extra = _read_json(Path(m), "a lifelong results JSON")
            if not _is_lifelong(extra):
                raise ValueError(f"{m}: not the results of benchmarks/quality/lifelong.py (runs with points); only "
                                 "lifelong results are drawn together")
            docs.append(extra)
        return plot_lifelong(docs, out, title=path.name if not more else None)
    if more:
        raise ValueError("several files are drawn together only for lifelong results (benchmarks/quality/lifelong.py); "
                         "plot an ensemble or a kne eval results file on its own")
    if isinstance(data, dict) and ("runs" in data or "summary" in data):
        runs = check_results(data, path)  # one line naming a bad field; NaN refused
        missing = [f"runs[{i}]" for i, r in enumerate(runs) if not isinstance(r.get("summary"), dict)]
        if missing:
            raise ValueError(f"{path}: {', '.join(missing)} lack a summary object to plot; give a results JSON "
                             "written by kne eval --out")
        return plot_results(runs, out, title=f"{path.name}")
    return plot_ensemble(Ensemble.load(path), out, title=None)
