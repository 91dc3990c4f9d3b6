"""Hostile use: special output files, one model in two threads, runaway edits, shared modules, and
the unclear errors of odd inputs. Each test here failed on the code before it was written (the
fingerprint, tied-weight and JSON cases are in test_editfile.py and test_compare.py)."""

from __future__ import annotations

import copy
import errno
import json
import os
import stat
import threading
import time
from pathlib import Path

import pytest
import torch

import kne
from kne import cli
from kne.io import write_atomic, write_bytes, write_text
from helpers import AUTHORS, assert_state_bits, snapshot

REQ = {"prompt": "The capital of France is", "target_new": "Rome"}
KW = dict(percentile=90.0, steps=6, stop_loss=0.0, lr=5e-2, dropout=0.0)


def _node(folder: Path, name: str, major: int, minor: int) -> Path:
    """A character device like /dev/null (1, 3) or /dev/full (1, 7), made in a temporary folder."""
    path = folder / name
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
    except PermissionError:
        pytest.skip("making a device node needs root (CAP_MKNOD); the FIFO and symlink tests run anyway")
    return path


# ---------------------------------------------------------------------------------------------- 1. the writer
def test_a_device_is_written_in_place_not_replaced(tmp_path):
    null = _node(tmp_path, "null", 1, 3)
    assert write_text(null, "discarded\n") == null
    assert stat.S_ISCHR(os.stat(null).st_mode), "the device node was replaced by a regular file"
    assert not [p for p in tmp_path.iterdir() if p.name != "null"], "a temporary file was left"


def test_a_full_device_is_an_oserror_naming_it(tmp_path):
    full = _node(tmp_path, "full", 1, 7)
    with pytest.raises(OSError, match=r"cannot write .*full: no space left on the device") as e:
        write_text(full, "x" * 100_000)
    assert e.value.errno == errno.ENOSPC
    assert stat.S_ISCHR(os.stat(full).st_mode)


def test_a_fifo_is_written_through_to_its_reader(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    write_bytes(fifo, b"through the pipe")
    reader.join(10)
    assert got == [b"through the pipe"]
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_a_symlink_is_followed_and_kept(tmp_path):
    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    write_text(link, "new")
    assert link.is_symlink() and real.read_text() == "new"
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(tmp_path / "made.json")
    write_text(dangling, "made")
    assert dangling.is_symlink() and (tmp_path / "made.json").read_text() == "made"
    to_dev = tmp_path / "to-null"
    to_dev.symlink_to(_node(tmp_path, "null", 1, 3))
    write_text(to_dev, "x")
    assert to_dev.is_symlink() and stat.S_ISCHR(os.stat(tmp_path / "null").st_mode)


def test_a_symlink_loop_is_said(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(OSError, match=r"cannot write .*a: a symlink loop") as e:
        write_text(a, "x")
    assert e.value.errno == errno.ELOOP
    with pytest.raises(OSError, match="a symlink loop"):
        kne.io.check_output(str(a), "--out")
    with pytest.raises(OSError, match=r"cannot read KnowEdit file .*a: a symlink loop"):
        kne.load_knowedit(a)
    with pytest.raises(OSError, match=r"cannot read edit file .*a: a symlink loop"):
        kne.read_edit(a)


def test_a_read_only_folder_is_an_oserror_naming_the_path(tmp_path, monkeypatch):
    """Root writes through file modes, so the read-only file system is injected where the
    temporary file is made."""
    real = Path.write_text

    def erofs(self, *a, **k):
        if self.name.endswith(".tmp.json"):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", erofs)
    with pytest.raises(OSError, match=r"cannot write .*out.json: the file system is read-only"):
        write_text(tmp_path / "out.json", "{}")
    assert list(tmp_path.iterdir()) == []


def test_cli_outputs_onto_a_device_leave_it_a_device(tmp_path, capsys):
    """The issue's repro: kne compare --out onto a /dev/null-like node (and kne eval's writer, the same)."""
    null = _node(tmp_path, "null", 1, 3)
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "quality_independent.json"
    rc = cli.main(["compare", str(results), "--a-method", "kne (local)", "--b-method", "ft-m", "--boots", "50",
                   "--out", str(null), "--table", str(null)])
    assert rc == 0, capsys.readouterr().err
    assert stat.S_ISCHR(os.stat(null).st_mode)


def test_save_onto_a_full_device_is_one_oserror(tiny_model, tok, tmp_path):
    full = _node(tmp_path, "full", 1, 7)
    model = tiny_model("llama")
    snap = snapshot(model)
    res = kne.fast_edit(model, tok, REQ, AUTHORS, **KW)
    with pytest.raises(OSError, match=r"cannot write .*full: no space left on the device"):
        res.save(full)
    res.restore()
    assert_state_bits(model, snap)


def test_kne_edit_save_onto_a_full_device_is_one_line(tmp_path, capsys, tiny_model, tok):
    full = _node(tmp_path, "full", 1, 7)
    m = tmp_path / "m"
    tiny_model("llama").save_pretrained(m)
    tok.save_pretrained(m)
    capsys.readouterr()
    rc = cli.main(["edit", "--model", str(m), "--prompt", "The capital of France is", "--target", "Rome",
                   "--preset", "authors", "--steps", "2", "--percentile", "90", "--save", str(full)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith("kne edit: error: cannot write") and "no space left on the device" in err[0]


# ---------------------------------------------------------------------------------------------- 2. threads
def _concurrently(model, tok, at_step, job):
    """Run ``job()`` in another thread while ``fast_edit`` is at step ``at_step`` (its on_step
    callback waits for the job); returns (the edit's result, what the job returned or raised)."""
    box = {}

    def on_step(step, loss):
        if step == at_step:
            def run():
                try:
                    box["value"] = job()
                except BaseException as e:  # noqa: BLE001 - the test reads it
                    box["error"] = e
            t = threading.Thread(target=run)
            t.start()
            t.join(60)

    res = kne.fast_edit(model, tok, REQ, AUTHORS, on_step=on_step, **KW)
    return res, box


def test_a_second_edit_of_the_same_model_is_refused_at_once(tiny_model, tok):
    model = tiny_model("llama")
    solo = kne.fast_edit(model, tok, REQ, AUTHORS, **KW)
    solo_state = snapshot(model)
    solo.restore()
    flags = [p.requires_grad for p in model.parameters()]
    t0 = time.perf_counter()
    res, box = _concurrently(model, tok, 2, lambda: kne.fast_edit(model, tok, {"prompt": "Gold is", "target_new": "gas"},
                                                                   AUTHORS, **KW))
    assert isinstance(box.get("error"), kne.ModelBusyError), box
    assert "being changed by kne.fast_edit in another thread" in str(box["error"])
    assert time.perf_counter() - t0 < 30
    assert_state_bits(model, solo_state, "the edit beside a refused one equals its solo run")
    res.restore()
    assert [p.requires_grad for p in model.parameters()] == flags, "requires_grad flags changed"


@pytest.mark.parametrize("call", ["apply_edit", "revert_edit", "restore", "reference.edit", "ft_m", "locate"])
def test_every_state_change_is_refused_beside_an_edit(tiny_model, tok, tmp_path, call):
    model = tiny_model("llama")
    first = kne.fast_edit(model, tok, REQ, AUTHORS, **KW)
    path = first.save(tmp_path / "e.safetensors")
    jobs = {"apply_edit": lambda: kne.apply_edit(model, path), "revert_edit": lambda: kne.revert_edit(model, path),
            "restore": lambda: first.restore(), "reference.edit": lambda: kne.reference.edit(model, tok, REQ, AUTHORS, **KW),
            "ft_m": lambda: kne.baselines.ft_m(model, tok, REQ, steps=2), "locate": lambda: kne.locate(model, tok, REQ)}
    res, box = _concurrently(model, tok, 1, jobs[call])
    assert isinstance(box.get("error"), kne.ModelBusyError), box
    res.restore()
    first.restore()


def test_other_threads_see_the_unedited_model_during_the_edit(tiny_model, tok):
    model = tiny_model("llama")
    ids = tok("The capital of Japan is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = model(ids).logits.clone()
    res, box = _concurrently(model, tok, 3, lambda: model(ids).logits.detach().clone())
    assert torch.equal(box["value"], before), "a forward in another thread saw the half-trained edit"
    res.restore()


def test_generate_beside_an_edit_neither_crashes_it_nor_changes_it(tiny_model, tok):
    model = tiny_model("llama")
    solo = kne.fast_edit(model, tok, REQ, AUTHORS, **KW)
    solo_state = snapshot(model)
    solo.restore()
    ids = tok("The capital of Japan is", return_tensors="pt")["input_ids"]
    res, box = _concurrently(model, tok, 2, lambda: model.generate(ids, max_new_tokens=5, do_sample=False,
                                                                    pad_token_id=tok.pad_token_id))
    assert "error" not in box, box
    assert_state_bits(model, solo_state, "an edit with generate() beside it equals its solo run")
    res.restore()


def test_readers_during_an_edit_see_the_model_before_or_after_it_never_between(tiny_model, tok):
    """Forwards in another thread, slowed to straddle the merge: each output is the unedited
    model's or the edited model's, bit for bit (before the gate, 58 of 62 were neither)."""
    model = tiny_model("llama")
    ids = tok("The capital of Japan is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = model(ids).logits.clone()
    solo = kne.fast_edit(model, tok, REQ, AUTHORS, **KW)
    with torch.no_grad():
        after = model(ids).logits.clone()
    solo.restore()
    seen, stop = [], threading.Event()

    def slow(module, args, out):
        if threading.current_thread().name == "reader":
            time.sleep(0.005)

    handle = model.model.layers[1].register_forward_hook(slow)

    def reader():
        while not stop.is_set():
            with torch.no_grad():
                out = model(ids).logits
            seen.append("before" if torch.equal(out, before) else "after" if torch.equal(out, after) else "mixed")

    t = threading.Thread(target=reader, name="reader")
    t.start()
    try:
        res = kne.fast_edit(model, tok, REQ, AUTHORS, **KW)
        time.sleep(0.05)
    finally:
        stop.set()
        t.join(30)
        handle.remove()
    assert seen and "mixed" not in seen, seen
    res.restore()


# ---------------------------------------------------------------------------------------------- 3. runaway edits
def test_settings_no_edit_can_use_are_refused():
    for kw, msg in ((dict(lr=1e30), r"lr=1e\+30 is invalid: use a positive learning rate up to 10 with optimizer='adamw'"),
                    (dict(optimizer="ngd", lr=1e30), r"up to 1000 with optimizer='ngd'"),
                    (dict(alpha=1e30), r"alpha=1e\+30 is invalid: use a positive scale up to 1000")):
        with pytest.raises(ValueError, match=msg):
            kne.KNEConfig(**kw)


@pytest.mark.parametrize("edit", ["fast_edit", "reference.edit"])
def test_an_edit_whose_loss_rises_is_refused_and_rolled_back(tiny_model, tok, monkeypatch, edit):
    """Fault injected: every optimizer step pushes the delta up the gradient (what a runaway step
    size does), so the answer loss ends above where it started (fast_edit: the local preset's ngd
    step; the reference: torch's AdamW with the authors' settings)."""
    from kne import editing

    model = tiny_model("llama")
    snap = snapshot(model)

    def ngd_up(deltas, grads, bufs, **kw):
        for d, g in zip(deltas, grads):
            d.add_(g.to(d.dtype), alpha=50.0)

    def adamw_up(self, *a, **k):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data.add_(p.grad, alpha=50.0)

    monkeypatch.setattr(editing, "ngd_update_", ngd_up)
    monkeypatch.setattr(torch.optim.AdamW, "step", adamw_up)
    if edit == "fast_edit":
        call = lambda: kne.fast_edit(model, tok, REQ, steps=4, percentile=90.0, stop_rule="loss", stop_loss=0.0,  # noqa: E731
                                     project=False, preserve_weight=0.0, preserve_answer_end=False)
    else:
        call = lambda: kne.reference.edit(model, tok, REQ, AUTHORS, **dict(KW, steps=4))  # noqa: E731
    with pytest.raises(kne.EditError, match=r"the edit loss rose from .* over 4 step\(s\).*refused and the model left "
                                            r"as it was\. Lower the step size"):
        call()
    assert_state_bits(model, snap, "a refused runaway edit")


def test_the_collapse_check():
    from kne.objective import collapse

    varied = (torch.tensor([3, 5, 7]), torch.tensor([0.2, 0.4, 0.3]))
    assert collapse(varied, (torch.tensor([9, 9, 9]), torch.tensor([0.99, 0.97, 0.98]))).startswith(
        "the edited model predicts the token id 9 at all 3 positions")
    assert collapse(varied, (torch.tensor([9, 9, 9]), torch.tensor([0.99, 0.3, 0.98]))) is None  # not confident
    assert collapse(varied, (torch.tensor([9, 9, 4]), torch.tensor([0.99, 0.97, 0.98]))) is None  # varies
    assert collapse((torch.tensor([9, 9, 9]), torch.tensor([0.9] * 3)), (torch.tensor([9, 9, 9]),
                                                                        torch.tensor([0.99] * 3))) is None  # was so
    assert collapse(varied, (torch.tensor([9]), torch.tensor([0.99]))) is None  # one position tells nothing


def test_a_collapsed_edit_is_refused_and_rolled_back(tiny_model, tok, monkeypatch):
    """Fault injected at the check itself: the edited model's prompt predictions are replaced by one
    confident token; the merge is undone."""
    from kne import editing

    model = tiny_model("llama")
    snap = snapshot(model)
    calls = []
    real = editing.prompt_predictions

    def collapsed_after(m, batch):
        calls.append(1)
        got = real(m, batch)
        return got if len(calls) == 1 else (torch.full_like(got[0], 7), torch.full_like(got[1], 0.99))

    monkeypatch.setattr(editing, "prompt_predictions", collapsed_after)
    with pytest.raises(kne.EditError, match="next-token distribution collapsed; the edit was refused"):
        kne.fast_edit(model, tok, REQ, AUTHORS, **KW)
    assert_state_bits(model, snap, "a collapsed edit is put back")


def test_non_finite_merged_rows_are_refused(tiny_model, tok, monkeypatch):
    from kne import editing

    model = tiny_model("llama")
    snap = snapshot(model)
    real = editing.merged_rows
    monkeypatch.setattr(editing, "merged_rows", lambda base, s, d: real(base, s, d) * float("inf"))
    with pytest.raises(kne.EditError, match="hold NaN or infinity"):
        kne.fast_edit(model, tok, REQ, AUTHORS, **dict(KW, steps=0))
    assert_state_bits(model, snap)


# ---------------------------------------------------------------------------------------------- 6. shared modules
def test_a_module_shared_by_two_layers_is_refused(tiny_model, tok):
    model = tiny_model("llama")
    model.model.layers[1].mlp = model.model.layers[0].mlp
    snap = snapshot(model)
    for fn in (kne.fast_edit, kne.reference.edit):
        with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj is the same module \(or weight\) as "
                                             r"model\.layers\.0\.mlp\.down_proj.*copy\.deepcopy"):
            fn(model, tok, REQ, AUTHORS, **KW)
    assert_state_bits(model, snap)
    assert kne.locate(model, tok, REQ, layers=(0, 2))  # leaving one of them out works


# ---------------------------------------------------------------------------------------------- 9. unclear errors
def test_negative_layers_count_from_the_end(tiny_model, tok):
    model = tiny_model("llama")
    ens = kne.locate(model, tok, REQ, layers=(-1,), percentile=50.0)
    assert set(ens.indices["mlp.down_proj"]) == {2} and ens.config["layers"] == [2]
    res = kne.fast_edit(model, tok, REQ, AUTHORS, layers=(-1,), **KW)
    assert res.config.layers == (2,)
    res.restore()
    with pytest.raises(ValueError, match=r"layers=\(-4,\) has indices \[-4\] outside this model's 3 layers"):
        kne.fast_edit(model, tok, REQ, AUTHORS, layers=(-4,), **KW)
    with pytest.raises(ValueError, match=r"names a layer twice \(as \(2, 2\): -1 is layer 2\)"):
        kne.locate(model, tok, REQ, layers=(2, -1))


def test_a_model_on_the_meta_device_is_refused_up_front(tok):
    from conftest import build_tiny_model

    with torch.device("meta"):
        model = build_tiny_model("llama", tok)
    for fn in (kne.locate, kne.fast_edit):
        with pytest.raises(ValueError, match=r"parameter .* is on the meta device: it holds no values"):
            fn(model, tok, REQ)


def test_odd_data_files_name_the_file(tmp_path):
    gz = tmp_path / "records.json.gz"
    gz.write_text(json.dumps([REQ]))
    with pytest.raises(ValueError, match=r"records\.json\.gz: not a gzip file .*though its name ends in \.gz"):
        kne.load_knowedit(gz)
    u16 = tmp_path / "records.json"
    u16.write_text(json.dumps([REQ]), encoding="utf-16")
    with pytest.raises(ValueError, match=r"records\.json: not UTF-8 text .*UTF-16 byte-order mark"):
        kne.load_knowedit(u16)


def test_write_atomic_keeps_an_old_file_when_the_writer_fails(tmp_path):
    out = tmp_path / "out.bin"
    out.write_bytes(b"old")

    def half(tmp):
        tmp.write_bytes(b"ne")
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

    with pytest.raises(OSError, match="no space left on the device"):
        write_atomic(out, half)
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_kne_apply_refuses_a_fine_tuned_model_unless_forced(tmp_path, capsys, tiny_model, tok):
    m, tuned = tmp_path / "m", tmp_path / "tuned"
    model = tiny_model("llama")
    model.save_pretrained(m)
    tok.save_pretrained(m)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.01)  # a fine-tune of another weight
    model.save_pretrained(tuned)
    tok.save_pretrained(tuned)
    edit = tmp_path / "e.safetensors"
    base = ["--preset", "authors", "--steps", "2", "--percentile", "90"]
    assert cli.main(["edit", "--model", str(m), "--prompt", "The capital of France is", "--target", "Rome",
                     "--save", str(edit), *base]) == 0
    capsys.readouterr()
    assert cli.main(["apply", str(edit), "--model", str(m), "--save-model", str(tmp_path / "out")]) == 0
    assert "applied" in capsys.readouterr().out
    applied, _ = kne.load_model(tmp_path / "out")
    assert kne.revert_edit(applied, edit) > 0  # the saved model holds the edit
    rc = cli.main(["apply", str(edit), "--model", str(tuned), "--save-model", str(tmp_path / "out2")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "this file was made for another model" in err[0] and "--force" in err[0], err
    assert not (tmp_path / "out2").exists()
    assert cli.main(["apply", str(edit), "--model", str(tuned), "--save-model", str(tmp_path / "out2"), "--force"]) == 0
    err = capsys.readouterr().err
    assert "kne apply: warning: e.safetensors: apply with force=True on a model the file was not made for" in err
