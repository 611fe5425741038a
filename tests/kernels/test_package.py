"""Checks across the ops: a whole BAM model in one torch.compile graph, and bam-bench's
first-config-only switch over every autotuner of the package."""
import pytest
import torch

import bam_kernels as bk
from bam_kernels import reference
from bam_kernels._triton import grouped_gemm as gg
from tests.support import gpu_tiles
from tests.support.oracle import rel


@pytest.mark.parametrize("attention", ["expert-kv", "shared-kv"])
def test_torch_compile_whole_bam_model_one_graph(attention):
    from bam_model.config import BamConfig
    from bam_model.model import BamLM
    torch._dynamo.reset()
    model = BamLM(BamConfig(vocab_size=97, dim=36, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=52,
                            num_experts=3, top_k=2, attention=attention))
    x = torch.randint(0, 97, (2, 9))
    ref = model(x, labels=x)
    ref.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(x, labels=x)
    out.loss.backward()
    torch.testing.assert_close(out.logits, ref.logits)
    torch.testing.assert_close(out.loss, ref.loss)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)


def test_first_config_only_restricts_every_autotuner_and_restores_it(monkeypatch):
    """The GPU checks of bam-bench run each kernel on its first config only (one compile per
    variant); afterwards the full lists, and no remembered choice, are back."""
    from bam_kernels._triton import autotuners, first_config_only

    tuners = autotuners()
    assert len(tuners) == 6 + 2 + 4 * 2  # gemm (epilogue, fma), wgrad, 4 attention kernels x 2 families
    two = gpu_tiles.gpu(gg, gg._gemm_configs, gg.PLAIN, False)[:2]
    monkeypatch.setattr(tuners[0], "configs", two)
    tuners[0].cache["stale"] = two[1]
    with first_config_only():
        assert all(len(t.configs) == 1 for t in tuners) and tuners[0].configs == two[:1]
        assert not tuners[0].cache
        x, w = torch.randn(40, 24), torch.randn(3, 20, 24)
        with bk.use_backend("triton"):
            y = bk.grouped_mm(x, w, torch.tensor([10, 25, 40], dtype=torch.int32))
        assert rel(y, reference.grouped_mm(x.double(), w.double(), torch.tensor([10, 25, 40]))) < 1e-5
    assert tuners[0].configs == two and not tuners[0].cache
