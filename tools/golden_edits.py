"""Record the edits of the presets that must never change (``authors`` and ``tuned``) into
``tests/data/golden_edits.json``; ``tests/test_preservation.py`` holds every later version of kne
to them bit for bit.

Made once with kne 0.2.0 (commit 2ac9455, before the preservation options existed), CPU backend,
one thread:

    PYTHONPATH=<checkout of 2ac9455>/python:<checkout> python tools/golden_edits.py

The same code gives other last bits on another CPU (MKL and torch choose their kernels by it), so
a CPU whose results differ is recorded beside the first one, under its fingerprint
(``tests/helpers.py``'s ``cpu_fingerprint``). The tests pass when the edit equals any record: their
own CPU's, the first, or another CPU's (fingerprints that differ by a flag no kernel reads round
alike). A failure shows the difference from their own CPU's record, else the first:

    PYTHONPATH=<checkout of 2ac9455>/python:<checkout> python tools/golden_edits.py --add-machine

Cases: a tiny random Llama (tests/conftest.py's ``build_tiny_model``, seed 3, byte tokenizer) with
each preset, and the embedded SmolLM2-135M with each preset on "The capital of France is" ->
"Rome". Recorded per case: every loss (as float.hex), the step count, and a sha256 of the edited
model's whole state dict after the edit.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def state_hash(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def run(model, tok, req, preset, **over):
    import kne

    before = state_hash(model)
    res = kne.fast_edit(model, tok, req, kne.KNEConfig.preset(preset, backend="cpu", **over))
    out = {"losses": [float(x).hex() for x in res.stats["losses"]], "steps": res.stats["steps"],
           "state_sha256": state_hash(model), "neurons": res.stats["neurons"]}
    res.restore()
    assert state_hash(model) == before
    return out


def cases():
    """``(name, model factory, tokenizer, request, preset, overrides)`` of every recorded edit."""
    sys.path.insert(0, str(ROOT / "tests"))
    import kne
    from conftest import _byte_tokenizer, build_tiny_model

    tok = _byte_tokenizer()
    tiny_req = {"prompt": "The capital of France is", "target_new": "Rome"}
    out = []
    for preset in ("authors", "tuned"):
        out.append((f"tiny-llama/{preset}", lambda: build_tiny_model("llama", tok, seed=3), tok, tiny_req, preset,
                    {"percentile": 80.0, "steps": 6}))
    emb = {}

    def embedded():
        if "m" not in emb:
            emb["m"], emb["t"] = kne.load_model()
        return emb["m"]

    for preset in ("authors", "tuned"):
        out.append((f"smollm2/{preset}", embedded, None, tiny_req, preset, {}))
    return out, emb


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--add-machine", action="store_true",
                   help="record this CPU's results under its fingerprint beside the existing ones")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    import kne

    todo, emb = cases()
    made_with = {"kne": kne.__version__, "torch": torch.__version__.split("+")[0]}
    result = {"made_with": made_with, "cases": {}}
    for name, factory, tok, req, preset, over in todo:
        model = factory()
        result["cases"][name] = run(model, tok or emb["t"], req, preset, **over)
        print(name, result["cases"][name]["steps"], "steps")
    path = ROOT / "tests" / "data" / "golden_edits.json"
    if a.add_machine:
        from helpers import cpu_fingerprint  # tests/ is on the path (cases())

        doc = json.loads(path.read_text())
        if doc["made_with"]["torch"] != made_with["torch"]:
            raise SystemExit(f"the records were made with torch {doc['made_with']['torch']}, this is "
                             f"{made_with['torch']}: install that torch first")
        doc.setdefault("machines", {})[cpu_fingerprint()] = {"made_with": made_with, "cases": result["cases"]}
        result = doc
    # whole or not at all, as kne.io.write_text does; not that function: this runs against
    # kne 0.2.0's checkout, which does not have it
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
