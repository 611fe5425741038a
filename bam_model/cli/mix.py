"""``bam mix``: a mixture from a seed and its trained copies, described by flags or a YAML recipe
whose keys are the fields of ``MixRecipe`` (``bam_model.upcycle.MixOptions`` plus the models' paths
and the dtype); the recipe is copied to ``OUT/mix.yaml``."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass

import yaml

from ..config import DTYPES, BamConfig, dtype_option
from ..files import reserve_output
from ..formats import export_hf, export_mixtral
from ..formats.export import CLASSES, family_of
from ..formats.load import config_of
from ..options import add_options, check_mapping, flag_name, from_args, given, option, short_repr
from ..tokenizer import hf_tokenizer_files
from ..upcycle import FFN_ROUTINGS, MixOptions, upcycle
from .common import progress_option

RECIPE_MAX_BYTES = 1 << 20


@dataclass
class MixInputs:
    """The models a recipe mixes, and the mixture's dtype."""
    base_model: str | None = option(None, help="the seed (it is expert 0)", what="a path",
                                    accepts=lambda v: isinstance(v, str) and bool(v))
    experts: list = option(help="the seed's trained copies", default_factory=list, nargs="*",
                           what="a list of paths", accepts=lambda v: isinstance(v, list))
    dtype: str = dtype_option("float32", help="the mixture's dtype")


@dataclass
class MixRecipe(MixOptions, MixInputs):
    """A ``bam mix`` recipe: its keys are the YAML keys and (as ``--key-name``) the flags."""

    def options(self) -> MixOptions:
        names = [f.name for f in dataclasses.fields(MixOptions)]
        return MixOptions(**{k: getattr(self, k) for k in names})


@dataclass(kw_only=True)
class MixCommand:
    config: str | None = option(None, help="YAML recipe (keys: " + ", ".join(
        f.name for f in dataclasses.fields(MixRecipe)) + "); copied to OUT/mix.yaml")
    out: str = option(help="output folder")
    format: str = option("bam", help="hf: the Hugging Face MoE class of the models' family (Mixtral, "
                         "Qwen2-MoE, Qwen3-MoE; btx and sparse only); mixtral: Mixtral only",
                         choices=("bam", "hf", "mixtral"))
    no_progress: bool = progress_option()


def _expert_path(entry, i: int) -> str:
    # mergekit-moe lists experts as {source_model: path, ...}; a bare path is accepted too.
    if isinstance(entry, dict):
        extra = sorted(set(entry) - {"source_model"})
        if extra:
            raise ValueError(f"experts[{i}] has key {extra[0]!r}; only source_model is understood")
        entry = entry.get("source_model")
    if not isinstance(entry, str) or not entry:
        raise ValueError(f"experts[{i}] must be a path (or {{source_model: path}}), got {short_repr(entry)}")
    return entry


def validate_recipe(recipe: dict) -> MixRecipe:
    """The recipe as a ``MixRecipe`` (defaults filled in), or a ValueError naming the first bad key."""
    if not isinstance(recipe, dict):
        raise ValueError(f"a mix recipe must be a mapping of keys to values, got {type(recipe).__name__}")
    recipe = check_mapping(MixRecipe, recipe, "mix recipe key")
    if recipe.get("base_model") is None:
        raise ValueError("the mix recipe needs base_model (the seed's path)")
    recipe["experts"] = [_expert_path(e, i) for i, e in enumerate(recipe.get("experts", []))]
    for i, path in enumerate([recipe["base_model"]] + recipe["experts"]):
        if not os.path.exists(path):
            name = "base_model" if i == 0 else f"experts[{i - 1}]"
            raise ValueError(f"{name} path {path!r} does not exist")
    return MixRecipe(**recipe)


def add_mix_args(p: argparse.ArgumentParser) -> None:
    add_options(p, MixCommand, only=("config",))
    add_options(p, MixRecipe, defaults=False)
    add_options(p, MixCommand, skip=("config",))


def _read_recipe(args: argparse.Namespace) -> tuple[MixRecipe, str]:
    """The recipe of ``--config`` or of the recipe flags, and the text of OUT/mix.yaml."""

    flags = given(MixRecipe, args)
    if args.config is None:
        if flags.get("base_model") is None:
            raise ValueError("give --base-model (the seed) and --experts, or a recipe with --config")
        recipe = validate_recipe(flags)
        text = yaml.safe_dump({k: v for k, v in dataclasses.asdict(recipe).items() if v is not None},
                              sort_keys=False)
        return recipe, text
    if flags:
        flag = flag_name(next(iter(flags)))
        raise ValueError(f"give either --config or recipe flags, not both (got {flag})")
    if not os.path.isfile(args.config):
        raise ValueError(f"--config file {args.config!r} does not exist")
    size = os.path.getsize(args.config)
    if size > RECIPE_MAX_BYTES:
        raise ValueError(f"--config {args.config!r} holds {size:,} bytes; a mix recipe is a few hundred, and "
                         f"files over {RECIPE_MAX_BYTES:,} are not read")
    try:
        with open(args.config, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"--config {args.config!r} is not UTF-8 text ({e.reason} at byte "
                         f"{e.start})") from None
    try:
        recipe = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"--config {args.config!r} is not valid YAML: {e}") from None
    return validate_recipe(recipe if recipe is not None else {}), text


def _check_format(kind: str, recipe: MixRecipe) -> None:
    """Refuse, before any work, a mixture the Hugging Face format asked for cannot hold."""
    if kind == "bam":
        return
    options = recipe.options()
    if options.attention_kind != "dense":
        raise ValueError(f"--format {kind} writes FFN-only mixtures (method btx or sparse); this recipe's "
                         f"method {recipe.method!r} makes attention experts, which only bam's format holds")
    seed = config_of(recipe.base_model) if recipe.base_model else None
    if seed is None or isinstance(seed, BamConfig):
        return  # loading the models says what is wrong
    top_k, normalize, straight_through = options.routing()
    experts = max(options.num_experts or 1 + len(recipe.experts), top_k)
    planned = BamConfig(**{k: v for k, v in seed.__dict__.items() if k != "domain"}, num_experts=experts,
                        top_k=top_k, normalize=normalize, straight_through=straight_through,
                        attention="dense", method=recipe.method)
    family = family_of(planned)
    if kind == "mixtral" and family != "mixtral":
        raise ValueError(f"--format mixtral: this mixture computes as {CLASSES[family]}, not Mixtral; "
                         "--format hf writes it")


def run_mix(args: argparse.Namespace) -> str:
    command = from_args(MixCommand, args)
    recipe, text = _read_recipe(args)
    _check_format(command.format, recipe)
    inputs = [("base_model", recipe.base_model)]
    inputs += [(f"experts[{i}]", e) for i, e in enumerate(recipe.experts)]
    with reserve_output(command.out, "model", inputs=inputs, what="bam mix"):
        model = upcycle(recipe.base_model, recipe.experts, recipe.options(), dtype=DTYPES[recipe.dtype],
                        progress=sys.stderr.isatty() and not command.no_progress)
        files = {"mix.yaml": text}
        if command.format != "bam":
            if model.tokenizer is not None:
                files.update(hf_tokenizer_files(model.tokenizer.to_str(), model.config, model.chat_template))
            export = export_mixtral if command.format == "mixtral" else export_hf
            export(model, command.out, extra_files=files)
        else:
            model.save_pretrained(command.out, extra_files=files)
    c = model.config
    routing = next(name for name, flags in FFN_ROUTINGS.items() if flags == (c.normalize, c.straight_through))
    print(f"wrote {command.out}: {c.method}, {c.num_experts} experts, attention {c.attention}, "
          f"FFN top-{c.top_k} {routing}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    return command.out
