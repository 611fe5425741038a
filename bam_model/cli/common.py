"""Options several commands share, declared once: the dtype of the weights a command writes or
loads, and the device it runs on."""
from __future__ import annotations

from ..config import DTYPES
from ..options import option

DTYPE_CHOICES = tuple(sorted(DTYPES))
DEVICE_HELP = "default: cuda when available, else cpu"


def dtype_option(default: str | None, help: str):
    """A ``--dtype`` (and recipe key) of the weights: float32, bfloat16 or float16."""
    return option(default, help=help, choices=DTYPE_CHOICES, what=" or ".join(DTYPE_CHOICES),
                  accepts=lambda v: isinstance(v, str) and v in DTYPES)


def device_option(torchrun: bool = False):
    """A ``--device``; ``torchrun``: the command runs one process per rank under torchrun."""
    extra = " (under torchrun rank r takes cuda:LOCAL_RANK)" if torchrun else ""
    return option(None, help=DEVICE_HELP + extra)
