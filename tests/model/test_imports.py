"""Every module imports alone, and the package-internal imports form no cycle.

Two checks, since each misses what the other sees: importing each module by itself in a fresh
interpreter finds a cycle that breaks at run time (a name read from a module still half
initialised) whatever order the rest of the suite imported things in; the static graph of
module-level imports finds a cycle that happens to import today, because of the order the
package ``__init__`` files happen to use, before it breaks for a user who imports another module
first. Imports inside functions are deferred on purpose and are left out of the graph;
``if TYPE_CHECKING:`` blocks never run and are left out too.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("bam_kernels", "bam_model", "bam_bench", "benchmarks")
# The I/O a model module must not load: file formats, the file system module, safetensors, gguf.
IO_MODULES = ("bam_model.formats", "bam_model.files", "safetensors", "gguf")


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file of every module of our packages (pytest files of ``benchmarks`` left out:
    they are tests, collected by pytest, not modules anyone imports; ``__main__`` modules too: they
    run a command when imported, which is what they are for)."""
    modules = {}
    for package in PACKAGES:
        base = root / package
        if not (base / "__init__.py").is_file():
            continue
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(root)
            if path.name in ("conftest.py", "__main__.py") or path.name.startswith("test_"):
                continue
            folders = (root / Path(*rel.parts[:i]) for i in range(1, len(rel.parts)))
            if not all((folder / "__init__.py").is_file() for folder in folders):
                continue  # a script in a plain folder, not part of a package
            parts = rel.with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _is_type_checking(node: ast.stmt) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING" or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level(body: list[ast.stmt]):
    """The import statements a module runs when it is imported (at its top level, or in a
    top-level ``if``/``try``/``with``, but not under ``if TYPE_CHECKING``)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and not _is_type_checking(node):
            yield from _module_level(node.body)
            yield from _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                yield from _module_level(block)
        elif isinstance(node, ast.With):
            yield from _module_level(node.body)


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the names its module-level imports load: our modules by their dotted name (``from
    pkg import sub`` is ``pkg.sub`` when ``sub`` is a module, else ``pkg``), others by their top-level
    name. A module depends on its parent packages too, but every package's ``__init__`` imports
    its own modules, so those edges are left out: they are how packages work, not cycles."""
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in _module_level(ast.parse(path.read_text(), str(path)).body):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            edges.update(t if t in modules else t.split(".")[0] for t in targets)
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None."""
    state = {}  # 1 on the current path, 2 done

    def visit(node, path):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt in graph and nxt not in state and (cycle := visit(nxt, path)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [])):
            return cycle
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_import_graph_has_no_cycle():
    modules = module_files()
    assert {"bam_kernels", "bam_model", "bam_model.formats.load", "bam_model.layers"} <= set(modules)
    cycle = find_cycle(import_graph(modules))
    assert cycle is None, "module-level imports form a cycle: " + " -> ".join(cycle)


def test_the_cycle_check_sees_a_cycle(tmp_path):
    pkg = tmp_path / "bam_model"
    (pkg / "formats").mkdir(parents=True)
    files = {"__init__.py": "from .formats import load\n", "model.py": "import torch\n",
             "build.py": "from . import model\nfrom .formats.load import x\n",
             "formats/__init__.py": "", "formats/load.py": "from ..build import y\n"}
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(module_files(tmp_path))
    assert graph["bam_model.build"] == {"bam_model.model", "bam_model.formats.load"}
    assert graph["bam_model.model"] == {"torch"}
    cycle = find_cycle(graph)
    assert cycle[0] == cycle[-1] and set(cycle) == {"bam_model.build", "bam_model.formats.load"}


def test_the_model_imports_no_io():
    graph = import_graph(module_files())
    for module in ("bam_model.model", "bam_model.layers", "bam_model.build"):
        loads = reachable(graph, module)
        assert not [m for m in loads if m.startswith(IO_MODULES)], f"{module} loads I/O: {sorted(loads)}"


# One fresh interpreter imports the heavy third-party packages once, then forks a child per module
# that imports that module alone (a quarter of a second each, against 4 s for an interpreter per module).
_IMPORT_EACH = textwrap.dedent("""
    import importlib, os, sys, traceback
    for heavy in ("torch", "torch._dynamo", "numpy", "safetensors.torch", "triton"):
        try:
            importlib.import_module(heavy)
        except ImportError:
            pass
    failed = []
    for name in sys.argv[1:]:
        pid = os.fork()
        if pid == 0:
            try:
                importlib.import_module(name)
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        if os.waitpid(pid, 0)[1] != 0:
            failed.append(name)
    print("failed:", " ".join(failed))
    sys.exit(1 if failed else 0)
""")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="imports each module in a forked child")
def test_every_module_imports_alone():
    names = sorted(module_files())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *names], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_nn_path_names_the_layers():
    import bam_model.cache as cache
    import bam_model.layers as layers
    import bam_model.nn as nn_path

    assert nn_path.MoE is layers.MoE and nn_path.MixtureOfAttention is layers.MixtureOfAttention
    assert nn_path.KVCache is cache.KVCache
    others = [name for name in nn_path.__all__ if name != "KVCache"]
    assert others and all(getattr(nn_path, name) is getattr(layers, name) for name in others)
