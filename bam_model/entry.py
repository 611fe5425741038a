"""The console scripts' entry points. ``pip install bam-moe`` installs the op library
(``bam_kernels``: torch, triton, numpy, safetensors); the models, the ``bam`` command and
``bam-bench`` need the ``model`` extra too. Without it a command ends in one line saying what to
install, and exit status 2, instead of a traceback from deep inside the command."""
from __future__ import annotations

import importlib.util
import sys

# Import name -> distribution, for each package the ``model`` extra of pyproject.toml adds.
MODEL_EXTRA = {"tokenizers": "tokenizers", "tqdm": "tqdm", "yaml": "PyYAML", "matplotlib": "matplotlib"}
INSTALL = "pip install 'bam-moe[model]'"


def _installed(module: str) -> bool:
    if module in sys.modules:  # None there means "known missing", as in the import system
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


def missing_model_extra(needs=tuple(MODEL_EXTRA)) -> list[str]:
    """The distributions of the ``model`` extra that are not installed, of those imported as ``needs``."""
    return [MODEL_EXTRA[module] for module in needs if not _installed(module)]


def require_model_extra(prog: str, needs=tuple(MODEL_EXTRA)) -> None:
    """Exit with status 2 and one line naming what to install, when a package of the ``model`` extra
    that ``prog`` imports (``needs``, import names; by default all of them) is missing."""
    missing = missing_model_extra(needs)
    if missing:
        print(f"{prog}: error: {', '.join(missing)} not installed (the model extra): {INSTALL}",
              file=sys.stderr)
        raise SystemExit(2)


def bam(argv=None) -> int:
    """``bam``: ``bam_model.cli.main`` once the ``model`` extra is there."""
    require_model_extra("bam")
    from bam_model.cli import main
    return main(argv)
