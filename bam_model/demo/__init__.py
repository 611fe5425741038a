"""``bam demo``: the BAM paper's comparison, and with ``ablations`` its ablations, rerun small on the
bundled corpus. ``config`` says what a run is, ``cost`` what a model costs, ``pipeline`` runs the
phases, ``ablations`` adds the paper's ablations, ``report`` writes the tables and plots."""
from .config import (
                     COMPUTE_MATCHED,
                     FULL,
                     METHODS,
                     QUICK,
                     DemoConfig,
                     expert_data,
                     general_weights,
                     mixture_data,
                     mixture_spec,
                     mixtures,
)
from .cost import compute_matched_steps, total_parameters
from .pipeline import DEMO_ENTRIES, PhaseRunner, run_demo
from .report import expert_domain_avg, summarize

__all__ = ["COMPUTE_MATCHED", "DEMO_ENTRIES", "FULL", "METHODS", "QUICK", "DemoConfig",
           "PhaseRunner", "compute_matched_steps", "expert_data", "expert_domain_avg",
           "general_weights", "mixture_data", "mixture_spec", "mixtures", "run_demo",
           "summarize", "total_parameters"]
