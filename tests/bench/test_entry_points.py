"""The console scripts: where pyproject.toml points them, and what they say without the model extra."""
import ctypes
import importlib
import os
import subprocess
import sys

import pytest

from bam_bench import runner
from bam_model import entry

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _project() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def test_the_scripts_point_at_functions_that_exist():
    scripts = _project()["scripts"]
    assert set(scripts) == {"bam", "bam-bench"}
    for target in scripts.values():
        module, _, name = target.partition(":")
        assert callable(getattr(importlib.import_module(module), name)), target


def test_the_model_extra_is_what_the_entry_points_check():
    """The op library needs torch, triton, numpy and safetensors only; what bam_model and the
    commands need on top is the model extra, and the entry points check exactly that list."""
    project = _project()
    names = lambda reqs: {r.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip() for r in reqs}
    assert names(project["dependencies"]) == {"torch", "triton", "numpy", "safetensors"}
    assert names(project["optional-dependencies"]["model"]) == set(entry.MODEL_EXTRA.values())
    assert any(r.startswith("bam-moe[") and "model" in r for r in project["optional-dependencies"]["test"])


@pytest.mark.parametrize("command,missing", [("bam", "tokenizers, tqdm, PyYAML, matplotlib"),
                                             ("bam-bench", "tqdm, matplotlib")])
def test_without_the_model_extra_a_command_says_what_to_install(monkeypatch, capsys, command, missing):
    for module in entry.MODEL_EXTRA:
        monkeypatch.setitem(sys.modules, module, None)  # None in sys.modules: the import fails
    main = entry.bam if command == "bam" else runner.main
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 2
    assert capsys.readouterr().err == (f"{command}: error: {missing} not installed (the model extra): "
                                       "pip install 'bam-moe[model]'\n")


def test_bam_bench_needs_only_what_it_imports():
    """A GPU machine with torch, triton, tqdm and matplotlib runs bam-bench without the tokenizers
    and PyYAML that bam's own commands need: the runner and every suite import without them, and the
    runner's check lets it start."""
    code = ("import sys\nsys.modules['yaml'] = sys.modules['tokenizers'] = None\n"
            "import bam_bench.runner, bam_bench.moe, bam_bench.moa, bam_bench.model, bam_bench.decode\n"
            "try:\n    bam_bench.runner.main(['--help'])\n"
            "except SystemExit as e:\n    print('exit', e.code)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.endswith("exit 0\n"), proc.stdout[-500:] + proc.stderr[-2000:]
    assert "usage: bam-bench" in proc.stdout

def test_with_the_model_extra_bam_runs(capsys):
    assert entry.missing_model_extra() == []
    with pytest.raises(SystemExit) as exc:
        entry.bam(["--help"])
    assert exc.value.code == 0 and "usage: bam" in capsys.readouterr().out


def test_the_packages_import_without_the_model_extra():
    """The op library works with its four dependencies alone, and bam_model and bam_bench import
    without the extra too (they import its packages where they use them), so the entry points can
    run their check."""
    blocked = ", ".join(repr(m) for m in entry.MODEL_EXTRA)
    code = (f"import sys\nfor m in ({blocked},): sys.modules[m] = None\n"
            "import torch, bam_kernels as bk, bam_model, bam_model.nn, bam_bench.runner\n"
            "x = torch.randn(5, 8)\n"
            "w, idx = bk.route_topk(torch.randn(5, 4), k=2)\n"
            "print(tuple(bk.moe_mlp(x, torch.randn(4, 12, 8), torch.randn(4, 8, 6), w, idx).shape))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout == "(5, 8)\n", proc.stdout + proc.stderr


def test_the_commands_keep_freed_memory_for_reuse():
    """On glibc the bam command raises malloc's mmap and trim thresholds (a freed logits-sized block
    is reused, not unmapped and faulted in again); a user's own MALLOC_* setting is left alone."""
    code = ("import resource, torch\nfrom bam_model.entry import keep_freed_memory\n"
            "print(keep_freed_memory())\n"
            "for _ in range(3): torch.empty(64 << 20, dtype=torch.uint8).fill_(1)\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "for _ in range(20): torch.empty(64 << 20, dtype=torch.uint8).fill_(1)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    if not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "gnu_get_libc_version"):
        pytest.skip("glibc's malloc only")
    kept = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert kept.returncode == 0, kept.stderr
    said, faults = kept.stdout.split()
    assert said == "True" and int(faults) < 20 * (64 << 20) // 4096 // 10, kept.stdout  # 20 x 16k pages
    mine = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**env, "MALLOC_MMAP_THRESHOLD_": "131072"})
    said, faults = mine.stdout.split()
    assert said == "False" and int(faults) >= 20 * (64 << 20) // 4096 // 2, mine.stdout
