"""What a demo run reports: ``results.json`` (``summarize``), the markdown tables and the plots."""
from __future__ import annotations

from pathlib import Path

from ..config import BamConfig, DenseConfig
from ..files import write_atomic
from .config import METHODS
from .cost import total_parameters


def mixture_settings(config: DenseConfig, steps: int) -> dict:
    """What a model row is: method ("dense" for a dense model), attention (and its top-k), experts, FFN
    top-k and routing, parameters (all, and those a token uses), training steps."""
    counts = {"parameters": total_parameters(config), "active_parameters": config.active_parameters(),
              "steps": steps}
    if not isinstance(config, BamConfig):
        return {"method": "dense", "attention": "dense", "attention_top_k": None, "experts": 1,
                "ffn_top_k": 1, "ffn_routing": None, **counts}
    routing = ("straight-through" if config.straight_through else
               "renormalized" if config.normalize else "paper")
    return {"method": config.method, "attention": config.attention,
            "attention_top_k": config.attention_top_k, "experts": config.num_experts,
            "ffn_top_k": config.top_k, "ffn_routing": routing, **counts}


def summarize(runs: dict[str, list[dict]], settings: dict[str, dict], names=METHODS) -> dict:
    """Per model in ``names``: the mean perplexity per domain over its seeds (``perplexity``), every
    seed's (``runs``), the lowest and highest (``spread``) and what each mixture is (``mixtures``)."""
    mean = {m: {d: sum(r[d] for r in runs[m]) / len(runs[m]) for d in runs[m][0]} for m in names}
    spread = {m: {d: [min(r[d] for r in runs[m]), max(r[d] for r in runs[m])] for d in runs[m][0]}
              for m in names}
    return {"perplexity": mean, "runs": {m: runs[m] for m in names}, "spread": spread,
            "mixtures": {m: settings[m] for m in names if m in settings}}


def expert_domain_avg(row: dict, expert_domains) -> float:
    """Mean perplexity over the expert domains (where the mixtures' experts differ)."""
    return sum(row[d] for d in expert_domains) / len(expert_domains)


def _cell(values: list[float]) -> str:
    mean = sum(values) / len(values)
    return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ({min(values):.2f}-{max(values):.2f})"


def _phase(name: str) -> str:
    return "seed" if name == "seed" else f"mix/{name}/seed-0/train"


def format_table(results: dict, details: dict, names=METHODS) -> str:
    """A markdown table like the paper's Table 1: perplexity per domain (lower is better), the mean
    over all domains ("avg") and over the expert domains, with each model's FFN top-k, training
    steps, tokens and training FLOPs. With several seeds a cell is the mean over them with the lowest
    and highest in brackets."""
    runs = results["runs"]
    experts = details["config"]["expert_domains"]
    cols = [d for d in runs["seed"][0] if d != "avg"] + ["avg"]
    head = ("| model | FFN top-k | " + " | ".join(cols) + f" | avg {'/'.join(experts)} | steps | tokens "
            "| train FLOPs |")
    lines = [head, "|" + "---|" * (len(cols) + 6)]
    for m in names:
        info = details["phases"][_phase(m)]
        k = results["mixtures"][m]["ffn_top_k"] if m in results["mixtures"] else "-"
        cells = " | ".join(_cell([r[c] for r in runs[m]]) for c in cols)
        cells += " | " + _cell([expert_domain_avg(r, experts) for r in runs[m]])
        lines.append(f"| {m} | {k} | {cells} | {info['steps']} | {info['tokens']:,} | "
                     f"{info['train_flops']:.3g} |")
    seeds = max(len(r) for r in runs.values())
    if seeds > 1:
        lines.append(f"\nEach mixture trained with {seeds} seeds (router initialisation and data order) "
                     "from the same seed model and experts: mean (lowest-highest).")
    return "\n".join(lines) + "\n"


def format_ablations(ablations: dict, details: dict) -> str:
    """ablations.md: one table per ablation (the models it compares, what each is), then the
    inference cost and the wall time of each part of the run."""
    experts = details["config"]["expert_domains"]
    runs, settings = ablations["runs"], ablations["mixtures"]
    out = []
    for title, names in ablations["groups"].items():
        out += [f"## {title}", "", "| model | experts | FFN top-k | attention | parameters | active "
                f"| avg | avg {'/'.join(experts)} | steps |", "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
        for m in names:
            s = settings[m]
            attention = s["attention"]
            if attention != "dense":
                attention += f" top-{s['attention_top_k']}" if s["attention_top_k"] else " soft"
            out.append(f"| {m} | {s['experts']} | {s['ffn_top_k']} | {attention} | "
                       f"{s['parameters'] / 1e6:.2f}M | {s['active_parameters'] / 1e6:.2f}M | "
                       f"{_cell([r['avg'] for r in runs[m]])} | "
                       f"{_cell([expert_domain_avg(r, experts) for r in runs[m]])} | {s['steps']} |")
        out.append("")
    out += ["## Inference cost", "", "| model | parameters | active per token | forward FLOPs per token "
            "| KV cache per token (bf16) | decode ms per token |", "|---|---:|---:|---:|---:|---:|"]
    for m, c in ablations["cost"].items():
        out.append(f"| {m} | {c['parameters'] / 1e6:.2f}M | {c['active_parameters'] / 1e6:.2f}M | "
                   f"{c['flops_per_token'] / 1e6:.2f}M | {c['kv_cache_bytes_per_token']:,} B | "
                   f"{c['decode_ms_per_token']:.2f} |")
    out += ["", f"Decoding: batch 1, greedy, {ablations['decode']['new_tokens']} tokens after a "
            f"{ablations['decode']['prompt_tokens']}-token prompt, median of {ablations['decode']['rounds']} "
            f"rounds on {details['device']}; FLOPs at a {details['config']['seq_len']}-token window.", "",
            "## Wall time of each part", "", "| part | seconds |", "|---|---:|"]
    out += [f"| {part} | {seconds:.0f} |" for part, seconds in details["seconds_by_part"].items()]
    return "\n".join(out) + "\n"


def plot_perplexity(results: dict, expert_domains, path: Path) -> None:
    import matplotlib  # noqa: PLC0415 (start-up: matplotlib for the plots only)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 (start-up: matplotlib for the plots only)

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
    import matplotlib  # noqa: PLC0415 (start-up: matplotlib for the plots only)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 (start-up: matplotlib for the plots only)

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
