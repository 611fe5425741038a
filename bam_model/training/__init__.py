"""Training (``bam train``): ``config`` (hyper-parameters, LR schedule, optimizer),
``checkpointing`` (save, verify, resume), ``run_folder`` (the run folder's checks, claim and lock),
``loop`` (the training loop) and what plugs into it: ``extension`` (the hooks), ``mixup_run``
(weight mixup, on ``mixup``'s module). The command-line handler is ``bam_model.cli.train``."""
from .checkpointing import load_checkpoint, remove_checkpoints, save_checkpoint, verify_checkpoint
from .config import RunOptions, TrainConfig, lr_at, make_optimizer
from .extension import Extension, LossNotFinite
from .loop import Estimate, train
from .run_folder import FINAL_MODEL, METRICS, RunFolder, data_inputs, open_run

__all__ = ["FINAL_MODEL", "METRICS", "Estimate", "Extension", "LossNotFinite", "RunFolder", "RunOptions",
           "TrainConfig", "data_inputs", "load_checkpoint", "lr_at", "make_optimizer", "open_run",
           "remove_checkpoints", "save_checkpoint", "train", "verify_checkpoint"]
