"""``bam demo``: the paper's comparison (BAM Table 1) rerun small, on the bundled corpus.

1. Pretrain a parallel-block dense seed on the general mix (the five bundled domains, equal parts).
2. Branch it into one copy per expert domain (code, math, legal) and train each on its domain
   mixed with 10% general data.
3. Mix seed + experts (E = 4) with BAM expert-KV, BAM shared-KV, BTX and sparse upcycling
   (``upcycle``, mean merging), all with the same top-1 FFN routing (the paper's setting), and
   train every mixture on the same data: 25% of each expert domain and 25% general (data-matched).
   The BAM mixtures are trained once more with the training FLOPs of BTX (compute-matched, ``-cm``):
   fewer steps, since their attention experts cost more per token (``flops_per_token``). BTX with
   its own paper's top-2 routing is an extra row (``btx-top2``). Every mixture is trained
   ``seeds`` times, each with its own router initialisation and data order, from the same seed
   model and experts.
4. Evaluate every model's held-out perplexity per domain, print the table, and write into ``out``:
   ``results.json`` (``summarize``: the mean per method and domain, every seed's run, the spread and
   what each mixture is), ``table.md``,
   ``perplexity.png``, ``router_use.png`` (mean router probability of each expert per domain and
   layer, FFN and attention routers of both BAM mixtures) and ``details.json`` (steps, tokens, FLOPs,
   perplexity right after mixing, the experts' own perplexities, router statistics, timings).

Every model is written under ``out`` (atomically, by ``train`` and ``save_pretrained``); a rerun
with the same settings reuses what a previous run finished and resumes a phase from its newest
checkpoint. Training and evaluation use ``bam_model.training`` and ``bam_model.evaluate``; the run is
seeded, so it is repeatable on one machine.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import files
from .config import BamConfig, DenseConfig
from .data import DOMAINS, eval_windows, load_tokenizer, parse_data_spec, tokens
from .distributed import resolve_device
from .evaluate import evaluate
from .files import read_json, write_atomic, write_text_atomic
from .formats import from_pretrained
from .formats.folder import load_config
from .model import DenseLM
from .options import positive_float, positive_int
from .training import FINAL_MODEL, TrainConfig, remove_checkpoints, train
from .upcycle import branch, upcycle

METHODS = ("seed", "btx", "sparse", "bam-expert-kv", "bam-shared-kv", "bam-expert-kv-cm", "bam-shared-kv-cm",
           "btx-top2")
# The paper trains every mixture with top-1 FFN routing "unless otherwise stated": BTX, sparse
# upcycling and BAM share bam's top-1 routing (renormalised forward, the paper's router gradient);
# BTX at top-2 (the BTX paper's own routing, twice the active FFN) is an extra row.
TOP1 = dict(top_k=1, ffn_routing="straight-through")
MIXTURES = {  # name -> upcycle arguments
    "btx": dict(method="btx", **TOP1),
    "sparse": dict(method="sparse", **TOP1),
    "bam-expert-kv": dict(method="bam", attention="expert-kv", **TOP1),
    "bam-shared-kv": dict(method="bam", attention="shared-kv", **TOP1),
    "btx-top2": dict(method="btx", top_k=2, ffn_routing="renormalized"),
}
# What a demo folder holds (its manifest lists these; the phase folders are runs and models of their own).
DEMO_ENTRIES = ["demo.json", "results.json", "details.json", "table.md", "perplexity.png", "router_use.png",
                "seed", "experts", "mix"]
COMPUTE_MATCHED = {"bam-expert-kv-cm": "bam-expert-kv", "bam-shared-kv-cm": "bam-shared-kv"}


@dataclass
class DemoConfig:
    """Sizes and schedules of one demo run. Steps are optimizer steps of ``batch_size`` sequences
    of ``seq_len`` tokens; ``eval_windows`` held-out windows per domain are scored (all of them
    when None); ``general_fraction`` of each expert's data is the general mix."""
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 352
    seq_len: int = 128
    batch_size: int = 16
    seed_steps: int = 600
    expert_steps: int = 250
    mix_steps: int = 250
    seed_lr: float = 2e-3
    expert_lr: float = 1e-3
    mix_lr: float = 1e-3
    expert_domains: tuple[str, ...] = ("code", "math", "legal")
    general_fraction: float = 0.1
    eval_windows: int | None = 64
    diagnostic_windows: int = 8
    seed: int = 0
    seeds: int = 3

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "seq_len", "batch_size",
                     "seed_steps", "expert_steps", "mix_steps", "diagnostic_windows", "seeds"):
            positive_int(name, getattr(self, name))
        if self.eval_windows is not None and (not isinstance(self.eval_windows, int)
                                              or self.eval_windows < 1):
            raise ValueError(f"eval_windows must be None or a positive int, got {self.eval_windows!r}")
        for name in ("seed_lr", "expert_lr", "mix_lr"):
            positive_float(name, getattr(self, name))
        if not 0 <= self.general_fraction < 1:
            raise ValueError(f"general_fraction must be in [0, 1), got {self.general_fraction!r}")
        self.expert_domains = tuple(self.expert_domains)
        if not self.expert_domains or len(set(self.expert_domains)) != len(self.expert_domains) or not set(
                self.expert_domains) <= set(DOMAINS):
            raise ValueError(f"expert_domains must be distinct bundled domains {DOMAINS}, "
                             f"got {self.expert_domains!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")


FULL = DemoConfig()
QUICK = DemoConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176, seq_len=64, batch_size=16,
                   seed_steps=250, expert_steps=100, mix_steps=80, seed_lr=3e-3, expert_lr=1.5e-3,
                   mix_lr=1.5e-3,
                   eval_windows=32, diagnostic_windows=4, seeds=1)


# --- data and cost ------------------------------------------------------------------------------

def mixture_spec(weights: dict[str, float]) -> str:
    """A ``--data`` mixture string from {domain: weight}, domains in the bundled order."""
    return ",".join(f"{d}:{weights[d]:.6g}" for d in DOMAINS if weights.get(d, 0) > 0)


def general_weights() -> dict[str, float]:
    return {d: 1 / len(DOMAINS) for d in DOMAINS}


def expert_data(domain: str, general_fraction: float) -> str:
    """The expert's own domain with ``general_fraction`` of the general mix."""
    w = {d: general_fraction * g for d, g in general_weights().items()}
    w[domain] += 1 - general_fraction
    return mixture_spec(w)


def mixture_data(expert_domains) -> str:
    """Equal parts of each expert domain and of the general mix (the paper's 25% each for three)."""
    part = 1 / (len(expert_domains) + 1)
    w = {d: part * g for d, g in general_weights().items()}
    for d in expert_domains:
        w[d] += part
    return mixture_spec(w)


def flops_per_token(config: DenseConfig, seq_len: int) -> float:
    """Forward FLOPs per token of a training window of ``seq_len`` tokens: 2 per multiply-add of
    every projection a token goes through (routers, the top-k FFN experts, every attention expert,
    the LM head) plus causal attention over the mean context ``(seq_len + 1) / 2``. Training costs
    three times this (the backward pass is twice the forward)."""
    D, H, Hkv, Dh, F, V = (config.dim, config.n_heads, config.n_kv_heads, config.dh, config.ffn_dim,
                           config.vocab_size)
    context = (seq_len + 1) / 2
    attn_experts = kv_sets = ffn_experts = 1
    router = 0
    if isinstance(config, BamConfig):
        ffn_experts = config.top_k
        router = 2 * D * config.num_experts
        if config.attention != "dense":
            attn_experts = config.num_experts
            kv_sets = 1 if config.attention == "shared-kv" else config.num_experts
            router += 2 * D * config.num_experts
    attention = attn_experts * (2 * D * H * Dh * 2 + 4 * H * Dh * context) + kv_sets * 2 * 2 * D * Hkv * Dh
    ffn = ffn_experts * 3 * 2 * D * F
    return config.n_layers * (attention + ffn + router) + 2 * D * V


def compute_matched_steps(steps: int, reference: DenseConfig, config: DenseConfig, seq_len: int) -> int:
    """Training steps for ``config`` that cost what ``steps`` steps of ``reference`` cost (same
    batch), at most ``steps`` and at least 1."""
    ratio = flops_per_token(reference, seq_len) / flops_per_token(config, seq_len)
    return max(1, min(steps, int(steps * ratio)))


# --- the run ------------------------------------------------------------------------------------

def _write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


class PhaseRunner:
    """Trains, reuses and evaluates the models of one demo folder (also used by the ablation script
    in docs/demo)."""

    def __init__(self, cfg: DemoConfig, out: Path, device: torch.device, progress: bool, log):
        self.cfg, self.out, self.device, self.progress, self.log = cfg, out, device, progress, log
        self.tokenizer = load_tokenizer()
        self.details: dict = {"config": dataclasses.asdict(cfg), "device": str(device), "phases": {}}

    def train_cfg(self, steps: int, lr: float, seed: int | None = None) -> TrainConfig:
        c = self.cfg
        return TrainConfig(steps=steps, batch_size=c.batch_size, seq_len=c.seq_len, lr=lr,
                           seed=c.seed if seed is None else seed,
                           warmup=max(1, min(100, steps // 10)), log_every=max(1, steps // 10),
                           eval_windows=1,
                           save_every=100)

    def trained(self, name: str, make_model, data: str, steps: int, lr: float, seed: int | None = None):
        """Train ``make_model()`` on ``data`` in ``out/name`` (or load what a previous run finished);
        ``seed`` (default the demo's) orders the data."""
        run = self.out / name
        final = run / FINAL_MODEL
        t0 = time.perf_counter()
        if (final / "config.json").is_file() and (run / "done.json").is_file():
            model = from_pretrained(str(final), device=self.device)
            info = read_json(str(run / "done.json"))
            self.log(f"[{name}] reusing {final}")
        else:
            model = make_model().to(self.device)
            self.log(f"[{name}] training {steps} steps on {data} "
                     f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters)")
            records = train(model, data, run, self.train_cfg(steps, lr, seed), resume=True,
                            tokenizer=self.tokenizer,
                            progress=self.progress)
            info = {"steps": steps, "tokens": steps * self.cfg.batch_size * self.cfg.seq_len, "lr": lr,
                    "data": data, "seed": self.cfg.seed if seed is None else seed,
                    "final_loss": records[-1]["loss"], "seconds": time.perf_counter() - t0,
                    "flops_per_token": flops_per_token(model.config, self.cfg.seq_len)}
            info["train_flops"] = 3 * info["flops_per_token"] * info["tokens"]
            _write_json_atomic(run / "done.json", info)
            remove_checkpoints(run)   # only needed to resume an unfinished phase
            self.log(f"[{name}] loss {info['final_loss']:.3f} in {info['seconds']:.0f} s")
        self.details["phases"][name] = info
        return model

    def perplexity(self, model, windows: int | None) -> dict[str, float]:
        res = evaluate(model, DOMAINS, seq_len=self.cfg.seq_len, batch_size=self.cfg.batch_size,
                       max_windows=windows, tokenizer=self.tokenizer)
        return {name: r["ppl"] for name, r in res.items()}


def router_use(model, cfg: DemoConfig, tokenizer) -> dict:
    """Mean router probability of each expert, per domain and layer, for the FFN routers and (BAM)
    the attention routers, over ``cfg.diagnostic_windows`` held-out windows per domain; and the
    mean normalised entropy of the routers' per-token distributions (1: uniform, 0: one-hot)."""
    device = next(model.parameters()).device
    E = model.config.num_experts
    out = {}
    model.eval()
    with torch.no_grad():
        for domain in DOMAINS:
            ids = eval_windows(tokens(parse_data_spec(domain)[0][0], "heldout", tokenizer), cfg.seq_len,
                               cfg.diagnostic_windows)
            sums: dict[str, list] = {}
            for chunk in ids.split(cfg.batch_size):
                logits = model(chunk.to(device)).router_logits
                for kind, layers in logits.items():
                    acc = sums.setdefault(kind, [[torch.zeros(E, dtype=torch.float64), 0.0, 0]
                                                 for _ in layers])
                    for slot, logits_TE in zip(acc, layers):
                        p_TE = torch.softmax(logits_TE.double().cpu(), dim=-1)
                        slot[0] += p_TE.sum(0)
                        slot[1] += float(-(p_TE * p_TE.clamp_min(1e-30).log()).sum(-1).sum() / math.log(E))
                        slot[2] += p_TE.shape[0]
            for kind, acc in sums.items():
                out.setdefault(kind, {})[domain] = {
                    "mean_prob": [(s / n).tolist() for s, _, n in acc],
                    "entropy": [h / n for _, h, n in acc]}
    return out


def _experts_names(config: BamConfig) -> list[str]:
    return [d if d is not None else "seed" for d in config.expert_domains]


def run_demo(cfg: DemoConfig, out: str | os.PathLike, *, device: str | None = None, progress: bool = False,
             log=print) -> dict:
    """Run the whole pipeline into the folder ``out``; returns the results dict (also in results.json)."""
    if not isinstance(cfg, DemoConfig):
        raise ValueError(f"cfg must be a DemoConfig, got {type(cfg).__name__}")
    device = resolve_device(device)
    out = Path(out)
    with files.reserve_output(out, "demo", what="bam demo") as state:   # one demo writes a folder at once
        settings = out / "demo.json"
        if state == "ours" and settings.is_file():
            before = read_json(str(settings))
            if before != json.loads(json.dumps(dataclasses.asdict(cfg))):
                raise ValueError(f"--out {str(out)!r} holds a demo run with other settings; choose another "
                                 "folder")
        else:
            files.claim_folder(out, "demo", DEMO_ENTRIES)
        _write_json_atomic(settings, dataclasses.asdict(cfg))
        return _pipeline(cfg, out, device, progress, log)


def _pipeline(cfg: DemoConfig, out: Path, device: torch.device, progress: bool, log) -> dict:
    """The demo's phases into ``out`` (claimed and locked by ``run_demo``)."""
    t_start = time.perf_counter()
    run = PhaseRunner(cfg, out, device, progress, log)
    tok = run.tokenizer
    dense_cfg = DenseConfig(vocab_size=tok.get_vocab_size(), dim=cfg.dim, n_layers=cfg.n_layers,
                            n_heads=cfg.n_heads,
                            n_kv_heads=cfg.n_kv_heads, ffn_dim=cfg.ffn_dim, max_seq_len=cfg.seq_len,
                            block="parallel", tie_embeddings=True,
                            eos_token_id=tok.token_to_id("<|endoftext|>"))

    def new_seed():
        torch.manual_seed(cfg.seed)
        seed = DenseLM(dense_cfg)
        seed.tokenizer = tok  # built with the bundled BPE: every folder of the run carries it
        return seed

    general = mixture_spec(general_weights())
    seed = run.trained("seed", new_seed, general, cfg.seed_steps, cfg.seed_lr)
    experts = []
    for copy in branch(seed, list(cfg.expert_domains)):
        domain = copy.config.domain
        experts.append(run.trained(f"experts/{domain}", lambda c=copy: c,
                                   expert_data(domain, cfg.general_fraction),
                                   cfg.expert_steps, cfg.expert_lr))

    runs = {"seed": [run.perplexity(seed, cfg.eval_windows)]}
    diag = run.details
    diag["expert_ppl"] = {m.config.domain: run.perplexity(m, cfg.eval_windows) for m in experts}
    diag["init_ppl"], diag["router_use"] = {}, {}
    data = mixture_data(cfg.expert_domains)
    inits = {}
    # Every mixture once per seed: its router initialisation and its data order; the seed model and
    # the experts are the same for all.
    for k in range(cfg.seeds):
        mix_seed = cfg.seed + k
        for name, kwargs in MIXTURES.items():
            init_path = out / "mix" / name / f"seed-{k}" / "init"
            if not (init_path / "config.json").is_file():
                upcycle(seed, experts, router_seed=mix_seed, **kwargs).save_pretrained(str(init_path))
            inits[name, k] = init_path
            model = from_pretrained(str(init_path), device=device)
            diag["init_ppl"].setdefault(name, []).append(run.perplexity(model, cfg.eval_windows))
            model = run.trained(f"mix/{name}/seed-{k}/train", lambda m=model: m, data, cfg.mix_steps,
                                cfg.mix_lr, seed=mix_seed)
            runs.setdefault(name, []).append(run.perplexity(model, cfg.eval_windows))
            if name.startswith("bam") and k == 0:
                diag["router_use"][name] = router_use(model, cfg, tok)
        btx = load_config(str(inits["btx", k]))
        for name, base in COMPUTE_MATCHED.items():
            model = from_pretrained(str(inits[base, k]), device=device)
            steps = compute_matched_steps(cfg.mix_steps, btx, model.config, cfg.seq_len)
            model = run.trained(f"mix/{name}/seed-{k}/train", lambda m=model: m, data, steps, cfg.mix_lr,
                                seed=mix_seed)
            runs.setdefault(name, []).append(run.perplexity(model, cfg.eval_windows))
    diag["seconds"] = time.perf_counter() - t_start

    settings = {name: mixture_settings(load_config(str(inits[COMPUTE_MATCHED.get(name, name), 0])),
                                       diag["phases"][f"mix/{name}/seed-0/train"]["steps"])
                for name in METHODS if name != "seed"}
    results = summarize(runs, settings)
    _write_json_atomic(out / "results.json", results)
    _write_json_atomic(out / "details.json", diag)
    table = format_table(results, diag)
    write_text_atomic(out / "table.md", table)
    plot_perplexity(results, cfg.expert_domains, out / "perplexity.png")
    names = {n: _experts_names(load_config(str(inits[n, 0]))) for n in diag["router_use"]}
    plot_router_use(diag["router_use"], names,
                    out / "router_use.png")
    log(table)
    log(f"wrote {out / 'results.json'}, table.md, perplexity.png, router_use.png, details.json "
        f"in {diag['seconds']:.0f} s")
    return results


# --- reporting ----------------------------------------------------------------------------------

def mixture_settings(config: BamConfig, steps: int) -> dict:
    """What a mixture row is: method, attention, FFN top-k and routing, experts, training steps."""
    routing = ("straight-through" if config.straight_through else
               "renormalized" if config.normalize else "paper")
    return {"method": config.method, "attention": config.attention, "experts": config.num_experts,
            "ffn_top_k": config.top_k, "ffn_routing": routing, "steps": steps}


def summarize(runs: dict[str, list[dict]], settings: dict[str, dict]) -> dict:
    """results.json: per method the mean perplexity per domain over its seeds (``perplexity``),
    every seed's (``runs``), the lowest and highest (``spread``) and what each mixture is
    (``mixtures``)."""
    mean = {m: {d: sum(r[d] for r in rs) / len(rs) for d in rs[0]} for m, rs in runs.items()}
    spread = {m: {d: [min(r[d] for r in rs), max(r[d] for r in rs)] for d in rs[0]} for m, rs in runs.items()}
    return {"perplexity": {m: mean[m] for m in METHODS}, "runs": {m: runs[m] for m in METHODS},
            "spread": {m: spread[m] for m in METHODS}, "mixtures": settings}

def expert_domain_avg(row: dict, expert_domains) -> float:
    """Mean perplexity over the expert domains (where the mixtures' experts differ)."""
    return sum(row[d] for d in expert_domains) / len(expert_domains)


def format_table(results: dict, details: dict) -> str:
    """A markdown table like the paper's Table 1: perplexity per domain (lower is better), the mean
    over all domains ("avg") and over the expert domains, with each model's FFN top-k, training
    steps, tokens and training FLOPs. With several seeds a cell is the mean over them with the lowest
    and highest in brackets."""
    ppl, runs = results["perplexity"], results["runs"]
    experts = details["config"]["expert_domains"]
    cols = [d for d in ppl["seed"] if d != "avg"] + ["avg"]
    phase = {"seed": "seed", **{m: f"mix/{m}/seed-0/train" for m in METHODS if m != "seed"}}

    def cell(m: str, values: list[float]) -> str:
        mean = sum(values) / len(values)
        return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ({min(values):.2f}-{max(values):.2f})"

    head = ("| method | FFN top-k | " + " | ".join(cols) + f" | avg {'/'.join(experts)} | steps | tokens "
            "| train FLOPs |")
    lines = [head, "|" + "---|" * (len(cols) + 6)]
    for m in METHODS:
        info = details["phases"][phase[m]]
        k = results["mixtures"][m]["ffn_top_k"] if m in results["mixtures"] else "-"
        cells = " | ".join(cell(m, [r[c] for r in runs[m]]) for c in cols)
        cells += " | " + cell(m, [expert_domain_avg(r, experts) for r in runs[m]])
        lines.append(f"| {m} | {k} | {cells} | {info['steps']} | {info['tokens']:,} | "
                     f"{info['train_flops']:.3g} |")
    seeds = len(runs["btx"])
    if seeds > 1:
        lines.append(f"\nEach mixture trained with {seeds} seeds (router initialisation and data order) "
                     "from the same seed model and experts: mean (lowest-highest).")
    return "\n".join(lines) + "\n"


def plot_perplexity(results: dict, expert_domains, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ppl = results["perplexity"]
    cols = [d for d in ppl["seed"] if d != "avg"] + ["avg"]
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / len(METHODS)
    for i, m in enumerate(METHODS):
        xs = [j + (i - (len(METHODS) - 1) / 2) * width for j in range(len(cols) + 1)]
        ax.bar(xs, [ppl[m][c] for c in cols] + [expert_domain_avg(ppl[m], expert_domains)], width, label=m)
    ax.set_xticks(range(len(cols) + 1), cols + [f"avg {'/'.join(expert_domains)}"])
    ax.set_yscale("log")
    ax.set_ylabel("held-out perplexity (log scale, lower is better)")
    ax.set_title("bam demo: per-domain perplexity (cm = compute-matched to BTX)")
    ax.legend(ncol=4, fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def plot_router_use(router: dict, experts: dict[str, list[str]], path: Path) -> None:
    """Heatmaps, one row per BAM mixture and one column per router kind: domains down, (layer,
    expert) across, the mean router probability in each cell."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(router)
    kinds = ("ffn", "attention")
    fig, axes = plt.subplots(len(names), 2, figsize=(14, 2.6 * len(names) + 0.8), squeeze=False)
    for r, name in enumerate(names):
        for c, kind in enumerate(kinds):
            ax = axes[r][c]
            use = router[name].get(kind)
            if use is None:
                ax.set_axis_off()
                continue
            domains = list(use)
            rows = [[p for layer in use[d]["mean_prob"] for p in layer] for d in domains]
            L, E = len(use[domains[0]]["mean_prob"]), len(experts[name])
            im = ax.imshow(rows, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            for y, row in enumerate(rows):
                for x, v in enumerate(row):
                    ax.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=6,
                            color="black" if v > 0.6 else "white")
            ax.set_yticks(range(len(domains)), domains, fontsize=8)
            ax.set_xticks(range(L * E), [f"L{layer}\n{e}" for layer in range(L) for e in experts[name]],
                          fontsize=6)
            for layer in range(1, L):
                ax.axvline(layer * E - 0.5, color="white", linewidth=2)
            entropy = sum(sum(use[d]["entropy"]) / L for d in domains) / len(domains)
            ax.set_title(f"{name}: {kind} router, mean probability per expert "
                         f"(mean normalised entropy {entropy:.2f})", fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.02)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def _save_figure(fig, path: Path) -> None:
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110))
