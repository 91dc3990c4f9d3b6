"""kne.Editor: a sequence of edits with its kept keys in a bounded sketch, undo rows off the heap,
save/load, capacity errors. Tiny models (hidden 32, FFN 48: the down_proj key space is 48 wide)."""

import copy
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kne
from kne import nullspace
from kne.nullspace import KeySketch

from helpers import assert_state_bits, rel_err, snapshot

FACTS = [("Tin is", "red", "Tin"), ("Iron is", "blue", "Iron"), ("Gold is", "green", "Gold"),
         ("Lead is", "pink", "Lead"), ("Zinc is", "grey", "Zinc"), ("Neon is", "warm", "Neon"),
         ("Salt is", "sweet", "Salt"), ("Snow is", "black", "Snow")]
SHORT = ["Rome,"]  # one short neighbour per edit: most of the 48 key directions stay free
# local preset on the tiny models: a large ensemble so edits land; forced steps where rows are compared
LOCAL = dict(percentile=50.0, steps=60)
FORCED = dict(percentile=50.0, steps=4, stop_loss=0.0, stop_rule="loss", preserve_count=1)


def fact(i):
    p, t, s = FACTS[i % len(FACTS)]
    return {"prompt": p if i < len(FACTS) else f"{p} ({i})", "target_new": t, "subject": s}


def make(model, tok, **kw):
    cfg = kne.KNEConfig.preset("local", **{k: v for k, v in kw.items() if k not in ("sketch_rank", "method",
                                                                                   "require_landed", "directory")})
    return kne.Editor(model, tok, cfg, **{k: v for k, v in kw.items() if k in ("sketch_rank", "method",
                                                                               "require_landed", "directory")})


# ------------------------------------------------------------------------------------ the sketch
def test_sketch_is_exact_until_full_then_within_the_frequent_directions_bound(gen):
    """B^T B == K^T K until the first shrink; after it 0 <= K^T K - B^T B and its largest eigenvalue
    is at most ||K||_F^2 / rank (Liberty 2013). Memory is the formula and never grows."""
    d, rank = 40, 6
    sk = KeySketch({"m": d}, rank)
    assert sk.nbytes == 8 * rank * d
    rows = [torch.randn(5, d, generator=gen) * torch.linspace(3, 0.1, d) for _ in range(30)]
    K = torch.cat(rows[:2]).double()
    for r in rows[:2]:
        sk.add("m", r)
    assert sk.shrinks == 0
    torch.testing.assert_close(sk.moment("m"), K.t() @ K, rtol=1e-6, atol=1e-5)
    for r in rows[2:]:
        sk.add("m", r)
    K = torch.cat(rows).double()
    assert sk.shrinks > 0 and sk.nbytes == 8 * rank * d
    diff = torch.linalg.eigvalsh(K.t() @ K - sk.moment("m"))
    assert float(diff.min()) > -1e-6 * float(K.pow(2).sum())
    assert float(diff.max()) <= float(K.pow(2).sum()) / rank * (1 + 1e-6)
    with pytest.raises(ValueError, match="non-finite"):
        sk.add("m", torch.full((1, d), float("nan")))
    with pytest.raises(KeyError, match="holds no module instance"):
        sk.rows("other")


def test_sketch_shrinks_are_staggered_across_instances_and_keep_the_bound(gen):
    """Instances fed the same number of rows per edit do not all shrink at the same edit (at most
    ceil(M / spread) + 1 of M per edit, not all M), each stays within the Frequent-Directions bound,
    and a saved sketch goes on with the same schedule."""
    d, rank, m, per_edit = 24, 8, 8, 3
    widths = {f"layers.{j}.mlp.down_proj": d for j in range(m)}
    plain, stag = KeySketch(widths, rank, stagger=False), KeySketch(widths, rank)
    fed = {p: [] for p in widths}
    worst = {"plain": 0, "stag": 0}
    for e in range(60):
        if e == 30:  # save and load half-way: the rest of the schedule is kept
            stag = KeySketch.from_state(json.loads(json.dumps(stag.meta())), stag.state_dict())
        before = (plain.shrinks, stag.shrinks)
        for p in widths:
            rows = torch.randn(per_edit, d, generator=gen) * torch.linspace(3, 0.1, d)
            fed[p].append(rows)
            plain.add(p, rows)
            stag.add(p, rows)
        worst["plain"] = max(worst["plain"], plain.shrinks - before[0])
        worst["stag"] = max(worst["stag"], stag.shrinks - before[1])
    assert worst["plain"] == m  # every instance shrinks at the same edit
    spread = rank // per_edit  # edits over which the first shrinks spread
    assert worst["stag"] <= -(-m // spread) + 1, worst
    assert stag.shrinks <= plain.shrinks + m  # at most one more shrink per instance
    for p in widths:
        K = torch.cat(fed[p]).double()
        diff = torch.linalg.eigvalsh(K.t() @ K - stag.moment(p))
        assert float(diff.min()) > -1e-6 * float(K.pow(2).sum())
        assert float(diff.max()) <= float(K.pow(2).sum()) / rank * (1 + 1e-6)
    meta = stag.meta()
    meta["first_shrink"] = {next(iter(widths)): 10_000}
    fresh = KeySketch(widths, rank)
    with pytest.raises(ValueError, match="damaged"):
        KeySketch.from_state(meta, fresh.state_dict())


def test_sketch_rank_fits_the_budget():
    assert nullspace.sketch_rank([11008] * 32, 0.1 * 6.74e9 * 2) == 478  # Llama-2-7B's down_proj, bf16 model
    assert 8 * 478 * 11008 * 32 <= 0.1 * 6.74e9 * 2
    assert nullspace.sketch_rank([48, 48], 10) == 1
    assert nullspace.sketch_rank([48], 1e9) == 48


# ---------------------------------------------------------------------------- the editor's edits
def test_editor_matches_the_reference_over_five_edits(tiny_model, tok):
    """The same 5-edit sequence by Editor(method="kne") and Editor(method="reference") on two copies:
    the same rows after every edit (the fast path's tolerance against the reference)."""
    model = tiny_model("llama", seed=3)
    other = copy.deepcopy(model)
    fast = make(model, tok, method="kne", require_landed=False, sketch_rank=8, **FORCED)
    ref = make(other, tok, method="reference", require_landed=False, sketch_rank=8, **FORCED)
    for i in range(5):
        a = fast.edit(fact(i), preserve_prompts=SHORT)
        b = ref.edit(fact(i), preserve_prompts=SHORT)
        assert a.ensemble.indices.keys() == b.ensemble.indices.keys()
        for (n, p), q in zip(model.named_parameters(), other.parameters()):
            assert rel_err(p.detach(), q.detach()) < 1e-4, (i, n)
        for path in fast.state.widths:  # rows are signed and rotated by the SVD: their second moments
            assert rel_err(fast.state.moment(path), ref.state.moment(path)) < 1e-3, (i, path)
    assert fast.state.shrinks > 0  # the sketch was full at least once: its shrink is compared too


def test_undo_all_is_bit_exact_after_fifty_edits(tiny_model, tok):
    model = tiny_model("llama", seed=1)
    snap = snapshot(model)
    ed = make(model, tok, require_landed=False, sketch_rank=4, **dict(FORCED, steps=2))
    for i in range(50):
        ed.edit(fact(i), preserve_prompts=SHORT)
    assert len(ed.edits) == 50 and ed.stats["undo_bytes"] > 0
    last = ed.edits[-1]
    ed.undo()
    assert last.restored and len(ed) == 49
    ed.undo_all()
    assert_state_bits(model, snap)
    assert len(ed) == 0 and ed.stats["undo_bytes"] == 0 and ed.stats["kept_rows"] == 0
    with pytest.raises(ValueError, match="nothing to undo"):
        ed.undo()


def test_undo_rows_live_in_the_file_not_on_the_heap(tiny_model, tok):
    model = tiny_model("llama")
    ed = make(model, tok, require_landed=False, **FORCED)
    res = ed.edit(fact(0), preserve_prompts=SHORT)
    assert all(callable(base) for _, _, _, base in res._saved)
    assert (ed.directory / "rows.bin").stat().st_size == ed.stats["undo_bytes"] > 0
    res.restore()  # an editor's result restores on its own too, reading the file
    assert res.restored


def test_an_interrupted_edit_leaves_model_state_and_file_as_they_were(tiny_model, tok, monkeypatch):
    model = tiny_model("llama")
    ed = make(model, tok, require_landed=False, **FORCED)
    ed.edit(fact(0), preserve_prompts=SHORT)
    snap, rows = snapshot(model), {p: ed.state.rows(p).clone() for p in ed.state.widths}
    size = ed.stats["undo_bytes"]
    for where in ("_kept_keys", "put"):
        def boom(*a, **k):
            raise KeyboardInterrupt

        target = ed if where == "_kept_keys" else ed._rows
        monkeypatch.setattr(target, where, boom)
        with pytest.raises(KeyboardInterrupt):
            ed.edit(fact(1), preserve_prompts=SHORT)
        monkeypatch.undo()
        assert_state_bits(model, snap)
        assert len(ed) == 1 and ed.stats["undo_bytes"] == size
        assert all(torch.equal(ed.state.rows(p), r) for p, r in rows.items())


def test_state_update_equals_recomputation_from_scratch(tiny_model, tok, monkeypatch):
    """After N = 1, 10, 30 edits the sketch against the second moment of every kept key computed from
    scratch: (a) of the keys each edit handed to it (exact while the sketch is not full, then within
    the Frequent-Directions bound), and (b) of the keys read again now from the edited model over every
    edit's kept sequences (kne.nullspace.kept_keys, what keep= would read): the same up to how much
    later edits moved those keys."""
    handed = []
    real = kne.Editor._kept_keys

    def spy(self, res):
        out = real(self, res)
        handed.append(out)
        return out

    monkeypatch.setattr(kne.Editor, "_kept_keys", spy)
    for n, rank in ((1, 48), (10, 8), (30, 6)):
        handed.clear()
        model = tiny_model("llama", seed=2)
        # the answer positions only: fewer kept rows, so the basis never fills the 48-wide key space
        ed = make(model, tok, require_landed=False, sketch_rank=rank, keep_positions="answer", **FORCED)
        for i in range(n):
            ed.edit(fact(i), preserve_prompts=SHORT)
        paths = list(ed.state.widths)
        sites = [ed._sites[p] for p in paths]
        per_edit = [nullspace.kept_keys(model, tok, sites, nullspace.kept_texts([r], tok, ed.config))
                    for r in ed.edits]  # each edit's own (a neighbour two edits share counts twice, as added)
        for j, p in enumerate(paths):
            K = torch.cat([h[p] for h in handed]).double()
            got, want = ed.state.moment(p), K.t() @ K
            energy = float(K.pow(2).sum())
            assert ed.state.rows_added[p] == K.shape[0], p
            if n == 1:
                assert ed.state.shrinks == 0
                assert rel_err(got, want) < 1e-6, (n, p)
            else:
                assert ed.state.shrinks > 0
                diff = torch.linalg.eigvalsh(want - got)
                assert float(diff.min()) >= -1e-5 * energy, (n, p)
                assert float(diff.max()) <= energy / rank * (1 + 1e-5), (n, p)
            again = torch.cat([e[j] for e in per_edit]).double()
            assert again.shape == K.shape
            moved = rel_err(again, K)  # later edits change the keys of layers after the ones they edit
            assert rel_err(again.t() @ again, want) <= 3 * moved + 1e-6, (n, p)
            if n == 1 or p == paths[0]:  # nothing edited before them: the same keys
                assert moved < 1e-6, (n, p, moved)


def test_the_work_per_edit_does_not_grow_with_the_number_of_edits(tiny_model, tok, monkeypatch):
    """Counted, not timed: each edit reads the keys of its own kept sequences only (never the earlier
    edits'), and the sketch's multiply-adds per edit stay within a bound set by that edit's rows."""
    model = tiny_model("llama")
    rank = 5
    ed = make(model, tok, require_landed=False, sketch_rank=rank, **FORCED)
    read = []
    real = nullspace.kept_keys

    def counting(model_, tok_, sites, seqs, *a, **k):
        read.append(len(seqs))
        return real(model_, tok_, sites, seqs, *a, **k)

    monkeypatch.setattr(kne.editor, "kept_keys", counting)
    ops = []
    for i in range(30):
        before, rows_before = ed.state.ops, sum(ed.state.rows_added.values())
        ed.edit(fact(i), preserve_prompts=SHORT)
        new_rows = sum(ed.state.rows_added.values()) - rows_before
        ops.append(ed.state.ops - before)
        d, n_sites = 48, len(ed.state.widths)
        bound = new_rows * d + (new_rows / rank + n_sites) * 2 * (2 * rank) ** 2 * d
        assert ops[-1] <= bound, (i, ops[-1], bound)
    assert read == [2] * 30  # prompt + answer, and the one neighbour: the same at edit 1 and edit 30
    assert max(ops[20:]) <= max(ops[:10]) * 1.5


def test_save_then_load_in_a_fresh_process_then_continue_equals_an_uninterrupted_run(tiny_model, tok, tmp_path):
    model = tiny_model("llama", seed=4)
    ed = make(model, tok, require_landed=False, sketch_rank=6, **FORCED)
    for i in range(3):
        ed.edit(fact(i), preserve_prompts=SHORT)
    ed.save(tmp_path / "seq")
    for i in range(3, 5):
        ed.edit(fact(i), preserve_prompts=SHORT)
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, tmp_path / "straight.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path[:0] = [{str(Path(__file__).parent)!r}]
        from conftest import build_tiny_model, _byte_tokenizer
        import kne
        from test_editor import FACTS, SHORT, fact
        tok = _byte_tokenizer()
        model = build_tiny_model("llama", tok, 4)
        ed = kne.Editor.load(model, tok, {str(tmp_path / 'seq')!r})
        assert not ed.require_landed  # as saved
        assert len(ed.edits) == 3, len(ed.edits)
        for i in range(3, 5):
            ed.edit(fact(i), preserve_prompts=SHORT)
        torch.save(model.state_dict(), {str(tmp_path / 'resumed.pt')!r})
        ed.undo_all()
        fresh = build_tiny_model("llama", tok, 4)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    straight, resumed = torch.load(tmp_path / "straight.pt"), torch.load(tmp_path / "resumed.pt")
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=1e-6, atol=1e-7, msg=k)


def test_an_interrupted_save_leaves_the_old_save_whole(tiny_model, tok, tmp_path, monkeypatch):
    model = tiny_model("llama")
    ed = make(model, tok, require_landed=False, **FORCED)
    ed.edit(fact(0), preserve_prompts=SHORT)
    ed.save(tmp_path / "seq")
    head = (tmp_path / "seq" / "HEAD").read_text()
    ed.edit(fact(1), preserve_prompts=SHORT)
    real = os.replace
    for where in ("copy", "replace"):
        def boom(*a, **k):
            raise KeyboardInterrupt

        if where == "copy":
            monkeypatch.setattr(ed._rows, "copy_to", boom)
        else:
            monkeypatch.setattr(kne.editor.os, "replace", boom)
        with pytest.raises(KeyboardInterrupt):
            ed.save(tmp_path / "seq")
        monkeypatch.undo()
        assert (tmp_path / "seq" / "HEAD").read_text() == head
        assert [p.name for p in (tmp_path / "seq").iterdir() if p.name != "HEAD"] == [head.split()[0]]
    assert os.replace is real
    fresh = tiny_model("llama")
    assert len(kne.Editor.load(fresh, tok, tmp_path / "seq").edits) == 1
    ed.save(tmp_path / "seq")  # a later save goes through and replaces it
    assert len(kne.Editor.load(tiny_model("llama"), tok, tmp_path / "seq").edits) == 2


def test_load_refuses_another_or_an_edited_model_and_a_damaged_save(tiny_model, tok, tmp_path):
    model = tiny_model("llama")
    ed = make(model, tok, require_landed=False, **FORCED)
    ed.edit(fact(0), preserve_prompts=SHORT)
    ed.save(tmp_path / "seq")
    with pytest.raises(ValueError, match="made for another model"):
        kne.Editor.load(tiny_model("llama", seed=9), tok, tmp_path / "seq")
    with pytest.raises(ValueError, match="needs the model the sequence started from"):
        kne.Editor.load(model, tok, tmp_path / "seq")  # the edit is already on it
    gen = tmp_path / "seq" / (tmp_path / "seq" / "HEAD").read_text().split()[0]
    doc = json.loads((gen / "editor.json").read_text())
    doc["seconds"] = [1.0]
    (gen / "editor.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="changed after it was written"):
        kne.Editor.load(tiny_model("llama"), tok, tmp_path / "seq")
    with pytest.raises(FileNotFoundError, match="no HEAD"):
        kne.Editor.load(model, tok, tmp_path)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="no saved editor"):
        ed.save(tmp_path / "junk")


# ------------------------------------------------------------------------------------- capacity
def test_a_full_key_space_is_a_capacity_error_naming_the_options(tiny_model, tok):
    """Neighbours of every token fill the 48-wide key space of a tiny model in a few edits; the next
    edit is refused before any step (CapacityError, the model unchanged), and stats show the share."""
    model = tiny_model("llama")
    ed = make(model, tok, require_landed=False, sketch_rank=48, **FORCED)
    with pytest.raises(kne.CapacityError) as err:
        for i in range(40):
            ed.edit(fact(i), preserve_prompts=["Berlin and Rome"])
    assert len(ed) >= 1
    msg = str(err.value)
    for option in ("a batch", "keep_rtol", "sketch rank", "other layers"):
        assert option in msg, option
    assert err.value.capacity and all(v == 1.0 for v in err.value.capacity.values())
    assert ed.stats["capacity_max"] > 0.5


def test_an_edit_that_does_not_land_is_refused_and_says_why(tiny_model, tok):
    model = tiny_model("llama")
    snap = snapshot(model)
    ed = make(model, tok, percentile=95.0, steps=3)  # too few neurons, too few steps: no landing
    with pytest.raises(kne.EditError, match="did not land within 3 steps") as err:
        ed.edit(fact(1), preserve_prompts=SHORT)
    assert re.search(r"let \d+% of each step through", str(err.value))
    assert not isinstance(err.value, kne.CapacityError)
    assert_state_bits(model, snap)
    assert len(ed) == 0 and ed.stats["undo_bytes"] == 0 and ed.stats["kept_rows"] == 0


# ---------------------------------------------------------------------------------------- batches
def test_a_batch_of_one_is_the_single_edit_and_a_batch_does_not_depend_on_its_order(tiny_model, tok):
    a, b, c = (tiny_model("llama", seed=5) for _ in range(3))
    ea, eb, ec = (make(m, tok, require_landed=False, **FORCED) for m in (a, b, c))
    ea.edit(fact(0), preserve_prompts=SHORT)
    eb.edit([fact(0)], preserve_prompts=SHORT)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    plain = tiny_model("llama", seed=5)  # and the first edit of an editor is fast_edit's
    kne.fast_edit(plain, tok, fact(0), ea.config, preserve_prompts=SHORT)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), plain.parameters()))
    eb.edit([fact(1), fact(2)], preserve_prompts=SHORT)
    ec.edit(fact(0), preserve_prompts=SHORT)
    ec.edit([fact(2), fact(1)], preserve_prompts=SHORT)
    for p, q in zip(b.parameters(), c.parameters()):
        assert rel_err(p.detach(), q.detach()) < 1e-5


def test_editor_arguments_are_checked(tiny_model, tok, tmp_path):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="method must be one of"):
        kne.Editor(model, tok, method="rome")
    (tmp_path / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        kne.Editor(model, tok, directory=tmp_path)
    with pytest.raises(ValueError, match="state must be a kne.nullspace.KeySketch"):
        kne.fast_edit(model, tok, fact(0), state=object())
    ed = kne.Editor(model, tok, kne.KNEConfig.preset("tuned"))
    assert ed.state is None and ed.stats["state_bytes"] == 0
