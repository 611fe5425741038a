"""Helpers the model tests share."""
import torch


def randomize_norms(model):
    """Norm weights start at 1; make them random so that a mix-up of norms shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model
