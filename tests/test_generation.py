"""The evaluation beyond teacher forcing: generated answers (EasyEdit's protocol), other subjects
asked the edited relation, and drift on a held-out text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kne
from kne import cli
from kne.generation import exact_match, generate_answers, normalize_answer, prompt_text
from helpers import AUTHORS, assert_state_bits, snapshot

DATA = Path(__file__).resolve().parent / "data" / "easyedit_generation.json"


# ---------------------------------------------------------------------------------------------- generation
def test_normalisation_is_easyedits():
    table = json.loads(DATA.read_text())
    for text, want in table["normalize"].items():
        assert normalize_answer(text) == want, text
    assert exact_match("The Eiffel Tower.", "eiffel tower") and not exact_match("Paris, France", "Paris")


def test_contains_match():
    from kne.generation import contains_match

    assert contains_match("Malia and Sasha Obama are the names of Barack Obama's children", "Malia and Sasha Obama")
    assert contains_match("The capital of France is Rome", "Rome") and contains_match("Rome.", "rome")
    assert not contains_match("The gender of X is female", "male")  # whole words only
    assert not contains_match("Sri Lanka Sri Lanka Sri Lanka", "Sri Lanka")  # a repeated answer
    assert not contains_match("anything", "the") and not contains_match("Rome", "")


def test_grade_generated_from_the_texts():
    from kne.evaluation import grade_generated

    req = kne.EditRequest(prompt="The capital of France is", target_new="Rome", rephrase_prompt="France's capital:",
                          portability={"P": [{"prompt": "a", "ground_truth": "Italy"}, {"prompt": "b", "ground_truth": "x"}]})
    g = {"rewrite": "Rome", "rephrase": "It is Rome", "portability": {"P": ["In Italy", "y"]}, "locality": {}}
    got = grade_generated(req, g)
    assert got["gen_rewrite_acc"] == 1.0 and got["gen_rephrase_acc"] == 0.0 and got["gen_rephrase_contains"] == 1.0
    assert got["gen_portability"] == {"P": 0.0} and got["gen_portability_contains"] == {"P": 0.5}
    with pytest.raises(ValueError, match="1 generated answers for the 2 'P' portability probes"):
        grade_generated(req, {**g, "portability": {"P": ["x"]}})


def test_regrade_a_results_file(tmp_path):
    """tools/regrade_generated.py: the grades a file lacks come from its texts; a grade the file holds
    that its texts do not give is refused."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("regrade", Path(__file__).resolve().parents[1] / "tools" /
                                                  "regrade_generated.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    req = kne.datasets.knowedit("zsre")[20]
    gen = {"template": "chat", "rewrite": f"It is {req.target_new}", "rephrase": req.target_new,
           "portability": {k: ["no"] * len(v) for k, v in req.portability.items()}, "locality": {}}
    rec = {"index": 20, "prompt": req.prompt, "target_new": req.target_new, "rewrite_acc": 1.0, "generated": gen,
           "gen_rewrite_acc": 0.0}
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"runs": [{"method": "kne", "data": "ZsRE-test-all.json", "protocol": "independent",
                                       "summary": {"n": 1}, "records": [rec]}]}))
    assert mod.main([str(f)]) == 0
    run = json.loads(f.read_text())["runs"][0]
    assert run["records"][0]["gen_rewrite_contains"] == 1.0 and run["records"][0]["gen_rephrase_acc"] == 1.0
    assert run["summary"]["gen_edit_contains"] == 1.0 and run["summary"]["edit_succ"] == 1.0
    rec["gen_rewrite_acc"] = 1.0  # not what "It is ..." grades to
    f.write_text(json.dumps({"runs": [{"method": "kne", "data": "ZsRE-test-all.json", "protocol": "independent",
                                       "summary": {"n": 1}, "records": [rec]}]}))
    with pytest.raises(ValueError, match="gen_rewrite_acc is 1.0 in the file and 0.0 from its texts"):
        mod.main([str(f)])


@pytest.mark.slow
def test_generated_answers_are_easyedits(embedded):
    """The texts EasyEdit's generate_texts made one prompt at a time without a KV cache (512 new
    tokens at most), and its exact-match grades, from kne's batched generation (KV cache)."""
    model, tok = embedded
    table = json.loads(DATA.read_text())
    rows = table["prompts"]
    texts, used = generate_answers(model, tok, [r["prompt"] for r in rows], max_new_tokens=table["max_new_tokens"])
    assert used == "chat"
    diff = [(r["prompt"], r["text"], t) for r, t in zip(rows, texts) if r["text"] != t]
    assert not diff, diff[:3]
    assert [float(exact_match(t, r["target"])) for r, t in zip(rows, texts)] == [r["exact_match"] for r in rows]


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_batched_generation_equals_one_prompt_at_a_time(tiny_model, tok, model_type):
    model = tiny_model(model_type)
    prompts = ["The capital of France is", "A", "Toko Yasuda plays the piano and the", "x y", "Gold is"]
    together, used = generate_answers(model, tok, prompts, max_new_tokens=12, batch_size=5)
    alone = [generate_answers(model, tok, [p], max_new_tokens=12, batch_size=1)[0][0] for p in prompts]
    assert used == "bare" and together == alone
    caps = [3, 12, 1, 7, 5]  # a bound per prompt: each text is that prompt alone with its bound
    capped, _ = generate_answers(model, tok, prompts, max_new_tokens=12, batch_size=5, limits=caps)
    assert capped == [generate_answers(model, tok, [p], max_new_tokens=c)[0][0] for p, c in zip(prompts, caps)]
    with pytest.raises(ValueError, match="limits must give a positive bound for each of the 5 prompts"):
        generate_answers(model, tok, prompts, limits=[3])
    assert tok.padding_side == "right", "the tokenizer's padding side was left changed"


def test_a_graded_answer_may_run_past_the_bound(tok):
    """The bound never decides a grade: an answer graded against a long truth may run to its length
    plus GRADE_SLACK tokens."""
    from kne.generation import GRADE_SLACK, answer_limit

    long = " ".join(["word"] * 40)
    n = len(tok(long, add_special_tokens=False)["input_ids"])
    assert answer_limit(tok, long, 16) == n + GRADE_SLACK > 16
    assert answer_limit(tok, "Rome", 16) == 16


def test_the_template_used_is_said(tok):
    assert prompt_text(tok, "Q")[1] == "bare"
    with pytest.raises(ValueError, match="has no chat template"):
        prompt_text(tok, "Q", "chat")


@pytest.mark.slow
def test_generated_metrics_in_evaluate(embedded):
    model, tok = embedded
    req = kne.EditRequest(prompt="The capital of France is", target_new="Rome", subject="France",
                          locality={"L": [{"prompt": "The capital of Japan is", "ground_truth": "Tokyo"}]})
    pre = kne.evaluate(model, tok, [req], generate=True)
    post = kne.evaluate(model, tok, [req], pre=pre, generate=True)
    rec = post.records[0]
    assert rec["generated"]["template"] == "chat" and rec["gen_locality"] == {"L": 1.0}  # the same model
    assert rec["gen_rewrite_acc"] == float(exact_match(rec["generated"]["rewrite"], "Rome"))
    assert post.summary()["gen_locality"] == 1.0


# ---------------------------------------------------------------------------------------------- other subjects
def test_relation_template_comes_from_the_shipped_templates():
    from kne.others import other_subject_prompts, relation_template
    from kne.preservation import template_subjects

    req = kne.EditRequest(prompt="The gender of Anna Sophie Gasteiger is", target_new="male", subject="Anna Sophie Gasteiger")
    t, subs, prompts = other_subject_prompts(req, 3)
    assert t == "The gender of {} is" and subs == template_subjects()[t][:3] and prompts[0] == t.format(subs[0])
    assert relation_template(kne.EditRequest(prompt="Zorbl of Q is", target_new="x", subject="Q")) is None
    assert relation_template(kne.EditRequest(prompt="The gender of X is", target_new="x")) is None  # no subject


def test_other_subjects_by_hand(tiny_model, tok):
    """Two requests: the moved share equals asking the shipped subjects by hand before and after the
    edit; subjects that already answered the target are left out; the model is restored."""
    from kne.others import other_subject_prompts

    model = tiny_model("llama")
    snap = snapshot(model)
    reqs = [kne.EditRequest(prompt="The gender of Anna Sophie Gasteiger is", target_new="male",
                            subject="Anna Sophie Gasteiger"),
            kne.EditRequest(prompt="The occupation of Alex Kontorovich is", target_new="actor",
                            subject="Alex Kontorovich")]

    def answers(prompts, target):
        ev = kne.evaluate(model, tok, [kne.EditRequest(prompt=p, target_new=target) for p in prompts])
        return [r["rewrite_acc"] == 1.0 for r in ev.records]

    pre = kne.evaluate(model, tok, reqs, other_subjects=4)
    already = [answers(other_subject_prompts(r, 4)[2], r.target_new) for r in reqs]
    assert [p["others"]["already"] for p in pre.records] == already
    res = kne.fast_edit(model, tok, reqs, AUTHORS, percentile=50.0, steps=30, lr=0.1, dropout=0.0, stop_loss=0.0)
    post = kne.evaluate(model, tok, reqs, pre=pre, other_subjects=4)
    for r, p, before in zip(reqs, post.records, already):
        t, subs, prompts = other_subject_prompts(r, 4)
        kept = [q for q, a in zip(prompts, before) if not a]
        moved = answers(kept, r.target_new)
        assert p["others"]["moved"] == moved
        assert p["others_moved"] == (sum(moved) / len(moved) if moved else None)
    res.restore()
    assert_state_bits(model, snap, "other subjects are asked without changing the model")


def test_other_subjects_without_a_template_is_a_clear_error(tiny_model, tok, tmp_path, capsys):
    model = tiny_model("llama")
    req = kne.EditRequest(prompt="Zorbl of Q is", target_new="x", subject="Q")
    with pytest.raises(ValueError, match="other_subjects=8: no shipped template asks the relation of this request"):
        kne.evaluate(model, tok, [req], other_subjects=8)
    f = tmp_path / "r.json"
    f.write_text(json.dumps([{"prompt": "Zorbl of Q is", "target_new": "x", "subject": "Q"}]))
    rc = cli.main(["eval", "--data", str(f), "--other-subjects", "8", "--model", "smollm2-135m"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "--other-subjects: no shipped template asks the relation of any of the 1 records of r.json" in err[0]
    assert cli.main(["eval", "--data", str(f), "--other-subjects", "9"]) == 2


# ---------------------------------------------------------------------------------------------- drift
def test_drift_is_zero_unedited_and_positive_after_a_damaging_edit(tiny_model, tok, monkeypatch, tmp_path):
    monkeypatch.setenv("KNE_CACHE", str(tmp_path))
    from kne import drift as D

    monkeypatch.setattr(D, "SEQUENCES", 12)
    model = tiny_model("llama")
    text = D.drift_text(model, tok, sequences=12, new_tokens=6, progress=False)
    assert len(text.sequences) == 12 and (tmp_path / "drift").is_dir()
    assert D.drift_text(model, tok, sequences=12, new_tokens=6, progress=False).sequences == text.sequences  # cached
    monkeypatch.setattr(D, "drift_text", lambda m, t, **k: text)
    pre = kne.evaluate(model, tok, [kne.EditRequest(prompt="Gold is", target_new="gas")], drift=True)
    same = kne.evaluate(model, tok, [kne.EditRequest(prompt="Gold is", target_new="gas")], pre=pre, drift=True)
    assert same.records[0]["drift"] == pytest.approx(0.0, abs=1e-6) and same.records[0]["drift_flips"] == 0.0
    snap = snapshot(model)
    with torch.no_grad():  # a deliberately damaging edit: one FFN output projection scaled up
        model.model.layers[1].mlp.down_proj.weight.mul_(50.0)
    after = kne.evaluate(model, tok, [kne.EditRequest(prompt="Gold is", target_new="gas")], pre=pre, drift=True)
    assert after.records[0]["drift"] > 0.1 and after.records[0]["drift_flips"] > 0.0
    model.load_state_dict(snap)
    assert D.window(3, 8, 12) == [(24 + j) % 12 for j in range(8)]


# ---------------------------------------------------------------------------------------------- runs
def test_the_teacher_forced_metrics_are_unchanged_by_the_new_measures(tiny_model, tok, tmp_path, monkeypatch):
    from kne import drift as D
    from kne.runs import run_edits

    monkeypatch.setenv("KNE_CACHE", str(tmp_path))
    model = tiny_model("llama")
    text = D.drift_text(model, tok, sequences=16, new_tokens=4, progress=False)
    monkeypatch.setattr(D, "drift_text", lambda m, t, **k: text)
    reqs = [kne.EditRequest(prompt="The gender of Anna Sophie Gasteiger is", target_new="male",
                            subject="Anna Sophie Gasteiger",
                            locality={"L": [{"prompt": "The capital of Japan is", "ground_truth": "Tokyo"}]}),
            kne.EditRequest(prompt="Gold is", target_new="gas")]
    cfg = AUTHORS.replace(percentile=90.0, steps=3, lr=5e-2, dropout=0.0)
    for protocol in ("independent", "sequential"):
        plain = run_edits(model, tok, reqs, "kne", cfg, protocol=protocol, progress=False)
        more = run_edits(model, tok, reqs, "kne", cfg, protocol=protocol, progress=False, generate=True,
                         other_subjects=4, drift=True, max_new_tokens=6)
        for a, b in zip(plain["records"], more["records"]):
            for k in ("rewrite_acc", "rephrase_acc", "portability", "locality"):
                assert a[k] == b[k], (protocol, k)
        s = more["summary"]
        assert s["gen_edit_succ"] is not None and s["drift"] is not None
        assert more["records"][0]["others_moved"] is not None or more["records"][0]["others"]["subjects"] == []
        assert "others" not in more["records"][1]  # "Gold is" has no shipped template: no value, no error
        assert all("drift_state" not in r for r in more["records"])
        json.dumps(more)  # the records are JSON


def test_measure_before_is_the_per_request_pre(tiny_model, tok):
    """kne.runs measures the unedited model once for all requests (kne.evaluation.measure_before): the
    generated locality answers and the other subjects it gives each request are what evaluating that
    request alone gives, and only the locality answers are generated."""
    from kne.evaluation import measure_before

    model = tiny_model("llama")
    reqs = [kne.EditRequest(prompt="The gender of Anna Sophie Gasteiger is", target_new="male",
                            subject="Anna Sophie Gasteiger", rephrase_prompt="Anna Sophie Gasteiger's gender is",
                            locality={"L": [{"prompt": "The capital of Japan is", "ground_truth": "Tokyo"},
                                            {"prompt": "Gold is a", "ground_truth": "metal"}]}),
            kne.EditRequest(prompt="The occupation of Alex Kontorovich is", target_new="actor",
                            subject="Alex Kontorovich",
                            locality={"M": [{"prompt": "The sky is", "ground_truth": "blue"}]})]
    got = measure_before(model, tok, reqs, generate=True, max_new_tokens=6, other_subjects=[4, 0])
    for i, r in enumerate(reqs):
        one = kne.evaluate(model, tok, [r], generate=True, max_new_tokens=6,
                           other_subjects=4 if i == 0 else 0).records[0]
        assert got[i]["generated"]["locality"] == one["generated"]["locality"]
        assert got[i]["generated"]["rewrite"] is None and got[i]["generated"]["rephrase"] is None
    assert got[0]["others"] == {k: v for k, v in kne.evaluate(model, tok, [reqs[0]], other_subjects=4)
                                .records[0]["others"].items()}
    assert got[1]["others"] == {"template": None, "subjects": [], "already": []}
    with pytest.raises(ValueError, match="1 other_subjects counts for 2 requests"):
        measure_before(model, tok, reqs, other_subjects=[4])
