"""bam-bench's runner: results saved as they come, failures recorded without ending the run."""
import json
import subprocess
import sys
import types

import pytest
import torch

from bam_bench import runner
from bam_bench.common import attempt, check_close, guarded


def _fake_suite():
    mod = types.ModuleType("bam_bench.fake")

    def check(device):
        yield "op a: rel err 1e-7 (tol 1e-05)"
        yield from guarded("op b", device,
                           lambda: [check_close("op b out", torch.ones(3), torch.zeros(3) + 2, 1e-5)])
        yield from guarded("op c", device, lambda: 1 / 0)
        yield "op d: rel err 2e-7 (tol 1e-05)"  # after the failures: still run

    def run(device, quick):
        yield {"case": "c1", "provider": "bam", **attempt(lambda: None, device, quick=True)}
        peer = attempt(lambda: torch.ones(2) @ torch.ones(3), device, True)
        yield {"case": "c1", "provider": "peer", **peer}
        raise RuntimeError("suite crashed half-way")

    mod.check, mod.run = check, run
    return mod


def test_failures_are_recorded_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bam_bench.fake", _fake_suite())
    monkeypatch.setattr(runner, "_available_suites", lambda: ["fake"])
    code = runner.main(["fake", "--device", "cpu", "--out", str(tmp_path)])
    assert code == 1
    (path,) = tmp_path.glob("*.json")
    data = json.loads(path.read_text())
    checks = data["checks"]
    assert len(checks) == 4 and checks[0].startswith("fake: op a") and checks[3].startswith("fake: op d")
    assert checks[1].startswith("fake: FAIL op b out: relative error")
    assert checks[2] == "fake: FAIL op c: ZeroDivisionError: division by zero"
    bam, peer = data["rows"]
    assert bam["provider"] == "bam" and bam["ms"] >= 0 and bam["p20_ms"] <= bam["p80_ms"]
    assert peer["provider"] == "peer" and "ms" not in peer and peer["error"].startswith("RuntimeError")
    assert len(data["errors"]) == 1 and "suite crashed half-way" in data["errors"][0]
    md = path.with_suffix(".md").read_text()
    assert "2 of 4 passed" in md and "FAIL op c" in md and "| c1 | peer | failed |" in md
    assert path.with_suffix(".png").exists()


def _clean_suite():
    mod = types.ModuleType("bam_bench.clean")
    mod.check = lambda device: iter(["op: rel err 0 (tol 1e-05)"])
    mod.run = lambda device, quick: iter([{"case": "c", "provider": "bam", "ms": 1.0}])
    return mod


def test_a_clean_run_exits_zero(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bam_bench.clean", _clean_suite())
    monkeypatch.setattr(runner, "_available_suites", lambda: ["clean"])
    assert runner.main(["clean", "--device", "cpu", "--out", str(tmp_path)]) == 0


def test_each_suite_has_one_set_of_results_per_machine_which_the_next_run_replaces(tmp_path, monkeypatch):
    """Results are named by machine and suite, not by time: a second run replaces the first's files
    (history is git's), and a run of two suites writes each suite's own set."""
    monkeypatch.setitem(sys.modules, "bam_bench.fake", _fake_suite())
    monkeypatch.setitem(sys.modules, "bam_bench.clean", _clean_suite())
    monkeypatch.setattr(runner, "_available_suites", lambda: ["fake", "clean"])
    stem = runner.machine_tag("cpu")

    def files(*suites):
        return sorted(f"{stem}-{s}.{ext}" for s in suites for ext in ("json", "md", "png"))

    assert runner.main(["clean", "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == files("clean")
    assert runner.main(["fake", "clean", "--device", "cpu", "--out", str(tmp_path)]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == files("fake", "clean")  # no temporary files left
    fake = json.loads((tmp_path / f"{stem}-fake.json").read_text())
    clean = json.loads((tmp_path / f"{stem}-clean.json").read_text())
    assert len(fake["checks"]) == 4 and len(fake["errors"]) == 1
    assert {r["suite"] for r in fake["rows"]} == {"fake"}
    assert clean["checks"] == ["clean: op: rel err 0 (tol 1e-05)"] and clean["errors"] == []
    assert [(r["suite"], r["case"]) for r in clean["rows"]] == [("clean", "c")]
    assert "1 of 1 passed" in (tmp_path / f"{stem}-clean.md").read_text()


@pytest.mark.slow
def test_isolated_suite_stopped_at_its_timeout_keeps_a_valid_result(tmp_path):
    """A suite past --suite-timeout is killed; the run reports it, exits 1 and leaves valid files."""
    proc = subprocess.run([sys.executable, "-m", "bam_bench.runner", "moe", "--device", "cpu", "--isolate",
                           "--suite-timeout", "3", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (path,) = tmp_path.glob("*.json")
    data = json.loads(path.read_text())
    assert any("stopped after 3 s" in e for e in data["errors"])
    assert "stopped after 3 s" in path.with_suffix(".md").read_text()


@pytest.mark.parametrize("argv,message", [
    (["nosuch"], "unknown suite 'nosuch'"),
    (["moe", "--suite-timeout", "0"], "--suite-timeout must be a positive"),
    (["moe", "--suite-timeout", "moa=10"], "names 'moa', which is not among the suites run (moe)"),
    (["moe", "--suite-timeout", "moe=ten"], "suite=seconds pairs"),
    (["moe", "--suite-timeout", "60"], "add --isolate"),
])
def test_bad_arguments_are_refused(capsys, argv, message):
    with pytest.raises(SystemExit):
        runner.main(argv + ["--device", "cpu"])
    assert message in capsys.readouterr().err


def test_suite_timeouts_parse():
    assert runner._timeouts(None, ["moe", "moa"]) == {"moe": None, "moa": None}
    assert runner._timeouts("90", ["moe", "moa"]) == {"moe": 90.0, "moa": 90.0}
    assert runner._timeouts("moe=240, moa=180", ["moe", "moa", "model"]) == {"moe": 240.0, "moa": 180.0,
                                                                          "model": None}


def test_transformers_peers_are_what_they_are_named():
    """The hf-grouped_mm peer runs torch._grouped_mm and hf-eager does not; a transformers release
    that ignored the implementation setting would be left out rather than timed under that name."""
    from bam_bench.moe import _runs_op, _transformers_block
    from bam_model.layers import MoE
    moe = MoE(64, 96, 4, top_k=2, normalize=True)
    grouped, eager = _transformers_block(moe, "grouped_mm"), _transformers_block(moe, "eager")
    assert grouped is not None and _runs_op(grouped, 64, "aten::_grouped_mm")
    assert eager is not None and not _runs_op(eager, 64, "aten::_grouped_mm")


def test_gpu_only_check_paths_run_on_small_sizes():
    """The checks bam-bench runs only on CUDA, run here at small sizes on the CPU, so that a slip
    in them cannot cost a GPU session: the int64 cache check, the large-size check against the
    torch path, the decode checks, and the copy-bandwidth row."""
    from bam_bench import moa, moe
    lines = moa._check_int64("cpu", B=3, S=257)
    lines += moe._check_ops("cpu", torch.float32, 300, 24, 40, 16, 8, 1e-5, vs="torch")
    lines += moa._check_case("cpu", torch.float32, 4, 1, 700, 4, 8, 8, 32, False, True, [700, 300, 1, 500],
                             1e-5)
    lines += moa._check_case("cpu", torch.float32, 2, 3, 600, 4, 8, 2, 32, True, True, [600, 17], 1e-5)
    assert len(lines) == 3 + 5 + 5 + 5 and not [line for line in lines if line.startswith("FAIL")], lines
    from bam_bench import model
    _, mixes = model._models("cpu", torch.float32, (1000, 64, 2, 4, 2, 96, 4))
    for attention, m in mixes.items():
        (line,) = model._check_bf16(m, "cpu", 1000, f"bam {attention}")
        assert not line.startswith("FAIL"), line
    row = moa._copy_row(1 << 20, "cpu", True, "copy case")
    assert row["provider"] == "copy" and row["ms"] > 0 and row["gbps"] > 0


def test_agreement_after_the_timings_flags_a_disagreeing_kernel():
    """On a GPU the timings run configs the checks did not (those the autotuner picks there): each
    fwd+bwd case of bam is compared once with its peer afterwards, and a gap over the tolerance
    reads FAIL in the row and the table."""
    from bam_bench.common import agreement
    from bam_bench.runner import markdown

    a = [torch.ones(4), torch.arange(4.0)]
    assert agreement(lambda: a, lambda: [t.clone() for t in a], "peer", 1e-4) == "0.0e+00 vs peer"
    off = agreement(lambda: a, lambda: [a[0], a[1] * 1.1], "peer", 3e-2)
    assert off == "FAIL 9.1e-02 vs peer"  # |0.1 a| / |1.1 a|
    env = {"device_name": "cpu", "device": "cpu", "torch": "x", "triton": "x", "bam": "x"}
    row = {"suite": "moe", "case": "c", "provider": "bam", "ms": 1.0, "agreement": off}
    assert "| bam (agrees: FAIL 9.1e-02 vs peer) |" in markdown({"environment": env, "rows": [row]})
