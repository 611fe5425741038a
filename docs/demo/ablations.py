"""Why does BAM land where it does against BTX in ``bam demo``? Ablations on a finished demo run.

Reuses the run's seed and experts and trains more mixtures exactly as the demo trains its own
(same data, steps, learning rate; ``--steps`` overrides), varying one thing at a time:

- the FFN routing of BAM: top-1 without renormalisation (the default, the paper's), top-1
  renormalised, and top-2 renormalised (BTX's), with expert-KV attention experts;
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

from bam_model import from_pretrained
from bam_model.config import load_config
from bam_model.data import DOMAINS
from bam_model.demo import DemoConfig, PhaseRunner, compute_matched_steps, expert_domain_avg, mixture_data
from bam_model.upcycle import upcycle

VARIANTS = {  # name -> (upcycle arguments, router seeds)
    "btx": (dict(method="btx"), (0, 1)),
    "bam-expert-kv (top-1)": (dict(method="bam", attention="expert-kv"), (0, 1)),
    "bam-expert-kv top-1 renormalised": (dict(method="bam", attention="expert-kv", top_k=1, ffn_routing="renormalized"), (0,)),
    "bam-expert-kv top-2 renormalised": (dict(method="bam", attention="expert-kv", top_k=2, ffn_routing="renormalized"), (0, 1)),
}
COMPUTE_MATCHED = "bam-expert-kv top-2 renormalised"
IN_DEMO = {"btx": "btx", "bam-expert-kv (top-1)": "bam-expert-kv"}   # trained by the demo at router seed 0


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
    btx = load_config(str(demo / "mix" / "btx" / "init"))
    jobs = [(name, kw, r, steps) for name, (kw, seeds) in VARIANTS.items() for r in seeds]
    kw = VARIANTS[COMPUTE_MATCHED][0]
    cm_steps = compute_matched_steps(steps, btx, upcycle(seed, experts, **kw).config, cfg.seq_len)
    jobs.append((COMPUTE_MATCHED + ", compute-matched", kw, 0, cm_steps))
    results = json.loads((demo / "results.json").read_text(encoding="utf-8"))["perplexity"]
    details = json.loads((demo / "details.json").read_text(encoding="utf-8"))
    rows = []
    for name, kwargs, router_seed, n in jobs:
        if name in IN_DEMO and router_seed == cfg.seed and n == cfg.mix_steps:
            rows.append({"variant": name, "router_seed": router_seed, "steps": n,
                         "init_avg": details["init_ppl"][IN_DEMO[name]]["avg"], "perplexity": results[IN_DEMO[name]]})
            continue
        model = upcycle(seed, experts, router_seed=router_seed, **kwargs)
        init = run.perplexity(model, cfg.eval_windows)
        folder = f"{name.replace(' ', '_').replace(',', '')}-r{router_seed}-{n}"
        model = run.trained(folder, lambda m=model: m, data, n, cfg.mix_lr)
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
