"""Foreseeable bad inputs on the reading side (checkpoints, configs, GGUF files, tokenizers) fail
fast with one ValueError that names the file and the key: one line from the CLI, exit code 2."""
import json
import math
import os
import re
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import bam_model
from bam_model.cli import main
from bam_model.config import BamConfig, DenseConfig
from bam_model.formats import folder
from bam_model.formats.folder import load_config
from bam_model.model import DenseLM
from tests.support.real_models import smollm2_gguf

HF_CONFIG = {"model_type": "llama", "vocab_size": 101, "hidden_size": 40, "intermediate_size": 72,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 5000.0,
             "tie_word_embeddings": False}


def tiny_config(**changes) -> DenseConfig:
    base = dict(vocab_size=101, dim=40, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=72, rope_theta=5000.0,
                norm_eps=1e-6, max_seq_len=64)
    return DenseConfig(**{**base, **changes})


@pytest.fixture
def ours(tmp_path):
    """A small dense checkpoint in our format."""
    path = tmp_path / "ours"
    DenseLM(tiny_config()).save_pretrained(str(path))
    return path


@pytest.fixture
def hf(tmp_path):
    """A small Hugging Face Llama folder (config.json + model.safetensors), made without transformers."""
    path = tmp_path / "hf"
    path.mkdir()
    save_file(dict(DenseLM(tiny_config()).state_dict()), str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(HF_CONFIG))
    return path


def cli_error(args, capsys) -> str:
    """Run ``bam ARGS``; it must exit 2 with one ``bam <command>: error:`` line and no traceback."""
    capsys.readouterr()
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(f"bam {args[0]}: error: "), err
    return err


def edit_json(path, **changes):
    d = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    path.write_text(json.dumps(d))


# --- 1. a huge config is refused from the safetensors headers, before any model is built --------

@pytest.mark.parametrize("kind", ["ours", "hf"])
def test_a_config_of_many_more_layers_than_the_weights_is_refused_at_once(kind, request, capsys):
    path = request.getfixturevalue(kind)
    edit_json(path / "config.json", num_hidden_layers=20000)  # both spell it as Hugging Face does
    start = time.perf_counter()
    err = cli_error(["eval", path], capsys)
    assert time.perf_counter() - start < 1.0  # was 55 s and 1.3 GB: 20000 layers built on the meta device
    assert f"{path / 'config.json'} says 20000 layers but {path / 'model.safetensors'} holds 2" in err


def test_sizes_the_weights_do_not_have_are_refused(ours):
    edit_json(ours / "config.json", vocab_size=10 ** 9)
    message = r"'model.embed_tokens.weight' has shape \(101, 40\) in .*safetensors, expected \(10+, 40\)"
    with pytest.raises(ValueError, match=message):
        bam_model.from_pretrained(str(ours))
    # q_proj would hold 2**66 values
    edit_json(ours / "config.json", vocab_size=101, hidden_size=2 ** 33, head_dim=None)
    with pytest.raises(ValueError, match="the config's sizes make a tensor too large to exist"):
        bam_model.from_pretrained(str(ours))


# --- 2. a sharded index stays inside its folder ------------------------------------------------

@pytest.mark.parametrize("shard, message", [
    ("../outside.safetensors", "lies outside the checkpoint folder"),
    ("sub/../../outside.safetensors", "lies outside the checkpoint folder"),
    ("/etc/passwd", "lies outside the checkpoint folder"),
    (3, "must be a shard file name, got 3"),
    ("", "must be a shard file name, got ''"),
    (["model.safetensors"], r"must be a shard file name, got \['model.safetensors'\]"),
])
def test_an_index_naming_a_shard_outside_the_folder_or_no_file_is_refused(ours, capsys, shard, message):
    os.rename(ours / "model.safetensors", ours.parent / "outside.safetensors")  # a real file out there
    weight_map = {"model.embed_tokens.weight": shard}
    (ours / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    err = cli_error(["eval", ours], capsys)
    assert "model.safetensors.index.json: weight_map['model.embed_tokens.weight']" in err
    assert re.search(message, err), err


@pytest.mark.parametrize("index, message", [
    ({"metadata": {}}, "has no weight_map"), ({"weight_map": []}, "has no weight_map"),
    ([], "must hold a JSON object, got list")])
def test_an_index_without_a_weight_map_is_refused(ours, index, message):
    (ours / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=message):
        bam_model.from_pretrained(str(ours))


def test_a_tensor_in_two_shards_is_refused(ours):
    tensors = folder.read_safetensors_folder(str(ours))
    folder.write_folder(str(ours), {"config.json": (ours / "config.json").read_text()}, tensors,
                            max_shard_bytes=4000)
    first, second = sorted(p for p in os.listdir(ours) if p.startswith("model-"))[:2]
    save_file({"model.norm.weight": torch.ones(40)}, str(ours / second))
    save_file({"model.norm.weight": torch.ones(40)}, str(ours / first))
    with pytest.raises(ValueError, match="tensor 'model.norm.weight' is stored twice"):
        bam_model.from_pretrained(str(ours))


# --- 3. truncated or corrupt safetensors -------------------------------------------------------

@pytest.mark.parametrize("cut", ["half", "header", "garbage", "bad header"])
def test_a_truncated_or_corrupt_safetensors_file_is_named(ours, capsys, cut):
    weights = ours / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"half": data[:len(data) // 2], "header": data[:20], "garbage": os.urandom(1000),
                         "bad header": (10).to_bytes(8, "little") + b"{not json}"}[cut])
    err = cli_error(["generate", ours, "--prompt", "x"], capsys)
    assert f"{weights} is truncated or corrupt (Error while deserializing header" in err


def test_missing_weights_a_weights_folder_and_unreadable_weights(ours, capsys):
    (ours / "model.safetensors").unlink()
    for args in (["eval", ours], ["generate", ours, "--prompt", "x"], ["mix", "--base-model", ours, "--out",
                                                                        ours.parent / "o"]):
        assert "no model.safetensors or model.safetensors.index.json in" in cli_error(args, capsys)
    (ours / "model.safetensors").mkdir()
    assert "model.safetensors' is not a file" in cli_error(["eval", ours], capsys)


def test_an_unreadable_weights_file_is_named(ours, capsys, monkeypatch):
    import builtins

    weights = str(ours / "model.safetensors")

    # As a user without read rights sees a 0600 file of another (root reads any).
    def denied(path, *args, **kwargs):
        if os.fspath(path) == weights:
            raise PermissionError(13, "Permission denied", weights)
        return builtins.open(path, *args, **kwargs)
    monkeypatch.setattr(folder, "open", denied, raising=False)
    assert f"cannot read {weights}: Permission denied" in cli_error(["eval", ours], capsys)


# --- 4. truncated or corrupt GGUF --------------------------------------------------------------

def tiny_gguf(path, block_count=1, poison=None):
    """A one-layer llama GGUF of float32 tensors (tied embeddings); ``poison`` puts that value into
    the first layer's down_proj."""
    import gguf
    V, D, F, H, KV = 11, 8, 12, 2, 1
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in [(w.add_block_count, block_count), (w.add_embedding_length, D), (w.add_head_count, H),
                       (w.add_head_count_kv, KV), (w.add_feed_forward_length, F), (w.add_context_length, 32),
                       (w.add_vocab_size, V), (w.add_tokenizer_model, "gpt2")]:
        add(value)
    w.add_token_list([f"t{i}" for i in range(V)])
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (V, D), "output_norm.weight": (D,), "blk.0.attn_norm.weight": (D,),
              "blk.0.ffn_norm.weight": (D,), "blk.0.attn_q.weight": (D, D),
              "blk.0.attn_output.weight": (D, D),
              "blk.0.attn_k.weight": (KV * D // H, D), "blk.0.attn_v.weight": (KV * D // H, D),
              "blk.0.ffn_gate.weight": (F, D), "blk.0.ffn_up.weight": (F, D), "blk.0.ffn_down.weight": (D, F)}
    for name, shape in shapes.items():
        t = rng.standard_normal(shape).astype(np.float32)
        if name == "blk.0.ffn_down.weight" and poison is not None:
            t[1, 2] = poison
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_gguf_cut_in_half_is_named_truncated(tmp_path, capsys):
    data = open(smollm2_gguf(), "rb").read()
    (tmp_path / "half.gguf").write_bytes(data[:len(data) // 2])
    err = cli_error(["generate", tmp_path / "half.gguf", "--prompt", "x"], capsys)
    assert f"GGUF file {tmp_path / 'half.gguf'} is truncated or corrupt (" in err


@pytest.mark.parametrize("cut", ["header", "garbage", "empty", "bad version"])
def test_a_gguf_cut_in_its_header_or_not_gguf_is_named(tmp_path, capsys, cut):
    data = tiny_gguf(tmp_path / "tiny.gguf").read_bytes()
    path = tmp_path / "bad.gguf"
    path.write_bytes({"header": data[:100], "garbage": b"\x00junk" * 50, "empty": b"",
                      "bad version": b"GGUF" + (99).to_bytes(4, "little") + data[8:]}[cut])
    err = cli_error(["generate", path, "--prompt", "x"], capsys)
    expected = "is not a GGUF file" if cut in ("garbage", "empty") else "is truncated or corrupt"
    assert f"{path} {expected}" in err, err


def test_a_gguf_of_more_blocks_than_tensors_or_with_nan_is_refused(tmp_path):
    message = r"\(llama.block_count\) says 20000 layers but its tensor list holds 1"
    with pytest.raises(ValueError, match=message):
        bam_model.load_dense(str(tiny_gguf(tmp_path / "many.gguf", block_count=20000)))
    with pytest.raises(ValueError, match="tensor 'blk.0.ffn_down.weight' holds NaN"):
        bam_model.load_dense(str(tiny_gguf(tmp_path / "nan.gguf", poison=np.nan)))
    assert bam_model.load_dense(str(tiny_gguf(tmp_path / "fine.gguf"))).config.n_layers == 1


# --- 5. config.json: missing keys, wrong types, not an object ----------------------------------

@pytest.mark.parametrize("changes, message", [
    ({"hidden_size": None}, "key 'hidden_size' is missing; expected a positive int"),
    ({"num_attention_heads": "nine"}, "key 'num_attention_heads' must be a positive int, got 'nine'"),
    ({"vocab_size": -1}, "key 'vocab_size' must be a positive int, got -1"),
    ({"num_hidden_layers": 2.5}, "key 'num_hidden_layers' must be a positive int, got 2.5"),
    ({"tie_word_embeddings": "yes"}, "key 'tie_word_embeddings' must be true or false, got 'yes'"),
    ({"rms_norm_eps": "1e-6"}, "key 'rms_norm_eps' must be a finite positive number, got '1e-6'"),
    ({"max_position_embeddings": [64]}, "key 'max_position_embeddings' must be a positive int, got [64]"),
    ({"rope_parameters": "default"}, "key 'rope_parameters' must be an object"),
    ({"model_type": ["llama"]}, "model_type must be a string, got ['llama']"),
])
def test_hugging_face_config_keys_of_the_wrong_type_are_named(hf, capsys, changes, message):
    edit_json(hf / "config.json", **changes)
    err = cli_error(["generate", hf, "--prompt", "x"], capsys)
    assert f"{hf / 'config.json'}: {message}" in err, err


@pytest.mark.parametrize("changes, message", [
    ({"num_local_experts": "4"}, "key 'num_local_experts' must be a positive int, got '4'"),
    ({"router_aux_loss_coef": -1}, "key 'router_aux_loss_coef' must be a finite number >= 0, got -1"),
    ({"num_experts_per_tok": None}, "key 'num_experts_per_tok' is missing"),
])
def test_mixtral_config_keys_of_the_wrong_type_are_named(hf, changes, message):
    edit_json(hf / "config.json", model_type="mixtral", num_local_experts=2, num_experts_per_tok=1)
    edit_json(hf / "config.json", **changes)
    with pytest.raises(ValueError, match=re.escape(f"{hf / 'config.json'}: {message}")):
        bam_model.from_pretrained(str(hf))


@pytest.mark.parametrize("text, kind", [("[1, 2]", "list"), ("null", "null"), ("3", "int"), ('"x"', "str")])
@pytest.mark.parametrize("kind_of_folder", ["ours", "hf"])
def test_a_config_json_that_is_not_an_object_is_named(kind_of_folder, request, capsys, text, kind):
    path = request.getfixturevalue(kind_of_folder)
    (path / "config.json").write_text(text)
    err = cli_error(["eval", path], capsys)
    assert f"{path / 'config.json'} must hold a JSON object, got {kind}" in err


def test_our_config_keys_of_the_wrong_type_are_named_with_the_file(ours, capsys):
    edit_json(ours / "config.json", num_hidden_layers=2.5)
    message = f"{ours / 'config.json'}: num_hidden_layers must be a positive int, got 2.5"
    assert message in cli_error(["eval", ours], capsys)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(str(ours))


# --- 6. JSON nested too deeply -----------------------------------------------------------------

@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_deeply_nested_json_is_a_clear_error(ours, capsys, name):
    (ours / name).write_text("[" * 100000 + "]" * 100000)
    assert f"{ours / name} is nested too deeply to be read" in cli_error(["eval", ours], capsys)


def test_deeply_nested_tokenizer_json_is_a_clear_error(ours, tmp_path, capsys):
    (tmp_path / "deep.json").write_text('{"a": ' * 100000 + "1" + "}" * 100000)
    err = cli_error(["generate", ours, "--prompt", "x", "--tokenizer", tmp_path / "deep.json"], capsys)
    assert f"tokenizer file {tmp_path / 'deep.json'} is not a tokenizers tokenizer.json (" in err


# --- 7. non-float and non-finite tensors -------------------------------------------------------

@pytest.mark.parametrize("value, message", [
    ("int32", "has dtype int32, expected a floating dtype"), (math.nan, "holds NaN"),
    (-math.inf, "holds Inf")])
@pytest.mark.parametrize("kind", ["ours", "hf"])
def test_a_non_float_or_non_finite_tensor_is_named(kind, request, capsys, value, message):
    path = request.getfixturevalue(kind)
    weights = path / "model.safetensors"
    tensors = folder.read_safetensors_folder(str(path))
    name = "model.layers.1.mlp.down_proj.weight"
    if value == "int32":
        tensors[name] = tensors[name].to(torch.int32)
    else:
        tensors[name][3, 5] = value
    save_file(tensors, str(weights))
    err = cli_error(["eval", path], capsys)
    assert f"{weights}: tensor '{name}' {message}" in err, err


# --- 8. tokenizer files that are not tokenizers ------------------------------------------------

@pytest.mark.parametrize("content, reason", [(b'{"a": 1}', "line 1"), (b"\xff\xfe garbage \x00", "UTF-8"),
                                             (b"[1, 2]", "expected struct Tokenizer")])
def test_a_tokenizer_file_that_is_not_a_tokenizer_is_named(ours, tmp_path, capsys, content, reason):
    (tmp_path / "some.json").write_bytes(content)
    err = cli_error(["generate", ours, "--prompt", "x", "--tokenizer", tmp_path / "some.json"], capsys)
    assert f"tokenizer file {tmp_path / 'some.json'} is not a tokenizers tokenizer.json (" in err
    assert reason in err
    assert "tokenizer file" in cli_error(["generate", ours, "--prompt", "x", "--tokenizer", tmp_path], capsys)


def test_a_folders_own_corrupt_tokenizer_json_is_named(ours, tmp_path, capsys):
    (ours / "tokenizer.json").write_text('{"version": "1.0"')
    message = f"tokenizer file {ours / 'tokenizer.json'} is not a tokenizers tokenizer.json ("
    assert message in cli_error(["generate", ours, "--prompt", "x"], capsys)
    assert message in cli_error(["branch", ours, "--domains", "a", "--out", tmp_path / "br"], capsys)


# --- 9. floats in configs are finite; JSON NaN and Infinity are refused ------------------------

@pytest.mark.parametrize("cls, key, value", [
    (DenseConfig, "rope_theta", math.inf), (DenseConfig, "norm_eps", math.nan),
    (BamConfig, "load_balancing_alpha", math.nan), (BamConfig, "z_loss_beta", math.inf)])
def test_config_floats_must_be_finite(cls, key, value):
    with pytest.raises(ValueError, match=f"{key} must be a finite"):
        cls(**{**tiny_config().__dict__, key: value})


@pytest.mark.parametrize("literal, message", [
    ("NaN", "NaN is not a number JSON allows"), ("-Infinity", "-Infinity is not a number JSON allows"),
    ("1e999", "1e999 is out of range for a float")])
def test_json_nan_and_infinity_are_refused(ours, literal, message):
    text = (ours / "config.json").read_text()
    (ours / "config.json").write_text(re.sub(r'"rope_theta": [^,\n]+', f'"rope_theta": {literal}', text))
    with pytest.raises(ValueError, match=f"config.json is not valid JSON: {message}"):
        load_config(str(ours))


def test_a_nan_router_loss_weight_in_a_mix_recipe_is_refused(ours, tmp_path, capsys):
    (tmp_path / "r.yaml").write_text(f"base_model: {ours}\nexperts: [{ours}]\nload_balancing_alpha: .nan\n")
    err = cli_error(["mix", "--config", tmp_path / "r.yaml", "--out", tmp_path / "out"], capsys)
    assert "load_balancing_alpha must be a finite number >= 0, got nan" in err
