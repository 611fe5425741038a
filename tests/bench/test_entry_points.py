"""The console scripts: where pyproject.toml points them, and what they say without the model extra."""
import importlib
import os
import sys

import pytest

from bam_bench import runner
from bam_model import _entry

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
    assert names(project["optional-dependencies"]["model"]) == set(_entry.MODEL_EXTRA.values())
    assert any(r.startswith("bam-moe[") and "model" in r for r in project["optional-dependencies"]["test"])


@pytest.mark.parametrize("command", ["bam", "bam-bench"])
def test_without_the_model_extra_a_command_says_what_to_install(monkeypatch, capsys, command):
    monkeypatch.setitem(sys.modules, "yaml", None)  # None in sys.modules: the import fails
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    main = _entry.bam if command == "bam" else runner.main
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err == f"{command}: error: tokenizers, PyYAML not installed (the model extra): " \
                  "pip install 'bam-moe[model]'\n"


def test_with_the_model_extra_bam_runs(capsys):
    assert _entry.missing_model_extra() == []
    with pytest.raises(SystemExit) as exc:
        _entry.bam(["--help"])
    assert exc.value.code == 0 and "usage: bam" in capsys.readouterr().out
