"""Compact edit files: save / apply / revert round trips, refusals, integrity, all-or-nothing
checks (the fault-injection cases are in test_faults.py)."""

import json
import warnings

import pytest
import torch

import kne
from helpers import AUTHORS, assert_state_bits, assert_state_equal, rewrite_edit, snapshot

REQ = {"prompt": "The capital of France is", "target_new": "Rome"}


@pytest.mark.parametrize("model_type, axis", [("llama", "out"), ("gpt2", "in"), ("opt", "out")])
def test_save_apply_revert_round_trip_bit_exact(model_type, axis, tiny_model, tok, tmp_path):
    model = tiny_model(model_type)
    orig = snapshot(model)
    res = kne.fast_edit(model, tok, REQ, AUTHORS, neuron_axis=axis, percentile=90.0, steps=4, lr=5e-2)
    edited = snapshot(model)
    path = res.save(tmp_path / "edit.safetensors")
    meta, tensors = kne.read_edit(path)
    assert meta["format"] == "kne.edit/3" and meta["requests"][0]["target_new"] == "Rome"
    assert len(meta["sites"]) == len(res._saved) > 0
    # only what changed: the file holds the edited rows twice (new, orig) plus indices
    n_rows = sum(t.numel() for k, t in tensors.items() if not k.endswith(".index"))
    assert n_rows == 2 * res.stats["params_edited"]
    res.restore()
    assert_state_equal(model, orig, "after restore")
    assert kne.apply_edit(model, path) == len(meta["sites"])
    assert_state_equal(model, edited, "after apply_edit")
    with pytest.raises(ValueError, match="already holds the edited values"):
        kne.apply_edit(model, path)
    assert kne.revert_edit(model, path) == len(meta["sites"])
    assert_state_equal(model, orig, "after revert_edit")
    with pytest.raises(ValueError, match="never applied, or reverted already"):
        kne.revert_edit(model, path)


def test_refuses_another_model_and_changed_rows(tiny_model, tok, tmp_path):
    model = tiny_model("llama")
    res = kne.fast_edit(model, tok, REQ, AUTHORS, percentile=90.0, steps=3, lr=5e-2)
    path = res.save(tmp_path / "e.safetensors")
    res.restore()
    other = tiny_model("gpt2")
    snap = snapshot(other)
    with pytest.raises(ValueError, match="made for another model"):
        kne.apply_edit(other, path)
    assert_state_equal(other, snap, "a refused model")
    # same architecture, but the rows the edit replaces were changed meanwhile
    site, dim, idx, _ = res._saved[0]
    with torch.no_grad():
        site.weight().index_fill_(dim, idx[:1], 0.5)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="another edit changed these values"):
        kne.apply_edit(model, path)
    assert_state_equal(model, snap, "nothing is written on a refusal")


def test_save_after_restore_and_bad_files(tiny_model, tok, tmp_path):
    model = tiny_model("llama")
    res = kne.fast_edit(model, tok, REQ, AUTHORS, percentile=90.0, steps=2)
    res.restore()
    with pytest.raises(ValueError, match="was restored"):
        res.save(tmp_path / "x.safetensors")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a kne edit"):
        kne.read_edit(tmp_path / "plain.safetensors")
    with pytest.raises(FileNotFoundError):
        kne.apply_edit(model, tmp_path / "missing.safetensors")


@pytest.mark.slow
def test_embedded_model_edit_file_is_small(embedded, tmp_path):
    model, tok = embedded
    snap = snapshot(model)
    res = kne.fast_edit(model, tok, REQ, AUTHORS, stop_loss=0.1)
    path = res.save(tmp_path / "france.safetensors")
    edited = {k: v.clone() for k, v in model.state_dict().items() if not torch.equal(v, snap[k])}
    res.restore()
    size = path.stat().st_size
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert size < 0.01 * model_bytes, (size, model_bytes)  # about 2 MB against 540 MB
    kne.apply_edit(model, path)
    for k, v in edited.items():
        assert torch.equal(model.state_dict()[k], v)
    kne.revert_edit(model, path)
    assert_state_equal(model, snap)


# ---------------------------------------------------------------------------------------------- issue 10
# Each of these failed before edit files were verified and applied all-or-nothing.
FORMATS = ["kne.edit/1", "kne.edit/3"]


@pytest.fixture
def saved(tiny_model, tok, tmp_path):
    """``(model, path, original state, edited state)``: a llama edit of ffn_in and ffn_out with at
    least three sites, saved and restored."""
    model = tiny_model("llama")
    orig = snapshot(model)
    res = kne.fast_edit(model, tok, REQ, AUTHORS, target_modules=("ffn_in", "ffn_out"), percentile=90.0, steps=3, lr=5e-2)
    assert len(res._saved) >= 3, "the fixture needs several sites"
    edited = snapshot(model)
    path = res.save(tmp_path / "edit.safetensors")
    res.restore()
    assert_state_bits(model, orig, "after restore")
    return model, path, orig, edited


def _last(meta):
    return meta["sites"][-1]["i"]


def _refused(model, path, snap, match, fn=kne.apply_edit):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # kne.edit/1 copies warn that they carry no digest
        with pytest.raises(ValueError, match=match):
            fn(model, path)
    assert_state_bits(model, snap, "a refused file must write nothing")


@pytest.mark.parametrize("fmt", FORMATS)
def test_bad_last_site_index_dtype_writes_nothing(saved, tmp_path, fmt):
    model, path, orig, _ = saved

    def int32_index(meta, t):
        t[f"{_last(meta)}.index"] = t[f"{_last(meta)}.index"].to(torch.int32)

    bad = rewrite_edit(path, tmp_path / "bad.safetensors", int32_index, fmt)
    _refused(model, bad, orig, r"bad\.safetensors: bad edit file: field '\d+\.index' must be a 1-D int64 tensor")


@pytest.mark.parametrize("fmt", FORMATS)
def test_wrong_shape_new_on_last_site_writes_nothing(saved, tmp_path, fmt):
    model, path, orig, _ = saved

    def short_new(meta, t):
        t[f"{_last(meta)}.new"] = t[f"{_last(meta)}.new"][..., :-1].contiguous()

    bad = rewrite_edit(path, tmp_path / "bad.safetensors", short_new, fmt)
    _refused(model, bad, orig, r"field '\d+\.new' must be torch.float32 \[")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("how", ["out of range", "negative", "duplicate"])
def test_bad_index_values_are_value_errors(saved, tmp_path, fmt, how):
    model, path, orig, _ = saved

    def mutate(meta, t):
        i = _last(meta)
        idx = t[f"{i}.index"].clone()
        site = meta["sites"][-1]
        if how == "out of range":
            idx[-1] = site["weight_shape"][site["dim"]]
        elif how == "negative":
            idx[0] = -1
        else:  # a row listed twice, with consistent new/orig rows: it would be written twice
            idx = torch.cat([idx, idx[:1]])
            for k in ("new", "orig"):
                x = t[f"{i}.{k}"]
                t[f"{i}.{k}"] = torch.cat([x, x.narrow(site["dim"], 0, 1)], dim=site["dim"]).contiguous()
        t[f"{i}.index"] = idx

    bad = rewrite_edit(path, tmp_path / "bad.safetensors", mutate, fmt)
    match = r"field '\d+\.index' holds a row/column more than once" if how == "duplicate" else \
        r"field '\d+\.index' holds -?\d+, outside \[0, \d+\)"
    _refused(model, bad, orig, match)


@pytest.mark.parametrize("fmt", FORMATS)
def test_non_finite_new_rows_are_refused(saved, tmp_path, fmt):
    model, path, orig, _ = saved

    def nan_rows(meta, t):
        t[f"{_last(meta)}.new"][0].fill_(float("nan"))

    bad = rewrite_edit(path, tmp_path / "bad.safetensors", nan_rows, fmt)
    _refused(model, bad, orig, r"field '\d+\.new' holds NaN or infinity")


def test_flipped_byte_fails_the_digest(saved, tmp_path):
    model, path, orig, _ = saved
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = json.loads(header["__metadata__"]["kne"])
    # flip the lowest bit of one float32 of the last site's new rows: a value that still looks sane
    start, end = header[f"{_last(meta)}.new"]["data_offsets"]
    pos = 8 + n + start + ((end - start) // 8) * 4
    data[pos] ^= 1
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(data))
    _refused(model, bad, orig, r"flipped\.safetensors: the content digest does not match")
    _, tensors = kne.read_edit(path)  # the intact file still reads
    assert tensors


def test_hand_edited_field_fails_the_digest(saved, tmp_path):
    model, path, orig, _ = saved
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    meta = json.loads(header["__metadata__"]["kne"])
    meta["sites"][0]["layer"] = 7  # an informational field, no structural check catches it
    header["__metadata__"]["kne"] = json.dumps(meta)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    bad = tmp_path / "edited.safetensors"
    bad.write_bytes(len(h).to_bytes(8, "little") + h + raw[8 + n:])
    _refused(model, bad, orig, r"field 'digest.sha256'")


def _drop_sites(meta, t):
    del meta["sites"]


def _garbage_site(meta, t):
    meta["sites"][0] = "garbage"


def _bad_dim(meta, t):
    meta["sites"][1]["dim"] = 5


def _bool_dim(meta, t):
    meta["sites"][1]["dim"] = True


def _bad_shape(meta, t):
    meta["sites"][0]["weight_shape"] = "48x32"


def _missing_tensor(meta, t):
    meta["sites"][-1]["i"] = 99


def _no_model(meta, t):
    del meta["model"]


def _two_sites_one_module(meta, t):
    meta["sites"][1]["path"] = meta["sites"][0]["path"]


def _bad_dtype(meta, t):
    meta["sites"][0]["dtype"] = "float32"


def _unknown_module(meta, t):
    meta["sites"][0]["path"] = "model.layers.0.mlp.nothing"


def _flip_transposed(meta, t):
    meta["sites"][0]["transposed"] = True


def _extra_tensor(meta, t):
    t["junk"] = torch.zeros(2)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mutate, match", [
    (_drop_sites, r"field 'sites' is missing"),
    (_garbage_site, r"field 'sites\[0\]' must be an object"),
    (_bad_dim, r"field 'sites\[1\]\.dim' must be 0 \(rows\) or 1 \(columns\), got 5"),
    (_bool_dim, r"field 'sites\[1\]\.dim' must be 0 \(rows\) or 1 \(columns\), got True"),
    (_bad_shape, r"field 'sites\[0\]\.weight_shape' must be \[out, in\]"),
    (_missing_tensor, r"field '99\.index' \(the index tensor of sites\[\d+\]\) is missing"),
    (_no_model, r"field 'model' is missing"),
    (_two_sites_one_module, r"field 'sites\[1\]\.path' names .* again"),
    (_bad_dtype, r"field 'sites\[0\]\.dtype' must be one of"),
    (_unknown_module, r"has no module 'model\.layers\.0\.mlp\.nothing' \(field sites\[0\]\.path\)"),
    (_flip_transposed, r"field sites\[0\]\.transposed is True"),
    (_extra_tensor, r"field 'junk' is a tensor that belongs to no site"),
], ids=lambda x: getattr(x, "__name__", "")[1:] if callable(x) else "")
def test_tampered_metadata_is_a_value_error_naming_file_and_field(saved, tmp_path, fmt, mutate, match):
    """Never a KeyError/IndexError/AttributeError/TypeError: one ValueError with the file and the field."""
    model, path, orig, edited = saved
    bad = rewrite_edit(path, tmp_path / "tampered.safetensors", mutate, fmt)
    for fn in (kne.apply_edit, kne.revert_edit):
        _refused(model, bad, orig, "tampered.safetensors.*" + match, fn)
    if mutate not in (_unknown_module, _flip_transposed):  # those need a model to be found wrong
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            with pytest.raises(ValueError, match=match):
                kne.read_edit(bad)


def test_header_that_is_not_json_or_not_safetensors(saved, tmp_path):
    model, path, orig, _ = saved
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "nojson.safetensors"), metadata={"kne": "{not json"})
    _refused(model, tmp_path / "nojson.safetensors", orig, r"nojson\.safetensors: bad edit file: field 'kne' .* not valid JSON")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    _refused(model, tmp_path / "junk.safetensors", orig, r"junk\.safetensors: not a readable safetensors file")
    data = path.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) - 100])
    _refused(model, tmp_path / "truncated.safetensors", orig, r"truncated\.safetensors: not a readable safetensors file")


def test_directory_path_says_it_is_a_directory(saved, tmp_path):
    model, path, orig, _ = saved
    with pytest.raises(IsADirectoryError, match="is a directory"):
        kne.apply_edit(model, tmp_path)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        kne.read_edit(tmp_path)
    assert_state_bits(model, orig)


def test_save_to_a_directory_path_says_so(tiny_model, tok, tmp_path):
    model = tiny_model("llama")
    res = kne.fast_edit(model, tok, REQ, AUTHORS, percentile=90.0, steps=2)
    with pytest.raises(IsADirectoryError, match="is a directory: give the edit file a name"):
        res.save(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [], "no temporary file left behind"


def test_same_shapes_other_weights_is_another_model(saved, tiny_model, tmp_path):
    """Another model of the same architecture (another seed): told it is another model, by the value
    fingerprint, not that another edit changed the rows."""
    _, path, _, _ = saved
    other = tiny_model("llama", seed=1)
    snap = snapshot(other)
    for fn in (kne.apply_edit, kne.revert_edit):
        with pytest.raises(ValueError, match=r"this file was made for another model \(fingerprint [0-9a-f]{16} "):
            fn(other, path)
    assert_state_bits(other, snap)


def test_value_fingerprint_ignores_edits_and_sees_other_weights(saved, tiny_model):
    model, path, orig, edited = saved
    from kne.editfile import value_fingerprint

    kinds = ["mlp.up_proj", "mlp.down_proj"]
    fp = value_fingerprint(model, kinds)
    assert fp["parameters"] > 1 and fp["excluded"] == sorted(kinds)
    kne.apply_edit(model, path)
    assert value_fingerprint(model, kinds) == fp, "an edit changed the value fingerprint"
    kne.revert_edit(model, path)
    other = tiny_model("llama")
    assert value_fingerprint(other, kinds) == fp
    with torch.no_grad():
        other.model.norm.weight[3] += 1e-3  # one norm value of another model
    assert value_fingerprint(other, kinds) != fp


@pytest.mark.parametrize("change", ["attention rows nudged (a merged attention-only LoRA)", "up_proj fine-tuned",
                                    "gate_proj fine-tuned", "lm_head changed"])
def test_a_file_refuses_a_model_fine_tuned_elsewhere(tiny_model, tok, tmp_path, change):
    """kne.edit/3 fingerprints every weight but the edited kind: a file made on one model is refused
    by a copy of it whose other weights were fine-tuned (kne.edit/2 files accepted both cases:
    only embeddings, norms and biases were fingerprinted), unless forced."""
    import copy

    model = tiny_model("llama")
    res = kne.fast_edit(model, tok, REQ, AUTHORS, percentile=90.0, steps=3, lr=5e-2)  # rows of mlp.down_proj
    path = res.save(tmp_path / "e.safetensors")
    res.restore()
    other = copy.deepcopy(model)
    with torch.no_grad():
        if change.startswith("attention"):
            other.model.layers[1].self_attn.q_proj.weight[:4] += 1e-3
        elif change.startswith("up_proj"):
            other.model.layers[0].mlp.up_proj.weight.mul_(1.01)
        elif change.startswith("gate_proj"):
            other.model.layers[2].mlp.gate_proj.weight[0, 0] += 1e-4
        else:
            other.lm_head.weight[5] += 1e-3
    snap = snapshot(other)
    _refused(other, path, snap, r"this file was made for another model \(fingerprint [0-9a-f]{16} of every weight but "
                                r"the edited kind \(mlp.down_proj\).*pass force=True \(--force\)")
    with pytest.warns(UserWarning, match="apply with force=True on a model the file was not made for"):
        assert kne.apply_edit(other, path, force=True) == len(res._saved)
    with pytest.warns(UserWarning, match="revert with force=True"):
        kne.revert_edit(other, path, force=True)
    assert_state_bits(other, snap, "forced apply then revert")


def test_stacked_edit_files_apply_in_either_order(tiny_model, tok, tmp_path):
    """Two edit files of one model (rows of mlp.down_proj, possibly in the same layers) apply and
    revert in any order: the fingerprint leaves out every layer's mlp.down_proj."""
    model = tiny_model("llama")
    orig = snapshot(model)
    a = kne.fast_edit(model, tok, REQ, AUTHORS, percentile=90.0, steps=3, lr=5e-2)
    pa = a.save(tmp_path / "a.safetensors")
    a.restore()
    b = kne.fast_edit(model, tok, {"prompt": "Gold is a", "target_new": "gas"}, AUTHORS, percentile=95.0, steps=3,
                      lr=5e-2, layers=(0,))
    pb = b.save(tmp_path / "b.safetensors")
    b.restore()
    overlap = any(torch.isin(ia, ib).any() for (_, _, ia, _), (_, _, ib, _) in zip(a._saved, b._saved))
    if overlap:
        pytest.skip("the two ensembles share a row: the files then conflict by design")
    kne.apply_edit(model, pb)
    kne.apply_edit(model, pa)
    kne.revert_edit(model, pb)
    kne.revert_edit(model, pa)
    assert_state_bits(model, orig, "two files applied and reverted out of order")


def test_version_2_files_keep_their_own_fingerprint(saved, tmp_path):
    """A kne.edit/2 file (embeddings, norms and biases fingerprinted) still applies and reverts."""
    model, path, orig, edited = saved
    from kne.editfile import _value_fingerprint_v2

    def v2(meta, t):
        meta["values"] = {"sha256": _value_fingerprint_v2(model), "parameters": 1, "sample": 65536}

    old = rewrite_edit(path, tmp_path / "v2.safetensors", v2, "kne.edit/2")
    assert kne.apply_edit(model, old) > 0
    assert_state_bits(model, edited, "a kne.edit/2 file applies")
    kne.revert_edit(model, old)
    assert_state_bits(model, orig)


def test_a_site_tied_to_another_weight_is_refused(saved, tmp_path, tiny_model, tok):
    """A crafted file that writes rows of lm_head, tied to the input embeddings: refused at apply
    (before, it applied and could never be reverted)."""
    model, path, orig, _ = saved
    tied = tiny_model("gpt2")  # GPT-2 ties lm_head to the token embeddings
    assert tied.lm_head.weight.data_ptr() == tied.transformer.wte.weight.data_ptr()
    res = kne.fast_edit(tied, tok, REQ, AUTHORS, percentile=90.0, steps=2, lr=5e-2)
    good = res.save(tmp_path / "g.safetensors")
    res.restore()
    snap = snapshot(tied)

    def to_lm_head(meta, t):
        s = meta["sites"][0]
        w = tied.lm_head.weight
        s.update(path="lm_head", transposed=False, dim=0, weight_shape=list(w.shape), dtype=str(w.dtype))
        i = s["i"]
        t[f"{i}.index"] = torch.tensor([1, 2], dtype=torch.int64)
        t[f"{i}.orig"] = w[[1, 2]].detach().clone()
        t[f"{i}.new"] = t[f"{i}.orig"] + 1.0
        meta["sites"] = [s]
        for k in [k for k in t if not k.startswith(f"{i}.")]:
            del t[k]

    bad = rewrite_edit(good, tmp_path / "lm.safetensors", to_lm_head)
    _refused(tied, bad, snap, r"lm_head \(field sites\[0\]\.path\) shares its weight with transformer\.wte\.weight")


def test_old_format_files_still_apply_with_a_warning(saved, tmp_path):
    model, path, orig, edited = saved
    old = rewrite_edit(path, tmp_path / "v1.safetensors", None, "kne.edit/1")
    with pytest.warns(UserWarning, match=r"kne\.edit/1 file \(kne 0\.2\.0\): it carries no content digest"):
        assert kne.apply_edit(model, old) > 0
    assert_state_bits(model, edited, "a kne.edit/1 file applies")
    with pytest.warns(UserWarning, match="no content digest"):
        kne.revert_edit(model, old)
    assert_state_bits(model, orig)


def test_unknown_format_names_the_versions(saved, tmp_path):
    model, path, orig, _ = saved
    bad = rewrite_edit(path, tmp_path / "v9.safetensors", None, "kne.edit/9")
    _refused(model, bad, orig, r"unknown edit format 'kne\.edit/9' \(field 'format'\); this kne reads kne\.edit/3, kne\.edit/2, kne\.edit/1")


def test_apply_and_revert_reach_offloaded_weights(tiny_model, tok, tmp_path):
    """A model whose layers Accelerate offloads to disk: the edit file writes the offload store."""
    import copy

    from test_offload import dispatch, logits

    plain = tiny_model("llama")
    res = kne.fast_edit(plain, tok, REQ, AUTHORS, percentile=90.0, steps=3, lr=5e-2)
    path = res.save(tmp_path / "e.safetensors")
    edited_logits = logits(plain, tok)
    res.restore()
    off = dispatch(copy.deepcopy(plain), tmp_path, "model.layers", 3, offloaded=(1, 2))
    before = logits(off, tok)
    assert kne.apply_edit(off, path) == len(res._saved)
    torch.testing.assert_close(logits(off, tok), edited_logits, rtol=1e-5, atol=1e-5)
    kne.revert_edit(off, path)
    assert torch.equal(logits(off, tok), before)
