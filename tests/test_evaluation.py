"""EasyEdit's metric definitions, checked by hand on the embedded model."""

import math

import pytest
import torch

import kne
from kne.evaluation import generate_topk, ngram_entropy

pytestmark = pytest.mark.slow


def manual_acc(model, tok, prompt, answer):
    full = tok(prompt + " " + answer, add_special_tokens=False)["input_ids"]
    n = len(tok(prompt, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logits = model(torch.tensor([full])).logits[0]
    pred = logits[n - 1:len(full) - 1].argmax(-1).tolist()
    tgt = full[n:]
    return sum(int(a == b) for a, b in zip(pred, tgt)) / len(tgt), pred


def test_rewrite_portability_locality_match_hand_computation(embedded):
    model, tok = embedded
    req = {"prompt": "The capital of France is", "target_new": "Paris", "rephrase_prompt": "France's capital city is",
           "portability": {"Reasoning": [{"prompt": "The capital of Germany is", "ground_truth": [["Berlin", "BER"]]},
                                         {"prompt": "The largest planet is", "ground_truth": "Saturn of the rings"}]},
           "locality": {"Relation_Specificity": [{"prompt": "The capital of Japan is", "ground_truth": "Tokyo city"}]}}
    res = kne.evaluate(model, tok, [req])
    rec = res.records[0]
    assert rec["rewrite_acc"] == manual_acc(model, tok, req["prompt"], "Paris")[0] == 1.0
    assert rec["rephrase_acc"] == manual_acc(model, tok, req["rephrase_prompt"], "Paris")[0]
    want = (manual_acc(model, tok, "The capital of Germany is", "Berlin")[0]
            + manual_acc(model, tok, "The largest planet is", "Saturn of the rings")[0]) / 2
    assert rec["portability"]["Reasoning"] == pytest.approx(want)
    assert rec["locality"] == {}  # needs pre
    assert rec["locality_output"]["Relation_Specificity"][0] == manual_acc(model, tok, "The capital of Japan is",
                                                                           "Tokyo city")[1]
    # unchanged model: locality 1.0 against itself
    again = kne.evaluate(model, tok, [req], pre=res)
    assert again.records[0]["locality"] == {"Relation_Specificity": 1.0}
    s = again.summary()
    assert s["edit_succ"] == 1.0 and s["locality"] == 1.0 and s["fluency"] is None
    assert s["portability"] == pytest.approx(want)


def test_locality_counts_changed_predictions(embedded):
    model, tok = embedded
    req = {"prompt": "The capital of France is", "target_new": "Rome",
           "locality": {"L": [{"prompt": "The capital of Japan is", "ground_truth": "Tokyo"}]}}
    pre = kne.evaluate(model, tok, [req])
    # tamper with the recorded pre-edit prediction: locality must drop to 0
    pre.records[0]["locality_output"]["L"][0] = [-1 for _ in pre.records[0]["locality_output"]["L"][0]]
    post = kne.evaluate(model, tok, [req], pre=pre)
    assert post.records[0]["locality"]["L"] == 0.0
    with pytest.raises(ValueError, match="same requests"):
        kne.evaluate(model, tok, [req, req], pre=pre)


def test_ngram_entropy_by_hand():
    # "a b a b": bigrams (a,b) x2, (b,a) x1 -> H2 = H(2/3, 1/3); trigrams (a,b,a), (b,a,b) -> H3 = 1
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b") == pytest.approx((h2 * 2 / 3 + 1.0 * 4 / 3) / 2)
    assert ngram_entropy("the the the the") == 0.0


def test_fluency_generation_is_seeded_and_100_tokens(embedded):
    model, tok = embedded
    state = torch.get_rng_state()
    a = generate_topk(model, tok, "The capital of France is", seed=3)
    assert torch.equal(state, torch.get_rng_state())  # caller's RNG untouched
    assert a.startswith("The capital of France is")
    assert len(tok(a, add_special_tokens=False)["input_ids"]) >= 90
    r = kne.evaluate(model, tok, [{"prompt": "The capital of France is", "target_new": "Paris"}], fluency=True, seed=3)
    assert r.records[0]["fluency"] == pytest.approx(ngram_entropy(a))  # same seed, same text
    other = kne.evaluate(model, tok, [{"prompt": "The capital of France is", "target_new": "Paris"}], fluency=True, seed=4)
    assert other.records[0]["fluency"] != r.records[0]["fluency"]
    assert 3.0 < r.records[0]["fluency"] < 7.0
