"""The Python parts of the GPU check (.ci/gpu_check.sh drives them; see its header).

    python .ci/gpu_check.py --env              # versions, GPU, tools: one line each
    python .ci/gpu_check.py --selfcheck        # kernel checks without pytest (fallback)
    python .ci/gpu_check.py --check-imports    # CI: everything the GPU check imports and builds,
                                                      # on any machine (no GPU needed)

Nothing here needs more than the GPU machine's own packages (torch, triton, transformers,
accelerate, numpy) and the repository: no network, no embedded model, no matplotlib, nltk or gguf.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata as md
import io
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _version(name: str) -> str:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "missing"


def env() -> int:
    """One line per fact; the shell copies them into the log and the summary."""
    import torch

    print(f"python: {platform.python_version()} ({sys.executable})")
    print("packages: " + ", ".join(f"{n} {_version(n)}" for n in
                                   ("torch", "triton", "transformers", "accelerate", "numpy", "tokenizers",
                                    "safetensors", "pytest", "ninja", "setuptools", "matplotlib")))
    print(f"torch CUDA: {torch.version.cuda}; devices: " + (", ".join(
        f"cuda:{i} {torch.cuda.get_device_name(i)} ({torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB, "
        f"sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})" for i in range(torch.cuda.device_count()))
        or "none"))
    nvcc = shutil.which("nvcc")
    line = "missing"
    if nvcc:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
        line = f"{out[-1] if out else '?'} ({nvcc})"
    print(f"nvcc: {line}")
    print(f"cpus: {os.cpu_count()}; MAX_JOBS={os.environ.get('MAX_JOBS', 'unset')}")
    return 0


def selfcheck() -> int:
    """Without pytest: every op on every live GPU backend against the torch kernel (the first-use
    cases, fp32), and the attribution ops in fp32/fp16/bf16 on odd shapes against float64."""
    import torch

    import kne_kernels
    from kne_kernels import _backends
    from kne_kernels.ops import registry

    dev = torch.device("cuda")
    backends = [b for b in ("triton", "cuda") if _backends.status(b, "cuda")[0]]
    if not backends:
        print("selfcheck: no live GPU backend: " + "; ".join(f"{b}: {_backends.status(b, 'cuda')[1]}"
                                                             for b in ("triton", "cuda")))
        return 1
    failed = 0
    for b in backends:
        for op, d in registry().items():
            ok, why = d.selfcheck(_backends.implementation(op, b), d.torch, dev)
            failed += not ok
            print(f"selfcheck {b:<6} {op:<22} fp32 {'ok' if ok else 'FAILED ' + why}")
        g = torch.Generator().manual_seed(0)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for n, d in ((1, 7), (7, 4097), (513, 1031)):
                a = torch.randn(n, d, generator=g).to(dtype)
                gr = torch.randn(n, d, generator=g).to(dtype)
                want = (a.double() * gr.double()).sum(0)
                got = kne_kernels.neuron_attribution(a.to(dev), gr.to(dev), backend=b).cpu().double()
                plain = (a.to(dev) * gr.to(dev)).float().sum(0).cpu().double()  # the torch expression in dtype
                err, base = (got - want).abs().max().item(), (plain - want).abs().max().item()
                ok = err <= max(2 * base, 1e-5 * want.abs().max().item() + 1e-6)
                failed += not ok
                print(f"selfcheck {b:<6} neuron_attribution     {str(dtype)[6:]:<8} [{n}, {d}] error {err:.2e} "
                      f"(torch in {str(dtype)[6:]}: {base:.2e}) {'ok' if ok else 'FAILED'}")
                w = torch.randn(d, n, generator=g).to(dtype)
                wg = torch.randn(d, n, generator=g).to(dtype)
                want = (w.double() * wg.double()).sum(1)
                got = kne_kernels.weight_attribution(w.to(dev), wg.to(dev), dim=1, backend=b).cpu().double()
                plain = (w.to(dev) * wg.to(dev)).float().sum(1).cpu().double()
                err, base = (got - want).abs().max().item(), (plain - want).abs().max().item()
                ok = err <= max(2 * base, 1e-5 * want.abs().max().item() + 1e-6)
                failed += not ok
                print(f"selfcheck {b:<6} weight_attribution     {str(dtype)[6:]:<8} [{d}, {n}] error {err:.2e} "
                      f"(torch in {str(dtype)[6:]}: {base:.2e}) {'ok' if ok else 'FAILED'}")
    print(f"selfcheck: {'all ok' if not failed else f'{failed} FAILED'} ({', '.join(backends)})")
    return 1 if failed else 0


def check_imports() -> int:
    """What the GPU check imports and builds, on this machine: kne and kne_kernels (every module,
    the Triton kernels included when triton is installed), the two benchmark scripts, the offline
    tokenizer and a Llama-7B-shaped model on the meta device (no memory)."""
    import pkgutil

    import torch

    names = []
    for top in ("kne", "kne_kernels"):
        pkg = importlib.import_module(top)
        for m in pkgutil.walk_packages(pkg.__path__, prefix=top + "."):
            if m.name.endswith("__main__") or m.name.endswith("._C"):
                continue
            if m.name.startswith("kne_kernels.triton.") and _version("triton") == "missing":
                continue
            importlib.import_module(m.name)
            names.append(m.name)
    sys.path.insert(0, str(ROOT / "benchmarks" / "speed"))
    bench_edit = importlib.import_module("bench_edit")
    bench_kernels = importlib.import_module("bench_kernels")
    tok = bench_edit.offline_tokenizer()
    ids = tok(bench_edit.LONG_PROMPT, add_special_tokens=False)["input_ids"]
    assert 2 not in ids, "the long prompt has a word outside the offline vocabulary"
    from kne.objective import encode

    batch = encode(tok, [bench_edit.LONG_PROMPT], [bench_edit.TARGET])
    assert batch.lengths == [1], batch.lengths
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    import kne

    sites = kne.adapters.resolve_sites(model, ["ffn_out"], None)["ffn_out"]
    assert len(sites) == 32 and tuple(sites[0].weight().shape) == (4096, 11008)
    for parser in (bench_edit.main, bench_kernels.main):  # --help parses and exits 0
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                parser(["--help"])
            except SystemExit as e:
                assert e.code == 0
    print(f"check-imports: {len(names)} modules of kne and kne_kernels, bench_edit, bench_kernels; offline "
          f"tokenizer ({len(ids)} tokens for the long prompt); Llama-7B shape {n / 1e9:.2f}B parameters on meta; "
          f"torch {torch.__version__}, transformers {_version('transformers')}, triton {_version('triton')}: ok")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--env", action="store_true")
    g.add_argument("--selfcheck", action="store_true")
    g.add_argument("--check-imports", action="store_true")
    args = ap.parse_args(argv)
    if args.env:
        return env()
    if args.selfcheck:
        return selfcheck()
    return check_imports()


if __name__ == "__main__":
    sys.exit(main())
