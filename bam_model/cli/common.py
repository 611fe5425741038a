"""Options several commands share, declared once: the device a command runs on and whether it shows
progress bars (the dtype of the weights, ``config.dtype_option``, is declared beside the dtypes, for
the training run's options too)."""
from __future__ import annotations

from ..options import option

DEVICE_HELP = "default: cuda when available, else cpu"


def device_option(torchrun: bool = False):
    """A ``--device``; ``torchrun``: the command runs one process per rank under torchrun."""
    extra = " (under torchrun rank r takes cuda:LOCAL_RANK)" if torchrun else ""
    return option(None, help=DEVICE_HELP + extra)


def progress_option(instead: str = ""):
    """A ``--no-progress``; ``instead``: what the command prints in the bars' place."""
    return option(False, help="no progress bar" + (f": {instead}" if instead else ""))
