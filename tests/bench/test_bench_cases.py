"""One case list (bam_bench/cases.py), two runners: every case is collected by the pytest-benchmark
suite, for both kinds of device, and timed by bam-bench's suites."""
import os
import re
import subprocess
import sys

import pytest

from bam_bench import cases, moa, moe

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _collect(kind: str) -> subprocess.Popen:
    """``pytest benchmarks --collect-only`` for one device kind (collecting needs no such device)."""
    cmd = [sys.executable, "-m", "pytest", "benchmarks", "--collect-only", "-q", "-p", "no:cacheprovider",
           "--bench-device", kind]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _expected(kind: str) -> tuple[set, set]:
    """The ids that must be collected (bam and its einsum baseline for every op, case and mode) and
    the case-and-mode prefixes every collected id must start with."""
    ids, prefixes = set(), set()
    for c in cases.MOE[kind]:
        for T in cases.MOE_TOKENS[kind]:
            for mode in cases.MODES:
                key = f"{c.id(T)}-{mode}"
                prefixes.add(key)
                ids |= {f"test_{op}[{key}-{p}]" for op in ("route_topk", "grouped_mm", "moe_mlp") for p in
                        ("bam", "einsum")}
                ids.add(f"test_moe_layer[{key}-bam]")
    for c in cases.MOA_TRAIN[kind]:
        for mode in cases.MODES:
            prefixes.add(f"{c.id}-{mode}")
            ids |= {f"test_moa_prefill[{c.id}-{mode}-{p}]" for p in ("bam", "einsum")}
    for c in cases.MOA_DECODE[kind]:
        prefixes.add(c.id)
        ids |= {f"test_moa_decode[{c.id}-{p}]" for p in ("bam", "einsum")}
    return ids, prefixes


def test_every_case_is_collected_by_the_pytest_suite():
    procs = {kind: _collect(kind) for kind in ("cpu", "cuda")}
    for kind, proc in procs.items():
        out = proc.communicate(timeout=120)[0]
        assert proc.returncode == 0, out
        collected = set(re.findall(r"::(test_\w+\[[^\]]+\])", out))
        ids, prefixes = _expected(kind)
        assert ids <= collected, (kind, sorted(ids - collected)[:10])
        strays = [i for i in collected if not any(i.split("[")[1].startswith(p + "-") for p in prefixes)]
        assert not strays, (kind, strays[:10])


def test_bam_bench_times_every_case_of_the_shared_list(monkeypatch):
    """Small cases put in the shared lists are exactly the cases bam-bench's moe and moa suites time."""
    tiny_moe = [cases.MoECase("tiny-a", 16, 24, 4, 2, True), cases.MoECase("tiny-b", 8, 16, 3, 1, False)]
    tiny_train = [cases.MoACase("tiny shared-kv", 1, 8, 8, 2, 4, 2, 8, False)]
    tiny_decode = [cases.MoACase("tiny decode expert-kv", 2, 1, 16, 2, 4, 2, 8, True)]
    monkeypatch.setitem(cases.MOE, "cpu", tiny_moe)
    monkeypatch.setitem(cases.MOE_TOKENS, "cpu", [5, 9])
    monkeypatch.setitem(cases.MOA_TRAIN, "cpu", tiny_train)
    monkeypatch.setitem(cases.MOA_DECODE, "cpu", tiny_decode)
    monkeypatch.setitem(cases.MOE_MODEL, "cpu", tiny_moe[0])
    monkeypatch.setitem(cases.MOE_MODEL_BATCH, "cpu", (1, 8))

    def untimed(steps, device, quick=False):
        return {name: {"ms": 1.0} for name in steps}

    monkeypatch.setattr(moe, "time_group", untimed)
    monkeypatch.setattr(moa, "time_group", untimed)
    timed = {row["case"] for row in [*moe.run("cpu", False), *moa.run("cpu", False)]}
    listed = {c.label(T, mode) for c in tiny_moe for T in (5, 9) for mode in cases.MODES}
    listed |= {c.label(mode) for c in tiny_train for mode in cases.MODES} | {c.label() for c in tiny_decode}
    listed |= {cases.model_label(tiny_moe[0], 1, 8, mode) for mode in cases.MODES}
    assert timed == listed


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_case_names_are_unique(kind):
    """The pytest suite finds a case by its name, and its test ids are made of the names."""
    for listed in (cases.MOE[kind], cases.MOA_TRAIN[kind] + cases.MOA_DECODE[kind]):
        ids = [c.name.replace(" ", "-") for c in listed]
        assert len(ids) == len(set(ids)), ids
