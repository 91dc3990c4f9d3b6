"""Grade again the generated answers a results file keeps (``kne eval --generate --out``).

    python tools/regrade_generated.py benchmarks/results/quality_measures.json

The grades of a generated answer are a pure function of its text and the record's truths
(:func:`kne.evaluation.grade_generated`), so a results file made before a grade was added can be
given it from the texts it keeps, without generating again. For every record with generated texts
this recomputes every grade from the texts and the shipped KnowEdit record of the same index,
refuses the file if a grade it already holds comes out different (the texts are not what was
graded, or the grading changed), writes the grades it lacked, and recomputes each run's summary.
The file is rewritten in place, all or nothing (``kne.io.write_text``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))


def regrade(payload: dict) -> int:
    """Add the missing grades to every run of ``payload`` in place; returns the records graded."""
    from kne.datasets import KNOWEDIT, knowedit
    from kne.evaluation import EvalResult, grade_generated

    by_file = {f.removesuffix(".gz"): name for name, f in KNOWEDIT.items()}
    n = 0
    for run in payload["runs"]:
        if run["data"] not in by_file:
            raise ValueError(f"run {run['method']!r} on {run['data']}: not a shipped KnowEdit file")
        reqs = knowedit(by_file[run["data"]])
        graded = False
        for rec in run["records"]:
            if "generated" not in rec:
                continue
            req = reqs[rec["index"]]
            if req.prompt != rec["prompt"] or req.target_new != rec["target_new"]:
                raise ValueError(f"record {rec['index']} of {run['data']} is not the shipped record of that index")
            for k, v in grade_generated(req, rec["generated"]).items():
                if k in rec and rec[k] != v:
                    raise ValueError(f"{run['method']} on {run['data']}, record {rec['index']}: {k} is {rec[k]!r} in "
                                     f"the file and {v!r} from its texts")
                rec[k] = v
            graded = True
            n += 1
        if graded:
            run["summary"] = {**run["summary"], **EvalResult(run["records"]).summary()}
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="a kne eval --generate --out results JSON")
    a = p.parse_args(argv)
    from kne.io import write_text

    path = Path(a.results)
    payload = json.loads(path.read_text(encoding="utf-8"))
    n = regrade(payload)
    if not n:
        raise SystemExit(f"{path}: no record holds generated answers (make it with kne eval --generate)")
    write_text(path, json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
    print(f"{path}: {n} records graded from their texts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
