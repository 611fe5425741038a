"""bam demo: a tiny configuration through every phase (results.json schema, finite values, plots,
compute matching, reuse of a finished run), the FLOP count, the data mixtures and the command line."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from bam_model import DenseConfig
from bam_model.cli import build_parser
from bam_model.config import BamConfig
from bam_model.data import DOMAINS, parse_data_spec
from bam_model.demo import (
    METHODS,
    QUICK,
    DemoConfig,
    expert_data,
    mixture_data,
    mixtures,
    run_demo,
    total_parameters,
)
from bam_model.demo.ablations import ablation_mixtures
from bam_model.formats.folder import load_config

TINY = DemoConfig(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=24, seq_len=16, batch_size=2,
                  seed_steps=3,
                  expert_steps=2, mix_steps=3, eval_windows=1, diagnostic_windows=1, seeds=2)


def test_every_phase_of_a_tiny_demo(tmp_path):
    out = tmp_path / "demo"
    lines = []
    results = run_demo(TINY, out, device="cpu", log=lines.append)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == results and list(on_disk) == ["perplexity", "runs", "spread", "mixtures"]
    assert list(on_disk["perplexity"]) == list(METHODS)
    for method, row in on_disk["perplexity"].items():
        assert list(row) == [*DOMAINS, "avg"], method
        assert all(math.isfinite(v) and v > 1 for v in row.values()), (method, row)
        assert row["avg"] == pytest.approx(sum(row[d] for d in DOMAINS) / len(DOMAINS))
        runs = on_disk["runs"][method]
        assert len(runs) == (1 if method == "seed" else TINY.seeds)
        for d in row:     # the mean over the seeds, between the lowest and the highest
            assert row[d] == pytest.approx(sum(r[d] for r in runs) / len(runs))
            assert on_disk["spread"][method][d] == [min(r[d] for r in runs), max(r[d] for r in runs)]
    mixtures = on_disk["mixtures"]
    # The paper's settings: BTX, sparse upcycling and BAM at the same top-1 FFN routing; BTX at top-2
    # (its own paper's routing) is a row of its own.
    for name in ("btx", "sparse", "bam-expert-kv", "bam-shared-kv", "bam-expert-kv-cm", "bam-shared-kv-cm"):
        assert (mixtures[name]["ffn_top_k"], mixtures[name]["ffn_routing"]) == (1, "straight-through"), name
    assert (mixtures["btx-top2"]["ffn_top_k"], mixtures["btx-top2"]["ffn_routing"]) == (2, "renormalized")
    assert [mixtures[m]["attention"] for m in ("btx", "bam-expert-kv", "bam-shared-kv")] == \
        ["dense", "expert-kv", "shared-kv"]
    for png in ("perplexity.png", "router_use.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "table.md").read_text()
    assert all(f"| {m} |" in table for m in METHODS) and table in "\n".join(lines)

    details = json.loads((out / "details.json").read_text())
    phases = details["phases"]
    for domain in TINY.expert_domains:
        assert (out / "experts" / domain / "model" / "config.json").is_file()
        assert not (out / "experts" / domain / "checkpoints").exists()      # dropped once a phase is done
        assert phases[f"experts/{domain}"]["data"] == expert_data(domain, TINY.general_fraction)
    btx = phases["mix/btx/seed-0/train"]
    assert btx["flops_per_token"] < phases["mix/btx-top2/seed-0/train"]["flops_per_token"]
    for cm in ("bam-expert-kv-cm", "bam-shared-kv-cm"):
        for k in range(TINY.seeds):
            run = phases[f"mix/{cm}/seed-{k}/train"]
            per_step = run["train_flops"] / run["steps"]
            # compute-matched to top-1 BTX: the most steps whose training FLOPs stay within BTX's
            assert run["train_flops"] <= btx["train_flops"] < run["train_flops"] + per_step
            assert run["steps"] < btx["steps"] and run["flops_per_token"] > btx["flops_per_token"]
            assert run["steps"] == mixtures[cm]["steps"]
    # Seeds: one seed model and one set of experts; per seed, its own router initialisation and
    # data order.
    assert sorted(p.name for p in (out / "mix" / "bam-expert-kv").iterdir()) == ["seed-0", "seed-1"]
    orders = [phases[f"mix/bam-expert-kv/seed-{k}/train"]["seed"] for k in range(2)]
    assert orders == [TINY.seed, TINY.seed + 1]
    inits = [load_file(str(out / "mix" / "bam-expert-kv" / f"seed-{k}" / "init" / "model.safetensors"))
             for k in range(2)]
    routers = [n for n in inits[0] if "gate.weight" in n or "router" in n]
    assert routers and all(not torch.equal(inits[0][n], inits[1][n]) for n in routers)
    assert all(torch.equal(inits[0][n], inits[1][n]) for n in inits[0] if n not in routers)
    for name in ("bam-expert-kv", "bam-shared-kv"):
        for kind in ("ffn", "attention"):
            use = details["router_use"][name][kind]
            assert list(use) == list(DOMAINS)
            for d in DOMAINS:
                assert len(use[d]["mean_prob"]) == TINY.n_layers
                assert all(sum(p) == pytest.approx(1) and len(p) == 4 for p in use[d]["mean_prob"])
                assert all(0 <= h <= 1 + 1e-9 for h in use[d]["entropy"])

    lines.clear()
    settings = json.loads((out / "demo.json").read_text())   # as a bam before --ffn-routing wrote it
    del settings["ffn_routing"]
    (out / "demo.json").write_text(json.dumps(settings))
    again = run_demo(TINY, out, device="cpu", log=lines.append, ablations=True)
    assert again == results                     # the main table's models reused, not trained again
    trained = [line for line in lines if line.startswith("[") and "] training " in line]
    rows = [*ablation_mixtures(TINY, load_config(str(out / "seed" / "model")), 4), "seed-continued"]
    assert trained and all(line.startswith(tuple(f"[mix/{n}/" for n in rows)) for line in trained), trained
    assert len(trained) == len(rows) * TINY.seeds     # every ablation row once per seed, nothing else
    check_ablations(out, json.loads((out / "ablations.json").read_text()))
    with pytest.raises(ValueError, match="other settings"):
        run_demo(DemoConfig(**{**TINY.__dict__, "seed": 1}), out, device="cpu", log=lines.append)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="not written by bam"):
        run_demo(TINY, tmp_path / "other", device="cpu", log=lines.append)




def check_ablations(out, ablations):
    """The ablation rows build what their names say, and ablations.json holds every seed's runs."""
    seed = load_config(str(out / "seed" / "model"))
    E = 1 + len(TINY.expert_domains)
    bam = load_config(str(out / "mix" / "bam-expert-kv" / "seed-0" / "init"))
    groups = ablations["groups"]
    matched = groups["Parameter-matched BTX (the paper's Tables 4-5)"]
    assert matched[0] == "btx" and matched[-1] == "bam-expert-kv" and len(matched) == 4
    n = int(matched[1].split("-")[1].removesuffix("e"))
    k = int(matched[2].rsplit("top", 1)[1])
    assert matched[1:3] == [f"btx-{n}e-top1", f"btx-{n}e-top{k}"] and n > E and 2 <= k <= n

    def params(n_experts):
        return total_parameters(BamConfig(**{**seed.__dict__, "domain": None}, num_experts=n_experts, top_k=1,
                                          normalize=True, attention="dense", method="btx"))
    # n experts brings BTX closest to BAM expert-KV's parameter count
    assert all(abs(params(n) - total_parameters(bam)) <= abs(params(m) - total_parameters(bam))
               for m in range(E, 3 * n))
    init = out / "mix" / f"btx-{n}e-top1" / "seed-0" / "init"
    c = load_config(str(init))
    assert (c.method, c.num_experts, c.top_k, c.attention) == ("btx", n, 1, "dense")
    assert c.expert_domains == [None, *TINY.expert_domains] + [None] * (n - E)
    assert load_config(str(out / "mix" / f"btx-{n}e-top{k}" / "seed-0" / "init")).top_k == k
    weights = load_file(str(init / "model.safetensors"))
    seed_w = load_file(str(out / "seed" / "model" / "model.safetensors"))
    for e in range(E, n):     # the extra experts are the seed's FFN
        assert torch.equal(weights["model.layers.0.mlp.experts.down_proj"][e],
                           seed_w["model.layers.0.mlp.down_proj.weight"])
    routing = groups["Attention routing (the paper's Table 6)"]
    assert routing == ["btx", "bam-expert-kv-attn-top1", "bam-expert-kv-attn-top2", "bam-expert-kv"]
    for top in (1, 2):
        c = load_config(str(out / "mix" / f"bam-expert-kv-attn-top{top}" / "seed-0" / "init"))
        assert (c.attention, c.attention_top_k, c.num_experts, c.top_k) == ("expert-kv", top, E, 1)
    assert ablations["mixtures"]["bam-expert-kv"]["attention_top_k"] is None
    for name in {n for rows in groups.values() for n in rows}:
        assert len(ablations["runs"][name]) == (1 if name == "seed" else TINY.seeds), name
        assert ablations["mixtures"][name]["parameters"] > 0
    continued = ablations["mixtures"]["seed-continued"]
    assert (continued["method"], continued["steps"]) == ("dense", TINY.mix_steps)
    assert list(ablations["cost"]) == ["seed", "btx", "bam-expert-kv", "bam-shared-kv"]
    cost = ablations["cost"]
    assert all(math.isfinite(c["decode_ms_per_token"]) and c["decode_ms_per_token"] > 0
               for c in cost.values())
    kv = [cost[m]["kv_cache_bytes_per_token"] for m in ("seed", "btx", "bam-shared-kv", "bam-expert-kv")]
    assert kv[0] == kv[1] == kv[2] and kv[3] == E * kv[0]
    assert cost["bam-expert-kv"]["flops_per_token"] > cost["bam-shared-kv"]["flops_per_token"] > \
        cost["btx"]["flops_per_token"]
    text = (out / "ablations.md").read_text()
    assert all(f"| {name} |" in text for rows in groups.values() for name in rows)
    assert "Wall time of each part" in text


def test_flops_per_token_counts_every_projection_by_hand():
    D, H, Hkv, Dh, F, V, L, T, E = 16, 2, 1, 8, 24, 100, 3, 9, 4
    dense = DenseConfig(vocab_size=V, dim=D, n_layers=L, n_heads=H, n_kv_heads=Hkv, ffn_dim=F)
    ctx = (T + 1) / 2
    attn = 2 * D * H * Dh * 2 + 2 * 2 * D * Hkv * Dh + 4 * H * Dh * ctx
    assert dense.flops_per_token(T) == L * (attn + 6 * D * F) + 2 * D * V
    moe = dict(vocab_size=V, dim=D, n_layers=L, n_heads=H, n_kv_heads=Hkv, ffn_dim=F, num_experts=E)
    btx = BamConfig(**moe, top_k=2, attention="dense", method="btx")
    assert btx.flops_per_token(T) == L * (attn + 2 * 6 * D * F + 2 * D * E) + 2 * D * V
    ekv = BamConfig(**moe, top_k=1, attention="expert-kv")
    assert ekv.flops_per_token(T) == L * (E * attn + 6 * D * F + 2 * 2 * D * E) + 2 * D * V
    skv = BamConfig(**moe, top_k=1, attention="shared-kv")
    shared_kv = 2 * 2 * D * Hkv * Dh
    assert skv.flops_per_token(T) == (L * (E * (attn - shared_kv) + shared_kv + 6 * D * F + 2 * 2 * D * E)
                                       + 2 * D * V)


def test_data_mixtures_follow_the_paper():
    code = dict((s.name, w) for s, w in parse_data_spec(expert_data("code", 0.1)))
    assert code["code"] == pytest.approx(0.92) and code["drama"] == pytest.approx(0.02)
    assert sum(code.values()) == pytest.approx(1)
    mix = dict((s.name, w) for s, w in parse_data_spec(mixture_data(("code", "math", "legal"))))
    assert mix["math"] == pytest.approx(0.25 + 0.25 / 5) and mix["scripture"] == pytest.approx(0.25 / 5)


def test_demo_command_line_and_config_checks():
    args = build_parser().parse_args(["demo", "--quick", "--out", "somewhere"])
    assert args.quick and args.out == "somewhere" and args.command == "demo"
    assert build_parser().parse_args(["demo", "--ffn-routing", "paper"]).ffn_routing == "paper"
    # --ffn-routing paper: every top-1 mixture, main table and ablations, with the paper's routing;
    # BTX at top-k > 1 keeps its own renormalised routing.
    paper = DemoConfig(ffn_routing="paper")
    seed = DenseConfig(vocab_size=100, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=24)
    for rows in (mixtures(paper), ablation_mixtures(paper, seed, 4)):
        for name, kwargs in rows.items():
            want = "paper" if kwargs.get("top_k") == 1 else "renormalized"
            assert kwargs["ffn_routing"] == want, name
    assert mixtures(DemoConfig())["btx"]["ffn_routing"] == "straight-through"
    assert QUICK.seed_steps < DemoConfig().seed_steps
    for bad, word in ((dict(dim=0), "dim"), (dict(expert_domains=("code", "poetry")), "expert_domains"),
                      (dict(general_fraction=1.0), "general_fraction"), (dict(mix_lr=0), "mix_lr"),
                      (dict(eval_windows=0), "eval_windows"), (dict(ffn_routing="top-1"), "ffn_routing")):
        with pytest.raises(ValueError, match=word):
            DemoConfig(**bad)
