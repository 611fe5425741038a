"""bam_model: dense and Branch-Attend-Mix models, upcycling, checkpoints, training."""
from .config import BamConfig, DenseConfig
from .formats import export_mixtral, from_pretrained, load_dense, save_pretrained
from .model import BamLM, CausalLM, CausalLMOutput, DenseLM
from .upcycle import branch, upcycle

__all__ = ["BamConfig", "BamLM", "CausalLM", "CausalLMOutput", "DenseConfig", "DenseLM", "branch",
           "export_mixtral", "from_pretrained", "load_dense", "save_pretrained", "upcycle"]
