"""bam: upcycle dense transformer checkpoints into Branch-Attend-Mix mixtures.

    bam branch SEED --domains code math legal --out branches/
    bam train branches/code --data code:0.9,drama:0.1 --steps 2000 --out runs/code
    bam mix --base-model SEED --experts runs/code/model runs/math/model --out mixed/
    bam train mixed/ --data code,math,legal,drama --steps 2000 --out runs/mixed
    bam eval runs/mixed/model --data code,math
    bam generate runs/mixed/model --prompt "def fib(n):"
    bam export runs/code/model --out code-hf/

Each subcommand has its own --help.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys

from .config import DTYPES, METHODS, finite_float
from .demo import add_demo_args, run_demo_cli
from .evaluate import add_eval_args, run_eval
from .train import add_train_args, run_train
from .upcycle import FFN_ROUTINGS, MERGES


# --- branch ------------------------------------------------------------------------------------

def add_branch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("seed", help="dense model: our folder, a Hugging Face Llama-family folder or a .gguf file")
    p.add_argument("--domains", nargs="+", required=True, help="one copy per domain name")
    p.add_argument("--out", required=True, help="folder that receives one checkpoint folder per domain")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="the copies' dtype")


def run_branch(args: argparse.Namespace) -> list[str]:
    from .checkpoint import load_dense
    from .files import check_output
    from .upcycle import branch

    for d in args.domains:
        if not d or os.sep in d or d in (".", "..") or d.startswith("."):
            raise ValueError(f"--domains: {d!r} cannot name a folder")
    if len(set(args.domains)) < len(args.domains):
        raise ValueError(f"--domains names a domain twice: {args.domains}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out!r} is a file, not a folder; choose a folder path")
    for d in args.domains:  # every target is checked before anything is written
        check_output(os.path.join(args.out, d), "model", flag="--out", inputs=[("SEED", args.seed)])
    copies = branch(load_dense(args.seed, DTYPES[args.dtype]), list(args.domains))
    paths = []
    for model in copies:  # each copy carries the seed's tokenizer into its folder
        path = os.path.join(args.out, model.config.domain)
        model.save_pretrained(path)
        paths.append(path)
        print(f"wrote {path}")
    return paths


# --- mix ---------------------------------------------------------------------------------------

RECIPE_KEYS = {  # key -> (type check, description)
    "base_model": (lambda v: isinstance(v, str) and v, "a path"),
    "experts": (lambda v: isinstance(v, list), "a list of paths"),
    "method": (lambda v: isinstance(v, str), "bam, btx or sparse"),
    "attention": (lambda v: v is None or isinstance(v, str), "expert-kv or shared-kv"),
    "top_k": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)), "an int"),
    "merge": (lambda v: isinstance(v, str), "mean or fisher"),
    "fisher_data": (lambda v: v is None or (isinstance(v, list) and all(isinstance(d, str) for d in v)),
                    "a list of data specs, one per model, seed first"),
    "dtype": (lambda v: v in DTYPES, " or ".join(DTYPES)),
    "ffn_routing": (lambda v: v is None or v in FFN_ROUTINGS, " or ".join(FFN_ROUTINGS)),
    "kv_init": (lambda v: isinstance(v, str), "mean or seed"),
    "attention_top_k": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)), "an int"),
    "num_experts": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)), "an int"),
    "router_seed": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an int"),
    "load_balancing_alpha": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "z_loss_beta": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
}
RECIPE_DEFAULTS = {"experts": [], "method": "bam", "merge": "mean", "dtype": "float32", "kv_init": "mean",
                   "router_seed": 0, "load_balancing_alpha": 0.01, "z_loss_beta": 0.001}


def _expert_path(entry, i: int) -> str:
    # mergekit-moe lists experts as {source_model: path, ...}; a bare path is accepted too.
    if isinstance(entry, dict):
        extra = sorted(set(entry) - {"source_model"})
        if extra:
            raise ValueError(f"experts[{i}] has key {extra[0]!r}; only source_model is understood")
        entry = entry.get("source_model")
    if not isinstance(entry, str) or not entry:
        raise ValueError(f"experts[{i}] must be a path (or {{source_model: path}}), got {entry!r}")
    return entry


def validate_recipe(recipe: dict) -> dict:
    """The full recipe (defaults filled in), or a ValueError naming the first bad key."""
    if not isinstance(recipe, dict):
        raise ValueError(f"a mix recipe must be a mapping of keys to values, got {type(recipe).__name__}")
    unknown = sorted(set(recipe) - set(RECIPE_KEYS))
    if "normalize" in unknown:
        raise ValueError("mix recipe key 'normalize' is now ffn_routing: renormalized (normalize: true) or "
                         "paper (normalize: false)")
    if unknown:
        raise ValueError(f"unknown mix recipe key {unknown[0]!r}; known keys: {', '.join(RECIPE_KEYS)}")
    full = {**RECIPE_DEFAULTS, **recipe}
    if "base_model" not in full:
        raise ValueError("the mix recipe needs base_model (the seed's path)")
    for key, value in full.items():
        ok, what = RECIPE_KEYS[key]
        if not ok(value):
            raise ValueError(f"mix recipe key {key!r} must be {what}, got {value!r}")
    full["experts"] = [_expert_path(e, i) for i, e in enumerate(full["experts"])]
    for i, path in enumerate([full["base_model"]] + full["experts"]):
        if not os.path.exists(path):
            raise ValueError(f"{'base_model' if i == 0 else f'experts[{i - 1}]'} path {path!r} does not exist")
    return full


def add_mix_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML recipe (keys: " + ", ".join(RECIPE_KEYS) + "); copied to OUT/mix.yaml")
    p.add_argument("--base-model", help="the seed (it is expert 0)")
    p.add_argument("--experts", nargs="*", help="the seed's trained copies")
    p.add_argument("--method", choices=METHODS, help="how the mixture is built (default: bam)")
    p.add_argument("--attention", choices=("expert-kv", "shared-kv"), help="bam only (default expert-kv)")
    p.add_argument("--top-k", type=int, help="FFN router top-k (default 1 for bam, 2 otherwise)")
    p.add_argument("--ffn-routing", choices=tuple(FFN_ROUTINGS),
                   help="how the FFN router's top-k probabilities weight the experts: straight-through "
                        "(bam's default: renormalised, so mixing keeps the models' function, with the paper's "
                        "router gradient), renormalized (btx's and sparse's default, Mixtral's), or paper "
                        "(the kept probabilities as they are, as the BAM paper states)")
    p.add_argument("--merge", choices=MERGES, help="how norms, embeddings and head are merged (default: mean)")
    p.add_argument("--fisher-data", nargs="+", help="with --merge fisher: one data spec per model, seed first "
                   "(default: each model's domain from bam branch, the general mix for the seed)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="the mixture's dtype (default: float32)")
    p.add_argument("--kv-init", choices=("mean", "seed"), help="shared K/V start (default mean)")
    p.add_argument("--router-seed", type=int, help="seed of the new routers' initialisation (default: 0)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", choices=("bam", "mixtral"), default="bam",
                   help="mixtral: Hugging Face Mixtral layout (btx and sparse only)")


def run_mix(args: argparse.Namespace) -> str:
    import yaml

    from .checkpoint import export_mixtral
    from .files import check_output
    from .tokenizer import hf_tokenizer_files
    from .upcycle import upcycle

    flags = {"base_model": args.base_model, "experts": args.experts, "method": args.method,
             "attention": args.attention, "top_k": args.top_k, "merge": args.merge, "dtype": args.dtype,
             "kv_init": args.kv_init, "router_seed": args.router_seed, "fisher_data": args.fisher_data,
             "ffn_routing": args.ffn_routing}
    given = {k: v for k, v in flags.items() if v is not None}
    if args.config is not None:
        if given:
            flag = "--" + next(iter(given)).replace("_", "-")
            raise ValueError(f"give either --config or recipe flags, not both (got {flag})")
        if not os.path.isfile(args.config):
            raise ValueError(f"--config file {args.config!r} does not exist")
        with open(args.config) as f:
            text = f.read()
        try:
            recipe = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"--config {args.config!r} is not valid YAML: {e}") from None
    else:
        recipe = given
    recipe = validate_recipe(recipe if recipe is not None else {})
    if args.config is None:
        text = yaml.safe_dump(recipe, sort_keys=False)
    inputs = [("base_model", recipe["base_model"])] + [(f"experts[{i}]", e) for i, e in enumerate(recipe["experts"])]
    check_output(args.out, "model", inputs=inputs)
    kwargs = {k: v for k, v in recipe.items() if k not in ("base_model", "experts", "dtype")}
    model = upcycle(recipe["base_model"], recipe["experts"], dtype=DTYPES[recipe["dtype"]],
                    progress=sys.stderr.isatty(), **kwargs)
    files = {"mix.yaml": text}
    if args.format == "mixtral":
        if model.tokenizer is not None:
            files.update(hf_tokenizer_files(model.tokenizer.to_str(), model.config))
        export_mixtral(model, args.out, extra_files=files)
    else:
        model.save_pretrained(args.out, extra_files=files)
    c = model.config
    routing = next(name for name, flags in FFN_ROUTINGS.items() if flags == (c.normalize, c.straight_through))
    print(f"wrote {args.out}: {c.method}, {c.num_experts} experts, attention {c.attention}, FFN top-{c.top_k} "
          f"{routing}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    return args.out


# --- generate ----------------------------------------------------------------------------------

def add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="our folder (dense or mixture), a Hugging Face Llama-family folder or a .gguf")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--temperature", type=finite_float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=finite_float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--tokenizer", default=None, help="a tokenizer.json (default: the model's own)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: as stored (float32 for HF/GGUF)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--verbose", action="store_true", help="print the generation speed even when stderr is not a "
                   "terminal (it is printed on a terminal)")


def run_generate(args: argparse.Namespace) -> str:
    from .distributed import resolve_device
    from .generate import generate_text, load_model_and_tokenizer

    device = resolve_device(args.device)
    model, tok = load_model_and_tokenizer(args.model, args.tokenizer,
                                          DTYPES[args.dtype] if args.dtype else None, device)
    stats = {}
    text = generate_text(model.eval(), tok, args.prompt, args.max_new_tokens, args.temperature, args.top_p, args.seed,
                         stats=stats)
    print(text)
    if sys.stderr.isatty() or args.verbose:
        print(f"generate: {stats['new_tokens']} tokens in {stats['seconds']:.2f} s "
              f"({stats['new_tokens'] / max(stats['seconds'], 1e-9):.1f} tokens/s on {device})", file=sys.stderr)
    return text


# --- export ------------------------------------------------------------------------------------

def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="our folder (dense or BTX/sparse mixture), a Hugging Face folder or a .gguf")
    p.add_argument("--format", choices=("hf",), default="hf",
                   help="hf: the Hugging Face class that computes the model (a dense model as Llama, a BTX or "
                        "sparse mixture as Mixtral), with the tokenizer files AutoTokenizer reads "
                        "(default: %(default)s)")
    p.add_argument("--out", required=True, help="output folder (new, empty, or one bam wrote)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="weights' dtype (default: as stored; float32 for a .gguf)")
    p.add_argument("--tokenizer", default=None, help="a tokenizer.json (default: the model's own)")


def run_export(args: argparse.Namespace) -> str:
    from .checkpoint import export_hf
    from .files import check_output
    from .generate import load_model_and_tokenizer
    from .tokenizer import hf_tokenizer_files

    check_output(args.out, "model", inputs=[("MODEL", args.model)])
    model, tok = load_model_and_tokenizer(args.model, args.tokenizer, DTYPES[args.dtype] if args.dtype else None)
    cls = export_hf(model, args.out, extra_files=hf_tokenizer_files(tok.tokenizer.to_str(), model.config))
    print(f"wrote {args.out}: {cls}, {model.dtype}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
          "parameters, with its tokenizer")
    return args.out


# --- entry point -------------------------------------------------------------------------------

SUBCOMMANDS = [  # (name, help, add_args, run)
    ("branch", "copy a dense seed once per domain", add_branch_args, run_branch),
    ("train", "train a model on a domain, a mixture or text files", add_train_args, run_train),
    ("mix", "build a mixture (bam, btx, sparse) from a seed and its trained copies", add_mix_args, run_mix),
    ("eval", "held-out perplexity and bits per byte per domain", add_eval_args, run_eval),
    ("generate", "continue a prompt with any model bam reads", add_generate_args, run_generate),
    ("export", "write a model as the Hugging Face class that computes it (Llama, Mixtral)", add_export_args,
     run_export),
    ("demo", "the paper's comparison on the bundled corpus: seed, experts, every mixture, table and plots",
     add_demo_args, run_demo_cli),
]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Says each option's default in ``--help``, where it has one worth saying."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" in text or "default" in text.lower() or action.default is None
                or action.default is False or action.default is argparse.SUPPRESS or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bam", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, add_args, run in SUBCOMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        add_args(p)
        p.set_defaults(run=run)
    return parser


# OS errors a user can foresee and mend (rights, a read-only or full disk): one line, not a traceback.
USER_OS_ERRORS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR,
                  errno.ENAMETOOLONG)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FloatingPointError) as e:
        print(f"bam {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in USER_OS_ERRORS:
            raise
        where = f": {e.filename!r}" if e.filename else ""
        print(f"bam {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
