"""Build ``python/kne/data/preservation.json``: relation templates and prompts for KNE's
preservation (neighbour KL, null-space corpus), harvested from KnowEdit *training* records.

Only records ``--first`` (default 100) and later of each KnowEdit file are read: the README's
quality tables report on records 20-69 and the ``local`` preset was chosen on records 0-19, so
nothing shipped here comes from a record that is tuned on or reported.

* ``templates``: every prompt of a record (its edit prompt and its locality and portability probes)
  that contains the record's subject once, with the subject replaced by ``{}`` ("The place of birth
  of {} is"), counted over the records; the ``--templates`` most frequent that occur at least
  ``--min-count`` times are kept, most frequent first. "Forgetfulness" probes ("..., which is not
  <target>, is") are left out: they name another record's answer.
* ``subjects``: per kept template, up to ``--subjects`` subjects the training records ask it about
  (a seeded sample): the other subjects a relation is asked of, for the neighbours that ask the
  edit's own relation of another subject ("The capital of {} is" -> Belgium).
* ``prompts``: ``--prompts`` edit prompts of training records (a seeded sample, one per record),
  the prompts the null-space corpus continues greedily (``kne.preservation.build``) and the
  fallback neighbours of a request without a subject.

    python tools/harvest_preservation.py --data-dir python/kne/data/knowedit
"""

from __future__ import annotations

import argparse
import collections
import json
import random
from pathlib import Path

FILES = {"zsre": "ZsRE-test-all.json", "counterfact": "wiki_counterfact-train.json",
         "recent": "wiki_recent-train.json"}


def _open(folder: Path, name: str):
    for cand in (folder / name, folder / (name + ".gz")):
        if cand.is_file():
            if cand.suffix == ".gz":
                import gzip

                return json.loads(gzip.decompress(cand.read_bytes()).decode("utf-8"))
            return json.loads(cand.read_text(encoding="utf-8"))
    raise SystemExit(f"{name} not found in {folder}")


def harvest(folder: Path, first: int, n_templates: int, min_count: int, n_prompts: int, seed: int,
            n_subjects: int = 8):
    counts: collections.Counter = collections.Counter()
    sources = collections.defaultdict(set)
    asked = collections.defaultdict(set)  # template -> subjects
    prompts = []
    for short, name in FILES.items():
        records = _open(folder, name)
        for rec in records[first:]:
            subject = rec.get("subject") or ""
            texts = [rec["prompt"]]
            for field in ("locality", "portability"):
                for kind, probes in (rec.get(field) or {}).items():
                    if kind != "Forgetfulness":
                        texts += [p["prompt"] for p in probes]
            for t in texts:
                if subject and t.count(subject) == 1 and "{" not in t and "}" not in t:
                    tpl = t.replace(subject, "{}")
                    counts[tpl] += 1
                    sources[tpl].add(short)
                    asked[tpl].add(subject)
            prompts.append(rec["prompt"])
    templates = [[t, c] for t, c in counts.most_common() if c >= min_count][:n_templates]
    rng = random.Random(seed)
    prompts = sorted(set(prompts))
    rng.shuffle(prompts)
    subjects = {}
    for t, _ in templates:
        pool = sorted(asked[t])
        subjects[t] = rng.sample(pool, min(n_subjects, len(pool)))
    return {
        "source": (f"KnowEdit (MIT; arXiv 2401.01286) records {first}+ of " + ", ".join(FILES.values())
                   + ": never the records 0-99 that kne tunes on (0-19) or reports on (20-69)"),
        "made_by": "tools/harvest_preservation.py",
        "templates": templates,
        "subjects": subjects,
        "prompts": prompts[:n_prompts],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="folder holding the three KnowEdit files (.json or .json.gz)")
    p.add_argument("--first", type=int, default=100, help="first record read from each file (default 100)")
    p.add_argument("--templates", type=int, default=64)
    p.add_argument("--min-count", type=int, default=10)
    p.add_argument("--prompts", type=int, default=1024)
    p.add_argument("--subjects", type=int, default=8, help="subjects kept per template")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "python" / "kne" / "data"
                                        / "preservation.json"))
    a = p.parse_args(argv)
    data = harvest(Path(a.data_dir), a.first, a.templates, a.min_count, a.prompts, a.seed, a.subjects)
    from kne.io import write_text

    write_text(a.out, json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {a.out}: {len(data['templates'])} templates, {len(data['prompts'])} prompts, "
          f"{sum(len(v) for v in data['subjects'].values())} template subjects")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
