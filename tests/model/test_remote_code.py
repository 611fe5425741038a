"""The Hugging Face code of a model folder is generated from bam's own modules (the model is defined
once): the committed files are what the generator writes, and what it copies is bam's code, checks
included."""
import ast
import dataclasses
import re

import pytest
import torch

from bam_model import BamConfig, BamLM
from bam_model.remote import generate as gen
from bam_model.remote.configuration_bam import BamDenseConfig, BamMoeConfig
from tests.support.oracle import rel


def test_the_committed_remote_files_are_what_the_generator_writes():
    for file, text in gen.generate().items():
        on_disk = (gen.REMOTE / file).read_text(encoding="utf-8")
        assert on_disk == text, f"{file} is out of date: run `python -m bam_model.remote.generate`"
    assert gen.main(["--check"]) == 0


def test_the_generated_files_define_each_name_once_and_import_no_bam_module():
    for file, text in gen.generate().items():
        tree = ast.parse(text)
        names = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        assert len(names) == len(set(names)), file
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and not node.level:
                assert node.module.split(".")[0] not in ("bam_model", "bam_kernels"), (file, node.module)
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.module == "configuration_bam", (file, node.module)
    modeling = gen.generate()["modeling_bam.py"]
    # bam's layers, not a restatement: the classes of bam_model.layers and bam_model.blocks
    for name in ("MoE", "MoEExperts", "MixtureOfAttention", "RouterLosses", "Attention", "MLP", "RMSNorm",
                 "DecoderLayer", "make_layer", "route", "load_balancing_loss", "router_z_loss"):
        assert re.search(rf"\n(class|def) {name}\b", modeling), name
    assert "class KVCache" not in modeling  # what the remote code does not use is not copied


def test_a_change_to_a_layer_makes_the_check_fail(tmp_path, monkeypatch):
    """The check sees a change in any module the files are made from, not only in the two sources."""
    package = tmp_path / "bam_model"
    (package / "remote").mkdir(parents=True)
    for path in gen.PACKAGE_ROOT.joinpath("bam_model").rglob("*.py"):
        target = package / path.relative_to(gen.PACKAGE_ROOT / "bam_model")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.setattr(gen, "PACKAGE_ROOT", tmp_path)
    monkeypatch.setattr(gen, "REMOTE", package / "remote")
    assert gen.main(["--check"]) == 0
    ops = package / "ops.py"
    line = "        weights_Tk = weights_Tk / weights_Tk.sum(dim=-1, keepdim=True)"
    assert line in ops.read_text()
    ops.write_text(ops.read_text().replace(line, line + " * 1.0"), encoding="utf-8")
    assert gen.main(["--check"]) == 1
    assert "* 1.0" not in (package / "remote" / "modeling_bam.py").read_text()  # --check writes nothing
    assert gen.main([]) == 0
    assert "* 1.0" in (package / "remote" / "modeling_bam.py").read_text()
    assert gen.main(["--check"]) == 0


def test_the_generator_refuses_what_it_cannot_copy(tmp_path, monkeypatch):
    package = tmp_path / "bam_model"
    (package / "remote").mkdir(parents=True)
    monkeypatch.setattr(gen, "PACKAGE_ROOT", tmp_path)
    (package / "a.py").write_text("def _h():\n    return 1\n\n\ndef fa():\n    return _h()\n")
    (package / "b.py").write_text("def _h():\n    return 2\n\n\ndef fb():\n    return _h()\n")
    body = "\n\n\ndef one():\n    return "
    sources = {
        "module": ("from .. import b" + body + "b.fb()\n", "import names from bam's modules"),
        "twice": ("from ..a import fa\nfrom ..b import fb" + body + "fa() + fb()\n",
                  "_h is defined in both bam_model.a and bam_model.b"),
        "absolute": ("import bam_kernels" + body + "bam_kernels\n", "`import bam_kernels` at the top"),
        "renamed": ("from ..a import fa as g" + body + "g()\n", "`as` on an import"),
        "missing": ("from ..a import nothing" + body + "nothing()\n", "does not define nothing"),
        "unknown": ("X = 1" + body + "X + helper()\n", "'helper' is used but neither defined, imported"),
        "branch": ("import sys\nif sys.platform:\n    def f():\n        return 1\n",
                   "a top-level if statement"),
        "call": ("SCALES = {}\nSCALES.update(a=1)\n", "a top-level expr statement"),
    }
    for name, (text, message) in sources.items():
        (package / "remote" / f"{name}.py").write_text(text)
        with pytest.raises(ValueError, match=message):
            gen.Generator().take_all(f"bam_model.remote.{name}")
    (package / "remote" / "fine.py").write_text("from ..a import fa\n\n\ndef one():\n    return fa()\n")
    g = gen.Generator()
    g.take_all("bam_model.remote.fine")
    text = g.render("bam_model.remote.fine")
    assert text.index("def _h") < text.index("def fa") < text.index("def one")
    assert "def fb" not in text
    assert [line for line in text.splitlines() if "import" in line] == ["from __future__ import annotations"]


def test_the_hugging_face_config_checks_what_bams_config_checks():
    with pytest.raises(ValueError, match=r"num_experts_per_tok must be an int in \[1, num_local_experts=2\]"):
        BamMoeConfig(num_local_experts=2, num_experts_per_tok=3)
    with pytest.raises(ValueError, match="hidden_act must be 'silu'"):
        BamDenseConfig(hidden_act="gelu")
    with pytest.raises(ValueError, match="straight_through=True needs norm_topk_prob=True"):
        BamMoeConfig(straight_through=True)
    c = BamMoeConfig(hidden_size=32, num_attention_heads=4, num_experts=3, attention="shared-kv")
    assert (c.num_local_experts, c.head_dim, c.num_key_value_heads) == (3, 8, 4)
    # the remote file's own copy of BamConfig (so compared by its fields)
    assert type(c.bam_config()).__name__ == "BamConfig"
    assert dataclasses.asdict(c.bam_config()) == dataclasses.asdict(BamConfig(
        vocab_size=32000, dim=32, n_layers=4, n_heads=4, n_kv_heads=4, ffn_dim=1376, num_experts=3,
        attention="shared-kv"))
    assert BamMoeConfig().bam_config() == BamMoeConfig.from_dict(BamMoeConfig().to_dict()).bam_config()


@pytest.mark.parametrize("features", [
    {}, dict(attention="shared-kv", attention_top_k=2), dict(qkv_bias=True), dict(qk_norm="head"),
    dict(qk_norm="projection", block="post-norm", norm_in_float32=True),
    dict(block="parallel", nope_layers=[0]),
    dict(embedding_multiplier=3.0, residual_multiplier=0.5, attention_scale=0.2, logits_scaling=4.0)])
def test_the_remote_model_is_bams_model_on_plain_pytorch(monkeypatch, features):
    """With bam_kernels hidden, the copied ops fall back to PyTorch and give bam's logits, loss and
    gradients (the remote code of a machine without bam), for every feature a family brings."""
    from bam_model.remote import modeling_bam

    settings = {"attention": "expert-kv", **features}
    config = BamConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=40, num_experts=3,
                       top_k=2, **settings)
    torch.manual_seed(0)
    ours = BamLM(config).double()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith(("router.weight", "gate.weight")):
                p.normal_(0, 1.0)
            elif "norm" in name or name.endswith("bias"):
                p.uniform_(0.5, 1.5)
    hf_config = BamMoeConfig(**{k: v for k, v in config.to_dict().items() if k != "model_type"})
    theirs = modeling_bam.BamMoeForCausalLM(hf_config).double()
    theirs.load_state_dict(ours.state_dict())
    monkeypatch.setattr(modeling_bam, "_bk", None)
    monkeypatch.setattr(modeling_bam, "_WARNED", [True])
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))
    want = ours(ids, labels=ids)
    got = theirs(input_ids=ids, labels=ids)
    # bam_kernels' routing weights are float32 (the fallback's are float64): float32 agreement
    assert rel(got.logits, want.logits) < 1e-6
    assert rel(got.loss, want.loss) < 1e-6
    want.loss.backward()
    got.loss.backward()
    grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        assert rel(grads[name].grad, p.grad) < 1e-5, name
