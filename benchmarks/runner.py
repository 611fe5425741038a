"""bam-bench: check every op on the device, then time it against its reference and peers.

    bam-bench moe                  # one suite, on CUDA if present else the CPU
    bam-bench --all --device cuda  # every suite: GPU correctness checks first, then timings
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import sys
import tempfile

import torch

SUITES = ("moe", "moa", "model")
RESULTS = os.path.join(os.path.dirname(__file__), "results")


def _available_suites():
    here = os.path.dirname(__file__)
    return [s for s in SUITES if os.path.exists(os.path.join(here, f"{s}.py"))]


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine() or "cpu"


def environment(device: str) -> dict:
    import bam_kernels
    env = {"device": device, "device_name": device_name(device), "torch": torch.__version__,
           "bam": bam_kernels.__version__, "python": platform.python_version(),
           "threads": torch.get_num_threads()}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.startswith("cuda"):
        env["cuda"] = torch.version.cuda
    return env


def _atomic_write(path: str, text: str | bytes) -> None:
    mode = "wb" if isinstance(text, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, mode) as f:
        f.write(text)
    os.replace(tmp, path)


def markdown(rows: list[dict], env: dict) -> str:
    lines = [f"# bam-bench on {env['device_name']} ({env['device']})", "",
             f"torch {env['torch']}, triton {env['triton']}, bam {env['bam']}", ""]
    suites = []
    for r in rows:
        if r["suite"] not in suites:
            suites.append(r["suite"])
    for suite in suites:
        srows = [r for r in rows if r["suite"] == suite]
        lines += [f"## {suite}", "", "| case | provider | ms | p20-p80 ms | rate | vs first |",
                  "|---|---|---:|---|---:|---:|"]
        first = {}
        for r in srows:
            base = first.setdefault(r["case"], r["ms"])
            rate = (f"{r['tflops']:.2f} TFLOP/s" if "tflops" in r else
                    f"{r['gbps']:.1f} GB/s" if "gbps" in r else
                    f"{r['tokens_per_s']:.0f} tok/s" if "tokens_per_s" in r else "")
            lines.append(f"| {r['case']} | {r['provider']} | {r['ms']:.3f} | "
                         f"{r.get('p20_ms', r['ms']):.3f}-{r.get('p80_ms', r['ms']):.3f} | {rate} | "
                         f"{base / r['ms']:.2f}x |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = list(dict.fromkeys(f"{r['suite']}:{r['case']}" for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(cases) * len(providers)), 4.5))
    width = 0.8 / max(len(providers), 1)
    for j, p in enumerate(providers):
        xs, ys = [], []
        for i, c in enumerate(cases):
            for r in rows:
                if f"{r['suite']}:{r['case']}" == c and r["provider"] == p:
                    base = next(q["ms"] for q in rows if f"{q['suite']}:{q['case']}" == c)
                    xs.append(i + j * width)
                    ys.append(base / r["ms"])
        ax.bar(xs, ys, width, label=p)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
    ax.set_xticklabels(cases, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("speed relative to the first provider (higher is faster)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bam-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suites", nargs="*", help=f"suites to run, of {', '.join(SUITES)}")
    p.add_argument("--all", action="store_true", help="run every suite")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    p.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    p.add_argument("--out", default=RESULTS, help="folder for the JSON, markdown and PNG results")
    args = p.parse_args(argv)
    available = _available_suites()
    suites = available if args.all else args.suites
    if not suites:
        p.error("name a suite or pass --all")
    for s in suites:
        if s not in available:
            p.error(f"unknown suite {s!r}; available: {', '.join(available)}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda asked for, but torch sees no CUDA device")
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
    env = environment(device)
    print(f"bam-bench on {env['device_name']} ({device}); torch {env['torch']}, triton {env['triton']}",
          flush=True)
    modules = {s: importlib.import_module(f"benchmarks.{s}") for s in suites}
    checks = []
    if not args.no_check:
        for s, mod in modules.items():
            for line in mod.check(device):
                print(f"[check {s}] {line}", flush=True)
                checks.append(f"{s}: {line}")
    rows = []
    for s, mod in modules.items():
        for row in mod.run(device, args.quick):
            row = {"suite": s, **row}
            print(f"[{s}] {row['case']:<40} {row['provider']:<24} {row['ms']:9.3f} ms", flush=True)
            rows.append(row)
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    tag = "cuda" if device.startswith("cuda") else "cpu"
    safe = "".join(c if c.isalnum() else "-" for c in env["device_name"]).strip("-").lower()[:40] or tag
    base = os.path.join(args.out, f"{tag}-{safe}-{'-'.join(suites)}-{stamp}")
    _atomic_write(base + ".json", json.dumps({"environment": env, "checks": checks, "rows": rows}, indent=1))
    table = markdown(rows, env)
    _atomic_write(base + ".md", table)
    if rows:
        plot(rows, base + ".png")
    print()
    print(table)
    print(f"wrote {base}.json, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
