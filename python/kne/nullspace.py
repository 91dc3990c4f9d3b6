"""Null-space projection of row edits (AlphaEdit, Fang et al., arXiv 2410.02355).

A row edit of a linear module ``y = W x`` changes the output by ``dW x``. If every row of ``dW`` is
orthogonal to the keys ``x`` of what must be kept, those outputs do not change at all. With
``KNEConfig.project`` the fast path (and the reference) projects the compact delta after every
optimizer step (``kne_kernels.nullspace_project_``)::

    dW <- dW - (dW U) U^T

with ``U`` an orthonormal basis of the *preserved key space* of that module instance: the
eigenvectors of the keys' second moment ``C = K0 K0^T / n`` whose eigenvalue is above
``KNEConfig.project_threshold`` times the largest one (AlphaEdit keeps the directions with
eigenvalues below an absolute 1e-2 free; the scale of the keys differs by four orders of
magnitude between the layers of one model, so kne's threshold is relative), joined with the span
of the edit's own neighbour prompts' keys (every token of them).

``K0`` comes from a preservation corpus: the model's own greedy continuations of shipped training
prompts (:func:`kne.preservation.training_prompts`), tens of thousands of tokens. :func:`build`
computes ``C`` for every layer of the target modules once, eigendecomposes it and caches the result
per model under ``$KNE_CACHE/nullspace/<key>/`` (the key hashes the model's config and the values
of the parameters an FFN edit never writes, and the corpus settings); :func:`load` reads only the
layers an ensemble touches.

Sequential edits (``fast_edit(..., keep=[earlier results])``, which :func:`kne.runs.run_edits`
passes in its sequential protocol): the keys of the earlier edits -- their ``prompt + answer`` at
the positions ``KNEConfig.keep_positions`` names, and the last token of each neighbour they kept
(:func:`kept_texts`), read from the model as it is now (:func:`kept_keys`) -- join the basis,
cut at ``KNEConfig.keep_rtol``, so a later edit changes no edited module's output there
(AlphaEdit's rule for sequential editing: the earlier edits' keys join the preserved ones).

Columns (``neuron_axis="in"``) are not projected: a column delta ``[out, K]`` sees only the ``K``
ensemble coordinates of a key, and the ``K x K`` second moment of tens of thousands of preserved
keys is full rank, so its null space is empty: projecting would erase the edit.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ._exclusive import own_thread
from ._text import check_lengths, check_tokenizer, pad_batch, pad_id
from ._utils import as_int, frozen, input_device, max_positions, new_folder
from .adapters import ModuleSite, get_architecture, num_layers, resolve_sites
from .models import cache_dir
from .result import EditResult

__all__ = ["KeyStatistics", "KeyCapture", "KeySketch", "build", "load", "model_key", "preserved_basis", "edit_bases",
           "kept_texts", "kept_keys", "sketch_rank"]

_FORMAT = "kne.nullspace/1"
_VOLATILE = {"_name_or_path", "name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash",
             "architectures", "use_cache", "quantization_config"}


def model_key(model: nn.Module, suffixes: Sequence[str] = ()) -> str:
    """A hash of the model that FFN edits do not change: its config, and the values of every
    parameter except those of the FFN modules (``suffixes``; sampled: 4096 evenly spaced elements of
    each tensor), so an edited model keeps its key and a fine-tuned one gets another."""
    cfg = getattr(model, "config", None)
    d = {k: v for k, v in (cfg.to_dict() if cfg is not None else {}).items() if k not in _VOLATILE}
    h = hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode())
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        if any(name.endswith(s + ".weight") or name.endswith(s + ".bias") for s in suffixes):
            continue
        flat = p.detach().reshape(-1)
        if flat.numel() > 4096:
            flat = flat[torch.arange(4096, device=flat.device) * (flat.numel() - 1) // 4095]
        h.update(flat.float().cpu().numpy().tobytes())
    return h.hexdigest()[:20]


@dataclass
class KeyStatistics:
    """The cached eigendecompositions of one model's key second moments, read lazily per layer."""

    folder: Path
    meta: Dict
    _cache: Dict[Tuple[str, int], Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def suffixes(self) -> List[str]:
        return list(self.meta["suffixes"])

    def eig(self, suffix: str, layer: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(eigenvalues [in], eigenvectors [in, in])`` of ``C`` of one module instance (float32)."""
        key = (suffix, layer)
        if key not in self._cache:
            from safetensors.torch import load_file

            path = self.folder / f"{suffix}.{layer}.safetensors"
            if not path.is_file():
                raise ValueError(f"the null-space statistics in {self.folder} lack {suffix} layer {layer}: rebuild "
                                 "them with kne.nullspace.build(model, tokenizer, target_modules=...)")
            t = load_file(str(path))
            self._cache[key] = (t["eigenvalues"], t["eigenvectors"])
        return self._cache[key]

    def basis(self, suffix: str, layer: int, threshold: float) -> torch.Tensor:
        """Orthonormal ``[in, r]``: the eigenvectors whose eigenvalue is above ``threshold`` times
        the largest eigenvalue of that module instance (relative: the keys' scale differs by four
        orders of magnitude between the layers of one model)."""
        vals, vecs = self.eig(suffix, layer)
        return vecs[:, vals > threshold * vals.max()].contiguous()


def _stats_folder(model: nn.Module, suffixes: Sequence[str], prompts: Sequence[str], new_tokens: int,
                  add_special_tokens: bool) -> Path:
    h = hashlib.sha256(json.dumps([list(suffixes), list(prompts), new_tokens, add_special_tokens]).encode())
    h = h.hexdigest()[:12]
    return cache_dir() / "nullspace" / f"{model_key(model, suffixes)}-{h}"


def _suffixes(model: nn.Module, target_modules: Sequence[str]) -> List[str]:
    arch = get_architecture(model)
    return [arch.suffix(m) or m for m in target_modules]


def load(model: nn.Module, target_modules: Sequence[str] = ("ffn_out",), *, prompts: Optional[Sequence[str]] = None,
         new_tokens: int = 32, add_special_tokens: bool = False) -> Optional[KeyStatistics]:
    """The cached statistics of ``model`` for these settings, or ``None`` when not built yet."""
    from .preservation import training_prompts

    prompts = list(training_prompts() if prompts is None else prompts)
    suffixes = _suffixes(model, target_modules)
    folder = _stats_folder(model, suffixes, prompts, new_tokens, add_special_tokens)
    meta = folder / "meta.json"
    if not meta.is_file():
        return None
    return KeyStatistics(folder, json.loads(meta.read_text()))


@torch.no_grad()
def _continuations(model: nn.Module, tokenizer, prompts: Sequence[str], new_tokens: int, batch_size: int,
                   add_special_tokens: bool, bar) -> List[List[int]]:
    """Each prompt's tokens followed by the model's greedy continuation (stopped at EOS)."""
    device = input_device(model)
    pad = pad_id(tokenizer)
    eos = tokenizer.eos_token_id
    out: List[List[int]] = []
    for i in range(0, len(prompts), batch_size):
        ids = [list(tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]) for p in prompts[i:i + batch_size]]
        inp, mask = pad_batch(ids, pad, left=True)  # left padding: generation appends on the right
        T = inp.shape[1]
        gen = model.generate(input_ids=inp.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=int(pad), eos_token_id=eos)
        for b, x in enumerate(ids):
            cont = gen[b, T:].tolist()
            if eos is not None and eos in cont:
                cont = cont[:cont.index(eos)]
            out.append(x + cont)
        if bar is not None:
            bar.update(len(ids))
    return out


def build(model: nn.Module, tokenizer, *, target_modules: Sequence[str] = ("ffn_out",),
          prompts: Optional[Sequence[str]] = None, new_tokens: int = 32, batch_size: int = 64,
          add_special_tokens: bool = False, max_bytes: int = 1 << 30, progress: bool = True,
          force: bool = False) -> KeyStatistics:
    """Compute (or load from the cache) the key statistics of every layer of ``target_modules``.

    The corpus: each of ``prompts`` (default: the shipped training prompts,
    :func:`kne.preservation.training_prompts`) with the model's greedy continuation of
    ``new_tokens`` tokens. For every module instance, the second moment ``C = sum_t x_t x_t^T / n``
    of its inputs over every corpus token is accumulated in float64 (layers in groups that keep the
    accumulators under ``max_bytes``), eigendecomposed, and written to the cache (atomically).
    Prints a progress bar; the model is not modified.
    """
    from tqdm.auto import tqdm

    from .preservation import training_prompts

    check_tokenizer(tokenizer)
    prompts = list(training_prompts() if prompts is None else prompts)
    if not prompts:
        raise ValueError("build needs at least one prompt for the preservation corpus")
    new_tokens = as_int(new_tokens, "new_tokens", 0)
    limit = max_positions(model)
    if limit is not None:  # each prompt and its greedy continuation must fit the model
        check_lengths(tokenizer, [(p, None) for p in prompts], (limit[0] - new_tokens, f"{limit[1]} - new_tokens"),
                      add_special_tokens)
    suffixes = _suffixes(model, target_modules)
    folder = _stats_folder(model, suffixes, prompts, new_tokens, add_special_tokens)
    if not force and (folder / "meta.json").is_file():
        return KeyStatistics(folder, json.loads((folder / "meta.json").read_text()))
    sites = resolve_sites(model, list(target_modules), None)
    flat: List[ModuleSite] = [s for name in target_modules for s in sites[name]]
    with frozen(model):
        bar = tqdm(total=len(prompts), desc="null-space corpus: generate", unit="prompt", file=sys.stderr,
                   disable=not progress)
        seqs = _continuations(model, tokenizer, prompts, new_tokens, batch_size, add_special_tokens, bar)
        bar.close()
        n_tokens = sum(len(s) for s in seqs)
        per_site = [s.in_features ** 2 * 8 for s in flat]
        groups: List[List[int]] = [[]]
        used = 0
        for i, b in enumerate(per_site):
            if groups[-1] and used + b > max_bytes:
                groups.append([])
                used = 0
            groups[-1].append(i)
            used += b
        with new_folder(folder) as tmp:
            bar = tqdm(total=len(groups) * len(seqs) + len(flat), desc="null-space corpus: keys", unit="seq",
                       file=sys.stderr, disable=not progress)
            for group in groups:
                acc = {i: torch.zeros(flat[i].in_features, flat[i].in_features, dtype=torch.float64) for i in group}
                _accumulate(model, tokenizer, seqs, [flat[i] for i in group], [acc[i] for i in group], batch_size, bar)
                for i in group:
                    C = acc.pop(i) / n_tokens
                    vals, vecs = torch.linalg.eigh(C)
                    from safetensors.torch import save_file

                    save_file({"eigenvalues": vals.float().contiguous(), "eigenvectors": vecs.float().contiguous()},
                              str(tmp / f"{flat[i].suffix}.{flat[i].layer}.safetensors"))
                    bar.update(1)
            bar.close()
            meta = {"format": _FORMAT, "suffixes": suffixes, "layers": sorted({s.layer for s in flat}),
                    "prompts": len(prompts), "new_tokens": new_tokens, "tokens": n_tokens,
                    "model_type": getattr(getattr(model, "config", None), "model_type", None)}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return KeyStatistics(folder, json.loads((folder / "meta.json").read_text()))


@torch.no_grad()
def _accumulate(model, tokenizer, seqs, sites, accs, batch_size, bar) -> None:
    device = input_device(model)
    pad = pad_id(tokenizer)
    state = {}

    def grab(i):
        def hook(module, args, out):
            x = args[0]
            x = x.reshape(-1, x.shape[-1])[state["keep"].to(x.device)].float()
            accs[i].add_((x.t() @ x).double().cpu())  # one batch in float32, the running sum in float64
        return hook

    handles = [s.module.register_forward_hook(own_thread(grab(i))) for i, s in enumerate(sites)]
    try:
        for i in range(0, len(seqs), batch_size):
            chunk = seqs[i:i + batch_size]
            ids, mask = pad_batch(chunk, pad)
            state["keep"] = mask.reshape(-1).bool()
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, logits_to_keep=1)
            bar.update(len(chunk))
    finally:
        for h in handles:
            h.remove()


class KeyCapture:
    """Inside ``with``: forward hooks on the modules of ``sites`` keep their inputs (the keys) at
    every real token of sequences ``rows`` of the batch whose ``attention_mask`` is given.
    :meth:`keys` returns them per site, ``[tokens, in]`` float32, for the rows a mask keeps."""

    def __init__(self, sites: Sequence[ModuleSite], rows: torch.Tensor, attention_mask: torch.Tensor):
        self.sites, self.rows, self.mask = list(sites), rows, attention_mask
        self._keys: List[Optional[torch.Tensor]] = [None] * len(self.sites)  # [rows, T, in]
        self._handles = []

    def __enter__(self) -> "KeyCapture":
        B = self.mask.shape[0]

        def grab(i):
            def hook(module, args, out):
                x = args[0].reshape(B, -1, args[0].shape[-1])  # OPT flattens [B, T, D] around the FFN
                self._keys[i] = x[self.rows.to(x.device)].detach().float()
            return hook

        self._handles = [s.module.register_forward_hook(own_thread(grab(i))) for i, s in enumerate(self.sites)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def keys(self, keep: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        m = self.mask[self.rows].bool()
        if keep is not None:
            m = m & keep.to(m.device)[:, None]
        out = []
        for k in self._keys:
            if k is None:
                raise RuntimeError("a target module did not run in the forward pass (is it used by the model?)")
            out.append(k[m.to(k.device)])
        return out


def preserved_basis(keys: Optional[torch.Tensor], corpus: Optional[torch.Tensor], rtol: float = 1e-3
                    ) -> Optional[torch.Tensor]:
    """Orthonormal ``[in, r]`` basis of the space to keep: ``corpus`` (orthonormal columns, or
    ``None``) joined with the directions of ``keys`` (``[tokens, in]``) outside it whose singular
    value is above ``rtol`` times the largest."""
    parts = [] if corpus is None else [corpus.float()]
    if keys is not None and keys.numel():
        k = keys.double()
        # the keys' largest singular value, from the smaller Gram matrix (a full SVD of the keys
        # cost more than the rest of this function)
        g = k @ k.t() if k.shape[0] <= k.shape[1] else k.t() @ k
        top = float(torch.linalg.eigvalsh(g)[-1].clamp_min(0).sqrt())
        if parts:
            U0 = parts[0].to(k)
            k = k - (k @ U0) @ U0.t()
        if top > 0:
            # the right singular vectors of k from the smaller of its two Gram matrices: with few
            # tokens k k^T = U S^2 U^T, so V = k^T U S^-1 (float64 keeps it orthonormal to ~1e-12)
            if k.shape[0] <= k.shape[1]:
                lam, U = torch.linalg.eigh(k @ k.t())
                big = lam > (rtol * top) ** 2
                V = (k.t() @ U[:, big]) / lam[big].sqrt()
            else:  # more tokens than dimensions: the [in, in] second moment directly
                lam, V = torch.linalg.eigh(k.t() @ k)
                V = V[:, lam > (rtol * top) ** 2]
            parts.append(V.float())
    if not parts:
        return None
    return torch.cat(parts, 1).contiguous()


def kept_texts(keep, tokenizer, config) -> List[Tuple[List[int], int, int]]:
    """The token sequences whose keys ``keep`` asks to keep, as ``(ids, start, end)``: the keys of
    tokens ``start..end-1`` of ``ids`` are kept.

    ``keep`` holds earlier edits (:class:`kne.EditResult`, not restored) and prompt strings. An
    edit contributes each of its requests' ``prompt + answer``: with ``config.keep_positions ==
    "all"`` (the default) at every position but the last, with ``"answer"`` only at the positions
    that predict its answer (the prompt's last token to the answer's last but one: its subject's
    tokens are then left free, and later edits wear it away); and the neighbour prompts it kept
    (``stats["neighbours"]``) at their last token (the position whose prediction locality reads).
    A string is a prompt whose next-token prediction is kept: its last token. Not every token of
    the neighbours: that fills the key space within ten edits, and later edits no longer land
    (docs/local-edits.md)."""
    from ._text import encode
    if isinstance(keep, (str, EditResult)) or not hasattr(keep, "__iter__"):
        raise ValueError("keep must be a list of earlier edits (kne.EditResult) and/or prompt strings, got "
                         f"{type(keep).__name__}")
    add = config.add_special_tokens
    out: List[Tuple[List[int], int, int]] = []
    seen = set()

    def add_seq(ids: List[int], start: int, end: int) -> None:
        key = (tuple(ids[:end]), start)
        if 0 <= start < end and key not in seen:
            seen.add(key)
            out.append((ids[:end], start, end))

    def prompt(p: str) -> None:
        ids = list(tokenizer(p, add_special_tokens=add)["input_ids"])
        add_seq(ids, len(ids) - 1, len(ids))

    for item in keep:
        if isinstance(item, str):
            if not item.strip():
                raise ValueError("keep holds an empty prompt string: give prompts with text")
            prompt(item)
        elif isinstance(item, EditResult):
            if item.restored:
                raise ValueError(f"keep holds {item.describe()}, which was restored: keep only edits still applied")
            reqs = item.requests
            if reqs:
                b = encode(tokenizer, [r.prompt for r in reqs], [r.target_new for r in reqs], add_special_tokens=add,
                           always_space=config.always_space)
                for i in range(b.size):
                    cols = b.cols[b.rows == i]
                    start = 0 if config.keep_positions == "all" else int(cols.min()) - 1
                    add_seq(b.input_ids[i, : int(b.attention_mask[i].sum())].tolist(), start, int(cols.max()))
            for p in item.stats.get("neighbours") or []:
                prompt(p)
        else:
            raise ValueError(f"keep holds a {type(item).__name__}: give earlier edits (kne.EditResult) and/or prompt "
                             "strings")
    return out


@torch.no_grad()
def kept_keys(model: nn.Module, tokenizer, sites: Sequence[ModuleSite], seqs: Sequence[Tuple[List[int], int, int]],
              batch_size: int = 64) -> List[torch.Tensor]:
    """The inputs of each of ``sites`` (``[tokens, in]`` float32) at the kept positions of ``seqs``
    (:func:`kept_texts`), from the model as it is now (earlier edits applied)."""
    from ._utils import logits_at

    sites = list(sites)
    parts: List[List[torch.Tensor]] = [[] for _ in sites]
    device = input_device(model)
    pad = pad_id(tokenizer)
    seqs = sorted(seqs, key=lambda x: len(x[0]))  # batches of like lengths: little padding to run
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        ids, mask = pad_batch([x for x, _, _ in chunk], pad)
        held = torch.zeros_like(mask)
        for b, (_, start, end) in enumerate(chunk):
            held[b, start:end] = 1
        rows = torch.arange(len(chunk))
        with KeyCapture(sites, rows, held) as kc:
            logits_at(model, ids.to(device), mask.to(device), rows[:1].to(device), torch.zeros(1, dtype=torch.long,
                                                                                                device=device))
        for j, k in enumerate(kc.keys()):
            parts[j].append(k)
    return [torch.cat(p) if p else torch.zeros(0, s.in_features) for p, s in zip(parts, sites)]


def edit_bases(model: nn.Module, tokenizer, sites: Sequence[ModuleSite], keys: Sequence[torch.Tensor], config,
               progress: bool = True, kept: Sequence[Tuple[List[int], int, int]] = (),
               state: Optional["KeySketch"] = None) -> List[Optional[torch.Tensor]]:
    """The preserved-key basis of each edited module instance: the cached corpus statistics
    (built on first use, :func:`build`) above ``config.project_threshold`` when
    ``config.project_corpus``, joined with the neighbours' ``keys``, then with the keys of the
    earlier edits' sequences ``kept`` (:func:`kept_texts`; read now by :func:`kept_keys`, cut at
    ``config.keep_rtol``), then with the sketch rows of ``state`` (:class:`KeySketch`, a
    :class:`kne.Editor`'s kept keys; same cut)."""
    more = kept_keys(model, tokenizer, sites, kept) if kept else None
    stats = None
    if config.project_corpus:
        suffixes = sorted({s.suffix for s in sites})
        stats = build(model, tokenizer, target_modules=suffixes, add_special_tokens=config.add_special_tokens,
                      progress=progress)
    out = []
    for j, (site, k) in enumerate(zip(sites, keys)):
        corpus = stats.basis(site.suffix, site.layer, config.project_threshold).to(k.device) if stats else None
        basis = preserved_basis(k, corpus)
        if more is not None and more[j].numel():
            basis = preserved_basis(more[j].to(k.device), basis, rtol=config.keep_rtol)
        if state is not None:
            rows = state.rows(site.path)
            if rows.numel():
                basis = preserved_basis(rows.to(k.device), basis, rtol=config.keep_rtol)
        out.append(basis)
    return out


def sketch_rank(widths: Sequence[int], budget_bytes: float) -> int:
    """The largest Frequent-Directions rank ``l`` whose buffers (``2 l x width`` float32 per module
    instance) fit ``budget_bytes``: ``floor(budget / (8 * sum(widths)))``, at least 1, at most the
    widest module's width."""
    total = 8 * sum(int(w) for w in widths)
    return int(max(1, min(max(widths), budget_bytes // max(1, total))))


class KeySketch:
    """The kept keys of a sequence of edits, per module instance, in bounded memory: a
    Frequent-Directions sketch (Liberty, KDD 2013; Ghashami et al., SICOMP 2016).

    Per module instance of width ``d`` it holds a float32 buffer ``B`` of ``2 l x d`` (``l`` =
    ``rank``, at most ``d``): :meth:`add` appends key rows; when the buffer is full it is rotated
    onto its right singular vectors and shrunk, ``s_i <- sqrt(max(s_i^2 - s_l^2, 0))``, which leaves
    at most ``l - 1`` non-zero rows. The sketch keeps the second moment of everything added from
    above and within a known bound: ``0 <= K^T K - B^T B`` and ``||K^T K - B^T B||_2 <=
    ||K||_F^2 / l`` (exact, ``B^T B == K^T K``, until the first shrink). Its rows stand in for
    the keys themselves in :func:`preserved_basis` (same projection, same ``keep_rtol`` cut), so
    the null space of an edit is read from ``O(l d)`` numbers however many edits came before.

    Memory: ``8 * l * sum(d)`` bytes (``2 l`` rows of float32 per instance), constant in the number
    of edits. Work per added key row: a copy of ``d`` numbers, plus per ``l`` rows one shrink (the
    SVD of the ``2 l x d`` buffer through its ``2 l x 2 l`` Gram matrix: ``8 l^2 d`` multiply-adds and
    an eigendecomposition of size ``2 l``), amortised ``O(l d)`` per row, independent of how many
    rows came before. ``ops`` counts both (multiply-adds), so a test can see that the work per edit
    does not grow.

    Staggered shrinks (``stagger=True``, the default): an edit adds about as many rows to every
    instance, so their buffers would fill, and shrink, at the same edit: one edit would pay every
    instance's shrink (at a Llama-7B shape, 32 of them). Instead the ``j``-th of ``M`` instances
    shrinks the first time at ``2 l - floor(j l / M)`` rows (between ``l + 1`` and ``2 l``), and from
    then on when its buffer is full, so the shrinks spread over the edits that add ``l`` rows. A
    shrink of at least ``l`` rows takes ``s_l^2`` off at least ``l`` squared singular values, so the
    bound above still holds; it costs at most one more shrink per instance over a sequence.
    """

    def __init__(self, widths: Dict[str, int], rank: int, *, stagger: bool = True):
        rank = int(rank)
        if rank < 1:
            raise ValueError(f"the sketch rank must be at least 1, got {rank}")
        self.rank = rank
        self.widths = dict(widths)
        self._buf = {p: torch.zeros(2 * min(rank, d), d, dtype=torch.float32) for p, d in self.widths.items()}
        self._fill = {p: 0 for p in self.widths}
        # the fill at which an instance shrinks the first time (then: when full)
        m = len(self.widths)
        self._first = {p: self._buf[p].shape[0] - (j * (self._buf[p].shape[0] // 2)) // m
                       for j, p in enumerate(self.widths)} if stagger else {}
        self.rows_added = {p: 0 for p in self.widths}
        self.energy_added = {p: 0.0 for p in self.widths}  # ||K||_F^2 of everything added
        self.energy_shed = {p: 0.0 for p in self.widths}  # what the shrinks took off the trace
        self.ops = 0
        self.shrinks = 0

    @property
    def nbytes(self) -> int:
        """The bytes the buffers hold (the formula: ``8 * rank * sum(widths)`` when ``rank <= width``)."""
        return sum(b.numel() * b.element_size() for b in self._buf.values())

    def _check(self, path: str) -> None:
        if path not in self._buf:
            raise KeyError(f"the sketch holds no module instance {path!r}; it holds {len(self._buf)} of them, e.g. "
                           f"{next(iter(self._buf), '(none)')!r}")

    @torch.no_grad()
    def add(self, path: str, keys: torch.Tensor) -> None:
        """Append key rows ``[n, d]`` of one module instance."""
        self._check(path)
        buf = self._buf[path]
        k = keys.detach().reshape(-1, buf.shape[1]).float().cpu()
        if not bool(torch.isfinite(k).all()):
            raise ValueError(f"non-finite keys for {path}: the model produced NaN or infinity on a kept sequence")
        self.rows_added[path] += k.shape[0]
        self.energy_added[path] += float(k.double().pow(2).sum())
        i = 0
        while i < k.shape[0]:
            fill = self._fill[path]
            limit = self._first.get(path, buf.shape[0])
            take = min(k.shape[0] - i, limit - fill)
            buf[fill:fill + take] = k[i:i + take]
            self.ops += take * buf.shape[1]
            self._fill[path] = fill + take
            i += take
            if self._fill[path] == limit:
                self._first.pop(path, None)
                self._shrink(path)

    def _shrink(self, path: str) -> None:
        buf = self._buf[path]
        keep = buf.shape[0] // 2  # l (or the width, if smaller)
        # the SVD B = U S V^T through the 2l x 2l Gram matrix B B^T = U S^2 U^T (float64): row i of the
        # shrunk sketch is sqrt(s_i^2 - s_l^2) v_i^T = sqrt(1 - s_l^2 / s_i^2) u_i^T B
        b = buf.double()
        lam, U = torch.linalg.eigh(b @ b.t())
        lam, U = lam.flip(0).clamp_min(0), U.flip(1)  # descending
        self.ops += buf.shape[0] ** 2 * buf.shape[1] * 2
        self.shrinks += 1
        cut = lam[keep - 1]
        lam2 = (lam - cut).clamp_min(0)
        self.energy_shed[path] += float(lam.sum() - lam2.sum())
        n = int((lam2[:keep] > 0).sum())
        c = (lam2[:n] / lam[:n]).sqrt()
        rows = (U[:, :n].t() @ b) * c[:, None]
        buf.zero_()
        buf[:n] = rows.float()
        self._fill[path] = n

    def rows(self, path: str) -> torch.Tensor:
        """The sketch rows ``[m, d]`` of one module instance (``B^T B`` approximates the kept keys'
        ``K^T K`` from below)."""
        self._check(path)
        return self._buf[path][: self._fill[path]]

    def moment(self, path: str) -> torch.Tensor:
        """``B^T B`` (float64) of one module instance."""
        r = self.rows(path).double()
        return r.t() @ r

    def occupancy(self, path: str, rtol: float) -> float:
        """The share of the key space of ``path`` the kept keys occupy: the number of sketch
        directions whose singular value is above ``rtol`` times the largest, over the width."""
        r = self.rows(path)
        if not r.numel():
            return 0.0
        s = torch.linalg.svdvals(r.double())
        return float((s > rtol * s[0]).sum()) / self.widths[path]

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {p: self.rows(p).contiguous().clone() for p in self._buf}

    def meta(self) -> Dict:
        return {"rank": self.rank, "widths": self.widths, "rows_added": self.rows_added,
                "energy_added": self.energy_added, "energy_shed": self.energy_shed, "ops": self.ops,
                "shrinks": self.shrinks, "first_shrink": dict(self._first)}

    @classmethod
    def from_state(cls, meta: Dict, tensors: Dict[str, torch.Tensor]) -> "KeySketch":
        sk = cls({p: int(d) for p, d in meta["widths"].items()}, int(meta["rank"]))
        for p, rows in tensors.items():
            sk._check(p)
            if rows.ndim != 2 or rows.shape[1] != sk.widths[p] or rows.shape[0] >= sk._buf[p].shape[0]:
                raise ValueError(f"the saved sketch of {p} has shape {tuple(rows.shape)}, not [m < "
                                 f"{sk._buf[p].shape[0]}, {sk.widths[p]}]")
            sk._buf[p][: rows.shape[0]] = rows.float()
            sk._fill[p] = rows.shape[0]
        for name in ("rows_added", "energy_added", "energy_shed"):
            getattr(sk, name).update(meta[name])
        sk.ops, sk.shrinks = int(meta["ops"]), int(meta["shrinks"])
        # instances still before their first shrink (a save without the field shrank when full)
        sk._first = {p: int(v) for p, v in meta.get("first_shrink", {}).items()}
        for p, v in sk._first.items():
            sk._check(p)
            if not sk._fill[p] < v <= sk._buf[p].shape[0]:
                raise ValueError(f"the saved sketch of {p} holds {sk._fill[p]} rows and names its first shrink at "
                                 f"{v}: the save is damaged")
        return sk
