"""``python -m bam_bench``: the same as the ``bam-bench`` command."""
import sys

from .runner import main

sys.exit(main())
