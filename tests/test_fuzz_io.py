"""Hypothesis fuzzing of what reads and writes files: the results-file schema (kne compare / kne
plot read any JSON a user hands them) and the one writer (any bytes, onto any kind of target).
Budgets are fixed and derandomized, as the kernels' fuzz tests are."""

from __future__ import annotations

import math
import os
import stat
import threading

import pytest

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kne.io import write_atomic, write_bytes  # noqa: E402
from kne.metrics import ResultsError, check_results, record_value  # noqa: E402

SETTINGS = dict(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=5))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=20)
metric = st.one_of(st.none(), st.floats(0, 1), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3),
                   st.lists(st.floats(0, 1), max_size=2), st.dictionaries(st.sampled_from(["a", "b"]),
                                                                          st.one_of(st.none(), st.floats()), max_size=2))
record = st.fixed_dictionaries({"index": st.one_of(st.integers(0, 9), st.booleans(), st.text(max_size=2))},
                               optional={"rewrite_acc": metric, "rephrase_acc": metric, "portability": metric,
                                         "locality": metric, "fluency": metric})
run = st.fixed_dictionaries({"method": st.one_of(st.text(max_size=4), st.integers()), "data": st.just("d.json"),
                             "protocol": st.just("independent"), "records": st.lists(record, max_size=4)},
                            optional={"summary": st.one_of(st.dictionaries(st.sampled_from(["edit_succ", "locality"]),
                                                                           metric, max_size=2), st.integers())})
results = st.one_of(json_values, st.fixed_dictionaries({"runs": st.one_of(st.lists(run, max_size=3), json_values)}))


def _finite(v) -> bool:
    if v is None:
        return True
    if isinstance(v, dict):
        return all(_finite(x) for x in v.values())
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@settings(**SETTINGS)
@given(payload=results)
def test_fuzz_results_schema_accepts_or_names_the_field(payload):
    """Any JSON value: either runs whose every record value the metrics can read (a finite number
    or null, per kind for portability/locality), or one ResultsError naming a field -- never a
    TypeError, KeyError or a NaN that reaches a mean."""
    try:
        runs = check_results(payload, "r.json")
    except ResultsError as e:
        assert str(e).startswith("r.json: ")
        return
    for r in runs:
        assert all(isinstance(r[k], str) for k in ("method", "data", "protocol"))
        for rec in r.get("records") or []:
            assert isinstance(rec["index"], int) and not isinstance(rec["index"], bool)
            for field in ("rewrite_acc", "rephrase_acc", "portability", "locality", "fluency"):
                assert _finite(rec.get(field)), (field, rec)
                v = record_value(rec, field)
                assert v is None or math.isfinite(v)


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("targets")
    null = folder / "null"
    try:
        os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        null = None
    return folder, null


@settings(**SETTINGS)
@given(data=st.binary(max_size=4096), kind=st.sampled_from(["new", "regular", "symlink", "device", "fifo"]),
       old=st.binary(max_size=64))
def test_fuzz_the_writer_over_target_kinds(targets, data, kind, old):
    """Whatever the bytes and the target: a regular target (or a symlink's) ends holding exactly
    them, a special one stays what it was, and no temporary file is left beside it."""
    folder, null = targets
    for p in list(folder.iterdir()):
        if p.name != "null":
            p.unlink()
    if kind == "device" and null is None:
        return
    target = {"new": folder / "out.bin", "regular": folder / "out.bin", "symlink": folder / "link.bin",
              "device": null, "fifo": folder / "pipe"}[kind]
    if kind == "regular":
        target.write_bytes(old)
    if kind == "symlink":
        (folder / "real.bin").write_bytes(old)
        target.symlink_to(folder / "real.bin")
    got = []
    reader = None
    if kind == "fifo":
        os.mkfifo(target)
        reader = threading.Thread(target=lambda: got.append(target.read_bytes()))
        reader.start()
    write_bytes(target, data)
    if reader is not None:
        reader.join(10)
        assert got == [data] and stat.S_ISFIFO(os.stat(target).st_mode)
    elif kind == "device":
        assert stat.S_ISCHR(os.stat(target).st_mode)
    elif kind == "symlink":
        assert target.is_symlink() and (folder / "real.bin").read_bytes() == data
    else:
        assert target.read_bytes() == data
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp") or ".tmp." in p.name]


@settings(**dict(SETTINGS, max_examples=100))
@given(fail_after=st.integers(0, 3), payload=st.binary(min_size=1, max_size=256))
def test_fuzz_a_failing_writer_leaves_the_old_file(tmp_path_factory, fail_after, payload):
    """The writer fails after writing ``fail_after`` chunks: the old file is untouched and no
    temporary file remains."""
    folder = tmp_path_factory.mktemp("fail")
    out = folder / "out.json"
    out.write_bytes(b"old")

    def chunks(tmp):
        with open(tmp, "wb") as f:
            for i in range(fail_after):
                f.write(payload)
        raise RuntimeError("the writer failed")

    with pytest.raises(RuntimeError):
        write_atomic(out, chunks)
    assert out.read_bytes() == b"old" and [p.name for p in folder.iterdir()] == ["out.json"]
