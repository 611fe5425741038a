import os

# The Triton interpreter must be chosen before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import atexit
import shutil
import tempfile

import pytest
import torch

# Prepared data (the bundled corpus, raw --data paths) goes to a cache of this test session, shared
# by the commands the tests start, removed at the end: the user's own cache is never touched.
if not os.environ.get("BAM_DATA_CACHE"):
    os.environ["BAM_DATA_CACHE"] = tempfile.mkdtemp(prefix="bam-test-data-")
    atexit.register(shutil.rmtree, os.environ["BAM_DATA_CACHE"], True)

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

# Every Triton launch under the interpreter is bounds-checked (tests/support/sanitizer.py); set
# BAM_TEST_SANITIZE=0 to run without the checks.
if os.environ.get("BAM_TEST_SANITIZE", "1") != "0" and os.environ["TRITON_INTERPRET"] not in ("", "0"):
    from tests.support import sanitizer

    SANITIZED = sanitizer.install()
else:
    SANITIZED = False

# The interpreter's bf16 dots are garbage (integer products of the bit patterns); this makes them
# right, so bf16 runs on the CPU too (tests/support/interpreter_bf16.py).
if os.environ["TRITON_INTERPRET"] not in ("", "0"):
    from tests.support import interpreter_bf16

    BF16_DOTS = interpreter_bf16.install()
else:
    BF16_DOTS = False

# As the bam command does: freed blocks kept for reuse instead of unmapped and faulted in again.
from bam_model.entry import keep_freed_memory  # noqa: E402

keep_freed_memory()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def poison(monkeypatch):
    """Make torch.empty / empty_like return NaN (floats) or 2**40 (ints), so any output element an
    op forgets to write shows up in the comparison."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in (torch.int64,):
            t.fill_(2 ** 40)
        elif t.dtype in (torch.int32,):
            t.fill_(2 ** 30)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))
