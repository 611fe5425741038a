"""Kept for ``bam_model.train`` imports: training now lives in ``bam_model.training`` (config,
checkpointing, run_folder, loop) and ``bam train``'s handler in ``bam_model.cli.train``."""
from .training import (
                       FINAL_MODEL,
                       METRICS,
                       Estimate,
                       LossNotFinite,
                       RunFolder,
                       TrainConfig,
                       data_inputs,
                       load_checkpoint,
                       lr_at,
                       make_optimizer,
                       open_run,
                       remove_checkpoints,
                       save_checkpoint,
                       train,
                       verify_checkpoint,
)

__all__ = ["FINAL_MODEL", "METRICS", "Estimate", "LossNotFinite", "RunFolder", "TrainConfig", "data_inputs",
           "load_checkpoint", "lr_at", "make_optimizer", "open_run", "remove_checkpoints", "save_checkpoint",
           "train", "verify_checkpoint"]
