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


# glibc's malloc serves a block above its mmap threshold (at most 32 MiB however it adapts) with a fresh
# mapping and unmaps it when freed, and gives the top of its heap back to the system once more than its
# trim threshold is free there; a CPU training step, which allocates and frees logits-sized tensors,
# then faults the same pages in again every step. Measured on an AMD EPYC VM, 2 cores: the demo's quick
# model (16 x 64 tokens, 8,192-token vocabulary) 97 ms a step with 34,000 page faults, 54 ms with
# freed blocks kept; its full BAM expert-KV mixture (16 x 128 tokens) 425 ms by default, 503 ms with
# the trim threshold at 256 MiB (the step frees more than that at once), 371 ms with it at the most
# mallopt takes. Memory freed stays with the process for reuse (its heap keeps its peak); a single
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
    from bam_model.cli import main
    return main(argv)
