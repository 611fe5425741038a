"""Why does BAM land where it does against BTX in ``bam demo``, and which FFN routing should it use?
Ablations on a finished demo run.

Reuses the run's seed and experts and trains more mixtures exactly as the demo trains its own
(same data, steps, learning rate; ``--steps`` overrides), varying one thing at a time:

- the FFN routing of BAM (expert-KV attention experts), the candidates for its default:
  - ``paper``: top-1 without renormalisation (the paper's routing): a fresh router scales each
    token's FFN output by its top probability, about 1/E;
  - ``straight-through``: top-1 with the renormalised forward (weight 1: the mixture of identical
    models keeps their function) and the plain probabilities' gradient (the paper's router signal);
  - ``renormalized``: top-1 renormalised (weight 1, so the router learns from the load-balancing
    loss only), and top-2 renormalised (BTX's routing, at twice the FFN compute);
  - ``scaled``: weights ``E * p`` with the router started at zero (uniform), which keeps the
    function at the start only (defined here, not in the package);
- the router seed (0 is the demo's own), to see how far apart two draws land;
- compute matching for BAM with top-2 routing (fewer steps, from the counted FLOPs).

    python docs/demo/ablations.py runs/demo --out runs/demo-ablations
    python docs/demo/ablations.py runs/demo --out runs/demo-ablations --steps 500

Writes ``OUT/ablations.json`` and ``OUT/ablations.md`` (one row per variant: average perplexity right
after mixing and per domain after training, on the held-out windows of the demo). Runs the demo
itself made (router seed 0, the demo's steps) are read from its results, not trained again.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import bam_kernels as bk
from bam_model import from_pretrained
from bam_model.formats.folder import load_config
from bam_model.data import DOMAINS
from bam_model.demo import DemoConfig, PhaseRunner, compute_matched_steps, expert_domain_avg, mixture_data
from bam_model.layers import MoE, route_logits
from bam_model.upcycle import upcycle

class ScaledMoE(MoE):
    """The ``scaled`` candidate: expert weights ``E * p`` (top-k probabilities not renormalised)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_TD = x.reshape(-1, self.dim)
        logits_TE = route_logits(self.gate, x_TD)
        weights_TK, experts_TK = bk.route_topk(logits_TE, self.top_k, normalize=False)
        y_TD = self.experts(x_TD, weights_TK * self.num_experts, experts_TK)
        self._set_routed(logits_TE, experts_TK)
        return y_TD.reshape(x.shape)


def scaled(model, start: bool):
    """Give ``model``'s FFN routers the scaled weights (and at the ``start``, a zero router)."""
    for layer in model.model.layers:
        layer.mlp.__class__ = ScaledMoE
        if start:
            with torch.no_grad():
                layer.mlp.gate.weight.zero_()
    return model


BAM = dict(method="bam", attention="expert-kv")
VARIANTS = {  # name -> (upcycle arguments, router seeds)
    "btx": (dict(method="btx"), (0, 1)),
    "bam-expert-kv top-1 paper": ({**BAM, "ffn_routing": "paper"}, (0, 1)),
    "bam-expert-kv top-1 straight-through": ({**BAM, "ffn_routing": "straight-through"}, (0, 1)),
    "bam-expert-kv top-1 renormalised": ({**BAM, "top_k": 1, "ffn_routing": "renormalized"}, (0,)),
    "bam-expert-kv top-1 scaled": ({**BAM, "ffn_routing": "paper"}, (0,)),
    "bam-expert-kv top-2 renormalised": ({**BAM, "top_k": 2, "ffn_routing": "renormalized"}, (0, 1)),
}
SCALED = "bam-expert-kv top-1 scaled"
COMPUTE_MATCHED = "bam-expert-kv top-2 renormalised"
ROUTING_NAMES = {(False, False): "paper", (True, True): "straight-through"}


def in_demo(demo: Path) -> dict[str, str]:
    """Variant name -> the demo mixture that is that variant (trained by the demo at its first seed):
    BTX with its own top-2 routing (the demo's ``btx-top2``), and BAM expert-KV with whichever FFN
    routing the demo ran (its default when it ran)."""
    c = load_config(str(demo / "mix" / "bam-expert-kv" / "seed-0" / "init"))
    return {"btx": "btx-top2",
            f"bam-expert-kv top-1 {ROUTING_NAMES[(c.normalize, c.straight_through)]}": "bam-expert-kv"}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("demo", help="folder of a finished bam demo run")
    p.add_argument("--out", required=True, help="folder for the ablation runs and their results")
    p.add_argument("--steps", type=int, default=None, help="mixture training steps (default: the demo's)")
    args = p.parse_args(argv)
    demo = Path(args.demo)
    settings = json.loads((demo / "demo.json").read_text(encoding="utf-8"))
    cfg = DemoConfig(**settings)
    steps = cfg.mix_steps if args.steps is None else args.steps
    out = Path(args.out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = PhaseRunner(cfg, out, device, False, print)
    seed = from_pretrained(str(demo / "seed" / "model"), device=device)
    experts = [from_pretrained(str(demo / "experts" / d / "model"), device=device) for d in cfg.expert_domains]
    data = mixture_data(cfg.expert_domains)
    btx = load_config(str(demo / "mix" / "btx-top2" / "seed-0" / "init"))   # this script's BTX: top-2
    jobs = [(name, kw, r, steps) for name, (kw, seeds) in VARIANTS.items() for r in seeds]
    kw = VARIANTS[COMPUTE_MATCHED][0]
    cm_steps = compute_matched_steps(steps, btx, upcycle(seed, experts, **kw).config, cfg.seq_len)
    jobs.append((COMPUTE_MATCHED + ", compute-matched", kw, 0, cm_steps))
    demo_runs = in_demo(demo)
    runs = json.loads((demo / "results.json").read_text(encoding="utf-8"))["runs"]
    results = {m: seeds[0] for m, seeds in runs.items()}     # the demo's first seed
    details = json.loads((demo / "details.json").read_text(encoding="utf-8"))
    rows = []
    for name, kwargs, router_seed, n in jobs:
        if name in demo_runs and router_seed == cfg.seed and n == cfg.mix_steps:
            rows.append({"variant": name, "router_seed": router_seed, "steps": n,
                         "init_avg": details["init_ppl"][demo_runs[name]][0]["avg"],
                         "perplexity": results[demo_runs[name]]})
            continue
        model = upcycle(seed, experts, router_seed=router_seed, **kwargs)
        if name == SCALED:
            scaled(model, start=True)
        init = run.perplexity(model, cfg.eval_windows)
        folder = f"{name.replace(' ', '_').replace(',', '')}-r{router_seed}-{n}"
        model = run.trained(folder, lambda m=model: m, data, n, cfg.mix_lr)
        if name == SCALED:
            scaled(model, start=False)  # a reused run is loaded as a plain mixture: its weights, our forward
        rows.append({"variant": name, "router_seed": router_seed, "steps": n, "init_avg": init["avg"],
                     "perplexity": run.perplexity(model, cfg.eval_windows)})
        print(json.dumps(rows[-1]), flush=True)
    (out / "ablations.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    lines = ["| variant | router seed | steps | avg after mixing | " + " | ".join(DOMAINS)
             + f" | avg | avg {'/'.join(cfg.expert_domains)} |", "|" + "---|" * (len(DOMAINS) + 6)]
    for r in rows:
        ppl = r["perplexity"]
        lines.append(f"| {r['variant']} | {r['router_seed']} | {r['steps']} | {r['init_avg']:.1f} | "
                     + " | ".join(f"{ppl[d]:.2f}" for d in DOMAINS)
                     + f" | {ppl['avg']:.2f} | {expert_domain_avg(ppl, cfg.expert_domains):.2f} |")
    (out / "ablations.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
