"""kne.evaluate against values computed with EasyEdit's own metric functions.

The table ``tests/data/easyedit_parity.json`` was computed ONCE by
``tools/make_easyedit_table.py``, which runs EasyEdit's ``compute_edit_quality`` (and through
it ``compute_rewrite_or_rephrase_quality``, ``compute_portability_quality``,
``compute_locality_quality`` and ``test_prediction_acc``, taken unmodified from
``easyeditor/evaluate/`` of the EasyEdit checkout named in the table's ``easyedit`` field) on the
requests of :func:`cases`, with the models and tokenizers built here:

* ``tiny``: a 2-layer Llama with fixed pseudo-random weights and a byte-level tokenizer that adds
  ``<bos>`` (fast; the table holds EasyEdit's accuracies and its predicted answer tokens);
* ``smollm2``: the embedded SmolLM2-135M-Instruct with its tokenizer made to add BOS
  (``<|im_start|>``): real accuracies, including the leading-space answers (slow).

Every request has an answer that starts with a space (EasyEdit joins ``prompt + " " + answer``
anyway, so the answer tokens begin with a lone space token) and the tokenizers add BOS (EasyEdit
tokenises with ``add_special_tokens=True``). Regenerate (an EasyEdit checkout is needed; its code
is not part of this repository)::

    git clone https://github.com/zjunlp/EasyEdit /tmp/EasyEdit
    .venv/bin/python tools/make_easyedit_table.py /tmp/EasyEdit

and commit the new JSON with the EasyEdit commit it names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

import kne

TABLE = Path(__file__).resolve().parent / "data" / "easyedit_parity.json"


# ---------------------------------------------------------------------------------------------- the inputs
def cases() -> List[kne.EditRequest]:
    """The requests of the table: two hand-written ones and the two KnowEdit ZsRE records whose
    ``target_new`` starts with a space among the first twenty (records 16 and 18)."""
    hand = [
        {"prompt": "The capital of France is", "target_new": " Paris", "rephrase_prompt": "France's capital city is",
         "portability": {"Reasoning": [{"prompt": "The capital of Germany is", "ground_truth": "Berlin"},
                                       {"prompt": "Paris is the capital of", "ground_truth": " France"}]},
         "locality": {"Relation_Specificity": [{"prompt": "The capital of Japan is", "ground_truth": "Tokyo"},
                                               {"prompt": "The tallest mountain on Earth is",
                                                "ground_truth": " Mount Everest"}]}},
        {"prompt": "The capital of France is", "target_new": "Paris",
         "locality": {"Forgetfulness": [{"prompt": "The capital of France, which is not Rome, is",
                                         "ground_truth": "Paris"}]}},
    ]
    zsre = kne.datasets.knowedit("zsre", limit=20)
    return [kne.EditRequest.from_dict(r) for r in hand] + [zsre[16], zsre[18]]


def parity_tokenizer():
    """Byte-level tokenizer (``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, the 256 bytes after) that adds
    ``<bos>`` with the default ``add_special_tokens=True``; built in memory, no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2}
    for c in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[c] = len(vocab)
    t = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


def parity_model(tok):
    """A float32 2-layer Llama whose weights are drawn in a fixed order from a seeded generator
    (independent of transformers' own initialisation), eager attention, eval mode."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                      pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    g = torch.Generator().manual_seed(20241229)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if name.endswith("norm.weight")
                    else 0.5 * torch.randn(p.shape, generator=g))
    return model.eval()


def smollm2_with_bos():
    """The embedded model, and its tokenizer made to add ``<|im_start|>`` (its BOS) in front."""
    from tokenizers.processors import TemplateProcessing

    model, tok = kne.load_model()
    tok.backend_tokenizer.post_processor = TemplateProcessing(single=f"{tok.bos_token} $A",
                                                              special_tokens=[(tok.bos_token, tok.bos_token_id)])
    return model, tok


# ---------------------------------------------------------------------------------------------- the check
def table() -> Dict[str, Any]:
    return json.loads(TABLE.read_text(encoding="utf-8"))


def check(model, tok, entry: Dict[str, Any]) -> None:
    reqs = cases()
    assert [r.prompt for r in reqs] == [e["prompt"] for e in entry["records"]], "the cases changed: regenerate"
    assert tok("ab")["input_ids"][0] == tok.bos_token_id, "the tokenizer must add BOS by default"
    got = kne.evaluate(model, tok, reqs)  # EasyEdit's tokenisation is the default
    for i, (rec, want) in enumerate(zip(got.records, entry["records"])):
        where = f"record {i} ({want['prompt']!r} -> {want['target_new']!r})"
        assert rec["rewrite_acc"] == pytest.approx(want["rewrite_acc"], abs=1e-12), where
        if want["rephrase_acc"] is None:
            assert rec["rephrase_acc"] is None, where
        else:
            assert rec["rephrase_acc"] == pytest.approx(want["rephrase_acc"], abs=1e-12), where
        assert set(rec["portability"]) == set(want["portability"]), where
        for kind, accs in want["portability"].items():
            assert rec["portability"][kind] == pytest.approx(sum(accs) / len(accs), abs=1e-12), (where, kind)
        assert rec["locality_output"] == want["locality_output"], where


def old_rule_differs(model, tok, entry: Dict[str, Any]) -> bool:
    """kne 0.2's evaluation (no BOS, no second space) gives other numbers on these cases: the
    table can tell the two rules apart."""
    old = kne.evaluate(model, tok, cases(), add_special_tokens=False, always_space=False)
    return any(r["rewrite_acc"] != w["rewrite_acc"] or r["locality_output"] != w["locality_output"]
               for r, w in zip(old.records, entry["records"]))


def test_tiny_model_with_bos_tokenizer_matches_easyedit():
    tok = parity_tokenizer()
    model = parity_model(tok)
    entry = table()["tiny"]
    check(model, tok, entry)
    assert old_rule_differs(model, tok, entry)


@pytest.mark.slow
def test_embedded_model_with_bos_matches_easyedit():
    model, tok = smollm2_with_bos()
    entry = table()["smollm2"]
    check(model, tok, entry)
    assert old_rule_differs(model, tok, entry)
    # The leading-space answer is where the rules part: EasyEdit scores " Paris" after a second space.
    assert entry["records"][0]["rewrite_acc"] < 1.0 == entry["records"][1]["rewrite_acc"]
