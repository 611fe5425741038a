"""The Hugging Face code of bam's models (``configuration_bam.py``, ``modeling_bam.py``).

Both files are copied into every model folder bam writes and named by its ``config.json``
(``auto_map``), so ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads a
bam model where bam is not installed. They import only torch and transformers (and bam_kernels when
it is there), never this package: ``generate.py`` writes them from ``hf_config.py``, ``hf_model.py``
and the package modules those import (docs/architecture.md, "The model is defined once").
"""

# transformers first: importing it runs bam's registration (bam_model.auto_classes), which imports
# these two files; were transformers first imported from inside one of them, that file would be
# half-initialised when the registration asks for it.
import transformers  # noqa: F401
