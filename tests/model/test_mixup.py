"""Weight mixup (``bam train --mixup``): the document split its two kinds of step read, the
``WeightMixup`` wrapper (coefficient shapes, exact end points, gradients, materialize), and the
trainer with it (equal to a plain run when the coefficients are held at 1, the seed at 0; a
learned run's final model, its checkpoints and resuming; refused settings; the command line)."""
import copy
import hashlib
import json
import math
import random
import re
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

import bam_model
from bam_model import data as D
from bam_model.training import RunOptions, TrainConfig, train
from bam_model.training.mixup import WeightMixup, alpha_shape, logit, tensors_digest
from tests.model.test_train import Out, TinyLM, V, _cfg, _model
from tests.support.models import randomize_norms

# --- data: the task and mixup parts -------------------------------------------------------------


def _sha(text):
    return hashlib.sha256(text.encode()).hexdigest()


def _documents(n=24, seed=0):
    rng = random.Random(seed)
    return [f"document {i}: " + " ".join(f"w{rng.randrange(1000)}" for _ in range(rng.randrange(5, 120)))
            + "\n" for i in range(n)]


def test_split_train_cuts_whole_documents_by_their_hash():
    docs = _documents()
    total = sum(map(len, docs))
    for fraction in (0.05, 0.2, 0.5, 0.85):
        task, mixup = D.split_train(docs, fraction)
        # Disjoint, together every document once, each part in the documents' own order.
        where = [docs.index(d) for d in task], [docs.index(d) for d in mixup]
        assert sorted(where[0] + where[1]) == list(range(len(docs)))
        assert all(w == sorted(w) for w in where)
        assert mixup and task                                  # at least one document, never all
        # The mixup part is the first documents in the order of their SHA-256 ...
        assert max(map(_sha, mixup)) < min(map(_sha, task))
        # ... up to about ``fraction`` of the characters (the last one taken crossed it).
        held = sum(map(len, mixup))
        assert held >= fraction * total
        assert held - len(max(mixup, key=_sha)) < fraction * total
        # Deterministic, and the same documents whatever order they come in.
        assert D.split_train(docs, fraction) == (task, mixup)
        shuffled = docs[:]
        random.Random(fraction).shuffle(shuffled)
        task2, mixup2 = D.split_train(shuffled, fraction)
        assert set(mixup2) == set(mixup) and mixup2 == [d for d in shuffled if d in set(mixup)]
    # Tiny and large fractions: one document, and all but one.
    assert len(D.split_train(docs, 1e-9)[1]) == 1
    assert len(D.split_train(docs, 0.999)[0]) == 1
    assert D.split_train(docs[:2], 0.9)[0] and D.split_train(docs[:2], 0.9)[1]
    assert D.split_train(docs, 0) == (docs, []) and D.split_train(docs, 0.0)[0] is not docs
    assert D.split_train([], 0.3) == ([], [])
    for bad in (-0.1, 1, 1.5, float("nan"), True, "0.2", None):
        with pytest.raises(ValueError, match="fraction must be a number in"):
            D.split_train(docs, bad)


def test_split_train_cuts_a_lone_document_at_a_line_break():
    text = "".join(f"line {i} " + "x" * (i % 7) + "\n" for i in range(400))
    for fraction in (0.1, 0.25, 0.6):
        [task], [mixup] = D.split_train([text], fraction)
        assert task + mixup == text
        assert task.endswith("\n") and mixup.startswith("line ")
        assert len(mixup) == pytest.approx(fraction * len(text), abs=20)      # a line is at most 16
    [task], [mixup] = D.split_train(["no line break at all"], 0.5)
    assert task + mixup == "no line break at all" and task and mixup
    # A line break far before the share's point does not move the cut there (nor the held-out cut).
    text = "Title line\n" + "word " * 20_000
    [task], [mixup] = D.split_train([text], 0.2)
    assert task + mixup == text and len(mixup) == pytest.approx(0.2 * len(text), abs=1)


def test_copies_of_a_document_stay_on_one_side():
    docs = _documents()
    boiler = "Terms and conditions apply.\n" * 40
    with_copies = docs[:5] + [boiler] * 3 + docs[5:] + [boiler] * 3
    for fraction in (0.05, 0.2, 0.5, 0.8):
        task, mixup = D.split_train(with_copies, fraction)
        assert (boiler in task) != (boiler in mixup)
        assert task.count(boiler) + mixup.count(boiler) == 6


def test_the_parts_of_a_bundled_domain_hold_its_training_tokens():
    tok = D.load_tokenizer()
    src = D.Source("drama")
    whole = D.tokens(src, "train", tok)
    ends = src.prepared(tok).doc_ends("train").astype(np.int64)
    docs = np.split(np.asarray(whole), ends[:-1])
    assert len(docs) == len(src.documents("train")) > 2
    task, mixup = D.split_train(docs, 0.2)
    parts = [D.tokens(src, "train", tok, part=(p, 0.2)) for p in ("task", "mixup")]
    assert np.array_equal(parts[0], np.concatenate(task)) and np.array_equal(parts[1], np.concatenate(mixup))
    assert len(parts[0]) + len(parts[1]) == len(whole)
    eos = D.eos_token_id(tok)
    assert [int((p == eos).sum()) for p in parts] == [len(task), len(mixup)]
    assert 0.1 < len(parts[1]) / len(whole) < 0.3
    # Whole documents: each text of the mixup part is one of the domain's training documents.
    texts = set(src.documents("train"))
    assert all(tok.decode(d[:-1].tolist()) in texts for d in mixup)
    with pytest.raises(ValueError, match=r"part \('mixup', 0\) is empty"):
        D.tokens(src, "train", tok, part=("mixup", 0))
    with pytest.raises(ValueError, match="part applies to the train split"):
        D.tokens(src, "heldout", tok, part=("task", 0.2))
    with pytest.raises(ValueError, match="part must be None or"):
        D.tokens(src, "train", tok, part=("tasks", 0.2))


def test_a_stream_of_the_mixup_part_reads_only_that_part(tmp_path):
    """A lone text file of numbered lines: its train split (the first 90%) cut 75/25 at a line
    break; every window of the mixup part's stream holds lines of the last quarter only."""
    f = tmp_path / "lines.txt"
    f.write_text("".join(f"line {i:05d}\n" for i in range(2000)))
    tok = D.load_tokenizer()
    [train_text] = D.Source("lines", f).documents("train")
    assert train_text.endswith("\n") and 1750 < train_text.count("\n") < 1850
    mixup_text = tok.decode(D.tokens(D.Source("lines", f), "train", tok, part=("mixup", 0.25)).tolist())
    assert mixup_text.startswith("line ") and train_text.endswith(mixup_text)
    first = int(mixup_text[5:10])
    assert 1000 < first < 1500
    kw = dict(seq_len=20, batch_size=8, seed=1, tokenizer=tok)
    stream = D.BatchStream(str(f), part=("mixup", 0.25), **kw)
    seen = set()
    for _ in range(12):
        for row in next(stream).input_ids:
            numbers = [int(n) for n in re.findall(r"line (\d{5})", tok.decode(row.tolist()))]
            assert numbers and all(first <= n < 1800 for n in numbers), numbers
            seen.update(numbers)
    assert len(seen) > 100
    task = D.BatchStream(str(f), part=("task", 0.25), **kw)
    row = tok.decode(next(task).input_ids[0].tolist())
    assert all(int(n) < first for n in re.findall(r"line (\d{5})", row))

    state = json.loads(json.dumps(stream.state_dict()))
    assert state["part"] == ["mixup", 0.25]
    with pytest.raises(ValueError, match=r"part=\['mixup', 0.25\] was saved"):
        task.load_state_dict(state)
    with pytest.raises(ValueError, match=r"part=\['mixup', 0.25\] was saved"):
        D.BatchStream(str(f), part=("mixup", 0.3), **kw).load_state_dict(state)
    with pytest.raises(ValueError, match=r"part=\['mixup', 0.25\] was saved"):
        D.BatchStream(str(f), **kw).load_state_dict(state)          # the whole training split
    with pytest.raises(ValueError, match=r"part=None was saved"):
        stream.load_state_dict(D.BatchStream(str(f), **kw).state_dict())
    again = D.BatchStream(str(f), part=("mixup", 0.25), **kw)
    again.load_state_dict(state)
    assert torch.equal(next(again).input_ids, next(stream).input_ids)


# --- WeightMixup -----------------------------------------------------------------------------------

def test_alpha_shape():
    assert alpha_shape(torch.Size([6, 4]), "row") == (6, 1)
    assert alpha_shape(torch.Size([6]), "row") == (6,)
    assert alpha_shape(torch.Size([3, 8, 4]), "row") == (3, 8, 1)
    assert alpha_shape(torch.Size([3, 8, 4]), "tensor") == (1, 1, 1)
    assert alpha_shape(torch.Size([6]), "tensor") == (1,)
    assert alpha_shape(torch.Size([3, 8, 4]), "element") == (3, 8, 4)
    with pytest.raises(ValueError, match="granularity must be one of"):
        alpha_shape(torch.Size([6, 4]), "column")
    # On a BAM model: attention matrices, norms and the [E, out, in] expert stacks.
    cfg = bam_model.BamConfig(vocab_size=16, dim=4, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=4,
                              tie_embeddings=True, num_experts=2, top_k=1, attention="expert-kv")
    model = bam_model.BamLM(cfg)
    mix = WeightMixup(model, granularity="row")
    shapes = {n: tuple(lg.shape) for n, lg in zip(mix.names, mix.logits)}
    assert shapes["model.layers.0.mlp.experts.gate_up_proj"] == (2, 8, 1)
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (4, 1)
    assert shapes["model.norm.weight"] == (4,)
    assert "lm_head.weight" not in shapes                     # tied: mixed once, as the embedding
    assert mix.names == [n for n, _ in model.named_parameters()]
    assert list(mix.state_dict()) == [f"model.{k}" for k in model.state_dict()] + [
        f"logits.{i}" for i in range(len(mix.names))]


def _dense(seed, dim=4, vocab=16, dtype=torch.float64):
    torch.manual_seed(seed)
    cfg = bam_model.DenseConfig(vocab_size=vocab, dim=dim, n_layers=1, n_heads=1, n_kv_heads=1, ffn_dim=4,
                                tie_embeddings=True)
    return randomize_norms(bam_model.DenseLM(cfg)).to(dtype)


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _mixed(model, base, a):
    """A copy of ``model`` holding base + a * (W - base)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in out.named_parameters():
            p.copy_(base[n] + a * (p - base[n]))
    return out


def test_mixup_forward_at_one_zero_and_between():
    ids = torch.randint(0, 16, (2, 7))
    model, other = _dense(0, dtype=torch.float32), _dense(1, dtype=torch.float32)
    base = _weights(other)
    want = model(ids).logits
    one = WeightMixup(model, base, init=1.0, learn_alpha=False)
    assert torch.equal(one(ids).logits, want)
    zero = WeightMixup(model, base, init=0.0, learn_alpha=False)
    assert torch.equal(zero(ids).logits, other(ids).logits)
    assert not torch.equal(want, other(ids).logits)
    # A coefficient between: the forward of a model holding the mixed weights, the tied head
    # included (it must use the mixed embedding, not the model's own).
    for gran in ("element", "row", "tensor"):
        mix = WeightMixup(model, base, granularity=gran, init=0.3, learn_alpha=False)
        ref = _mixed(model, base, torch.sigmoid(torch.tensor(logit(0.3))).item())
        torch.testing.assert_close(mix(ids).logits, ref(ids).logits, rtol=1e-6, atol=1e-6)
        assert mix.alphas()["model.norm.weight"].shape == alpha_shape(torch.Size([4]), gran)
    # The model itself is untouched: its state is still W_task.
    for n, p in model.named_parameters():
        assert torch.equal(p, _weights(_dense(0, dtype=torch.float32))[n])


class Tied(nn.Module):
    """A float64 LM of every kind of weight: an embedding tied to the output head, a matrix with
    its bias, an [E, out, in] expert stack, a norm's gain and bias. (A DenseLM cannot be
    gradchecked: its RMSNorm normalises in float32.)"""

    def __init__(self, vocab=11, dim=4, experts=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.experts = nn.Parameter(torch.randn(experts, dim, dim) / dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight
        randomize_norms(self)
        self.double()

    def forward(self, input_ids, labels=None):
        h = self.embed(input_ids)
        h = h + torch.tanh(self.proj(h))
        h = h + torch.tanh(torch.einsum("btd,eod->bteo", h, self.experts)).mean(2)
        logits = self.head(self.norm(h))
        if labels is None:
            return Out(logits)
        return Out(logits, F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()))


@pytest.mark.parametrize("granularity", ["element", "row", "tensor"])
def test_mixup_gradients_match_finite_differences(granularity):
    """float64 gradcheck of W_task (mode "task") and of the logits (mode "mixup"), the tied weight
    included; the wrapper is built in float32 and converted to float64, its base with it."""
    torch.manual_seed(0)
    model = Tied().float()
    base = _weights(Tied().float())
    mix = WeightMixup(model, base, granularity=granularity, init=0.5).double()
    assert all(b.dtype == torch.float64 for b in mix.base) and model.head.weight is model.embed.weight
    assert mix.names == ["experts", "embed.weight", "proj.weight", "proj.bias", "norm.weight", "norm.bias"]
    with torch.no_grad():
        for lg in mix.logits:
            lg.uniform_(-2, 2)
    ids = torch.randint(0, 11, (2, 5))
    weights = [p for _, p in model.named_parameters()]
    logits = list(mix.logits)

    def loss():
        mix.zero_grad(set_to_none=True)
        return mix(ids, labels=ids).loss

    # gradcheck perturbs its inputs in place: here the module's own parameters.
    mix.set_mode("task")
    assert torch.autograd.gradcheck(lambda *_: mix(ids).logits, weights)
    loss().backward()
    assert all(lg.grad is None for lg in logits)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in weights)
    mix.set_mode("mixup")
    assert torch.autograd.gradcheck(lambda *_: mix(ids).logits, logits)
    loss().backward()
    assert all(p.grad is None for p in weights)
    assert all(lg.grad is not None and lg.grad.abs().sum() > 0 for lg in logits)
    with pytest.raises(ValueError, match="mode must be one of"):
        mix.set_mode("both")


def test_materialize_writes_the_mix_into_the_model():
    ids = torch.randint(0, 16, (2, 7))
    model = _dense(0, dtype=torch.float32)
    w = _weights(model)
    base = _weights(_dense(1, dtype=torch.float32))
    mix = WeightMixup(model, base, granularity="row", init=0.5)
    with torch.no_grad():
        for lg in mix.logits:
            lg.normal_()
    a = {n: torch.sigmoid(lg.detach()) for n, lg in zip(mix.names, mix.logits)}
    before = mix(ids).logits
    assert mix.materialize() is model
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), base[n] + a[n] * (w[n] - base[n]), rtol=1e-6, atol=1e-7)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)       # still tied
    assert torch.equal(model(ids).logits, before)


def test_a_given_base_is_kept_once_and_the_models_own_is_copied():
    model, other = _dense(0), _dense(1)
    own = WeightMixup(model, granularity="row")
    given = {n: p.detach() for n, p in _weights(other).items()}
    theirs = WeightMixup(model, given, granularity="row")
    aliased = WeightMixup(model, {n: p.detach() for n, p in _weights(model).items()}, granularity="row")
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for i, name in enumerate(own.names):
        assert own.base[i].untyped_storage().data_ptr() not in params       # a copy: W_task will move
        assert aliased.base[i].untyped_storage().data_ptr() not in params   # the model's own: copied
        assert theirs.base[i].data_ptr() == given[name].data_ptr()          # another model's: kept


def test_weight_mixup_on_a_bam_mixture(tmp_path):
    """BamLM (MoE experts, attention experts and routers on bam's kernels): held at one it trains
    as plainly, bit for bit; in the coefficients' step every logit gets a gradient."""
    config = bam_model.BamConfig(vocab_size=V, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=24,
                                 tie_embeddings=True, num_experts=3, top_k=2, attention="expert-kv")

    def model(seed=0):
        torch.manual_seed(seed)
        return bam_model.BamLM(config)
    data = _text_data(tmp_path / "data", chars=8_000)
    small = dict(TINY, steps=2, eval_every=0)
    plain = train(model(), RunOptions(data=data, out=tmp_path / "plain"), _cfg(**small), progress=False)
    held = train(model(), RunOptions(data=data, out=tmp_path / "held"),
                 _cfg(**small, mixup=True, mixup_init=1, mixup_lr=0), progress=False)
    assert _same(held) == [{**r, "alpha": 1.0} for r in _same(plain)]          # bitwise
    ours, theirs = _final(tmp_path / "held"), _final(tmp_path / "plain")
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], v) for k, v in theirs.items())
    # (Against another model: at a run's start W_task is the base, and the coefficients' gradient,
    # the sum of the weights' gradient times W_task - W_base, is zero.)
    other = model(1)
    randomize_norms(other)                      # (norm gains start at one in both)
    mix = WeightMixup(model(), {n: p.detach() for n, p in other.named_parameters()}, granularity="row")
    mix.set_mode("mixup")
    ids = torch.randint(0, V, (2, 12))
    mix(ids, labels=ids).loss.backward()
    assert all(lg.grad is not None and lg.grad.abs().sum() > 0 for lg in mix.logits)
    assert any(n.endswith("experts.gate_up_proj") for n in mix.names)
    assert all(p.grad is None for p in mix.model.parameters())


def test_a_base_that_does_not_fit_is_refused_by_name():
    model = _dense(0, dtype=torch.float32)
    base = _weights(model)
    with pytest.raises(ValueError, match=r"lacks 1 of the model's weights, e.g. \['model.norm.weight'\]"):
        WeightMixup(model, {k: v for k, v in base.items() if k != "model.norm.weight"})
    wrong = {**base, "model.layers.0.mlp.up_proj.weight": torch.zeros(4, 5)}
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.up_proj.weight' has shape \(4, 5\), the model "
                                         r"\(4, 4\)"):
        WeightMixup(model, wrong)
    with pytest.raises(ValueError, match="init=0 holds the mixing coefficients fixed"):
        WeightMixup(model, init=0)
    with pytest.raises(ValueError, match="init must be a number in"):
        WeightMixup(model, init=1.5, learn_alpha=False)
    changed = {**base, "model.norm.weight": base["model.norm.weight"] + 1}
    assert tensors_digest(base) == tensors_digest(_weights(model))
    assert tensors_digest(changed) != tensors_digest(base)
    assert tensors_digest({k: v.double() for k, v in base.items()}) != tensors_digest(base)
    assert tensors_digest(dict(reversed(base.items()))) == tensors_digest(base)
    x = torch.arange(6.0).view(2, 3)
    assert tensors_digest({"x": x.T}) == tensors_digest({"x": x.T.contiguous()}) != tensors_digest({"x": x})


# --- training ----------------------------------------------------------------------------------------

TINY = dict(steps=6, batch_size=4, seq_len=16, eval_every=3, eval_windows=2)
# Every value of a record that does not depend on the clock.
KEYS = ("step", "loss", "lr", "grad_norm", "tokens", "nll", "aux_loss", "eval", "alpha", "mixup_loss")


def _text_data(folder, chars=16_000):
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("code", "legal"):
        (folder / f"{name}.txt").write_text("\n".join(D.Source(name).documents("train"))[:chars])
    return f"{folder / 'code.txt'}:0.5,{folder / 'legal.txt'}:0.5"


def _same(records):
    return [{k: r[k] for k in KEYS if k in r} for r in records]


def _final(run):
    return load_file(str(run / "model" / "model.safetensors"))


def test_coefficients_held_at_one_train_exactly_as_a_plain_run(tmp_path):
    data = _text_data(tmp_path / "data")
    plain = train(_model(), RunOptions(data=data, out=tmp_path / "plain"), _cfg(**TINY), progress=False)
    held = train(_model(), RunOptions(data=data, out=tmp_path / "held"),
                 _cfg(**TINY, mixup=True, mixup_init=1.0, mixup_lr=0.0), progress=False)
    assert all(r["alpha"] == 1.0 and "mixup_loss" not in r for r in held)
    assert "eval" in held[2] and "eval" in held[-1]
    assert _same(held) == [{**r, "alpha": 1.0} for r in _same(plain)]          # bitwise
    ours, theirs = _final(tmp_path / "held"), _final(tmp_path / "plain")
    assert set(ours) == set(theirs) == {n for n, _ in _model().named_parameters()}
    assert all(torch.equal(ours[k], v) for k, v in theirs.items())


def test_coefficients_held_at_zero_leave_the_seed(tmp_path):
    data = _text_data(tmp_path / "data")
    run = tmp_path / "run"
    train(_model(), RunOptions(data=data, out=run), _cfg(**TINY, mixup=True, mixup_init=0.0, mixup_lr=0.0),
          progress=False)
    seed = _model().state_dict()
    final = _final(run)
    assert all(torch.equal(final[k], v) for k, v in seed.items())
    # ... though the task weights trained (they are in the checkpoint).
    ckpt = load_file(str(run / "checkpoints" / "step-0000006" / "model.safetensors"))
    assert not torch.equal(ckpt["model.head.weight"], seed["head.weight"])


def test_a_learned_run_mixes_its_task_weights_with_the_seed(tmp_path):
    data = _text_data(tmp_path / "data")
    run = tmp_path / "run"
    records = train(_model(), RunOptions(data=data, out=run),
                    _cfg(**TINY, mixup=True, mixup_lr=0.2, mixup_granularity="row"), progress=False)
    names = [n for n, _ in _model().named_parameters()]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert all(math.isfinite(r["mixup_loss"]) and 0 < r["alpha"] < 1 for r in records)
    assert len({r["alpha"] for r in records}) == 6 and records[-1]["alpha"] != 0.5
    assert [sorted(r.get("alpha_by_weight", {})) for r in records] == [[], [], sorted(names)] * 2
    report = json.loads((run / "mixup-alpha.json").read_text())
    assert report["granularity"] == "row" and set(report["weights"]) == {*names, "all"}
    assert report["weights"]["all"]["mean"] == records[-1]["alpha"]
    assert report["weights"]["head.weight"]["mean"] == records[-1]["alpha_by_weight"]["head.weight"]
    assert (run / "mixup-alpha.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    ckpt = run / "checkpoints" / "step-0000006"
    tensors = load_file(str(ckpt / "model.safetensors"))
    assert set(tensors) == {f"model.{n}" for n in names} | {f"logits.{i}" for i in range(len(names))}
    assert tensors["logits.3"].shape == (V, 1)                                 # head.weight, per row
    seed, final = _model().state_dict(), _final(run)
    assert set(final) == set(names)
    for i, n in enumerate(names):
        lg = tensors[f"logits.{i}"]
        assert lg.abs().max() > 0 and lg.unique().numel() > 1, n                # moved, row by row
        assert not torch.equal(tensors[f"model.{n}"], seed[n]), n
        assert torch.equal(final[n], torch.lerp(seed[n], tensors[f"model.{n}"], torch.sigmoid(lg))), n
    trainer = load_file(str(ckpt / "trainer.safetensors"))
    for i in range(len(names)):
        assert trainer[f"optimizer.logits.{i}.exp_avg_sq"].abs().max() > 0
        assert trainer[f"optimizer.logits.{i}.exp_avg"].shape == tensors[f"logits.{i}"].shape
    state = json.loads((ckpt / "trainer.json").read_text())
    assert state["mixup"]["base_digest"] == tensors_digest(seed)
    assert state["optimizer_param_groups"][-1]["params"] == [f"logits.{i}" for i in range(len(names))]
    assert state["optimizer_param_groups"][-1]["weight_decay"] == 0
    assert state["mixup"]["data"]["part"] == ["mixup", 0.2] and state["data"]["part"] == ["task", 0.2]
    assert state["mixup"]["data"]["position"] == state["data"]["position"] == 6 * 4
    assert state["mixup"]["loss"] == records[-1]["mixup_loss"]

    # One step from init 0.5 (logits 0): Adam's first step moves each logit by the coefficients'
    # peak lr, its sign the gradient's (the norm's: their gradients are well above Adam's eps).
    one = tmp_path / "one"
    train(_model(), RunOptions(data=data, out=one),
          _cfg(**{**TINY, "steps": 1}, warmup=0, mixup=True, mixup_lr=0.2, mixup_granularity="row"),
          progress=False)
    tensors = load_file(str(one / "checkpoints" / "step-0000001" / "model.safetensors"))
    for i in (1, 2):                                                            # norm.weight, norm.bias
        torch.testing.assert_close(tensors[f"logits.{i}"].abs(), torch.full((16,), 0.2), rtol=1e-2, atol=0)


def test_a_crashed_mixup_run_resumes_bitwise(tmp_path, monkeypatch):
    data = _text_data(tmp_path / "data")
    cfg = _cfg(**{**TINY, "steps": 8}, grad_accum=2, save_every=2, keep_checkpoints=2, mixup=True,
               mixup_lr=0.2, mixup_every=2, mixup_granularity="element")
    full = train(_model(), RunOptions(data=data, out=tmp_path / "full"), cfg, progress=False)
    assert [r["step"] for r in full if "mixup_loss" in r][0] == 2

    run = tmp_path / "run"
    # 2 training forwards a step, and 2 more on the mixup part every second step: call 17 is the
    # first of step 6's coefficient step, after its weight step (the step-6 checkpoint never comes).
    with pytest.raises(KeyboardInterrupt):
        train(_model(crash_at=17), RunOptions(data=data, out=run), cfg, progress=False)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 5
    resumed = train(_model(), RunOptions(data=data, out=run, resume=True), cfg, progress=False)
    assert _same(resumed) == _same(full)                                       # bitwise
    ours, theirs = _final(run), _final(tmp_path / "full")
    assert all(torch.equal(ours[k], v) for k, v in theirs.items())

    # A refused resume changes nothing, the manifest (its time of writing) included.
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".bam-lock"}
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "2099-12-31T23:59:59")
    other = {n: p.detach() + 0.01 for n, p in _model().named_parameters()}
    with pytest.raises(ValueError, match="the mixup base differs .* SHA-256 digests differ"):
        train(_model(), RunOptions(data=data, out=run, resume=True, mixup_base=other), cfg, progress=False)
    with pytest.raises(ValueError, match="MODEL is not the model the run in"):
        train(TinyLM(), RunOptions(data=data, out=run, resume=True), cfg,          # another starting model
              progress=False)
    for kw, flag in ((dict(mixup_every=1), "--mixup-every 1 .the run has 2."),
                     (dict(mixup_lr=0.1), "--mixup-lr 0.1 .the run has 0.2."),
                     (dict(mixup_granularity="row"), "--mixup-granularity 'row'"),
                     (dict(mixup_split=0.3), "--mixup-split 0.3"),
                     (dict(mixup_init=0.4), "--mixup-init 0.4")):
        with pytest.raises(ValueError, match=f"--resume: {flag}"):
            train(_model(), RunOptions(data=data, out=run, resume=True), TrainConfig(**{**vars(cfg), **kw}),
                  progress=False)
    plain = TrainConfig(**{k: v for k, v in vars(cfg).items() if not k.startswith("mixup")})
    with pytest.raises(ValueError, match="--resume: --mixup False"):
        train(_model(), RunOptions(data=data, out=run, resume=True), plain, progress=False)
    assert {p: p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != ".bam-lock"} == before
    # A run folder claimed by a bam before mixup (its manifest without the reports) is claimed
    # again, the reports' names added.
    manifest = json.loads((run / "bam-manifest.json").read_text())
    del manifest["files"]["mixup-alpha.json"], manifest["files"]["mixup-alpha.png"]
    (run / "bam-manifest.json").write_text(json.dumps(manifest))
    # The default split (None: 0.2 when the coefficients learn) given explicitly is the same setting.
    explicit = TrainConfig(**{**vars(cfg), "mixup_split": 0.2})
    resumed = train(_model(), RunOptions(data=data, out=run, resume=True), explicit, progress=False)
    assert _same(resumed) == _same(full)
    manifest = json.loads((run / "bam-manifest.json").read_text())
    assert {"mixup-alpha.json", "mixup-alpha.png"} <= set(manifest["files"])
    assert manifest["written"] == "2099-12-31T23:59:59"


@pytest.mark.parametrize("kw, match", [
    (dict(mixup_init=0.0), "mixup_init=0.0 holds the coefficients"),
    (dict(mixup_init=1), "mixup_init=1 holds the coefficients"),
    (dict(mixup_split=0.0), "mixup_split=0 leaves no documents"),
    (dict(mixup_lr=0.0, mixup_split=0.2), "mixup_split=0.2 with mixup_lr=0"),
    (dict(mixup_split=0.95), r"mixup_split must be a number in \[0, 0.9\]"),
    (dict(mixup_split=-0.1), r"mixup_split must be a number in \[0, 0.9\]"),
    (dict(mixup_init=1.5, mixup_lr=0.0), "mixup_init must be a number in"),
    (dict(mixup_lr=-0.01), "mixup_lr must be a number"),
    (dict(mixup_granularity="column"), "mixup_granularity must be one of"),
    (dict(mixup_every=0), "mixup_every must be an int >= 1"),
    (dict(mixup=False, mixup_lr=0.5), "mixup_lr=0.5 is a setting of weight-mixup training: add mixup=True"),
    (dict(mixup=False, mixup_granularity="row"), "mixup_granularity='row' is a setting of weight-mixup"),
])
def test_bad_mixup_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(steps=4, **{"mixup": True, **kw})
    TrainConfig(steps=4, **{**kw, "mixup": True, "mixup_init": 0.5, "mixup_lr": 0.01, "mixup_split": 0.2,
                            "mixup_granularity": "row", "mixup_every": 1})


def test_mixup_with_sharding_or_a_base_without_mixup_is_refused(tmp_path):
    cfg = _cfg(steps=1, warmup=0, mixup=True)
    with pytest.raises(ValueError, match="--strategy fsdp would shard"):
        train(_model(), RunOptions(data="code", out=tmp_path / "a", strategy="fsdp"), cfg, progress=False)
    with pytest.raises(ValueError, match="--expert-parallel would shard"):
        train(_model(), RunOptions(data="code", out=tmp_path / "b", expert_parallel=True), cfg,
              progress=False)
    with pytest.raises(ValueError, match=r"mixup_base \(--mixup-base\) is for weight-mixup training: add "
                                         "--mixup"):
        train(_model(), RunOptions(data="code", out=tmp_path / "c", mixup_base=_model()),
              _cfg(steps=1, warmup=0), progress=False)
    assert not list(tmp_path.iterdir())


def test_bam_train_mixup_command(tmp_path, capsys):
    from bam_model.cli import main

    def dense(seed, path):
        torch.manual_seed(seed)
        cfg = bam_model.DenseConfig(vocab_size=V, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=24,
                                    tie_embeddings=True, eos_token_id=0)
        bam_model.DenseLM(cfg).save_pretrained(str(path))
    dense(0, tmp_path / "seed")
    dense(1, tmp_path / "other")
    data = _text_data(tmp_path / "data", chars=12_000)
    base = ["train", str(tmp_path / "seed"), "--data", data, "--steps", "2", "--batch-size", "2",
            "--seq-len", "16", "--eval-windows", "1", "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "run"), "--mixup", "--mixup-granularity", "element",
                 "--mixup-lr", "0.05", "--mixup-split", "0.3", "--mixup-every", "1",
                 "--mixup-init", "0.6"]) == 0
    out, err = capsys.readouterr()
    assert re.search(r"weight mixup: the weights train on [\d,]+ tokens, the coefficients on [\d,]+ "
                     r"\(\d+% of the training tokens; --mixup-split 0.3\)", err)
    report = json.loads((tmp_path / "run" / "mixup-alpha.json").read_text())
    assert f"weight mixup: mean coefficient {report['weights']['all']['mean']:.3f}" in out
    assert report["granularity"] == "element"
    # Per element, each weight's coefficients moved both ways from 0.6.
    moved = [w["min"] < 0.599 and w["max"] > 0.601 for w in report["weights"].values() if "min" in w]
    assert len(moved) == 11 and all(moved)
    assert main(["eval", str(tmp_path / "run" / "model"), "--data", data, "--max-windows", "1", "--seq-len",
                 "16", "--no-progress", "--json", str(tmp_path / "eval.json")]) == 0
    res = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert res["avg"]["ppl"] > 1 and math.isfinite(res["avg"]["ppl"])

    assert main([*base, "--out", str(tmp_path / "zero"), "--mixup", "--mixup-init", "0", "--mixup-lr", "0",
                 "--mixup-base", str(tmp_path / "other")]) == 0
    ours, theirs = _final(tmp_path / "zero"), load_file(str(tmp_path / "other" / "model.safetensors"))
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], v) for k, v in theirs.items())

    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "nomix"), "--mixup-base", str(tmp_path / "other")]) == 2
    assert "--mixup-base is the frozen base of weight-mixup training: add --mixup" in capsys.readouterr().err
    assert not (tmp_path / "nomix").exists()

