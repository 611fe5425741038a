"""bam_model: dense and Branch-Attend-Mix models, upcycling, checkpoints, training."""
from .auto_classes import register_on_import
from .config import BamConfig, DenseConfig
from .formats import export_hf, export_mixtral, from_pretrained, load_dense, save_pretrained
from .model import BamLM, CausalLM, CausalLMOutput, DenseLM
from .upcycle import branch, upcycle

# transformers' AutoConfig / AutoModelForCausalLM read bam folders without trust_remote_code once
# bam_model is imported (registered when transformers is first imported, not before).
register_on_import()

__all__ = ["BamConfig", "BamLM", "CausalLM", "CausalLMOutput", "DenseConfig", "DenseLM", "branch",
           "export_hf", "export_mixtral", "from_pretrained", "load_dense", "save_pretrained", "upcycle"]
