"""bam-bench decode on a tiny mixture (the suite's own model, SmolLM2, is left to real runs): the
shared per-token timing, the greedy check that fails on a mismatch, the rows and result files the
runner writes, and the arguments it refuses."""
import json
import math
import types

import pytest
import torch

from bam_bench import decode, runner
from bam_model import DenseConfig, DenseLM
from bam_model.demo import cost

pytest.importorskip("transformers")

TINY = DenseConfig(vocab_size=300, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=64)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(0)
    return decode.load_pair(DenseLM(TINY), str(tmp_path_factory.mktemp("tiny-mixture")), "cpu")


class Clock:
    """A fake ``time.perf_counter``; the fake models below move it on."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Steps:
    """A model whose prefill takes ``prefill`` seconds on the clock and each decoding step ``step``."""

    def __init__(self, clock, prefill, step, log, name):
        self.clock, self.prefill, self.step, self.log, self.name = clock, prefill, step, log, name

    def eval(self):
        return self

    def decode_steps(self, ids, n, now):
        self.log.append(self.name)
        self.clock.now += self.prefill
        start = now()
        self.clock.now += n * self.step
        return now() - start


def test_decode_timing_leaves_the_prefill_out_and_interleaves_the_models(monkeypatch):
    clock, log = Clock(), []
    monkeypatch.setattr(cost.time, "perf_counter", clock)
    models = {"a": Steps(clock, 0.5, 0.003, log, "a"), "b": Steps(clock, 2.0, 0.007, log, "b")}
    rounds = {}
    ms = cost.decode_ms_per_token(models, torch.zeros(1, 4, dtype=torch.long), 9, rounds=3, rounds_ms=rounds)
    assert ms == pytest.approx({"a": 3.0, "b": 7.0})
    assert rounds.keys() == {"a", "b"} and rounds["a"] == pytest.approx([3.0] * 3) and \
        rounds["b"] == pytest.approx([7.0] * 3)
    assert log == ["a", "b"] + ["a", "b"] * 3   # warm-up, then turns within each round


def test_decode_timing_waits_for_cuda_before_reading_the_clock(monkeypatch):
    clock, log, synced = Clock(), [], []
    monkeypatch.setattr(cost.time, "perf_counter", clock)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    on_cuda = types.SimpleNamespace(is_cuda=True, device="cuda:0")   # the fake models never touch it
    cost.decode_ms_per_token({"a": Steps(clock, 0.1, 0.001, log, "a")}, on_cuda, 4, rounds=2)
    assert synced == ["cuda:0"] * 6    # two clock readings a call: the warm-up's and each round's


def test_bams_decode_steps_are_timed_without_the_prefill(monkeypatch):
    """bam's side: the prefill fills the cache before the clock is read; each of the n steps is one
    token on it, greedy."""
    clock, calls = Clock(), []
    model = DenseLM(TINY).eval()
    real = model.decode_step

    def step(ids, cache):
        calls.append((ids.shape[1], cache.length()))
        clock.now += 1.0 if ids.shape[1] > 1 else 0.01   # the prefill costs a second, a step 10 ms
        return real(ids, cache)

    monkeypatch.setattr(model, "decode_step", step)
    prompt = torch.randint(0, TINY.vocab_size, (1, 6))
    assert cost.decode_seconds(model, prompt, 5, clock) == pytest.approx(0.05)
    assert calls == [(6, 0)] + [(1, 6 + i) for i in range(5)]


@pytest.mark.parametrize("new_tokens,rounds,message", [
    (1, 3, "new_tokens must be an int of at least 2, got 1"),
    (True, 3, "new_tokens must be an int of at least 2, got True"),
    (4.0, 3, "new_tokens must be an int of at least 2, got 4.0"),
    (4, 0, "rounds must be an int of at least 1, got 0"),
])
def test_decode_timing_refuses_bad_arguments(new_tokens, rounds, message):
    with pytest.raises(ValueError, match=message):
        cost.decode_ms_per_token({}, torch.zeros(1, 4, dtype=torch.long), new_tokens, rounds)


def test_bam_and_transformers_generate_the_same_greedy_tokens(pair):
    lines = list(decode.check_models(pair, TINY, [1, 7, 50], "cpu"))
    assert lines == [f"prefix {n}: the same 8 greedy tokens through bam generate, transformers generate"
                     for n in (1, 7, 50)]


class Off:
    """A model that gives another's tokens with one changed: the new token ``at`` (the last one when
    it generates fewer)."""

    def __init__(self, model, at):
        self.model, self.at = model, at

    def eval(self):
        return self

    def generate(self, ids, n):
        out = self.model.generate(ids, n).clone()
        out[0, ids.shape[1] + min(self.at, n - 1)] += 1
        return out

    def decode_steps(self, ids, n, now):
        return self.model.decode_steps(ids, n, now)


def test_the_greedy_check_fails_when_a_token_differs(pair):
    ids = decode.prompt(TINY.vocab_size, 7, "cpu")
    off = {**pair, "transformers generate": Off(pair["transformers generate"], 5)}
    line = decode.greedy_agreement(off, ids)
    assert line.startswith("FAIL prefix 7: transformers generate and bam generate part at new token 5 of 8")
    short = {**pair, "transformers generate": types.SimpleNamespace(generate=lambda ids, n: ids)}
    assert decode.greedy_agreement(short, ids).startswith("FAIL prefix 7: transformers generate and bam "
                                                         "generate part at new token 0 of 8")


def test_rows_hold_ms_per_new_token_of_each_side(pair):
    rows = list(decode.timed_rows(pair, TINY, [3, 40], 4, 2, "cpu", label="tiny"))
    assert [(r["case"], r["provider"]) for r in rows] == [
        (f"tiny, 1 sequence, prefix {n}, ms per new token of 4", side)
        for n in (3, 40) for side in ("bam generate", "transformers generate")]
    for r in rows:   # a tiny model's milliseconds are noise on a loaded machine: no bounds but > 0
        assert math.isfinite(r["ms"]) and 0 < r["p20_ms"] <= r["ms"] <= r["p80_ms"]
        assert r["tokens_per_s"] == pytest.approx(1e3 / r["ms"])
        assert (r["new_tokens"], r["rounds"], r["batch"], r["dtype"]) == (4, 2, 1, "float32")


@pytest.mark.parametrize("prefixes,new_tokens,rounds,message", [
    ([0, 8], 4, 2, r"prefixes must be prompt lengths of at least 1 token, got \[0, 8\]"),
    ([], 4, 2, "prefixes must be"),
    ([8, 61], 4, 2, "prefixes: 61 tokens \\+ 4 new exceed the model's max_seq_len=64"),
    ([8], 1, 2, "new_tokens must be an int of at least 2, got 1"),
    ([8], 4, 0, "rounds must be an int of at least 1, got 0"),
])
def test_bad_suite_arguments_are_refused_by_name(pair, prefixes, new_tokens, rounds, message):
    with pytest.raises(ValueError, match=message):
        list(decode.timed_rows(pair, TINY, prefixes, new_tokens, rounds, "cpu"))


def _tiny_suite(monkeypatch, pair):
    """The suite as the runner runs it, on the tiny mixture instead of SmolLM2."""
    monkeypatch.setattr(decode, "unavailable", lambda: None)
    monkeypatch.setattr(decode, "smollm2_gguf", lambda: "tiny")
    monkeypatch.setattr(decode, "load_dense", lambda path: None)
    monkeypatch.setattr(decode, "load_pair", lambda seed, folder, device: pair)
    monkeypatch.setattr(decode, "PREFIXES", (5, 20))
    decode._smollm2_pair.cache_clear()


def test_the_runner_writes_the_suites_results(pair, tmp_path, monkeypatch):
    _tiny_suite(monkeypatch, pair)
    assert runner.main(["decode", "--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    stem = tmp_path / f"{runner.machine_tag('cpu')}-decode"
    assert sorted(p.name for p in tmp_path.iterdir()) == [stem.name + ext for ext in (".json", ".md", ".png")]
    data = json.loads(stem.with_suffix(".json").read_text())
    assert [c.split(": ")[1] for c in data["checks"]] == ["prefix 5", "prefix 20"] and not data["errors"]
    assert [(r["suite"], r["prefix"], r["provider"], r["new_tokens"], r["rounds"]) for r in data["rows"]] == [
        ("decode", n, side, decode.NEW_TOKENS[True], decode.ROUNDS[True])
        for n in (5, 20) for side in ("bam generate", "transformers generate")]
    assert "2 of 2 passed" in stem.with_suffix(".md").read_text()
    assert decode._smollm2_pair.cache_info().currsize == 0     # the models are let go after the timings


def test_a_greedy_mismatch_fails_the_run(pair, tmp_path, monkeypatch):
    _tiny_suite(monkeypatch, {**pair, "transformers generate": Off(pair["transformers generate"], 2)})
    assert runner.main(["decode", "--device", "cpu", "--quick", "--out", str(tmp_path)]) == 1
    data = json.loads(next(tmp_path.glob("*-decode.json")).read_text())
    assert all(c.startswith("decode: FAIL prefix") for c in data["checks"]) and len(data["checks"]) == 2
    assert len(data["rows"]) == 4       # the timings still run


def test_without_its_packages_the_suite_is_refused_before_any_work(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(decode.REQUIRES, "bam_no_such_package", "no-such-package (pip install it)")
    with pytest.raises(SystemExit) as exc:
        runner.main(["decode", "--device", "cpu", "--out", str(tmp_path)])
    assert exc.value.code == 2 and not list(tmp_path.iterdir())
    err = capsys.readouterr().err
    assert "suite 'decode' cannot run: no-such-package (pip install it) not installed" in err


def test_all_leaves_the_named_only_suites_out(monkeypatch):
    monkeypatch.setattr(decode, "unavailable", lambda: None)
    p = runner._parser()
    assert runner._suites(p, p.parse_args(["--all"])) == ["moe", "moa", "model"]
    assert runner._suites(p, p.parse_args(["decode"])) == ["decode"]
