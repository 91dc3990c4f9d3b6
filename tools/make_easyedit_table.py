"""Writes tests/data/easyedit_parity.json: EasyEdit's own metric values for the cases of
tests/test_easyedit_parity.py (run once; the test compares kne.evaluate with the table).

    .venv/bin/python tools/make_easyedit_table.py /path/to/EasyEdit [--commit SHA]

The EasyEdit checkout is read, not imported as a package (its ``easyeditor/__init__`` pulls in
dozens of packages): the functions ``compute_edit_quality``, ``compute_rewrite_or_rephrase_quality``,
``compute_locality_quality``, ``compute_portability_quality`` (``easyeditor/evaluate/evaluate.py``),
``test_prediction_acc`` and ``slice_list`` (``evaluate_utils.py``), and the modules
``evaluate/metric_meta.py`` and ``util/device.py`` are executed from its source text as they are,
in one namespace that also holds numpy, torch and the typing names they use. Each record is
scored exactly as EasyEdit's KnowEdit runner scores an unedited model: one
``compute_edit_quality(model, "llama", hparams, tok, record, "cpu")`` call with
``hparams.alg_name = "KNB"`` and ``max_length = 30`` (the authors' KNB setting), the record in
EasyEdit's request form (locality and portability as ``{kind: {"prompt": [...],
"ground_truth": [...]}}``). Nothing of EasyEdit's code is written to this repository.

The script refuses to write a table whose predictions sit on a near-tie (top-2 logit margin under
1e-3 at any scored position), so the table does not depend on float rounding.
"""

from __future__ import annotations

import datetime
import json
import sys
import typing
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the case and model builders live in the test module

import test_easyedit_parity as parity  # noqa: E402
from easyedit_source import checkout_args, exec_functions  # noqa: E402

FUNCTIONS = {
    "easyeditor/evaluate/evaluate.py": ["compute_edit_quality", "compute_rewrite_or_rephrase_quality",
                                        "compute_locality_quality", "compute_portability_quality"],
    "easyeditor/evaluate/evaluate_utils.py": ["test_prediction_acc", "slice_list"],
}
MODULES = ["easyeditor/evaluate/metric_meta.py", "easyeditor/util/device.py"]


def easyedit_namespace(root: Path) -> dict:
    """EasyEdit's metric functions, executed from the checkout's source text."""
    class LORA:  # evaluate.py only asks isinstance(model, LORA) (its MELO wrapper)
        pass

    ns = {"np": np, "torch": torch, "typing": typing, "List": typing.List, "Optional": typing.Optional,
          "Union": typing.Union, "Dict": typing.Dict, "AutoTokenizer": object, "HyperParams": object, "LORA": LORA,
          "__name__": "easyedit_metrics"}
    for rel in MODULES:
        exec(compile((root / rel).read_text(), str(root / rel), "exec"), ns)
    exec_functions(root, FUNCTIONS, ns)
    return ns


def easyedit_record(req) -> dict:
    """kne.EditRequest -> the request dict EasyEdit's editor hands to compute_edit_quality."""
    def group(probes):
        return {kind: {"prompt": [p["prompt"] for p in ps], "ground_truth": [p["ground_truth"] for p in ps]}
                for kind, ps in probes.items()}

    rec = {"prompt": req.prompt, "target_new": req.target_new, "ground_truth": req.ground_truth or "<|endoftext|>",
           "portability": group(req.portability), "locality": group(req.locality)}
    if req.rephrase_prompt:
        rec["rephrase_prompt"] = req.rephrase_prompt
    return rec


def min_margin(model, tok, reqs) -> float:
    """Smallest top-2 logit margin at any answer position kne scores (EasyEdit's tokenisation)."""
    from kne.objective import encode

    pairs = []
    for r in reqs:
        pairs.append((r.prompt, r.target_new))
        if r.rephrase_prompt:
            pairs.append((r.rephrase_prompt, r.target_new))
        for probes in list(r.portability.values()) + list(r.locality.values()):
            pairs += [(p["prompt"], p["ground_truth"]) for p in probes]
    worst = float("inf")
    with torch.no_grad():
        for p, a in pairs:
            b = encode(tok, [p], [a], add_special_tokens=True, always_space=True)
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[b.rows, b.cols - 1]
            top = logits.float().topk(2, dim=-1).values
            worst = min(worst, float((top[:, 0] - top[:, 1]).min()))
    return worst


def score(ns: dict, model, tok, reqs) -> dict:
    hparams = SimpleNamespace(alg_name="KNB", max_length=30)
    records = []
    for req in reqs:
        ret = ns["compute_edit_quality"](model, "llama", hparams, tok, easyedit_record(req), "cpu")
        records.append({
            "prompt": req.prompt, "target_new": req.target_new,
            "rewrite_acc": float(np.mean(ret["rewrite_acc"])),
            "rephrase_acc": float(np.mean(ret["rephrase_acc"])) if "rephrase_acc" in ret else None,
            "portability": {k[:-len("_acc")]: [float(x) for x in v] for k, v in ret["portability"].items()},
            "locality_output": {k[:-len("_output")]: [[int(t) for t in row] for row in v]
                                for k, v in ret["locality"].items()},
        })
    margin = min_margin(model, tok, reqs)
    if margin < 1e-3:
        sys.exit(f"a scored prediction is a near-tie (top-2 margin {margin:.2e}): change the cases or the seed")
    return {"records": records, "min_top2_margin": margin}


def main() -> int:
    args, commit = checkout_args(__doc__, ROOT / "tests" / "data" / "easyedit_parity.json")
    torch.set_num_threads(1)
    ns = easyedit_namespace(args.easyedit)
    reqs = parity.cases()
    tok = parity.parity_tokenizer()
    out = {"easyedit": {"repository": "https://github.com/zjunlp/EasyEdit", "commit": commit,
                        "functions": {k: v for k, v in FUNCTIONS.items()}},
           "made_by": "tools/make_easyedit_table.py", "date": datetime.date.today().isoformat(),
           "torch": torch.__version__, "transformers": __import__("transformers").__version__,
           "tiny": score(ns, parity.parity_model(tok), tok, reqs)}
    model, tok = parity.smollm2_with_bos()
    out["smollm2"] = score(ns, model, tok, reqs)
    from kne.io import write_text

    write_text(args.out, json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    for key in ("tiny", "smollm2"):
        print(key, [(r["target_new"], r["rewrite_acc"], r["rephrase_acc"]) for r in out[key]["records"]],
              f"min top-2 margin {out[key]['min_top2_margin']:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
