"""Training (``bam train``): ``config`` (hyper-parameters, LR schedule, optimizer),
``checkpointing`` (save, verify, resume), ``run_folder`` (the run folder's checks, claim and lock)
and ``loop`` (the training loop). The command-line handler is ``bam_model.cli.train``."""
from .checkpointing import load_checkpoint, remove_checkpoints, save_checkpoint, verify_checkpoint
from .config import TrainConfig, lr_at, make_optimizer
from .loop import Estimate, LossNotFinite, train
from .run_folder import FINAL_MODEL, METRICS, RunFolder, data_inputs, open_run

__all__ = ["FINAL_MODEL", "METRICS", "Estimate", "LossNotFinite", "RunFolder", "TrainConfig", "data_inputs",
           "load_checkpoint", "lr_at", "make_optimizer", "open_run", "remove_checkpoints", "save_checkpoint",
           "train", "verify_checkpoint"]
