"""Every kne_kernels op against the plain torch expression a user would write, in one process.

For each case the candidate (``kne_kernels`` with ``--backend``, default ``auto``) and the
baseline alternate, after a warm-up each; the table gives median time, p20/p80, the ratio
baseline/candidate and effective GB/s (bytes the op must move, over its median time). CPU runs are
repeated with each thread count of ``--threads``. On a GPU, times come from
``triton.testing.do_bench`` and the table adds the measured device-to-device copy bandwidth and
each op's share of it.

    python benchmarks/speed/bench_kernels.py                    # CPU, 1 and 2 threads, default shapes
    python benchmarks/speed/bench_kernels.py --device cuda      # on a GPU (every live GPU backend: triton, cuda)
    python benchmarks/speed/bench_kernels.py --static           # registers/spills/smem of the GPU kernels
    python benchmarks/speed/bench_kernels.py --quick            # small shapes (smoke run)
    python benchmarks/speed/bench_kernels.py --overhead         # per-call overhead on tiny inputs, cpu vs torch

Rows are written to ``kernels_<device>.csv`` and the printed table to ``kernels_<device>.txt`` in
the folder ``--out`` (default: the current folder; the README's tables: ``--out benchmarks/results``).
``--overhead`` writes ``overhead_<device>.csv/.txt`` instead: microseconds per call of each public op
on a tiny input (where the kernel's own work is negligible and what remains is validation and the
choice of kernel), for ``--backend`` (default ``cpu torch``), the backends alternating in one process.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import torch


@dataclass
class Case:
    op: str
    shape: str
    dtype: str
    candidate: Callable[[], object]
    baseline: Callable[[], object]
    baseline_name: str
    nbytes: int
    repeats: Optional[int] = None


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, repeats: int) -> List[float]:
    """CPU: ``repeats`` wall times. CUDA: ``[p20, p50, p80]`` from ``triton.testing.do_bench`` (or,
    without triton, from CUDA events over about 100 ms of calls after 25 ms of warm-up)."""
    if device.type == "cuda":
        try:
            import triton.testing
        except ImportError:
            return _cuda_event_times(fn)
        ms = triton.testing.do_bench(fn, quantiles=[0.2, 0.5, 0.8], warmup=25, rep=100)
        return [m / 1e3 for m in ms]  # p20, p50, p80
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _cuda_event_times(fn) -> List[float]:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(); fn(); end.record(); torch.cuda.synchronize()
    est = max(start.elapsed_time(end), 1e-3)  # ms
    for _ in range(max(1, int(25 / est))):
        fn()
    times = []
    for _ in range(max(5, int(100 / est))):
        start.record(); fn(); end.record(); torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return [_q(times, 0.2), statistics.median(times), _q(times, 0.8)]


def _q(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def cases(device: torch.device, backend: str, quick: bool, huge: bool) -> List[Case]:
    import kne_kernels

    g = torch.Generator(device="cpu").manual_seed(0)
    out: List[Case] = []

    def rnd(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    # neuron_attribution
    N, D = (512, 1024) if quick else (8192, 4096)
    for dtype in (torch.bfloat16, torch.float32):
        a, gr = rnd(N, D, dtype=dtype), rnd(N, D, dtype=dtype)
        out.append(Case("neuron_attribution", f"[{N}, {D}]", str(dtype)[6:],
                        lambda a=a, gr=gr: kne_kernels.neuron_attribution(a, gr, backend=backend),
                        lambda a=a, gr=gr: (a.float() * gr.float()).sum(0), "(act.float()*grad.float()).sum(0)",
                        2 * a.numel() * a.element_size()))
    a, gr = rnd(N, D, dtype=torch.bfloat16), rnd(N, D, dtype=torch.bfloat16)
    seg = torch.arange(N, device=device) // (N // 8)
    out.append(Case("neuron_attribution", f"[{N}, {D}] 8 segments", "bfloat16",
                    lambda: kne_kernels.neuron_attribution(a, gr, segments=seg, num_segments=8, backend=backend),
                    lambda: torch.zeros(8, D, device=device).index_add_(0, seg, a.float() * gr.float()),
                    "zeros.index_add_(0, seg, act.float()*grad.float())", 2 * a.numel() * 2))
    # weight_attribution
    R, C = (1024, 512) if quick else (11008, 4096)
    for dtype in (torch.float32, torch.bfloat16):
        w, gw = rnd(R, C, dtype=dtype), rnd(R, C, dtype=dtype)
        out.append(Case("weight_attribution", f"[{R}, {C}] dim=1", str(dtype)[6:],
                        lambda w=w, gw=gw: kne_kernels.weight_attribution(w, gw, dim=1, backend=backend),
                        lambda w=w, gw=gw: (w.float() * gw.float()).sum(1), "(w.float()*g.float()).sum(1)",
                        2 * w.numel() * w.element_size()))
    # ensemble_select
    L, Dn = (4, 1000) if quick else (32, 11008)
    s = rnd(1, L, Dn)

    def quantile_select(s=s):
        agg = s.amax(0)
        thr = torch.quantile(agg.flatten(), 0.99)
        mask = (agg > thr) & (agg > 0)
        return [row.nonzero().flatten() for row in mask]

    out.append(Case("ensemble_select", f"[1, {L}, {Dn}]", "float32",
                    lambda: kne_kernels.ensemble_select(s, percentile=99.0, backend=backend), quantile_select,
                    "torch.quantile + mask + nonzero per layer", s.numel() * 4 * 2))
    if huge:
        n = 2**20 if quick else 2**28
        big = rnd(1, 1, n)

        def kth_select(big=big):
            v = big.view(-1)
            k = math.floor((n - 1) * 0.99)
            a = torch.kthvalue(v, k + 1).values
            b = torch.kthvalue(v, k + 2).values
            thr = a + (b - a) * ((n - 1) * 0.99 - k)
            return (v > thr).nonzero()

        out.append(Case("ensemble_select", f"2^{int(math.log2(n))} parameter scores", "float32",
                        lambda: kne_kernels.ensemble_select(big, percentile=99.0, backend=backend), kth_select,
                        "torch.kthvalue x2 + mask + nonzero (torch.quantile refuses > 2^24)", big.numel() * 4 * 2,
                        repeats=3))
    # ensemble_adamw_step_
    O, I, K = (1024, 512, 16) if quick else (11008, 4096, 110)
    weight = rnd(O, I, dtype=torch.bfloat16)
    idx = torch.randperm(O, generator=g)[:K].sort().values.to(device)
    base = weight[idx].clone()
    grad = rnd(K, I)
    delta, m1, m2 = torch.zeros(K, I, device=device), torch.zeros(K, I, device=device), torch.zeros(K, I, device=device)
    step = [0]

    def kne_step():
        step[0] += 1
        kne_kernels.ensemble_adamw_step_(weight, idx, grad, delta, m1, m2, base, step=step[0], lr=5e-3, scale=0.1,
                                         backend=backend)

    pdelta = torch.zeros(K, I, device=device, requires_grad=True)
    pdelta.grad = grad.clone()
    opt = torch.optim.AdamW([pdelta], lr=5e-3, weight_decay=0.0)

    def torch_step():
        opt.step()
        with torch.no_grad():
            weight.index_copy_(0, idx, (base.float() + 0.1 * pdelta).to(weight.dtype))

    out.append(Case("ensemble_adamw_step_", f"[{K}, {I}] of [{O}, {I}]", "bfloat16", kne_step, torch_step,
                    "torch.optim.AdamW.step() + index_copy_", K * I * 4 * 7 + K * I * 2 * 2))
    return out


def copy_bandwidth(device) -> Optional[float]:
    """Device-to-device copy of 256 MiB, GB/s counting the read and the write (CUDA only)."""
    if device.type != "cuda":
        return None
    x = torch.empty(2**28, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    t = _time(lambda: y.copy_(x), device, 1)[1]
    return 2 * x.numel() / t / 1e9


def gpu_backends(device) -> List[str]:
    """The live GPU backends here (``triton``, ``cuda``), else ``["torch"]``."""
    from kne_kernels import _backends

    live = [b for b in ("triton", "cuda") if _backends.status(b, device.type)[0]]
    return live or ["torch"]


def run(args) -> List[dict]:
    import kne_kernels
    from kne_kernels import _backends

    device = torch.device(args.device)
    rows = []
    bw = copy_bandwidth(device)
    if bw:
        print(f"device-to-device copy: {bw:.1f} GB/s (256 MiB, read + write)", flush=True)
    threads = args.threads if device.type == "cpu" else [torch.get_num_threads()]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    backends = args.backend or (gpu_backends(device) if device.type == "cuda" else ["auto"])
    for backend in backends:
        for nt in threads:
            torch.set_num_threads(nt)
            for c in cases(device, backend, args.quick, not args.no_huge):
                used = _backends.resolve(backend, device)
                reps = c.repeats or args.repeats
                c.candidate(); c.baseline(); _sync(device)  # warm-up (and the GPU backends' first-use check)
                tc, tb = [], []
                if device.type == "cuda":
                    tc, tb = _time(c.candidate, device, reps), _time(c.baseline, device, reps)
                    mc, mb = tc[1], tb[1]
                    p20c, p80c = tc[0], tc[2]
                else:
                    for _ in range(reps):
                        tc += _time(c.candidate, device, 1)
                        tb += _time(c.baseline, device, 1)
                    mc, mb = statistics.median(tc), statistics.median(tb)
                    p20c, p80c = _q(tc, 0.2), _q(tc, 0.8)
                row = {"op": c.op, "provider": f"kne_kernels[{used}]", "baseline": c.baseline_name, "shape": c.shape,
                       "dtype": c.dtype, "threads": nt, "median_s": mc, "p20_s": p20c, "p80_s": p80c,
                       "baseline_median_s": mb, "speedup": mb / mc, "GBps": c.nbytes / mc / 1e9,
                       "copy_GBps": bw, "share_of_copy": (c.nbytes / mc / 1e9) / bw if bw else None,
                       "device": name, "torch": torch.__version__, "kne_kernels": kne_kernels.__version__,
                       "date": datetime.date.today().isoformat()}
                rows.append(row)
                extra = f" {100 * row['share_of_copy']:5.1f}% of copy" if bw else ""
                print(f"{c.op:<21} {c.shape:<28} {c.dtype:<9} {nt:>2}t  {mc * 1e3:10.3f} ms  (p20 {p20c * 1e3:.3f}, "
                      f"p80 {p80c * 1e3:.3f})  baseline {mb * 1e3:10.3f} ms  x{mb / mc:6.2f}  "
                      f"{row['GBps']:7.2f} GB/s{extra}  [{used}]", flush=True)
    return rows


def overhead_cases(device: torch.device):
    """``(op, shape, call(backend))`` on tiny inputs: the cost of one call is argument checks, the
    choice of kernel and the launch, not arithmetic."""
    import kne_kernels

    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device)

    act, grad = rnd(4, 8), rnd(4, 8)
    w, wg = rnd(4, 8), rnd(4, 8)
    scores = rnd(1, 2, 8)
    weight, idx = rnd(4, 8), torch.tensor([0, 2], device=device)
    state = [torch.zeros(2, 8, device=device) for _ in range(3)]
    agrad, base = rnd(2, 8), weight[idx].clone()
    basis = torch.linalg.qr(torch.randn(8, 2, generator=g)).Q.contiguous().to(device)
    delta = rnd(2, 8)
    return [
        ("neuron_attribution", "[4, 8]", lambda b: kne_kernels.neuron_attribution(act, grad, backend=b)),
        ("weight_attribution", "[4, 8] dim=1", lambda b: kne_kernels.weight_attribution(w, wg, backend=b)),
        ("ensemble_select", "[1, 2, 8]", lambda b: kne_kernels.ensemble_select(scores, percentile=50.0, backend=b)),
        ("ensemble_adamw_step_", "[2, 8] of [4, 8]",
         lambda b: kne_kernels.ensemble_adamw_step_(weight, idx, agrad, *state, base, step=1, lr=1e-3, scale=1.0,
                                                    backend=b)),
        ("nullspace_project_", "[2, 8] of [4, 8], r=2",
         lambda b: kne_kernels.nullspace_project_(weight, idx, delta, basis, base, scale=1.0, backend=b)),
    ]


def overhead(args) -> List[dict]:
    """Microseconds per call of every public op on a tiny input, per backend: the backends
    alternate (``--repeats`` rounds of ``--calls`` calls each, after a warm-up), median and p20/p80
    over the rounds."""
    import kne_kernels

    device = torch.device(args.device)
    backends = args.backend or ["cpu", "torch"]
    torch.set_num_threads(1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    rows = []
    for op, shape, call in overhead_cases(device):
        for b in backends:  # warm-up: first-use checks, caches, lazy imports
            for _ in range(50):
                call(b)
        per = {b: [] for b in backends}
        for _ in range(args.repeats):
            for b in backends:
                _sync(device)
                t = time.perf_counter()
                for _ in range(args.calls):
                    call(b)
                _sync(device)
                per[b].append((time.perf_counter() - t) / args.calls * 1e6)
        for b in backends:
            med, p20, p80 = statistics.median(per[b]), _q(per[b], 0.2), _q(per[b], 0.8)
            rows.append({"op": op, "provider": f"kne_kernels[{b}]", "shape": shape, "dtype": "float32",
                         "metric": "time per call", "unit": "us", "median": med, "p20": p20, "p80": p80,
                         "threads": 1, "device": name, "torch": torch.__version__,
                         "kne_kernels": kne_kernels.__version__, "date": datetime.date.today().isoformat()})
            print(f"{op:<21} {shape:<24} {b:<7} {med:9.1f} us/call  (p20 {p20:.1f}, p80 {p80:.1f})", flush=True)
    return rows


def static_report() -> int:
    """Registers, spills and shared memory of every GPU kernel, built here without a GPU."""
    import subprocess

    print("Triton kernels (triton.compile, GPUTarget cuda 80/90):")
    rc = subprocess.call([sys.executable, "-m", "kne_kernels.triton.aot"])
    print("\nCUDA C++ kernels (nvcc -Xptxas -v):")
    from cuda_static import ptxas_report  # benchmarks/speed/cuda_static.py, beside this script
    rows = ptxas_report()
    print(f"  {'kernel':<48} {'arch':>5} {'regs':>5} {'spill B':>8} {'smem B':>7}")
    for r in rows:
        print(f"  {r['kernel'][:48]:<48} {r['arch']:>5} {r['registers']:>5} {r['spills_bytes']:>8} {r['shared_bytes']:>7}")
    spills = [r for r in rows if r["spills_bytes"]]
    return rc or (1 if spills else 0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench_kernels.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", nargs="+", default=None,
                    help="kne_kernels backend(s) for the candidate (default: auto on CPU; every live GPU backend, "
                         "triton and cuda, on CUDA)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="CPU thread counts (default 1 2)")
    ap.add_argument("--repeats", type=int, default=7, help="CPU repeats per case (median reported)")
    ap.add_argument("--quick", action="store_true", help="small shapes")
    ap.add_argument("--no-huge", action="store_true", help="skip the 2^28 ensemble_select case")
    ap.add_argument("--static", action="store_true", help="print the GPU kernels' resource usage and exit")
    ap.add_argument("--overhead", action="store_true",
                    help="microseconds per call on tiny inputs (default backends: cpu torch); overhead_<device>.csv")
    ap.add_argument("--calls", type=int, default=2000, help="--overhead: calls per timed round")
    ap.add_argument("--out", default=".", metavar="DIR",
                    help="folder for kernels_<device>.csv/.txt (default: the current folder)")
    args = ap.parse_args(argv)
    if args.static:
        return static_report()
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{'overhead' if args.overhead else 'kernels'}_{torch.device(args.device).type}.csv"
    lines: List[str] = []
    stdout = sys.stdout

    class _Tee:  # the terminal, and a copy for the .txt table
        def write(self, text):
            lines.append(text)
            return stdout.write(text)

        def flush(self):
            stdout.flush()

    sys.stdout = _Tee()
    try:
        if args.overhead:
            print(f"# kne_kernels per-call overhead on {args.device}: torch {torch.__version__}, {platform.machine()}, "
                  f"1 thread, median of {args.repeats} rounds of {args.calls} calls, backends alternating")
            rows = overhead(args)
        else:
            print(f"# kne_kernels benchmark on {args.device}: torch {torch.__version__}, {platform.machine()}, "
                  f"threads {args.threads if args.device == 'cpu' else torch.get_num_threads()}, "
                  f"{'do_bench' if args.device.startswith('cuda') else f'median of {args.repeats}'}")
            rows = run(args)
    finally:
        sys.stdout = stdout
    from kne.io import csv_text, write_text

    # each file whole or not at all: an interrupted write leaves the last run's table as it was
    write_text(path.with_suffix(".txt"), "".join(lines))
    write_text(path, csv_text(rows, list(rows[0])))
    print(f"wrote {path} and {path.with_suffix('.txt')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
