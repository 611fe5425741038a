"""bam_model: dense and Branch-Attend-Mix models, upcycling, checkpoints, training."""
