"""``python -m bam_model.cli``: the ``bam`` command."""
import sys

from . import main

sys.exit(main())
