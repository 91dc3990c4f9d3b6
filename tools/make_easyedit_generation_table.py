"""Writes tests/data/easyedit_generation.json: EasyEdit's own generated answers and exact-match
grades on the embedded model, for tests/test_generation.py (run once; the test holds
kne.generation to the table).

    .venv/bin/python tools/make_easyedit_generation_table.py /path/to/EasyEdit [--commit SHA]

The EasyEdit checkout is read, not imported as a package (its ``easyeditor/__init__`` pulls in
dozens of packages): ``normalize_answer``, ``exact_match_score``, ``generate_texts`` and
``test_prediction_acc_LLM_judge`` (``easyeditor/evaluate/evaluate_utils.py``) and the module
``util/device.py`` are executed from its source text as they are. Each prompt is graded as
EasyEdit's ``evaluation_type: LLM-judge`` without an API key grades it: one
``test_prediction_acc_LLM_judge(model, tok, hparams, prompt, target, "cpu")`` call (the chat template
with EasyEdit's system message, greedy until ".", "\\n" or EOS, at most 512 new tokens, no KV cache,
then exact match after SQuAD's normalisation). The prompts: the edit prompt, rephrase and
portability prompts of KnowEdit records 20-22 of each shipped file, with their targets, on the
unedited embedded SmolLM2-135M-Instruct in float32. Nothing of EasyEdit's code is written to this
repository.
"""

from __future__ import annotations

import datetime
import json
import string
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from easyedit_source import checkout_args, exec_functions  # tools/, beside this script

ROOT = Path(__file__).resolve().parents[1]
FILE = "easyeditor/evaluate/evaluate_utils.py"
FUNCTIONS = ["normalize_answer", "exact_match_score", "generate_texts", "test_prediction_acc_LLM_judge"]
RECORDS = {"zsre": range(20, 23), "counterfact": range(20, 23), "recent": range(20, 23)}
#: strings whose normalisation the table also records (articles, punctuation, case, whitespace)
NORMALIZE = ["The Eiffel Tower.", "  an   apple,  A pear!  ", "THE the thee", "Paris\n", "U.S.A. (the)"]


def easyedit_namespace(root: Path) -> dict:
    """EasyEdit's generation and grading functions, executed from the checkout's source text."""
    import regex
    from transformers import T5ForConditionalGeneration

    ns = {"np": np, "torch": torch, "regex": regex, "string": string, "T5ForConditionalGeneration":
          T5ForConditionalGeneration, "__name__": "easyedit_generation"}
    device = root / "easyeditor" / "util" / "device.py"
    exec(compile(device.read_text(), str(device), "exec"), ns)
    exec_functions(root, {FILE: FUNCTIONS}, ns)
    return ns


def cases():
    """``(file, record, field, prompt, target)`` of every graded prompt."""
    import kne

    out = []
    for name, records in RECORDS.items():
        reqs = kne.datasets.knowedit(name, limit=max(records) + 1)
        for i in records:
            r = reqs[i]
            out.append((name, i, "rewrite", r.prompt, r.target_new))
            if r.rephrase_prompt:
                out.append((name, i, "rephrase", r.rephrase_prompt, r.target_new))
            for kind, probes in r.portability.items():
                out += [(name, i, f"portability.{kind}", p["prompt"], p["ground_truth"]) for p in probes]
    return out


def main() -> int:
    args, commit = checkout_args(__doc__, ROOT / "tests" / "data" / "easyedit_generation.json")
    import kne

    torch.set_num_threads(1)
    ns = easyedit_namespace(args.easyedit)
    model, tok = kne.load_model()
    hparams = SimpleNamespace(alg_name="KNE")  # no api_key: exact match, as EasyEdit grades without a judge
    rows = []
    for name, i, field, prompt, target in cases():
        scores, texts = ns["test_prediction_acc_LLM_judge"](model, tok, hparams, prompt, target, "cpu")
        rows.append({"data": name, "record": i, "field": field, "prompt": prompt, "target": target,
                     "text": texts[0], "exact_match": float(scores[0])})
        print(f"{name} {i} {field}: {texts[0][:70]!r} -> {scores[0]}", file=sys.stderr)
    out = {"easyedit": {"repository": "https://github.com/zjunlp/EasyEdit", "commit": commit,
                        "file": FILE, "functions": FUNCTIONS},
           "made_by": "tools/make_easyedit_generation_table.py", "date": datetime.date.today().isoformat(),
           "torch": torch.__version__, "transformers": __import__("transformers").__version__,
           "model": "smollm2-135m (float32, CPU, one thread)", "max_new_tokens": 512, "use_cache": False,
           "normalize": {s: ns["normalize_answer"](s) for s in NORMALIZE}, "prompts": rows}
    from kne.io import write_text

    write_text(args.out, json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out} ({len(rows)} prompts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
