"""bam folders are Hugging Face model folders: AutoModelForCausalLM loads them (remote code, or the
classes bam_model registers), with bam's logits; HF generate with a cache and left padding; the
Trainer; PEFT LoRA; lm-evaluation-harness on the offline tasks."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

import bam_model
from bam_model import BamConfig, BamLM, DenseConfig, DenseLM
from bam_model.data import load_tokenizer
from tests.support.oracle import rel

DENSE = DenseConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=128)
MIXTURES = {
    "bam-expert-kv": dict(num_experts=3, top_k=2, attention="expert-kv"),
    "bam-shared-kv-parallel": dict(num_experts=3, top_k=1, attention="shared-kv", block="parallel"),
    "bam-straight-through": dict(num_experts=2, top_k=1, normalize=True, straight_through=True,
                                 attention_top_k=1),
    "btx": dict(num_experts=3, top_k=2, normalize=True, attention="dense", method="btx"),
    "sparse": dict(num_experts=2, top_k=1, normalize=True, attention="dense", method="sparse"),
}


def tiny(kind: str):
    torch.manual_seed(0)
    if kind == "dense":
        return DenseLM(DENSE).eval()
    settings = dict(MIXTURES[kind])
    block = settings.pop("block", "sequential")
    model = BamLM(BamConfig(**{**DENSE.__dict__, "block": block}, **settings)).eval()
    with torch.no_grad():  # routers away from uniform, so that routing matters
        for name, p in model.named_parameters():
            if name.endswith(("router.weight", "gate.weight")):
                p.normal_(0, 1.0)
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for kind in ["dense", *MIXTURES]:
        tiny(kind).save_pretrained(str(root / kind))
        out[kind] = root / kind
    return out


@pytest.mark.parametrize("kind", ["dense", *MIXTURES])
def test_auto_model_loads_every_kind_with_bams_logits(kind, folders):
    ours = bam_model.from_pretrained(str(folders[kind]))
    ids = torch.randint(0, 97, (2, 11))
    hf = AutoModelForCausalLM.from_pretrained(folders[kind]).eval()  # registered by import bam_model
    assert type(hf).__name__ == ("BamForCausalLM" if kind == "dense" else "BamMoeForCausalLM")
    with torch.no_grad():
        want = ours(ids, labels=ids)
        got = hf(input_ids=ids, labels=ids)
    assert rel(got.logits, want.logits) < 1e-5
    assert abs(got.loss.item() - want.loss.item()) < 1e-5  # cross-entropy plus the routers' aux losses


def test_config_is_what_auto_config_and_bam_read(folders):
    d = json.loads((folders["bam-expert-kv"] / "config.json").read_text())
    assert d["architectures"] == ["BamMoeForCausalLM"]
    assert d["auto_map"] == {"AutoConfig": "configuration_bam.BamMoeConfig",
                             "AutoModelForCausalLM": "modeling_bam.BamMoeForCausalLM"}
    assert "top_k" not in d and d["num_experts_per_tok"] == 2
    config = AutoConfig.from_pretrained(folders["bam-expert-kv"])
    assert (config.hidden_size, config.num_local_experts, config.num_experts_per_tok) == (32, 3, 2)
    # generate() would refuse a top_k config key as a generation setting; ours has none
    assert "top_k" not in config.to_dict()


def test_a_folder_saved_by_transformers_reads_back_in_bam(folders, tmp_path):
    hf = AutoModelForCausalLM.from_pretrained(folders["bam-shared-kv-parallel"])
    hf.save_pretrained(tmp_path / "resaved")
    for name in ("configuration_bam.py", "modeling_bam.py"):  # it loads where bam is not installed too
        assert (tmp_path / "resaved" / name).is_file()
    ours = bam_model.from_pretrained(str(tmp_path / "resaved"))
    assert ours.config == bam_model.from_pretrained(str(folders["bam-shared-kv-parallel"])).config


NO_BAM = textwrap.dedent("""
    import importlib.abc, sys, warnings

    class NoBam(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("bam_kernels", "bam_model", "bam_bench"):
                raise ModuleNotFoundError(f"No module named {name!r}")

    sys.meta_path.insert(0, NoBam())
    import torch
    from transformers import AutoModelForCausalLM
    folder, ids_file, out_file = sys.argv[1:]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        ids = torch.load(ids_file)
        with torch.no_grad():
            a = model(input_ids=ids).logits
            b = model(input_ids=ids).logits
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert "bam_kernels" not in sys.modules
    notes = [str(w.message) for w in caught if "pip install bam-moe" in str(w.message)]
    assert len(notes) == 1, notes
    torch.save(a, out_file)
""")


@pytest.mark.parametrize("kind", ["bam-expert-kv", "btx"])
def test_remote_code_runs_where_bam_is_not_installed(kind, folders, tmp_path):
    ids = torch.randint(0, 97, (2, 9))
    torch.save(ids, tmp_path / "ids.pt")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    out = subprocess.run([sys.executable, "-c", NO_BAM, str(folders[kind]), str(tmp_path / "ids.pt"),
                          str(tmp_path / "out.pt")], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    with torch.no_grad():
        want = bam_model.from_pretrained(str(folders[kind]))(ids).logits
    assert rel(torch.load(tmp_path / "out.pt"), want) < 1e-5


@pytest.mark.parametrize("kind", ["dense", "bam-expert-kv", "bam-shared-kv-parallel"])
def test_hf_generate_equals_bam_generate_and_left_padding_changes_nothing(kind, folders):
    ours = bam_model.from_pretrained(str(folders[kind]))
    hf = AutoModelForCausalLM.from_pretrained(folders[kind]).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 97, (n,), generator=g) for n in (3, 8, 5)]
    alone = [ours.generate(p[None], max_new_tokens=7)[0, len(p):] for p in prompts]
    for p, want in zip(prompts, alone):
        got = hf.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), max_new_tokens=7,
                          do_sample=False, pad_token_id=0)
        assert torch.equal(got[0, len(p):], want)
    width = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, p in enumerate(prompts):
        batch[i, width - len(p):], mask[i, width - len(p):] = p, 1
    out = hf.generate(batch, attention_mask=mask, max_new_tokens=7, do_sample=False, pad_token_id=0)
    for i, want in enumerate(alone):
        assert torch.equal(out[i, width:], want), f"prompt {i} of a left-padded batch"


def test_the_trainer_trains_with_the_router_losses(folders, tmp_path):
    hf = AutoModelForCausalLM.from_pretrained(folders["bam-expert-kv"])
    # One batch of 4 rows of one length: the first step's loss does not depend on their order.
    ids = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(2))
    data = [{"input_ids": row, "labels": row} for row in ids]
    with torch.no_grad():
        first = hf(input_ids=ids, labels=ids)
    assert first.aux_loss is not None and first.aux_loss > 0
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                                          max_steps=2, logging_steps=1, learning_rate=1e-3, report_to=[],
                                          use_cpu=True, save_strategy="no", seed=0)
    trainer = transformers.Trainer(model=hf, args=args, train_dataset=data)
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2
    assert abs(logged[0] - first.loss.item()) < 1e-4  # the first step's loss: NLL + aux, as bam trains
    moved = hf.model.layers[0].mlp.experts.gate_up_proj
    assert not torch.equal(moved, AutoModelForCausalLM.from_pretrained(
        folders["bam-expert-kv"]).model.layers[0].mlp.experts.gate_up_proj)


def test_lora_on_attention_experts_and_expert_weights_trains_and_merges(folders):
    import peft

    hf = AutoModelForCausalLM.from_pretrained(folders["bam-expert-kv"])
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                             init_lora_weights=False)
    model = peft.get_peft_model(hf, config)
    ids = torch.randint(0, 97, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in trained)
    reached = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert reached == trained
    assert any("experts" in n for n in trained) and any("q_proj" in n for n in trained)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        merged = model.merge_and_unload()(input_ids=ids).logits
    assert rel(merged, adapted) < 1e-5


def test_lm_eval_runs_the_offline_tasks(tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from bam_model.lm_eval_tasks import PATH

    tok = load_tokenizer()
    torch.manual_seed(0)
    config = BamConfig(**{**DENSE.__dict__, "vocab_size": tok.get_vocab_size(), "max_seq_len": 512,
                          "eos_token_id": 0}, num_experts=2, top_k=1)
    model = BamLM(config)
    model.tokenizer = tok
    model.save_pretrained(str(tmp_path / "m"))
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={tmp_path / 'm'},trust_remote_code=True,dtype=float32",
        tasks=["bam_continuation", "bam_next_words"], task_manager=TaskManager(include_path=str(PATH)),
        batch_size=4, limit=3, device="cpu")["results"]
    for domain in ("code", "math", "legal", "drama", "scripture"):
        assert 0.0 <= results[f"bam_continuation_{domain}"]["acc,none"] <= 1.0
    domains = [results[f"bam_continuation_{d}"]["acc,none"] for d in ("code", "math", "legal", "drama",
                                                                        "scripture")]
    assert results["bam_continuation"]["acc,none"] == pytest.approx(sum(domains) / 5)  # 3 items each
    assert 0.0 <= results["bam_next_words"]["exact_match,none"] <= 1.0


def test_caches_and_masks_it_does_not_serve_are_refused(folders):
    hf = AutoModelForCausalLM.from_pretrained(folders["bam-expert-kv"]).eval()
    ids = torch.randint(0, 97, (1, 6))
    with pytest.raises(ValueError, match="DynamicCache"):
        hf.generate(ids, max_new_tokens=2, do_sample=False, cache_implementation="static")
    with pytest.raises(ValueError, match=r"attention_mask must be \[batch, keys\]"):
        hf(input_ids=ids, attention_mask=torch.ones(1, 1, 6, 6, dtype=torch.bool))


def test_router_losses_count_the_real_tokens_of_a_padded_batch(folders):
    hf = AutoModelForCausalLM.from_pretrained(folders["bam-expert-kv"]).eval()
    rows = [torch.randint(1, 97, (n,), generator=torch.Generator().manual_seed(n)) for n in (4, 9)]
    routed = []
    with torch.no_grad():
        for row in rows:  # each row alone: what the losses of the batch must be made of
            hf(input_ids=row[None], output_router_logits=True)
            routed.append([layer.mlp.routed for layer in hf.model.layers])
        want = hf._aux_loss([(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(*routed)])
        batch = torch.zeros(2, 9, dtype=torch.long)
        mask = torch.zeros_like(batch)
        for i, row in enumerate(rows):
            batch[i, 9 - len(row):], mask[i, 9 - len(row):] = row, 1
        got = hf(input_ids=batch, attention_mask=mask, output_router_logits=True).aux_loss
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_import_bam_model_registers_whatever_the_order():
    code = textwrap.dedent("""
        import importlib.util, sys, warnings
        warnings.simplefilter("error")  # a registration that failed would only warn
        order = sys.argv[1]
        if order == "transformers first":
            import transformers
        if order == "remote code first":
            import bam_model.remote.modeling_bam
        import bam_model
        if order == "probe first":  # another library asking whether transformers is there
            assert importlib.util.find_spec("transformers") is not None
        assert "transformers" not in sys.modules or order != "probe first"
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        assert "bam-moe" in CONFIG_MAPPING and "bam-dense" in CONFIG_MAPPING, order
    """)
    for order in ("transformers first", "probe first", "remote code first"):
        out = subprocess.run([sys.executable, "-c", code, order], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, (order, out.stderr[-2000:])


def test_a_left_padded_batch_runs_on_bams_kernels(folders, monkeypatch):
    """Left padding reaches bam's attention kernels as each row's first key (kv_start), prefill and
    decode; any other mask goes to PyTorch's attention."""
    import bam_kernels

    starts = []
    real = bam_kernels.moa_attention

    def spy(*args, **kwargs):
        starts.append(kwargs.get("kv_start"))
        return real(*args, **kwargs)

    monkeypatch.setattr(bam_kernels, "moa_attention", spy)
    hf = AutoModelForCausalLM.from_pretrained(folders["bam-expert-kv"]).eval()
    batch = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    hf.generate(batch, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert starts and all(s is not None and s.tolist() == [2, 0] for s in starts)
    starts.clear()
    with torch.no_grad():  # a hole in the middle: not left padding
        hf(input_ids=batch, attention_mask=torch.tensor([[1, 0, 1, 1, 1], [1, 1, 1, 1, 1]]))
    assert starts == []
