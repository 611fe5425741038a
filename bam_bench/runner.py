"""bam-bench: check every op on the device, then time it against its reference and peers.

    bam-bench moe                  # one suite, on CUDA if present else the CPU
    bam-bench --all --device cuda  # every suite of the device: GPU correctness checks first, then timings
    bam-bench decode --quick       # SmolLM2 decoding through bam and transformers (run when named)

Each suite's results go to one set of files per machine, <device>-<machine>-<suite>.{json,md,png}
(cpu-x86-64-moe.json), which the next run on that machine replaces; their history is git's.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback

import torch

import bam_kernels
from bam_model.entry import require_model_extra
from bam_model.files import check_output_file, write_atomic, write_text_atomic
from bam_model.options import HelpFormatter

SUITES = ("moe", "moa", "model", "data", "decode")
# Run when named, not by --all, which times the kernels and models on the device (a GPU session's
# minutes are not spent on these): data is CPU work whatever the device (tokenizing a corpus);
# decode times a real model (SmolLM2) against transformers and needs both installed.
NAMED_ONLY = ("data", "decode")


def default_out() -> str:
    """``benchmarks/results`` of the source checkout this package is part of; installed, a folder
    in the working directory (never site-packages)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    checkout = os.path.isfile(os.path.join(root, "pyproject.toml"))
    if checkout and os.path.isdir(os.path.join(root, "benchmarks")):
        return os.path.join(root, "benchmarks", "results")
    return "bam-bench-results"


def _is_results(value: dict) -> bool:
    """Whether a JSON object is a results file of bam-bench (``Results``)."""
    return {"environment", "checks", "rows", "errors"} <= set(value)


def check_outputs(paths: dict[str, str], flag: str) -> None:
    """Before any work: each suite's ``.json`` is new or a results file of ours, and its ``.md`` and
    ``.png`` are new or lie beside such a ``.json`` (written with it); nothing else is replaced."""
    for path in paths.values():
        check_output_file(path, _is_results, flag=flag, what="a bam-bench results file")
        if os.path.exists(path):
            continue
        for sibling in (path[:-len(".json")] + ext for ext in (".md", ".png")):
            if os.path.lexists(sibling):
                raise ValueError(f"{flag}: {sibling!r} exists and bam-bench did not write it (no results "
                                 "file of bam-bench beside it); bam never replaces files it did not write: "
                                 "choose another folder")


def _available_suites():
    here = os.path.dirname(__file__)
    return [s for s in SUITES if os.path.exists(os.path.join(here, f"{s}.py"))]


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine() or "cpu"


def machine_tag(device: str, name: str | None = None) -> str:
    """The machine part of the results' file names: ``cpu-x86-64``, ``cuda-nvidia-h200``."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    name = device_name(device) if name is None else name
    safe = "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()[:40] or kind
    return f"{kind}-{safe}"


def environment(device: str) -> dict:
    env = {"device": device, "device_name": device_name(device), "torch": torch.__version__,
           "bam": bam_kernels.__version__, "python": platform.python_version(),
           "threads": torch.get_num_threads()}
    try:
        import triton  # noqa: PLC0415 (optional on CPU-only installs)
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.startswith("cuda"):
        env["cuda"] = torch.version.cuda
    return env


def markdown(result: dict) -> str:
    env, rows = result["environment"], result["rows"]
    lines = [f"# bam-bench on {env['device_name']} ({env['device']})", "",
             f"torch {env['torch']}, triton {env['triton']}, bam {env['bam']}", ""]
    checks = result.get("checks", [])
    failed = [c for c in checks if _failed(c)]
    if checks:
        lines += [f"Correctness checks on this device: {len(checks) - len(failed)} of {len(checks)} passed"
                  f" (every line is in the JSON).", ""]
        lines += [f"- {c}" for c in failed] + ([""] if failed else [])
    if result.get("errors"):
        lines += ["Errors:", ""] + [f"- {e}" for e in result["errors"]] + [""]
    suites = list(dict.fromkeys(r["suite"] for r in rows))
    for suite in suites:
        srows = [r for r in rows if r["suite"] == suite]
        lines += [f"## {suite}", "", "| case | provider | ms | p20-p80 ms | rate | vs first |",
                  "|---|---|---:|---|---:|---:|"]
        first = {}
        for r in srows:
            if "ms" not in r:
                lines.append(f"| {r['case']} | {r['provider']} | failed | | {r.get('error', '')} | |")
                continue
            base = first.setdefault(r["case"], r["ms"])
            rate = (f"{r['tflops']:.2f} TFLOP/s" if "tflops" in r else
                    f"{r['gbps']:.1f} GB/s" if "gbps" in r else
                    f"{r['tokens_per_s']:.0f} tok/s" if "tokens_per_s" in r else
                    f"{r['mbps']:.2f} MB/s" if "mbps" in r else "")
            if "rss_mib" in r:
                rss = f"peak RSS {r['rss_mib']:,.0f} MiB"
                rate = f"{rate}, {rss}" if rate else rss
            provider = f"{r['provider']} (agrees: {r['agreement']})" if "agreement" in r else r["provider"]
            lines.append(f"| {r['case']} | {provider} | {r['ms']:.3f} | "
                         f"{r.get('p20_ms', r['ms']):.3f}-{r.get('p80_ms', r['ms']):.3f} | {rate} | "
                         f"{base / r['ms']:.2f}x |")
        lines.append("")
    return "\n".join(lines)


def _failed(line: str) -> bool:
    return line.split(": ", 1)[-1].startswith("FAIL")


def plot(rows: list[dict], path: str) -> bool:
    """Speed relative to each case's first provider, as a bar chart (replaced atomically); with no
    timed row there is no chart, and a previous run's is removed rather than left beside new tables."""
    rows = [r for r in rows if "ms" in r]
    if not rows:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        return False
    import matplotlib  # noqa: PLC0415 (start-up: only the chart needs it)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 (start-up: only the chart needs it)
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
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)
    return True


class Results:
    """Check lines, rows and errors of one run, saved (JSON and markdown, atomically) after each:
    one file pair per suite, ``paths[suite]`` (its JSON; the markdown beside it). Check lines and
    errors start with their suite's name, rows carry it."""

    def __init__(self, env: dict, paths: dict[str, str]):
        self.data = {"environment": env, "checks": [], "rows": [], "errors": []}
        self.paths = paths

    def add(self, kind: str, item, suite: str) -> None:
        self.data[kind].append(item)
        self.save(suite)

    def part(self, suite: str) -> dict:
        """What one suite's files hold: everything, when the run has one suite."""
        if len(self.paths) == 1:
            return self.data
        mine = f"{suite}: "
        return {"environment": self.data["environment"],
                "checks": [c for c in self.data["checks"] if c.startswith(mine)],
                "rows": [r for r in self.data["rows"] if r["suite"] == suite],
                "errors": [e for e in self.data["errors"] if e.startswith(mine)]}

    def save(self, suite: str | None = None) -> None:
        """Rewrite one suite's files, or (``None``) every suite's."""
        for s in self.paths if suite is None else [suite]:
            part = self.part(s)
            write_text_atomic(self.paths[s], json.dumps(part, indent=1))
            write_text_atomic(self.paths[s][:-len(".json")] + ".md", markdown(part))

    def failed(self) -> bool:
        return bool(self.data["errors"]) or any(_failed(c) for c in self.data["checks"])


def _checking(device: str):
    """On CUDA the checks run each kernel on its first autotune config: compiling and timing every
    config of every variant the checks touch (three dtypes, odd shapes) would take minutes of a
    GPU loan, and the test suite already runs every config under the interpreter."""
    if not device.startswith("cuda"):
        return contextlib.nullcontext()
    from bam_kernels._triton import first_config_only  # noqa: PLC0415 (triton: optional)
    return first_config_only()


def _in_process(suites: list[str], device: str, args, results: Results) -> None:
    """All the suites' checks first, then their timings, in this process."""
    modules = {s: importlib.import_module(f"{__package__}.{s}") for s in suites}
    if not args.no_check:
        for s, mod in modules.items():
            try:
                with _checking(device):
                    for line in mod.check(device):
                        print(f"[check {s}] {line}", flush=True)
                        results.add("checks", f"{s}: {line}", s)
            except Exception as err:  # a check that crashed outside its guarded cases
                msg = f"{s}: FAIL checks stopped: {type(err).__name__}: {err}"
                print(f"[check {s}] {msg}", flush=True)
                results.add("checks", msg, s)
    for s, mod in modules.items():
        start = time.perf_counter()
        try:
            for row in mod.run(device, args.quick):
                row = {"suite": s, **row}
                shown = f"{row['ms']:9.3f} ms" if "ms" in row else f"failed: {row.get('error', '')}"
                print(f"[{s}] {row['case']:<40} {row['provider']:<24} {shown}", flush=True)
                results.add("rows", row, s)
        except Exception:  # the rows so far are kept; the traceback goes into the results
            tb = traceback.format_exc()
            print(tb, flush=True)
            results.add("errors", f"{s}: timings stopped: {tb.strip().splitlines()[-1]}", s)
        print(f"[{s}] {time.perf_counter() - start:.0f} s", flush=True)


def _isolated(suites: list[str], device: str, args, results: Results) -> None:
    """Each suite in its own process, so that a crash, a hang or a broken CUDA context in one
    suite costs that suite alone; a suite past ``--suite-timeout`` is stopped with what it saved."""
    with tempfile.TemporaryDirectory(prefix="bam-bench-") as tmp:
        for s in suites:
            part = os.path.join(tmp, f"{s}.json")
            cmd = [sys.executable, "-m", f"{__package__}.runner", s, "--device", device, "--no-isolate",
                   "--out", tmp, "--json", part] + (["--quick"] if args.quick else []) + \
                  (["--no-check"] if args.no_check else [])
            start = time.perf_counter()
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            limit = args.suite_timeout[s]
            try:
                code = subprocess.run(cmd, env=env, timeout=limit).returncode
                status = None if code in (0, 1) else f"{s}: the suite's process exited with code {code}"
            except subprocess.TimeoutExpired:
                status = f"{s}: stopped after {limit:.0f} s (--suite-timeout); what it measured is kept"
            print(f"[{s}] {time.perf_counter() - start:.0f} s", flush=True)
            if os.path.exists(part):
                with open(part) as f:
                    data = json.load(f)
                results.data["checks"] += data["checks"]
                results.data["rows"] += data["rows"]
                results.data["errors"] += data["errors"]
            if status:
                print(status, flush=True)
                results.data["errors"].append(status)
            results.save(s)


def _timeouts(spec: str | None, suites: list[str]) -> dict:
    """``--suite-timeout``: seconds per suite (None: no limit) from "300" or "moe=240,moa=180"."""
    if spec is None:
        return {s: None for s in suites}
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    try:
        if len(parts) == 1 and "=" not in parts[0]:
            out = {s: float(parts[0]) for s in suites}
        else:
            out = {s: None for s in suites}
            for part in parts:
                name, _, value = part.partition("=")
                if name not in out:
                    raise ValueError(f"--suite-timeout names {name!r}, which is not among the suites run "
                                     f"({', '.join(suites)})")
                out[name] = float(value)
    except ValueError as err:
        if "suite-timeout" in str(err):
            raise
        raise ValueError(f"--suite-timeout must be seconds (300) or suite=seconds pairs (moe=240,moa=180), "
                         f"got {spec!r}") from None
    if any(v is not None and not v > 0 for v in out.values()):
        raise ValueError(f"--suite-timeout must be a positive number of seconds, got {spec!r}")
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bam-bench", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("suites", nargs="*", help=f"suites to run, of {', '.join(SUITES)}")
    p.add_argument("--all", action="store_true",
                   help="run every suite of the device (moe, moa, model); data and decode run when named")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    p.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    p.add_argument("--out", default=default_out(),
                   help="folder for the JSON, markdown and PNG results")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="run each suite in its own process (default: on CUDA with several suites)")
    p.add_argument("--suite-timeout", default=None, metavar="SECONDS",
                   help="stop an isolated suite after this long, keeping what it measured: one number "
                        "for every suite, or per suite as moe=240,moa=180,model=120")
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)  # an isolated suite's one results file
    return p


def _suites(p: argparse.ArgumentParser, args) -> list[str]:
    """The suites to run; a CLI error for an unknown one, or one that says what it lacks
    (its ``unavailable()``: a package that is not installed)."""
    available = _available_suites()
    suites = [s for s in available if s not in NAMED_ONLY] if args.all else args.suites
    if not suites:
        p.error("name a suite or pass --all")
    for s in suites:
        if s not in available:
            p.error(f"unknown suite {s!r}; available: {', '.join(available)}")
        missing = getattr(importlib.import_module(f"{__package__}.{s}"), "unavailable", lambda: None)()
        if missing:
            p.error(f"suite {s!r} cannot run: {missing}")
    return suites


def main(argv=None) -> int:
    require_model_extra("bam-bench", needs=("tqdm", "matplotlib"))  # upcycle's progress bars, the charts
    p = _parser()
    args = p.parse_args(argv)
    suites = _suites(p, args)
    try:
        args.suite_timeout = _timeouts(args.suite_timeout, suites)
    except ValueError as err:
        p.error(str(err))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda asked for, but torch sees no CUDA device")
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
    isolate = args.isolate if args.isolate is not None else (device.startswith("cuda") and len(suites) > 1)
    if not isolate and any(v is not None for v in args.suite_timeout.values()):
        p.error("--suite-timeout stops suites run in their own processes: add --isolate (the default on "
                "CUDA with several suites)")
    env = environment(device)
    print(f"bam-bench on {env['device_name']} ({device}); torch {env['torch']}, triton {env['triton']}",
          flush=True)
    if args.json is not None:
        if len(suites) != 1:
            p.error("--json takes one suite")
        paths = {suites[0]: args.json}
    else:
        stem = os.path.join(args.out, machine_tag(device, env["device_name"]))
        paths = {s: f"{stem}-{s}.json" for s in suites}
    try:
        check_outputs(paths, "--json" if args.json is not None else "--out")
    except ValueError as err:
        p.error(str(err))
    os.makedirs(args.out, exist_ok=True)
    results = Results(env, paths)
    results.save()
    (_isolated if isolate else _in_process)(suites, device, args, results)
    if args.json is None:
        print()
        print(markdown(results.data))
        for s, path in paths.items():
            base = path[:-len(".json")]
            png = plot(results.part(s)["rows"], base + ".png")
            print(f"wrote {base}.json, .md{', .png' if png else ''}")
    return 1 if results.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
