"""Shared fixtures: tiny random causal LMs of every supported type, a tiny offline tokenizer, the
embedded SmolLM2-135M model, and a per-test seed.

The tiny models use a byte-level tokenizer (258 tokens: 256 bytes, <pad>, <eos>) built in memory
with ``tokenizers``: it needs no file and no network, and the 258-word vocabulary keeps the output
projection and the soft-max (which dominate a 32-wide model with SmolLM2's 49152-token vocabulary,
about 5x slower per pass) cheap. It is a real ``PreTrainedTokenizerFast``, and with no merges the
tokens of a prompt are always a prefix of the tokens of ``prompt + " " + answer`` (EasyEdit's rule).
"""

from __future__ import annotations

import os

import torch

# Without a GPU the Triton kernels run through Triton's interpreter on CPU tensors (how CI tests
# them); it must be switched on before any Triton kernel is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Two OpenMP threads are pathologically slow on this machine for the small ops these tests run.
torch.set_num_threads(1)

import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from torch import nn  # noqa: E402

import kne  # noqa: E402

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, HEAD_DIM, POSITIONS = 32, 48, 3, 4, 2, 8, 256


def _byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1}
    for c in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[c] = len(vocab)
    t = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="session")
def tok():
    """The tiny byte-level tokenizer (vocabulary 258) the tiny models are built for."""
    t = _byte_tokenizer()
    assert len(t) == 258
    assert t("ab c", add_special_tokens=False)["input_ids"] == [vocab_id(t, "a"), vocab_id(t, "b"),
                                                                vocab_id(t, "Ġ"), vocab_id(t, "c")]
    return t


def vocab_id(t, token: str) -> int:
    return t.convert_tokens_to_ids(token)


def _config_kwargs(model_type: str, vocab: int, pad: int, eos: int) -> dict:
    H, I, L, NH = HIDDEN, INTERMEDIATE, LAYERS, HEADS
    special = dict(vocab_size=vocab, pad_token_id=pad, bos_token_id=eos, eos_token_id=eos)
    llama_like = dict(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=NH,
                      num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, max_position_embeddings=POSITIONS,
                      attention_dropout=0.0)
    kw = {
        "llama": dict(llama_like, mlp_bias=False),
        "mistral": dict(llama_like),
        "qwen2": dict(llama_like),
        "qwen3": dict(llama_like),
        "gemma": dict(llama_like),
        "gemma2": dict(llama_like, query_pre_attn_scalar=HEAD_DIM, sliding_window=16),
        "gpt2": dict(n_embd=H, n_layer=L, n_head=NH, n_inner=I, n_positions=POSITIONS, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0),
        "gptj": dict(n_embd=H, n_layer=L, n_head=NH, n_inner=I, n_positions=POSITIONS, rotary_dim=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
        "gpt_neox": dict(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=NH,
                         max_position_embeddings=POSITIONS, hidden_dropout=0.0, attention_dropout=0.0,
                         classifier_dropout=0.0),
        "opt": dict(hidden_size=H, ffn_dim=I, num_hidden_layers=L, num_attention_heads=NH, word_embed_proj_dim=H,
                    max_position_embeddings=POSITIONS, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                    layerdrop=0.0),
    }[model_type]
    return dict(kw, **special)


def build_tiny_model(model_type: str, tokenizer, seed: int = 0) -> nn.Module:
    """A tiny randomly initialised float32 causal LM of ``model_type`` in eval mode, dropout 0."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, **_config_kwargs(model_type, len(tokenizer), tokenizer.pad_token_id,
                                                            tokenizer.eos_token_id))
    for k, v in cfg.to_dict().items():  # every dropout of the config is off
        if "drop" in k and isinstance(v, (int, float)) and not isinstance(v, bool):
            assert v == 0, f"{model_type}: config.{k}={v}"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            assert m.p == 0, f"{model_type}: {m} has p={m.p}"
    assert model.config.model_type == model_type
    assert all(p.dtype == torch.float32 for p in model.parameters())
    return model


@pytest.fixture
def tiny_model(tok):
    """Factory: ``tiny_model(model_type, seed=0)`` -> a fresh tiny model (hidden 32, FFN 48, 3 layers)."""

    def make(model_type: str, seed: int = 0) -> nn.Module:
        return build_tiny_model(model_type, tok, seed)

    return make


@pytest.fixture
def seed(request) -> int:
    """A seed of its own for every test (stable across runs): torch's global RNG is seeded with it."""
    s = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(s)
    return s


@pytest.fixture
def gen(seed) -> torch.Generator:
    """A torch.Generator seeded per test."""
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="session")
def smollm_tokenizer():
    """The embedded model's tokenizer (SmolLM2, 49152 tokens), from the kne cache (made once if missing)."""
    from transformers import AutoTokenizer

    folder = kne.models.cache_dir() / "smollm2-135m-instruct"
    if not (folder / "tokenizer.json").is_file():
        kne.load_model()
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


@pytest.fixture(scope="session")
def embedded():
    """``(model, tokenizer)`` of the embedded SmolLM2-135M-Instruct (float32, CPU, eval)."""
    return kne.load_model()
