"""``bam demo``: the paper's comparison (BAM Table 1) rerun small, on the bundled corpus.

1. Pretrain a parallel-block dense seed on the general mix (the five bundled domains, equal parts).
2. Branch it into one copy per expert domain (code, math, legal) and train each on its domain
   mixed with 10% general data.
3. Mix seed + experts (E = 4) with BAM expert-KV, BAM shared-KV, BTX and sparse upcycling
   (``upcycle``, mean merging), all with the same top-1 FFN routing (the paper's setting), and
   train every mixture on the same data: 25% of each expert domain and 25% general (data-matched).
   The BAM mixtures are trained once more with the training FLOPs of BTX (compute-matched, ``-cm``):
   fewer steps, since their attention experts cost more per token (``DenseConfig.flops_per_token``). BTX with
   its own paper's top-2 routing is an extra row (``btx-top2``). Every mixture is trained
   ``seeds`` times, each with its own router initialisation and data order, from the same seed
   model and experts. With ``ablations`` the paper's ablations follow (``ablations.py``).
4. Evaluate every model's held-out perplexity per domain, print the table, and write into ``out``:
   ``results.json`` (``summarize``: the mean per method and domain, every seed's run, the spread and
   what each mixture is), ``table.md``, ``perplexity.png``, ``router_use.png`` (mean router
   probability of each expert per domain and layer, FFN and attention routers of both BAM
   mixtures), ``details.json`` (steps, tokens, FLOPs, perplexity right after mixing, the experts'
   own perplexities, router statistics, the wall time of each part) and, with ``ablations``,
   ``ablations.json`` and ``ablations.md``.

Every model is written under ``out`` (atomically, by ``train`` and ``save_pretrained``); a rerun
with the same settings reuses what a previous run finished and resumes a phase from its newest
checkpoint, so ``--ablations`` after a finished run trains only the ablations' models. Training and
evaluation use ``bam_model.training`` and ``bam_model.evaluate``; the run is seeded, so it is
repeatable on one machine.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from .. import files
from ..config import BamConfig
from ..data import DOMAINS, load_tokenizer
from ..distributed import resolve_device
from ..evaluate import evaluate, router_use
from ..files.atomic import write_json_atomic, write_text_atomic
from ..files.reading import read_json
from ..formats import from_pretrained
from ..formats.folder import load_config
from ..model import DenseLM
from ..training import FINAL_MODEL, RunOptions, TrainConfig, remove_checkpoints, train
from ..upcycle import branch, upcycle
from . import ablations as abl
from .config import (
    COMPUTE_MATCHED,
    METHODS,
    DemoConfig,
    expert_data,
    general_weights,
    mixture_data,
    mixture_spec,
)
from .config import mixtures as main_mixtures
from .cost import compute_matched_steps
from .report import (
    format_ablations,
    format_table,
    mixture_settings,
    plot_perplexity,
    plot_router_use,
    summarize,
)

# What a demo folder holds (its manifest lists these; the phase folders are runs and models of their own).
DEMO_ENTRIES = ["demo.json", "results.json", "details.json", "table.md", "perplexity.png", "router_use.png",
                "ablations.json", "ablations.md", "seed", "experts", "mix"]


class PhaseRunner:
    """Trains, reuses and evaluates the models of one demo folder."""

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
            info = {**read_json(str(run / "done.json")), "reused": True}
            self.log(f"[{name}] reusing {final}")
        else:
            model = make_model().to(self.device)
            self.log(f"[{name}] training {steps} steps on {data} "
                     f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters)")
            records = train(model, RunOptions(data=data, out=run, resume=True),
                            self.train_cfg(steps, lr, seed), tokenizer=self.tokenizer, progress=self.progress)
            info = {"steps": steps, "tokens": steps * self.cfg.batch_size * self.cfg.seq_len, "lr": lr,
                    "data": data, "seed": self.cfg.seed if seed is None else seed,
                    "final_loss": records[-1]["loss"], "seconds": time.perf_counter() - t0,
                    "flops_per_token": model.config.flops_per_token(self.cfg.seq_len)}
            info["train_flops"] = 3 * info["flops_per_token"] * info["tokens"]
            write_json_atomic(run / "done.json", info, allow_nan=True)
            remove_checkpoints(run)   # only needed to resume an unfinished phase
            self.log(f"[{name}] loss {info['final_loss']:.3f} in {info['seconds']:.0f} s")
        self.details["phases"][name] = info
        return model

    def perplexity(self, model, windows: int | None) -> dict[str, float]:
        res = evaluate(model, DOMAINS, seq_len=self.cfg.seq_len, batch_size=self.cfg.batch_size,
                       max_windows=windows, tokenizer=self.tokenizer)
        return {name: r["ppl"] for name, r in res.items()}


def _experts_names(config: BamConfig) -> list[str]:
    return [d if d is not None else "seed" for d in config.expert_domains]


def run_demo(cfg: DemoConfig, out: str | os.PathLike, *, device: str | None = None, progress: bool = False,
             log=print, ablations: bool = False) -> dict:
    """Run the whole pipeline into the folder ``out`` (with the paper's ablations when ``ablations``);
    returns the results dict (also in results.json)."""
    if not isinstance(cfg, DemoConfig):
        raise ValueError(f"cfg must be a DemoConfig, got {type(cfg).__name__}")
    if not isinstance(ablations, bool):
        raise ValueError(f"ablations must be a bool, got {ablations!r}")
    device = resolve_device(device)
    out = Path(out)
    with files.reserve_output(out, "demo", what="bam demo") as state:   # one demo writes a folder at once
        settings = out / "demo.json"
        if state == "ours" and settings.is_file():
            # A setting an earlier bam did not record ran as its default does (ffn_routing: bam's
            # straight-through, the only routing then).
            before = {**json.loads(json.dumps(dataclasses.asdict(DemoConfig()))), **read_json(str(settings))}
            if before != json.loads(json.dumps(dataclasses.asdict(cfg))):
                raise ValueError(f"--out {str(out)!r} holds a demo run with other settings; choose another "
                                 "folder")
        files.claim_folder(out, "demo", DEMO_ENTRIES)   # (again: a run of an earlier bam wrote fewer files)
        write_json_atomic(settings, dataclasses.asdict(cfg), allow_nan=True)
        return _Pipeline(cfg, out, device, progress, log).run(ablations)


class _Pipeline:
    """The demo's phases into ``out`` (claimed and locked by ``run_demo``)."""

    def __init__(self, cfg: DemoConfig, out: Path, device: torch.device, progress: bool, log):
        self.cfg, self.out, self.device, self.log = cfg, out, device, log
        self.runner = PhaseRunner(cfg, out, device, progress, log)
        self.details = self.runner.details
        self.runs: dict[str, list[dict]] = {}
        self.inits: dict[tuple[str, int], Path] = {}
        self.data = mixture_data(cfg.expert_domains)

    def run(self, ablations: bool) -> dict:
        cfg, out, details, log = self.cfg, self.out, self.details, self.log
        t_start = time.perf_counter()
        seed, experts = self.seed_and_experts()
        mixtures = main_mixtures(cfg)
        extra = abl.ablation_mixtures(cfg, seed.config, 1 + len(experts)) if ablations else {}
        for k in range(cfg.seeds):
            for name, kwargs in {**mixtures, **extra}.items():
                make = lambda kw=kwargs, r=cfg.seed + k: upcycle(seed, experts, router_seed=r, **kw)
                self.mixture(name, k, make)
            btx = load_config(str(self.inits["btx", k]))
            for name, base in COMPUTE_MATCHED.items():
                model = from_pretrained(str(self.inits[base, k]), device=self.device)
                steps = compute_matched_steps(cfg.mix_steps, btx, model.config, cfg.seq_len)
                self.train_mixture(name, k, model, steps)
            if ablations:
                continued = copy.deepcopy(seed, memo={id(seed.tokenizer): seed.tokenizer})
                self.train_mixture(abl.CONTINUED, k, continued, cfg.mix_steps)
        settings = {name: mixture_settings(load_config(str(self.inits[COMPUTE_MATCHED.get(name, name), 0])),
                                           details["phases"][f"mix/{name}/seed-0/train"]["steps"])
                    for name in [*METHODS[1:], *extra]}
        results = summarize(self.runs, settings)
        self.report(results)     # the main table first: an ablation that fails leaves it written
        if ablations:
            settings["seed"] = mixture_settings(seed.config, cfg.seed_steps)
            settings[abl.CONTINUED] = mixture_settings(seed.config, cfg.mix_steps)
            t0 = time.perf_counter()
            ablation = self.ablations(seed, settings)
            details["seconds_by_part"] = self.seconds_by_part(extra, time.perf_counter() - t0, t_start)
            ablation["seconds_by_part"] = details["seconds_by_part"]
            write_json_atomic(out / "ablations.json", ablation, allow_nan=True)
            write_text_atomic(out / "ablations.md", format_ablations(ablation, details))
            log((out / "ablations.md").read_text(encoding="utf-8"))
        else:
            details["seconds_by_part"] = self.seconds_by_part({}, 0.0, t_start)
        details["seconds"] = time.perf_counter() - t_start
        write_json_atomic(out / "details.json", details, allow_nan=True)
        log(f"wrote {out / 'results.json'}, table.md, perplexity.png, router_use.png, details.json"
            f"{', ablations.json, ablations.md' if ablations else ''} in {details['seconds']:.0f} s")
        return results

    def seed_and_experts(self):
        """The seed, pretrained on the general mix, and its copies trained on the expert domains."""
        cfg, run, tok = self.cfg, self.runner, self.runner.tokenizer
        seed_config = cfg.seed_config(tok.get_vocab_size(), tok.token_to_id("<|endoftext|>"))

        def new_seed():
            torch.manual_seed(cfg.seed)
            seed = DenseLM(seed_config)
            seed.tokenizer = tok  # built with the bundled BPE: every folder of the run carries it
            return seed

        seed = run.trained("seed", new_seed, mixture_spec(general_weights()), cfg.seed_steps, cfg.seed_lr)
        experts = []
        for copied in branch(seed, list(cfg.expert_domains)):
            domain = copied.config.domain
            experts.append(run.trained(f"experts/{domain}", lambda c=copied: c,
                                       expert_data(domain, cfg.general_fraction), cfg.expert_steps,
                                       cfg.expert_lr))
        self.runs["seed"] = [run.perplexity(seed, cfg.eval_windows)]
        self.details["expert_ppl"] = {m.config.domain: run.perplexity(m, cfg.eval_windows) for m in experts}
        self.details["init_ppl"], self.details["router_use"] = {}, {}
        return seed, experts

    def mixture(self, name: str, k: int, make) -> None:
        """Mixture ``name`` at seed ``k``: built by ``make()`` (or read where an earlier run wrote it),
        scored as mixed, then trained and scored."""
        init_path = self.out / "mix" / name / f"seed-{k}" / "init"
        if not (init_path / "config.json").is_file():
            make().save_pretrained(str(init_path))
        self.inits[name, k] = init_path
        model = from_pretrained(str(init_path), device=self.device)
        init_ppl = self.runner.perplexity(model, self.cfg.eval_windows)
        self.details["init_ppl"].setdefault(name, []).append(init_ppl)
        model = self.train_mixture(name, k, model, self.cfg.mix_steps)
        if name in ("bam-expert-kv", "bam-shared-kv") and k == 0:
            self.details["router_use"][name] = router_use(model, DOMAINS, self.cfg.seq_len,
                                                            self.cfg.diagnostic_windows, self.cfg.batch_size,
                                                            self.runner.tokenizer)

    def train_mixture(self, name: str, k: int, model, steps: int):
        """Train ``model`` as every mixture is trained (the mixtures' data, ``steps`` steps, router
        seed and data order ``cfg.seed + k``) and score it."""
        cfg = self.cfg
        model = self.runner.trained(f"mix/{name}/seed-{k}/train", lambda: model, self.data, steps, cfg.mix_lr,
                                    seed=cfg.seed + k)
        self.runs.setdefault(name, []).append(self.runner.perplexity(model, cfg.eval_windows))
        return model

    def ablations(self, seed, settings: dict) -> dict:
        """ablations.json: each ablation's rows (``summarize``'s fields for them), and the inference cost
        of the seed, BTX and both BAM mixtures (their first seed's trained models)."""
        groups = abl.groups(self.cfg, seed.config, 1 + len(self.cfg.expert_domains))
        names = list(dict.fromkeys(n for rows in groups.values() for n in rows))
        result = summarize(self.runs, settings, names)
        result["groups"] = groups
        models = {"seed": seed, **{name: from_pretrained(str(self.out / "mix" / name / "seed-0" / "train" /
                                                             FINAL_MODEL), device=self.device)
                                   for name in abl.COST_MODELS[1:]}}
        result["cost"], result["decode"] = abl.inference_cost(models, self.cfg.seq_len, self.runner.tokenizer,
                                                              self.device)
        return result

    def seconds_by_part(self, extra: dict, cost_seconds: float, t_start: float) -> dict[str, float]:
        """Training time of each part (as its runs took, also where this run reused them), the cost
        measurement, and everything else this run did (evaluation, mixing, writing)."""
        phases = self.details["phases"]
        main = METHODS[1:]
        parts = {"seed": phases["seed"]["seconds"],
                 "experts": sum(phases[f"experts/{d}"]["seconds"] for d in self.cfg.expert_domains),
                 "main-table mixtures": sum(v["seconds"] for n, v in phases.items()
                                            if n.startswith("mix/") and n.split("/")[1] in main)}
        if extra:
            parts["ablation mixtures"] = sum(v["seconds"] for n, v in phases.items()
                                             if n.startswith("mix/") and n.split("/")[1] in extra)
            parts["seed-continued"] = sum(v["seconds"] for n, v in phases.items()
                                          if n.startswith(f"mix/{abl.CONTINUED}/"))
            parts["inference cost"] = cost_seconds
        trained_now = sum(v["seconds"] for v in phases.values() if not v.get("reused"))
        parts["evaluation, mixing and writing"] = time.perf_counter() - t_start - trained_now - cost_seconds
        parts["of the training above, done by an earlier run in this folder"] = sum(
            v["seconds"] for v in phases.values() if v.get("reused"))
        return parts

    def report(self, results: dict) -> None:
        cfg, out, details = self.cfg, self.out, self.details
        write_json_atomic(out / "results.json", results, allow_nan=True)
        write_json_atomic(out / "details.json", details, allow_nan=True)
        table = format_table(results, details)
        write_text_atomic(out / "table.md", table)
        plot_perplexity(results, cfg.expert_domains, out / "perplexity.png")
        names = {n: _experts_names(load_config(str(self.inits[n, 0]))) for n in details["router_use"]}
        plot_router_use(details["router_use"], names, out / "router_use.png")
        self.log(table)
