"""KNE hyper-parameters."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import numpy as np

__all__ = ["KNEConfig", "resolve_config", "edit_config", "DEFAULT_PRESET", "PRESETS"]

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.manual_seed / Generator.manual_seed accept
#: the largest learning rate per optimizer, and the largest alpha, an edit can use (KNEConfig refuses more)
LR_MAX = {"adamw": 10.0, "ngd": 1000.0}
ALPHA_MAX = 1000.0

_CHOICES = {
    "neuron_axis": ("out", "in"),
    "ig_path": ("layerwise", "joint"),
    "objective": ("prob", "logprob"),
    "aggregate": ("max", "mean"),
    "delta_init": ("zeros", "kaiming", "authors"),
    "backend": ("auto", "torch", "cpu", "triton", "cuda"),
    "stop_rule": ("loss", "argmax", "min_prob", "margin"),
    "loss_reduction": ("request", "token"),
    "keep_positions": ("all", "answer"),
    "optimizer": ("adamw", "ngd"),
}


def _f(default: Any, help: str):
    """A field with its one-line help (the CLI's --help reads it: ``dataclasses.fields(...).metadata``)."""
    if isinstance(default, (list, tuple, dict)):
        return field(default_factory=lambda: default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class KNEConfig:
    """Settings of one KNE localisation and edit.

    The fields' defaults are the authors' published Llama-2-7B setting (``preset("authors")``), so
    ``KNEConfig(steps=50)`` is that setting with 50 steps. An edit given no config at all
    (``kne.fast_edit(model, tok, req)``, ``kne edit``) uses ``preset("local")`` instead
    (:data:`DEFAULT_PRESET`), with any keyword overrides on top of it; :func:`describe` names the
    preset a config is and what it changes.

    Localisation (``kne.attribute`` / ``kne.locate``):

    * ``target_modules``: FFN modules whose neurons are scored, by neutral alias (``ffn_in``,
      ``ffn_gate``, ``ffn_out``) or by Hugging Face suffix (``mlp.down_proj``). Any other linear
      projection inside a decoder layer (``self_attn.o_proj``) may be named by its path too: it is
      scored and edited by the same code (tests/test_other_modules.py holds it to the reference).
    * ``neuron_axis``: ``"out"`` -- neuron ``i`` is row ``W[i, :]`` (the authors' ``this_layer``);
      ``"in"`` -- neuron ``j`` is column ``W[:, j]`` (``last_layer``).
    * ``layers``: decoder layer indices to score (``None``: all).
    * ``exclude_edge_layers``: leave the first and the last ``N`` decoder layers out of the scored
      ones (``0``: none). Layer 0's FFN writes into every token's stream and the last layer's
      straight into the logits: in a sequence of edits, edits there wear away what the model says
      about the other edits' subjects, while the last layer is also where an edit stays with its
      own subject (docs/local-edits.md).
    * ``ig_steps``: Riemann steps ``m`` of the integrated-gradient path, ``a_k = k/m``; ``1`` is
      gradient-times-weight at the model's own weights (the authors' "gas").
    * ``ig_path``: ``"layerwise"`` scales one module instance at a time along the path (default,
      as Dai et al. do for knowledge neurons); ``"joint"`` scales every target module together.
      Both coincide when ``ig_steps == 1``.
    * ``objective``: ``"prob"`` -- sum over answer tokens of ``P(y*_j)`` (the paper);
      ``"logprob"`` -- sum of ``log P(y*_j)``. Answer = ``target_new``, teacher-forced.
    * ``percentile`` / ``aggregate`` / ``positive_only``: keep neurons whose score, aggregated over
      requests with ``max`` or ``mean``, is above the global ``numpy.percentile`` of all layers of a
      module (strict ``>``), and above 0 when ``positive_only``.

    Edit (``kne.fast_edit``): ``optimizer`` ``"adamw"`` (AdamW on a compact delta of the ensemble
    rows/columns with ``lr``, ``weight_decay``) or ``"ngd"`` (normalised gradient descent with
    momentum ``ngd_momentum``: the momentum of the gradients, each divided by the norm of the whole
    gradient of every edited module instance together, and every step moves the delta by exactly
    ``lr`` in that joint Frobenius norm along it; no weight decay); at most ``steps`` optimizer
    steps, stopping as soon as the loss is below ``stop_loss``; the delta path
    ``y += s * dropout(x) @ dW^T`` with ``s = alpha / sqrt(K)`` (``rs_scaling``) or ``alpha / K``,
    ``K`` the ensemble size of that module instance;
    ``delta_init`` ``"zeros"`` (the model is unchanged before the first step), ``"kaiming"``
    (LoRA-style uniform noise, bound ``1/sqrt(in_features)`` on both axes) or ``"authors"`` (the
    bound of the authors' ``knb_W``, ``nn.init.kaiming_uniform_(a=sqrt(5))``: ``1/sqrt(fan_in)``,
    which is ``1/sqrt(in_features)`` for rows ``[K, in]`` and ``1/sqrt(K)`` for columns
    ``[out, K]``).

    Compatibility with the authors' KNB trainer (their EasyEdit fork; all off by default, on in
    ``preset("knb")``): ``stop_after_step`` -- their loop steps on the loss before testing it, so
    it applies one more optimizer step once the stop test passes (kne stops before it);
    ``loss_reduction`` -- ``"request"`` (the mean NLL of each request's answer tokens, then the
    mean over requests: every request weighs the same) or ``"token"`` (the mean over every answer
    token of the batch, Hugging Face's loss, which theirs is: a request with more answer tokens
    weighs more); ``always_space`` -- the edit's text is ``prompt + " " + target_new`` even when
    the target starts with whitespace (their trainer's and EasyEdit's text; kne's default adds no
    second space); with ``add_special_tokens=True`` (below) also BOS where the tokenizer adds it,
    as their trainer tokenises. Both tokenisation switches apply to the edit's own text, which
    attribution scores and the edit trains.

    Preservation (``kne.preservation``; all off by default; ``preset("local")`` turns on the
    projection, the argmax stop and the KL at the answer's end, weight 2):
    ``preserve_weight`` -- weight of the mean ``KL(p_before || p_after)`` over the next-token
    distributions of neighbour prompts (0: off); ``preserve_count`` -- relation templates filled with
    the request's subject (plus a few generic continuations); ``preserve_prompt_positions`` -- also
    keep the edit prompt's own positions before the answer; ``preserve_answer_end`` -- also keep
    the prediction after the answer (at its last token: what the model says next, given the new
    answer, stays the unedited model's, so the edit does not repeat its last token); both are read
    by the KL, so they need ``preserve_weight > 0``. ``stop_rule`` -- ``"loss"`` (the edit NLL below
    ``stop_loss``), ``"argmax"`` (every answer token is the argmax), ``"min_prob"`` (every
    answer token's probability at least ``stop_prob``) or ``"margin"`` (every answer token's logit
    at least ``stop_margin`` above every other token's: the argmax with a margin, ``log`` of the
    ratio of its probability to the runner-up's); ``delta_l2`` -- weight of the squared norm of
    the weight change ``s * dW``. ``project`` -- keep the row delta in the null space of preserved
    keys (``kne.nullspace``, ``neuron_axis="out"`` only): the neighbours' keys and, with
    ``project_corpus``, the directions of a cached corpus key covariance whose eigenvalue is above
    ``project_threshold`` times the largest. ``keep_positions`` / ``keep_rtol`` -- with
    ``fast_edit(..., keep=[earlier edits])`` (sequential editing), the earlier edits' positions
    whose keys the projection keeps too (``"all"`` of each prompt + answer, or only the
    ``"answer"``-predicting ones) and the relative singular-value cut of those keys.

    ``add_special_tokens`` is passed to the tokenizer for every prompt; ``backend`` picks the
    kernels of the fast path (``kne_kernels``): ``"auto"`` (the C++ extension on CPU, Triton or
    CUDA C++ on a GPU, falling back to torch), ``"torch"`` (the torch-only fast path), or one
    kernel backend by name (``"cpu"``, ``"triton"``, ``"cuda"``; one that cannot run here raises
    ``kne_kernels``' error instead of falling back); ``seed`` (an integer in ``[-2**63, 2**64)``, as
    ``torch.manual_seed`` takes) seeds dropout and the delta initialisation from generators of the
    edit's own (torch's global RNG is never touched).

    Numbers may be Python's or numpy's scalars. Every call validates its config again (a copy of it),
    so a field reassigned after construction is refused at the call.
    """

    target_modules: Tuple[str, ...] = _f(("ffn_out",), "FFN modules whose neurons are scored: aliases ffn_in, "
                                         "ffn_gate, ffn_out or suffixes such as mlp.down_proj")
    neuron_axis: str = _f("out", "out: neuron i is row W[i,:] (the authors' this_layer); in: column W[:,j] "
                                 "(last_layer)")
    layers: Optional[Tuple[int, ...]] = _f(None, "decoder layers to score (default: all)")
    exclude_edge_layers: int = _f(0, "leave the first and the last N decoder layers out of the scored ones")
    ig_steps: int = _f(1, "Riemann steps m of the integrated gradient, a_k = k/m; 1 = gradient x weight")
    ig_path: str = _f("layerwise", "scale one module instance at a time along the IG path, or all (joint)")
    objective: str = _f("prob", "attribution objective: sum of P (prob) or of log P (logprob) of the answer tokens")
    percentile: float = _f(99.0, "one global numpy.percentile threshold over all layers of a module (strict >)")
    aggregate: str = _f("max", "aggregate scores over requests: max or mean")
    positive_only: bool = _f(True, "keep only neurons whose score is > 0")
    optimizer: str = _f("adamw", "adamw (per-coordinate steps) or ngd (normalised gradient descent with momentum: "
                                 "steps of length lr along the gradient's direction)")
    lr: float = _f(5e-3, "AdamW learning rate; with optimizer ngd the length of every step")
    ngd_momentum: float = _f(0.9, "with optimizer ngd: momentum of the normalised gradients")
    steps: int = _f(30, "maximum optimizer steps")
    alpha: float = _f(1.0, "delta scale s = alpha/sqrt(K) (alpha/K without rs_scaling)")
    rs_scaling: bool = _f(True, "s = alpha/sqrt(K) rather than alpha/K")
    dropout: float = _f(0.1, "dropout on the input of the delta path")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    stop_loss: float = _f(1e-2, "stop once the edit loss is below this (stop_rule loss; the authors' t_loss)")
    delta_init: str = _f("zeros", "zeros; kaiming (uniform noise, bound 1/sqrt(in_features) on both axes); or "
                                  "authors (the authors' bound 1/sqrt(fan_in): in_features for rows, K for columns)")
    stop_after_step: bool = _f(False, "take one more optimizer step once the stop test passes (the authors' loop "
                                      "steps before it tests the loss)")
    loss_reduction: str = _f("request", "edit NLL: mean per request, then over requests (request); or over every "
                                        "answer token of the batch (token: the authors' and Hugging Face's loss)")
    always_space: bool = _f(False, "edit text prompt + ' ' + target_new even when the target starts with "
                                   "whitespace (the authors' and EasyEdit's text)")
    preserve_weight: float = _f(0.0, "weight of the neighbour KL(p_before || p_after) (0: off)")
    preserve_count: int = _f(16, "relation templates filled with the request's subject as neighbours")
    preserve_others: int = _f(0, "neighbours that ask the edit prompt's own relation of other subjects (kept "
                                 "like the others: projected, or held by the KL without project)")
    preserve_prompt_positions: bool = _f(False, "also keep the edit prompt's own positions before the answer")
    preserve_answer_end: bool = _f(False, "also keep what follows the answer: the prediction at the answer's "
                                          "last token (against repeating it)")
    stop_rule: str = _f("loss", "stop when the edit loss < stop_loss (loss), every answer token is the argmax "
                                "(argmax), has probability >= stop_prob (min_prob), or a logit at least "
                                "stop_margin above every other token's (margin)")
    stop_prob: float = _f(0.9, "answer-token probability of stop_rule min_prob")
    stop_margin: float = _f(1.0, "stop_rule margin: how far (in logits, so log of a probability ratio) each answer "
                                 "token must lead the runner-up")
    delta_l2: float = _f(0.0, "weight of the squared norm of the weight change s*dW")
    project: bool = _f(False, "keep the row delta off the preserved keys (null-space projection; rows only)")
    project_corpus: bool = _f(True, "with project: also the cached corpus key covariance (built on first use)")
    project_threshold: float = _f(1e-2, "with project_corpus: keep corpus directions whose eigenvalue is above "
                                        "this times the largest")
    keep_positions: str = _f("all", "with keep= (sequential edits): an earlier edit's positions kept, every "
                                    "position of its prompt and answer (all) or those that predict its answer (answer)")
    keep_rtol: float = _f(1e-5, "with keep=: keep the earlier edits' key directions whose singular value is above "
                                "this times the largest")
    add_special_tokens: bool = _f(False, "passed to the tokenizer for every prompt (True: BOS where the tokenizer "
                                         "adds one, as the authors' trainer)")
    backend: str = _f("auto", "kernels of the fast path: auto, torch, cpu, triton or cuda")
    seed: int = _f(0, "seed of dropout and the delta initialisation")

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        try:
            self.target_modules = tuple(self.target_modules)
        except TypeError:
            _bad("target_modules", self.target_modules, "a tuple of module names such as ('ffn_out',)")
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            _bad("target_modules", self.target_modules, "a non-empty tuple of module names such as ('ffn_out',)")
        if len(set(self.target_modules)) != len(self.target_modules):
            _bad("target_modules", self.target_modules, "each module named once")
        if self.layers is not None:
            if _is_integer(self.layers):
                self.layers = (self.layers,)
            try:
                self.layers = tuple(self.layers)
            except TypeError:
                _bad("layers", self.layers, "None (all layers) or a sequence of layer indices")
            if not self.layers or not all(_is_integer(l) for l in self.layers):
                _bad("layers", self.layers, "None (all layers) or a non-empty sequence of int layer indices")
            self.layers = tuple(int(l) for l in self.layers)
            if len(set(self.layers)) != len(self.layers):
                _bad("layers", self.layers, "each layer listed once")
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                _bad(name, getattr(self, name), "one of " + ", ".join(repr(c) for c in choices))
        _int(self, "exclude_edge_layers", 0)
        _int(self, "ig_steps", 1)
        _int(self, "steps", 0)
        _int(self, "seed", SEED_MIN, hi=SEED_MAX, fix="an integer in [-2**63, 2**64) (what torch.manual_seed takes)")
        _int(self, "preserve_count", 0)
        _int(self, "preserve_others", 0)
        _num(self, "percentile", lo=0.0, hi=100.0, hi_open=True,
             fix="a number in [0, 100); 99 keeps about 1% of neurons")
        # What an edit can use: AdamW moves every coordinate by up to about lr per step (weights are
        # O(0.01-1)); ngd's lr is the length of a step of the whole delta; alpha scales the delta.
        # Beyond these an edit only diverges (lr=1e30 wrecked the model), so they are refused.
        lr_max = LR_MAX[self.optimizer]
        _num(self, "lr", lo=0.0, lo_open=True, hi=lr_max,
             fix=f"a positive learning rate up to {lr_max:g} with optimizer={self.optimizer!r}, such as "
                 f"{5e-3 if self.optimizer == 'adamw' else 20:g}")
        _num(self, "alpha", lo=0.0, lo_open=True, hi=ALPHA_MAX, fix=f"a positive scale up to {ALPHA_MAX:g}, such as 1.0")
        _num(self, "dropout", lo=0.0, hi=1.0, hi_open=True, fix="a probability in [0, 1)")
        _num(self, "weight_decay", lo=0.0, fix="a non-negative number such as 0.0")
        _num(self, "ngd_momentum", lo=0.0, hi=1.0, hi_open=True, fix="a momentum in [0, 1) such as 0.9")
        if self.optimizer == "ngd" and self.weight_decay:
            _bad("weight_decay", self.weight_decay, "0 with optimizer='ngd' (its steps have a fixed length; "
                 "weight decay belongs to AdamW), or optimizer='adamw'")
        if self.optimizer != "ngd" and self.ngd_momentum != 0.9:
            _bad("ngd_momentum", self.ngd_momentum, "its default 0.9 with optimizer='adamw' (AdamW's own betas are "
                 "0.9, 0.999), or optimizer='ngd'")
        _num(self, "stop_loss", lo=0.0, fix="a non-negative loss (0 disables early stopping)")
        if self.project and self.neuron_axis != "out":
            _bad("project", self.project, "False with neuron_axis='in': the null-space projection applies to row "
                 "edits (neuron_axis='out'); a column delta sees only K coordinates of a key, whose K x K "
                 "covariance is full rank, so its null space is empty")
        _num(self, "preserve_weight", lo=0.0, fix="a non-negative weight (0 turns preservation off)")
        _num(self, "stop_prob", lo=0.0, lo_open=True, hi=1.0, fix="a probability in (0, 1]")
        _num(self, "stop_margin", lo=0.0, fix="a non-negative logit margin such as 1.0 (0 is the argmax rule)")
        _num(self, "delta_l2", lo=0.0, fix="a non-negative weight (0 turns the penalty off)")
        _num(self, "project_threshold", lo=0.0, fix="a non-negative eigenvalue threshold such as 1e-2")
        _num(self, "keep_rtol", lo=0.0, fix="a non-negative relative singular-value cut such as 1e-5")
        for name in ("positive_only", "rs_scaling", "add_special_tokens", "preserve_prompt_positions",
                     "preserve_answer_end", "project", "project_corpus", "stop_after_step", "always_space"):
            v = getattr(self, name)
            if isinstance(v, np.bool_):  # numpy's bool is the bool it holds
                v = bool(v)
                setattr(self, name, v)
            if not isinstance(v, bool):
                _bad(name, v, "True or False")
        for name in ("preserve_prompt_positions", "preserve_answer_end"):  # positions only the KL reads
            if getattr(self, name) and not self.preserve_weight > 0:
                _bad(name, True, "it with preserve_weight > 0 (the neighbour KL is what keeps those positions; "
                     f"--preserve-weight), or {name}=False (--no-{name.replace('_', '-')}; preset('local') turns "
                     "preserve_answer_end on)")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "KNEConfig":
        """Named settings (``PRESETS``), with ``overrides`` on top.

        * ``"authors"``: ``KNEConfig()``'s fields -- the authors' published Llama-2-7B setting
          (rows of ``mlp.down_proj``, dropout 0.1, stop at loss 1e-2).
        * ``"tuned"``: columns (``neuron_axis="in"``), dropout 0, stop at loss 0.1 -- the authors'
          own run scripts stop at ``t_loss=1e-1`` and their released YAML sets ``knb_dropout: 0``.
          On SmolLM2-135M (20 counterfact records, docs/quality.md) it reaches 100% edit success
          in about 12 steps where the authors' setting reaches 93% in 22-28, with higher portability.
        * ``"local"`` (:data:`DEFAULT_PRESET`: what an edit given no config uses): edits that keep
          what the model knows, about the subject and about other
          subjects. Rows (``neuron_axis="out"``), every step's delta projected off the keys of the
          subject's neighbour prompts (``project=True``: the edited modules' outputs on those
          prompts do not change at all), the KL at the answer's end (``preserve_answer_end=True``,
          ``preserve_weight=2``: what the model says after the new answer stays the unedited
          model's, against edits that repeat their last token), normalised gradient descent
          (``optimizer="ngd"``, steps of length ``lr=20``, at most 150: the change goes where the
          gradient puts it, where AdamW's per-coordinate steps move every ensemble coordinate about
          as far, which spills into other subjects and, over a sequence of edits, wears their
          facts away), dropout 0, stop as soon as every answer token is the argmax
          (``stop_rule="argmax"``). Chosen on records 0-19 of the three KnowEdit files
          (docs/experiments/local-preset.md); ``optimizer="adamw", lr=0.1, steps=60`` gives the preset's second
          revision, and with ``preserve_weight=0, preserve_answer_end=False`` as well its first.
          ``lr=15, stop_rule="margin", stop_margin=1`` trades some of what the edit keeps for
          portability (docs/local-edits.md: the margin stop). Needs the request's ``subject``
          (else its neighbours come from elsewhere, with a warning). On the embedded model "The
          capital of France is" -> "Rome" leaves 14 of 16 other capitals the model knows where
          they were (the second revision 5, FT-M none);
          ``preset("local", preserve_others=4)`` also projects off four prompts that ask other
          subjects the edited relation (docs/local-edits.md).
        * ``"knb"``: the authors' KNB trainer (their EasyEdit fork) as released for Llama-2-7b-chat
          (``hparams/KNB/llama2-7b-chat.yaml``: rows of ``mlp.down_proj``, dropout 0, stop at loss
          1e-2) with its three differences from kne's loop switched on -- ``stop_after_step``,
          ``loss_reduction="token"``, ``delta_init="authors"`` -- and its tokenisation
          (``add_special_tokens``, ``always_space``). From the same ensemble and start its per-step
          losses equal theirs: bit for bit in float64, within their own float32 noise in float32
          (``tests/test_knb_parity.py``, docs/parity.md).
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}")
        return resolve_config(None, {**PRESETS[name][1], **overrides})

    def replace(self, **overrides: Any) -> "KNEConfig":
        """A copy with some fields changed (validated; unknown names raise ``ValueError``)."""
        return resolve_config(self, overrides)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules)
        d["layers"] = None if self.layers is None else list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "KNEConfig":
        return resolve_config(None, d)


#: name -> (one-line description, overrides of the defaults); see :meth:`KNEConfig.preset`
PRESETS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "authors": ("the authors' published Llama-2-7B setting (KNEConfig's field defaults)", {}),
    "tuned": ("columns, dropout 0, stop at loss 0.1", {"neuron_axis": "in", "dropout": 0.0, "stop_loss": 0.1}),
    "local": ("rows kept off every key of the subject's neighbour prompts (null-space projection), the KL at the "
              "answer's end (weight 2), normalised gradient descent (steps of length 20), dropout 0, stop once the "
              "answer is the argmax",
              {"neuron_axis": "out", "dropout": 0.0, "optimizer": "ngd", "lr": 20.0, "steps": 150, "project": True,
               "project_corpus": False, "stop_rule": "argmax", "preserve_weight": 2.0, "preserve_answer_end": True}),
    "knb": ("the authors' KNB trainer: their llama2-7b-chat YAML (dropout 0) with their stopping step, token-mean "
            "loss, random start and tokenisation",
            {"dropout": 0.0, "stop_after_step": True, "loss_reduction": "token", "delta_init": "authors",
             "add_special_tokens": True, "always_space": True}),
}


#: The preset of an edit given no config (``fast_edit``, ``kne.reference.edit``, ``kne.Editor``, ``kne edit``,
#: ``kne eval``, the EasyEdit drop-in): edits that keep what the model knows.
DEFAULT_PRESET = "local"


def edit_config(config: Optional[KNEConfig], overrides: Optional[Dict[str, Any]] = None) -> KNEConfig:
    """The settings of an edit: ``config`` (a :class:`KNEConfig` or a dict of fields) with
    ``overrides`` applied; with no config, ``KNEConfig.preset(DEFAULT_PRESET)`` (``"local"``) is the base."""
    return resolve_config(KNEConfig.preset(DEFAULT_PRESET) if config is None else config, overrides)


def describe(config: KNEConfig) -> str:
    """The preset a config is, and what it changes: ``"local"``, ``"local with lr=15.0, stop_rule='margin'"``
    (the preset it differs least from; ties go to the order of ``PRESETS``)."""
    mine = config.to_dict()
    best = None
    for name in PRESETS:
        base = KNEConfig.preset(name).to_dict()
        diff = [k for k in mine if mine[k] != base[k]]
        if best is None or len(diff) < len(best[1]):
            best = (name, diff)
    name, diff = best
    return name if not diff else f"{name} with " + ", ".join(f"{k}={mine[k]!r}" for k in diff)


def resolve_config(config: Optional[KNEConfig], overrides: Optional[Dict[str, Any]] = None) -> KNEConfig:
    """A validated copy of ``config`` (default ``KNEConfig()``, the authors' setting) with ``overrides``
    applied. (An edit given no config starts from ``DEFAULT_PRESET`` instead: :func:`edit_config`.)"""
    if config is None:
        config = KNEConfig()
    elif isinstance(config, dict):
        config = resolve_config(None, config)
    elif not isinstance(config, KNEConfig):
        raise ValueError(f"config must be a kne.KNEConfig or a dict, got {type(config).__name__}")
    overrides = overrides or {}
    names = {f.name for f in dataclasses.fields(KNEConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown KNEConfig field(s) {unknown}; valid fields are: {', '.join(sorted(names))}")
    # Always a fresh, validated copy: fields reassigned after construction (cfg.lr = -1) are checked
    # again here, at the call, and the caller's later changes do not reach a running edit.
    return dataclasses.replace(config, **overrides)


def _bad(name: str, value: Any, fix: str) -> None:
    raise ValueError(f"KNEConfig.{name}={value!r} is invalid: use {fix}")


def _is_integer(v: Any) -> bool:
    """An integer: Python's or numpy's (any ``numbers.Integral``), never a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _int(cfg: KNEConfig, name: str, lo: Optional[int], hi: Optional[int] = None, fix: Optional[str] = None) -> None:
    v = getattr(cfg, name)
    if not _is_integer(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        _bad(name, v, fix or (f"an integer >= {lo}" if lo is not None else "an integer"))
    setattr(cfg, name, int(v))  # a numpy integer is the int it holds


def _num(cfg: KNEConfig, name: str, *, lo=None, hi=None, lo_open=False, hi_open=False, fix: str) -> None:
    v = getattr(cfg, name)
    # any real number (int, float, numpy's scalars: numbers.Real), never a bool
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
    if ok and lo is not None:
        ok = v > lo if lo_open else v >= lo
    if ok and hi is not None:
        ok = v < hi if hi_open else v <= hi
    if not ok:
        _bad(name, v, fix)
    setattr(cfg, name, float(v))
