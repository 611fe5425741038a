"""Fisher merging: the diagonal Fisher against a hand computation, the weighted average's limits
(equal Fishers give the mean, a zero Fisher gives no weight), and merge="fisher" in upcycle and bam mix."""
import copy
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bam_model import DenseConfig, DenseLM, from_pretrained
from bam_model.cli import main as bam_main
from bam_model.fisher import GENERAL_MIX, diagonal_fisher, fisher_average, model_fishers
from bam_model.upcycle import branch, upcycle


@dataclass
class Out:
    logits: torch.Tensor
    nll: torch.Tensor


class Bigram(nn.Module):
    """logits of token t+1 = W[x_t]: the gradient of the mean NLL has a closed form."""

    def __init__(self, V):
        super().__init__()
        self.W = nn.Parameter(torch.randn(V, V, dtype=torch.float64))

    def forward(self, input_ids, labels=None):
        logits = self.W[input_ids]
        return Out(logits, F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()))


def test_fisher_of_a_bigram_model_matches_the_hand_computation():
    V, N, T = 5, 7, 9
    model = Bigram(V)
    ids = torch.randint(0, V, (N, T))
    W = model.W.detach().numpy()
    probs = np.exp(W - W.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    grads = []
    for seq in ids.numpy():
        # d/dW[a] of (1/(T-1)) sum_t CE(W[x_t], x_{t+1})
        #   = (1/(T-1)) sum_{t: x_t = a} (softmax(W[a]) - e_{x_{t+1}})
        grad = np.zeros((V, V))
        for a, b in zip(seq[:-1], seq[1:]):
            grad[a] += probs[a] - np.eye(V)[b]
        grads.append(grad / (T - 1))
    expected = np.mean([g ** 2 for g in grads], axis=0)
    fisher = diagonal_fisher(model, ids)
    assert set(fisher) == {"W"} and fisher["W"].dtype == torch.float32
    torch.testing.assert_close(fisher["W"].double(), torch.from_numpy(expected), rtol=1e-5, atol=1e-9)
    # the mean of per-sequence squares, not the square of the batch gradient
    batch_squared = torch.from_numpy(np.mean(grads, axis=0) ** 2)
    assert not torch.allclose(fisher["W"].double(), batch_squared, rtol=1e-2, atol=1e-6)
    assert model.W.grad is None


def test_equal_fishers_give_the_mean():
    thetas = [torch.randn(7, 33, dtype=torch.float64) for _ in range(3)]
    f = torch.rand(7, 33, dtype=torch.float64) * 1e-4
    torch.testing.assert_close(fisher_average(thetas, [f, f, f]), torch.stack(thetas).mean(0), rtol=1e-12,
                               atol=1e-15)
    zero = torch.zeros(7, 33)
    torch.testing.assert_close(fisher_average(thetas, [zero] * 3), torch.stack(thetas).mean(0), rtol=1e-12,
                               atol=1e-15)


def test_a_zero_fisher_gets_no_weight_and_weights_follow_the_fisher():
    a, b = torch.randn(4, 300), torch.randn(4, 300)
    fa, fb = torch.zeros(4, 300), torch.rand(4, 300) + 0.1
    fa[0] = 3 * fb[0]          # row 0: a counts three times as much as b
    fb[1] = 0                  # row 1: both zero, so the plain mean
    merged = fisher_average([a, b], [fa, fb])
    torch.testing.assert_close(merged[2:], b[2:].double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged[0], (0.75 * a[0] + 0.25 * b[0]).double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged[1], ((a[1] + b[1]) / 2).double(), rtol=1e-5, atol=1e-5)


def test_fisher_average_refuses_bad_input():
    t = torch.randn(3, 4)
    with pytest.raises(ValueError, match="one length"):
        fisher_average([t, t], [t.abs()])
    with pytest.raises(ValueError, match=r"fishers\[1\] has shape"):
        fisher_average([t, t], [t.abs(), torch.ones(4, 3)])
    with pytest.raises(ValueError, match="finite and >= 0"):
        fisher_average([t, t], [t.abs(), -t.abs()])
    with pytest.raises(ValueError, match="eps"):
        fisher_average([t, t], [t.abs(), t.abs()], eps=0)


def tiny(vocab=97, **changes) -> DenseLM:
    cfg = DenseConfig(**{**dict(vocab_size=vocab, dim=24, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=40,
                                max_seq_len=64, block="parallel"), **changes})
    return DenseLM(cfg)


def perturbed(model, scale=0.05):
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn_like(p))
    return out


def ones_like(model, value=1.0):
    return {name: torch.full_like(p, value) for name, p in model.named_parameters()}


@pytest.mark.parametrize("case", [dict(method="btx"), dict(method="bam", attention="shared-kv"),
                                  dict(method="bam", attention="expert-kv")],
                                  ids=lambda c: "-".join(c.values()))
def test_upcycle_with_equal_fishers_is_the_mean_merge(case):
    seed = tiny()
    experts = [perturbed(seed), perturbed(seed)]
    mean = upcycle(seed, experts, **case).state_dict()
    fisher = upcycle(seed, experts, merge="fisher", fishers=[ones_like(seed, 0.3)] * 3, **case).state_dict()
    assert mean.keys() == fisher.keys()
    for key in mean:
        torch.testing.assert_close(fisher[key], mean[key], rtol=1e-6, atol=1e-7, msg=key)


def test_upcycle_gives_no_weight_to_a_model_with_zero_fisher_on_a_tensor():
    seed = tiny()
    experts = [perturbed(seed), perturbed(seed)]
    fishers = [ones_like(m) for m in [seed] + experts]
    shared = ("model.embed_tokens.weight", "model.layers.1.self_attn.k_proj.weight", "model.norm.weight")
    for key in shared:
        for f in fishers[1:]:
            f[key].zero_()
    mixed = upcycle(seed, experts, attention="shared-kv", merge="fisher", fishers=fishers).state_dict()
    mean = upcycle(seed, experts, attention="shared-kv").state_dict()
    sd = seed.state_dict()
    for key in shared:
        torch.testing.assert_close(mixed[key], sd[key], rtol=1e-5, atol=1e-6, msg=key)
        assert not torch.allclose(mean[key], sd[key], atol=1e-3)
    torch.testing.assert_close(mixed["lm_head.weight"], mean["lm_head.weight"], rtol=1e-6, atol=1e-7)


def test_upcycle_refuses_bad_fisher_arguments():
    seed = tiny()
    experts = [perturbed(seed)]
    with pytest.raises(ValueError, match="merge must be one of"):
        upcycle(seed, experts, merge="median")
    with pytest.raises(ValueError, match="merge='fisher' only"):
        upcycle(seed, experts, fishers=[ones_like(seed)] * 2)
    with pytest.raises(ValueError, match="sparse"):
        upcycle(seed, experts, method="sparse", merge="fisher")
    with pytest.raises(ValueError, match="fishers must be a list of 2"):
        upcycle(seed, experts, merge="fisher", fishers=[ones_like(seed)])
    bad = ones_like(seed)
    bad.pop("model.norm.weight")
    with pytest.raises(ValueError, match=r"fishers\[1\] has no entry for parameter 'model.norm.weight'"):
        upcycle(seed, experts, merge="fisher", fishers=[ones_like(seed), bad])
    with pytest.raises(ValueError,
                       match=r"Fisher of model 0 \(seed\).*carries no tokenizer and its vocabulary \(97"):
        upcycle(seed, experts, merge="fisher")


def test_fisher_of_a_dense_model_on_its_domain_is_seeded_and_covers_every_parameter():
    model = tiny(vocab=8192, tie_embeddings=True)
    f1 = diagonal_fisher(model, "code", num_sequences=3, seq_len=17, seed=1)
    f2 = diagonal_fisher(model, "code", num_sequences=3, seq_len=17, seed=1)
    f3 = diagonal_fisher(model, "math", num_sequences=3, seq_len=17, seed=1)
    assert f1.keys() == dict(model.named_parameters()).keys()
    for key, p in model.named_parameters():
        assert f1[key].shape == p.shape and bool(torch.isfinite(f1[key]).all()) and bool((f1[key] >= 0).all())
        assert float(f1[key].sum()) > 0, key
        assert torch.equal(f1[key], f2[key])
    assert not torch.equal(f1["model.embed_tokens.weight"], f3["model.embed_tokens.weight"])
    assert model.training and all(p.grad is None for p in model.parameters())


def test_model_fishers_default_to_each_models_domain():
    seed = tiny(vocab=8192)
    code, = branch(seed, ["code"])
    kw = dict(num_sequences=2, seq_len=9)
    got = model_fishers([seed, code], **kw)
    want = [diagonal_fisher(seed, GENERAL_MIX, **kw), diagonal_fisher(code, "code", **kw)]
    for g, w in zip(got, want):
        for key in w:
            assert torch.equal(g[key], w[key])
    law, = branch(seed, ["law"])
    with pytest.raises(ValueError, match=r"experts\[0\].*unknown domain 'law'"):
        model_fishers([seed, law], **kw)


def test_bam_mix_merge_fisher_from_the_branch_domains(tmp_path, capsys):
    seed = tiny(vocab=8192, max_seq_len=256)
    seed.save_pretrained(str(tmp_path / "seed"))
    assert bam_main(["branch", str(tmp_path / "seed"), "--domains", "code", "legal", "--out",
                     str(tmp_path / "br")]) == 0
    experts = [str(tmp_path / "br" / d) for d in ("code", "legal")]
    for path in experts:
        perturbed(from_pretrained(path)).save_pretrained(path)
    models = [from_pretrained(p) for p in [str(tmp_path / "seed")] + experts]
    assert [m.config.domain for m in models] == [None, "code", "legal"]
    args = ["mix", "--base-model", str(tmp_path / "seed"), "--experts", *experts, "--method", "btx"]
    assert bam_main(args + ["--merge", "fisher", "--out", str(tmp_path / "fisher")]) == 0
    got = from_pretrained(str(tmp_path / "fisher")).state_dict()
    fishers = [diagonal_fisher(m, d) for m, d in zip(models, [GENERAL_MIX, "code", "legal"])]
    want = upcycle(models[0], models[1:], method="btx", merge="fisher", fishers=fishers).state_dict()
    mean = upcycle(models[0], models[1:], method="btx").state_dict()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
    assert not torch.allclose(got["model.embed_tokens.weight"], mean["model.embed_tokens.weight"], rtol=1e-4,
                              atol=1e-6)
    assert "merge: fisher" in (tmp_path / "fisher" / "mix.yaml").read_text()

    flag = ["--merge", "fisher", "--fisher-data", "scripture", "math", "drama", "--out",
            str(tmp_path / "flag")]
    assert bam_main(args + flag) == 0
    other = from_pretrained(str(tmp_path / "flag")).state_dict()
    fishers = [diagonal_fisher(m, d) for m, d in zip(models, ["scripture", "math", "drama"])]
    want = upcycle(models[0], models[1:], method="btx", merge="fisher", fishers=fishers).state_dict()
    for key in want:  # each model's Fisher from the domain named in its place
        torch.testing.assert_close(other[key], want[key], rtol=0, atol=0, msg=key)
    assert not torch.equal(other["model.norm.weight"], got["model.norm.weight"])
    assert "- scripture" in (tmp_path / "flag" / "mix.yaml").read_text()
    assert bam_main(args + ["--merge", "fisher", "--fisher-data", "code", "--out",
                            str(tmp_path / "bad")]) == 2
    assert "fisher_data must be a list of 3" in capsys.readouterr().err
    assert bam_main(args + ["--fisher-data", "code", "math", "legal", "--out", str(tmp_path / "bad")]) == 2
    assert "merge='fisher' only" in capsys.readouterr().err
