"""The console scripts' entry points. ``pip install bam-moe`` installs the op library
(``bam_kernels``: torch, triton, numpy, safetensors); the models, the ``bam`` command and
``bam-bench`` need the ``model`` extra too. Without it a command ends in one line saying what to
install, and exit status 2, instead of a traceback from deep inside the command. ``keep_freed_memory``
is the commands' one process setting (``bam_model.cli.main`` calls it)."""
from __future__ import annotations

import ctypes
import importlib.util
import os
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


# glibc's malloc unmaps a freed block above its mmap threshold and gives the free top of its heap
# back past its trim threshold, so a CPU training step, which allocates and frees logits-sized
# tensors, would fault the same pages in again every step; kept for reuse, a training step of the
# demo's models takes less time (the measurements: docs/cpu-path.md). The heap keeps its peak; a single
# tensor above KEEP_FREED_BYTES still gets its own mapping.
KEEP_FREED_BYTES = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MALLOPT_MAX = 2 ** 31 - 1


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse (see above): blocks up to ``KEEP_FREED_BYTES``
    from its heap, and the heap's free top up to 2 GiB. Left alone where the C library is not glibc or
    the user set ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_``; returns whether it was set."""
    if not sys.platform.startswith("linux") or any(
            v in os.environ for v in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: their own allocator
            return False
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, KEEP_FREED_BYTES)
                    and libc.mallopt(_M_TRIM_THRESHOLD, _MALLOPT_MAX))
    except (OSError, AttributeError):
        return False


def bam(argv=None) -> int:
    """``bam``: ``bam_model.cli.main`` once the ``model`` extra is there."""
    require_model_extra("bam")
    from bam_model.cli import main  # noqa: PLC0415 (after the model-extra check)
    return main(argv)
