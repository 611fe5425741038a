"""The bam command line: branch, mix (flags and YAML, validated, recipe copied), generate."""
import os
import re

import pytest
import torch
import transformers
import yaml

import bam_model
from bam_model import DenseConfig, DenseLM
from bam_model.cli import SUBCOMMANDS, main


@pytest.fixture
def seed_path(tmp_path):
    cfg = DenseConfig(vocab_size=8192, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                      max_seq_len=64, tie_embeddings=True, eos_token_id=0)
    DenseLM(cfg).save_pretrained(str(tmp_path / "seed"))
    return str(tmp_path / "seed")


def test_branch_mix_generate(tmp_path, seed_path, capsys):
    assert main(["branch", seed_path, "--domains", "code", "law", "--out", str(tmp_path / "br")]) == 0
    code = bam_model.from_pretrained(str(tmp_path / "br" / "code"))
    assert code.config.domain == "code"
    out = str(tmp_path / "mixed")
    assert main(["mix", "--base-model", seed_path, "--experts", str(tmp_path / "br" / "code"),
                 str(tmp_path / "br" / "law"), "--attention", "shared-kv", "--top-k", "2", "--out", out]) == 0
    moe = bam_model.from_pretrained(out)
    assert (moe.config.num_experts, moe.config.attention, moe.config.top_k) == (3, "shared-kv", 2)
    assert moe.config.expert_domains == [None, "code", "law"]
    recipe = yaml.safe_load(open(os.path.join(out, "mix.yaml")))
    assert recipe["attention"] == "shared-kv" and recipe["experts"][1].endswith("law")
    capsys.readouterr()
    assert main(["generate", out, "--prompt", "def main():", "--max-new-tokens", "5", "--temperature", "0.8",
                 "--top-p", "0.9", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("def main():")


def test_mix_from_yaml_copies_it_verbatim_and_exports_mixtral(tmp_path, seed_path):
    text = (f"# my recipe\nbase_model: {seed_path}\nexperts:\n  - source_model: {seed_path}\n"
            f"  - {seed_path}\nmethod: btx\ndtype: bfloat16\n")
    (tmp_path / "r.yaml").write_text(text)
    assert main(["mix", "--config", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "mix.yaml").read_text() == text
    moe = bam_model.from_pretrained(str(tmp_path / "m"))
    assert moe.dtype == torch.bfloat16 and moe.config.method == "btx" and moe.config.top_k == 2
    assert main(["mix", "--config", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "hf"),
                 "--format", "mixtral"]) == 0
    assert '"model_type": "mixtral"' in (tmp_path / "hf" / "config.json").read_text()


@pytest.mark.parametrize("recipe, message", [
    ({"experts": []}, "needs base_model"),
    ({"base_model": "SEED", "colour": "red"}, "unknown mix recipe key 'colour'"),
    ({"base_model": "SEED", "method": "moe"}, "method must be one of"),
    ({"base_model": "SEED", "merge": "median"}, "merge must be one of"),
    ({"base_model": "SEED", "top_k": "two"}, "'top_k' must be an int"),
    ({"base_model": "SEED", "dtype": "int8"}, "'dtype' must be"),
    ({"base_model": "SEED", "experts": ["/no/such/model"]},
     r"experts\[0\] path '/no/such/model' does not exist"),
    ({"base_model": "SEED", "experts": [{"source_model": "SEED", "positive_prompts": ["x"]}]},
     "positive_prompts"),
    ({"base_model": "SEED", "method": "btx", "attention": "shared-kv"}, "attention applies to method='bam'"),
    ({"base_model": "SEED", "experts": ["SEED"], "top_k": 3}, "top_k must be an int in"),
])
def test_bad_recipes_get_clear_errors_and_write_nothing(tmp_path, seed_path, capsys, recipe, message):
    recipe = yaml.safe_load(yaml.safe_dump(recipe).replace("SEED", seed_path))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["mix", "--config", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "bam mix: error:" in err and re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_mix_refuses_config_and_flags_together(tmp_path, seed_path, capsys):
    (tmp_path / "r.yaml").write_text(f"base_model: {seed_path}\n")
    assert main(["mix", "--config", str(tmp_path / "r.yaml"), "--method", "btx", "--out",
                 str(tmp_path / "o")]) == 2
    assert "not both" in capsys.readouterr().err


def test_the_source_tokenizer_travels_through_branch_and_mix(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(95)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=None, eos_token_id=1)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    assert main(["branch", str(tmp_path / "hf"), "--domains", "a", "--out", str(tmp_path / "br")]) == 0
    assert main(["mix", "--base-model", str(tmp_path / "hf"), "--experts", str(tmp_path / "br" / "a"),
                 "--method", "btx", "--top-k", "1", "--out", str(tmp_path / "mix")]) == 0
    for folder in ("br/a", "mix"):  # the same tokenizer (tokenizers' own serialisation of it)
        assert Tokenizer.from_file(str(tmp_path / folder / "tokenizer.json")).to_str() == tok.to_str()
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "mix"), "--prompt", "w3 w7", "--max-new-tokens", "4"]) == 0
    words_out = capsys.readouterr().out.split()
    assert words_out[:2] == ["w3", "w7"] and all(w in words for w in words_out)
    (tmp_path / "mix" / "tokenizer.json").unlink()
    assert main(["generate", str(tmp_path / "mix"), "--prompt", "w3"]) == 2
    assert "--tokenizer" in capsys.readouterr().err


def test_generate_with_a_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "none"), "--prompt", "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_every_subcommand_has_help(capsys):
    for name, *_ in SUBCOMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0 and f"usage: bam {name}" in capsys.readouterr().out


def test_flags_recipe_keys_defaults_and_checks_come_from_one_declaration(seed_path):
    import argparse
    import dataclasses

    from bam_model.cli.mix import MixRecipe, add_mix_args, validate_recipe
    from bam_model.cli.train import add_train_args
    from bam_model.options import from_args, given
    from bam_model.training import TrainConfig
    from bam_model.upcycle import MixOptions

    p = argparse.ArgumentParser()
    add_train_args(p)
    args = p.parse_args(["m", "--data", "code", "--steps", "3", "--out", "o"])
    assert from_args(TrainConfig, args) == TrainConfig(steps=3)     # every flag's default is the field's
    assert from_args(TrainConfig, p.parse_args(["m", "--data", "code", "--steps", "3", "--out", "o",
                                                "--lr", "0.01"])).lr == 0.01
    p = argparse.ArgumentParser()
    add_mix_args(p)
    recipe_keys = [f.name for f in dataclasses.fields(MixRecipe)]
    assert set(recipe_keys) <= {a.dest for a in p._actions}          # every recipe key is a flag too
    args = p.parse_args(["--base-model", seed_path, "--z-loss-beta", "0.5", "--out", "o"])
    assert given(MixRecipe, args) == {"base_model": seed_path, "z_loss_beta": 0.5}
    recipe = validate_recipe(given(MixRecipe, args))
    assert (recipe.z_loss_beta, recipe.load_balancing_alpha, recipe.method) == (0.5, 0.01, "bam")
    with pytest.raises(ValueError, match=r"kv_init must be one of \('mean', 'seed'\), got 'first'"):
        MixOptions(kv_init="first")
    with pytest.raises(ValueError, match="mix recipe key 'router_seed' must be an int, got 1.5"):
        validate_recipe({"base_model": seed_path, "router_seed": 1.5})


def test_mix_without_a_seed_names_the_flags(tmp_path, capsys):
    assert main(["mix", "--out", str(tmp_path / "o")]) == 2
    assert "give --base-model (the seed) and --experts, or a recipe with --config" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_switch_left_out_is_not_given():
    """Under defaults=False (how bam mix tells recipe flags from a --config) an absent on/off flag
    is not 'given', and a present one is True."""
    import argparse
    from dataclasses import dataclass

    from bam_model.options import add_options, given, option

    @dataclass
    class Switches:
        fast: bool = option(False, help="go fast")
        name: str = option("x", help="a name")

    p = argparse.ArgumentParser()
    add_options(p, Switches, defaults=False)
    assert given(Switches, p.parse_args([])) == {}
    assert given(Switches, p.parse_args(["--fast"])) == {"fast": True}
    p = argparse.ArgumentParser()
    add_options(p, Switches)
    assert p.parse_args([]).fast is False and p.parse_args(["--fast"]).fast is True


def test_eval_window_defaults_to_the_models_context_and_a_longer_one_is_refused_first(tmp_path, seed_path,
                                                                                      capsys):
    """A model whose context (64) is shorter than the default window (256) is scored on windows of
    its context; an explicit longer --seq-len is refused in one line before the model is loaded."""
    out = tmp_path / "e.json"
    assert main(["eval", seed_path, "--data", "code", "--max-windows", "2", "--no-progress", "--json",
                 str(out)]) == 0
    record = yaml.safe_load(out.read_text())
    assert record["seq_len"] == 64 and record["results"]["code"]["tokens"] == 2 * 63
    capsys.readouterr()
    assert main(["eval", seed_path, "--data", "code", "--seq-len", "65", "--no-progress"]) == 2
    from bam_model.evaluate import evaluate
    with pytest.raises(ValueError, match=r"seq_len=65 is longer than the model's context \(max_seq_len=64\)"):
        evaluate(bam_model.from_pretrained(seed_path), "code", seq_len=65)
    said = capsys.readouterr()
    assert said.out == "" and said.err == ("bam eval: error: --seq-len 65 is longer than MODEL's context (64 "
                                           "tokens, its max_seq_len); give --seq-len 64 or less\n")


def test_train_without_a_bar_says_the_first_step_at_once_and_each_logged_one(tmp_path, seed_path, capsys):
    assert main(["train", seed_path, "--data", "code", "--out", str(tmp_path / "run"), "--steps", "5",
                 "--log-every", "2", "--batch-size", "2", "--seq-len", "16", "--eval-windows", "1",
                 "--no-progress"]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train: step ")]
    assert [re.match(r"train: step (\d+)/5: loss [\d.]+, [\d,]+ tokens/s, .* elapsed, about .* left$", line)
            .group(1) for line in said] == ["1", "2", "4", "5"]


def test_a_folders_chat_template_travels_into_every_folder_bam_writes(tmp_path, seed_path):
    """A chat template beside a model (``chat_template.jinja``, as transformers 5 writes it, before the
    ``chat_template`` of tokenizer_config.json) is carried through branch and mix into their folders."""
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    (tmp_path / "seed" / "chat_template.jinja").write_text(template)
    assert bam_model.load_dense(seed_path).chat_template == template
    assert main(["branch", seed_path, "--domains", "a", "--out", str(tmp_path / "br")]) == 0
    assert main(["mix", "--base-model", str(tmp_path / "br" / "a"), "--experts", str(tmp_path / "br" / "a"),
                 "--out", str(tmp_path / "mixed")]) == 0
    for folder in (tmp_path / "br" / "a", tmp_path / "mixed"):
        assert yaml.safe_load((folder / "tokenizer_config.json").read_text())["chat_template"] == template
        assert bam_model.from_pretrained(str(folder)).chat_template == template
