"""Register bam's model classes (``bam_model/remote``) with transformers' Auto classes.

After ``register()``, ``AutoConfig`` and ``AutoModelForCausalLM`` build bam folders from the
installed code, without ``trust_remote_code``. ``import bam_model`` calls ``register_on_import()``:
it registers at once when transformers is already imported, and otherwise right after transformers
is first imported, so that bam's command line does not pay for importing transformers (seconds)
when it does not use it.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

_DONE = []


def register() -> None:
    """Register ``bam-dense`` and ``bam-moe`` with transformers (once; later calls do nothing)."""
    if _DONE:
        return
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: PLC0415 (transformers: optional; bam registers with it once it is imported)

    from .remote.configuration_bam import BamDenseConfig, BamMoeConfig  # noqa: PLC0415 (transformers: optional; bam registers with it once it is imported)
    from .remote.modeling_bam import BamForCausalLM, BamMoeForCausalLM  # noqa: PLC0415 (transformers: optional; bam registers with it once it is imported)

    for config, model in ((BamDenseConfig, BamForCausalLM), (BamMoeConfig, BamMoeForCausalLM)):
        AutoConfig.register(config.model_type, config, exist_ok=True)
        AutoModelForCausalLM.register(config, model, exist_ok=True)
        # A folder transformers writes from these classes (model.save_pretrained after a fine-tune)
        # gets the two files and the auto_map too, so it loads where bam is not installed.
        config.register_for_auto_class()
        model.register_for_auto_class("AutoModelForCausalLM")
    _DONE.append(True)


def _register_quietly() -> None:
    try:
        register()
    except Exception as e:  # another transformers release: bam itself still works
        warnings.warn(f"bam could not register its models with transformers ({type(e).__name__}: {e}); "
                      "load bam folders with trust_remote_code=True", stacklevel=2)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds transformers as Python would and registers bam's classes once its module has run. It
    stays in ``sys.meta_path`` until then: a mere probe (``importlib.util.find_spec``) does not use
    it up."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "transformers":
            return None
        where = sys.meta_path.index(self)
        sys.meta_path.remove(self)  # the other finders say where transformers is
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(where, self)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            run(module)
            _register_quietly()

        spec.loader.exec_module = exec_module
        return spec


def register_on_import() -> None:
    """Register now if transformers is imported, else when it is; nothing if it is not installed."""
    if "transformers" in sys.modules:
        _register_quietly()
    elif importlib.util.find_spec("transformers") is not None and \
            not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
