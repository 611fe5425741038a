"""Training on several processes (gloo on the CPU) and surviving kills.

One ``torchrun --standalone --nproc_per_node 2`` launch of this file (``_worker`` below) runs
every multi-process scenario once and writes what it saw; the tests compare that with
single-process runs. Kill tests start ``bam train`` as a subprocess and SIGKILL it.
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORLD = 2
STEPS = 4
ROOT = Path(__file__).resolve().parents[2]


def _small_data(folder: Path) -> str:
    """A two-part mixture cut from the bundled corpus: a folder of prepared data (``bam prepare``)
    and a text file, which the ranks prepare into the cache together (one prepares, the other
    waits and opens it)."""
    from bam_model import data as D
    from bam_model import prepare as P

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("code", "math"):
        (folder / f"{name}.txt").write_text("\n".join(D.Source(name).documents("train"))[:40_000])
    P.prepare([folder / "code.txt"], D.load_tokenizer(), folder / "code-prepared", progress=False)
    return f"{folder / 'code-prepared'}:0.5,{folder / 'math.txt'}:0.5"


def _bam_config(**kw):
    import bam_model
    base = dict(vocab_size=8192, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=24, tie_embeddings=True,
                num_experts=4, top_k=2, attention="expert-kv", load_balancing_alpha=0.0, z_loss_beta=1e-3)
    return bam_model.BamConfig(**{**base, **kw})


# Weight mixup with learned coefficients: a step of them after every weight step.
MIXUP = dict(mixup=True, mixup_lr=5e-2, mixup_every=1)


def _train_cfg(**kw):
    from bam_model.training import TrainConfig
    base = dict(steps=STEPS, batch_size=8, seq_len=24, lr=3e-3, warmup=1, log_every=1, eval_windows=3, seed=3)
    return TrainConfig(**{**base, **kw})


# --- the worker: runs on each rank under torchrun ------------------------------------------------

def _check_expert_parallel(rank: int) -> None:
    """ExpertParallelMoE == MoE on the concatenated tokens: outputs and every gradient (float64)."""
    import torch.distributed as dist

    from bam_model.expert_parallel import ExpertParallelMoE, gather_experts, parallelize_experts
    from bam_model.layers import MoE

    for E, k, normalize, starve in ((4, 2, False, True), (2, 1, True, False), (6, 3, False, False)):
        torch.manual_seed(10 + E)
        moe = MoE(13, 19, E, top_k=k, normalize=normalize, dtype=torch.float64)
        T = (7, 11)                           # uneven token counts per rank
        x_full = torch.randn(sum(T), 13, dtype=torch.float64)
        if starve:                           # expert E-1 never wins: it receives zero rows
            x_full[:, 0] = 10.0
            with torch.no_grad():
                moe.gate.weight[E - 1] = 0.0
                moe.gate.weight[E - 1, 0] = -100.0
        x_full.requires_grad_()
        g_full = torch.randn(sum(T), 13, dtype=torch.float64)
        ref = MoE(13, 19, E, top_k=k, normalize=normalize, dtype=torch.float64)
        ref.load_state_dict(moe.state_dict())
        y_ref = ref(x_full)
        (y_ref * g_full).sum().backward()

        ep = ExpertParallelMoE(moe)
        assert list(ep.state_dict()) == list(ref.state_dict())
        lo = sum(T[:rank])
        x = x_full.detach()[lo:lo + T[rank]].clone().requires_grad_()
        y = ep(x[None])[0]                    # any leading shape
        (y * g_full[lo:lo + T[rank]]).sum().backward()
        torch.testing.assert_close(y, y_ref[lo:lo + T[rank]])
        torch.testing.assert_close(x.grad, x_full.grad[lo:lo + T[rank]])
        n = E // WORLD
        torch.testing.assert_close(ep.experts.gate_up_proj.grad,
                                   ref.experts.gate_up_proj.grad[rank * n:(rank + 1) * n])
        torch.testing.assert_close(ep.experts.down_proj.grad,
                                   ref.experts.down_proj.grad[rank * n:(rank + 1) * n])
        gate_grad = ep.gate.weight.grad.clone()
        dist.all_reduce(gate_grad)            # each rank has its tokens' share of the router's gradient
        torch.testing.assert_close(gate_grad, ref.gate.weight.grad)
        if starve and rank == WORLD - 1:
            assert ep.experts.gate_up_proj.grad[-1].abs().max() == 0

        holder = torch.nn.Sequential(ep)
        gather_experts(holder)
        assert isinstance(holder[0], MoE)
        for key, value in ref.state_dict().items():
            torch.testing.assert_close(holder[0].state_dict()[key], value, rtol=0, atol=0)
        parallelize_experts(holder)
        assert isinstance(holder[0], ExpertParallelMoE)
    try:
        ExpertParallelMoE(MoE(8, 8, 3))
    except ValueError as e:
        assert "num_experts=3 must be divisible by the world size 2" in str(e), e
    else:
        raise AssertionError("3 experts over 2 ranks were accepted")


def _worker(out: Path) -> None:
    import bam_model
    from bam_model import distributed
    from bam_model.cli import main
    from bam_model.training import RunOptions, train

    results = {}

    def record(name, fn):
        # A failed scenario stops this rank (its collectives would no longer pair up with the
        # other rank's); what it saw is in results-<rank>.json for the tests to show.
        try:
            results[name] = fn()
        except Exception:
            results[name] = {"error": traceback.format_exc()}
            raise
        finally:
            (out / f"results-{distributed.current().rank}.json").write_text(json.dumps(results))

    ctx, _ = distributed.init_from_env()          # from torchrun's environment, as `bam train` does
    rank = ctx.rank
    # The command line under torchrun, FSDP.
    data = (out / "data.txt").read_text()
    args = ["train", str(out / "seed"), "--data", data, "--steps", str(STEPS), "--batch-size", "8",
            "--seq-len", "24", "--lr", "3e-3", "--warmup", "1", "--log-every", "1", "--eval-windows", "3",
            "--seed", "3", "--save-every", "2", "--keep-checkpoints", "2", "--no-progress",
            "--strategy", "fsdp", "--grad-accum", "2"]
    record("fsdp", lambda: {"rc": main(args + ["--out", str(out / "fsdp")]),
                            "records": [json.loads(s)
                                        for s in (out / "fsdp" / "metrics.jsonl").read_text().splitlines()]})

    def ep_module():
        _check_expert_parallel(rank)
        return "ok"

    def run(name, grad_accum=1, settings=None, **kw):
        model = bam_model.from_pretrained(str(out / "seed"))
        cfg = _train_cfg(grad_accum=grad_accum, **(settings or {}))
        return {"records": train(model, RunOptions(data=data, out=out / name, **kw), cfg, progress=False)}

    def fsdp_resume():
        # Resume the FSDP run from its step-2 checkpoint (as if it had died in step 3 or 4).
        run_dir = out / "fsdp-resumed"
        if rank == 0:
            shutil.copytree(out / "fsdp", run_dir)
            shutil.rmtree(run_dir / "checkpoints" / f"step-{STEPS:07d}")
            shutil.rmtree(run_dir / "model")
        distributed.barrier()
        model = bam_model.from_pretrained(str(out / "seed"))
        cfg = _train_cfg(save_every=2, keep_checkpoints=2, grad_accum=2)
        options = RunOptions(data=data, out=run_dir, resume=True, strategy="fsdp")
        return {"records": train(model, options, cfg, progress=False)}

    # `bam eval` under torchrun: 5 windows per file in batches of 2 are 3 batches, 2 + 1 per rank.
    record("eval", lambda: {"rc": main(["eval", str(out / "seed"), "--data", data, "--seq-len", "24",
                                        "--batch-size", "2", "--max-windows", "5", "--json",
                                        str(out / "eval.json")])})
    record("ep_module", ep_module)
    record("ddp", lambda: run("ddp", grad_accum=2))
    record("ddp_ep", lambda: run("ddp-ep", expert_parallel=True))
    record("ddp_mixup", lambda: run("ddp-mixup", grad_accum=2, settings=MIXUP))
    record("fsdp_resume", fsdp_resume)
    distributed.shutdown()


# --- the tests -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    """Single-process reference runs (plain, and weight mixup), and the 2-rank runs of ``_worker``."""
    import bam_model
    from bam_model.training import RunOptions, train

    out = tmp_path_factory.mktemp("dist")
    torch.manual_seed(0)
    bam_model.BamLM(_bam_config()).save_pretrained(str(out / "seed"))
    data = _small_data(out / "data")
    (out / "data.txt").write_text(data)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           __file__, str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        reference = train(bam_model.from_pretrained(str(out / "seed")),
                          RunOptions(data=data, out=out / "single"), _train_cfg(), progress=False)
        mixup_reference = train(bam_model.from_pretrained(str(out / "seed")),
                                RunOptions(data=data, out=out / "single-mixup"),
                                _train_cfg(grad_accum=2, **MIXUP), progress=False)
        log, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:                  # torchrun and its workers, all of them
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    results = [json.loads(p.read_text()) if p.is_file() else {}
               for p in (out / f"results-{r}.json" for r in range(WORLD))]
    return out, reference, results, log, data, mixup_reference


def _scenario(multi, name):
    """Rank 0's result of a scenario, after checking that it ran without error on every rank."""
    results, log = multi[2], multi[3]
    for rank, res in enumerate(results):
        assert name in res, (f"scenario {name!r} did not run on rank {rank}; the workers' output:\n"
                             f"{log[-6000:]}")
        assert "error" not in res[name], f"rank {rank}: {res[name]['error']}"
    return results[0][name]


def _losses(records):
    return [r["loss"] for r in records]


def _final_weights(folder):
    return load_file(str(folder / "model" / "model.safetensors"))


@pytest.mark.parametrize("name", ["ddp", "ddp_ep", "fsdp"])
def test_two_ranks_match_one_process(multi, name):
    """ddp and fsdp run 2 micro-batches per rank (gradient sync on the last only), ddp_ep one."""
    out, reference, *_ = multi
    res = _scenario(multi, name)
    assert [r["step"] for r in res["records"]] == list(range(1, STEPS + 1))
    # Same global batch, same data order: the ranks' mean loss is the single process's loss.
    assert _losses(res["records"]) == pytest.approx(_losses(reference), rel=2e-5)
    # The global gradient norm too (expert gradients summed over ranks, then averaged; float32
    # norms of sharded and whole tensors differ by ~1e-4).
    assert [r["grad_norm"] for r in res["records"]] == pytest.approx([r["grad_norm"] for r in reference],
                                                                     rel=3e-4)
    # Evaluation is shared out: 3 windows per domain in batches of 2 (ddp, fsdp: one batch per
    # rank) or of 4 (ddp_ep: rank 1 runs a padding pass for the experts' all-to-all).
    ours, theirs = res["records"][-1]["eval"], reference[-1]["eval"]
    assert ours["avg"]["loss"] == pytest.approx(theirs["avg"]["loss"], rel=1e-4)
    assert len(theirs) == 3  # two files and the average
    for domain in (name for name in theirs if name != "avg"):
        assert (ours[domain]["tokens"], ours[domain]["bytes"]) == (theirs[domain]["tokens"],
                                                                   theirs[domain]["bytes"])
        assert ours[domain]["tokens"] == 3 * 23
    single = _final_weights(out / "single")
    folder = {"ddp": "ddp", "ddp_ep": "ddp-ep", "fsdp": "fsdp"}[name]
    theirs = _final_weights(out / folder)     # written whole by rank 0 (experts and shards gathered)
    assert set(theirs) == set(single)
    for key, value in single.items():
        torch.testing.assert_close(theirs[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_two_ranks_match_one_process_with_weight_mixup(multi):
    """DDP with learned mixing coefficients (2 micro-batches per rank): the weights' gradients are
    reduced by DDP, the coefficients' by the trainer; both must be the single process's."""
    out, reference = multi[0], multi[5]
    res = _scenario(multi, "ddp_mixup")
    assert [r["step"] for r in res["records"]] == list(range(1, STEPS + 1))
    for key in ("loss", "mixup_loss", "alpha"):
        assert [r[key] for r in res["records"]] == pytest.approx([r[key] for r in reference], rel=2e-5), key
    assert len({r["alpha"] for r in reference}) == STEPS                     # the coefficients moved
    # Rank 1 logged the same (its coefficients, averaged the same way, stayed rank 0's).
    def clockless(records):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]
    assert clockless(multi[2][1]["ddp_mixup"]["records"]) == clockless(res["records"])
    single, theirs = _final_weights(out / "single-mixup"), _final_weights(out / "ddp-mixup")
    assert set(theirs) == set(single)
    for key, value in single.items():
        torch.testing.assert_close(theirs[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_eval_under_torchrun_shares_the_windows_and_matches_one_process(multi):
    import bam_model
    from bam_model.evaluate import evaluate

    out, data = multi[0], multi[4]
    assert _scenario(multi, "eval")["rc"] == 0
    theirs = json.loads((out / "eval.json").read_text())["results"]
    ours = evaluate(bam_model.from_pretrained(str(out / "seed")), data, seq_len=24, batch_size=2,
                    max_windows=5)
    assert set(theirs) == set(ours) and len(ours) == 3
    for name, res in ours.items():
        for key, value in res.items():
            assert theirs[name][key] == pytest.approx(value, rel=1e-6), (name, key)
        if name != "avg":
            assert theirs[name]["tokens"] == 5 * 23


def test_expert_parallel_equals_single_process_outputs_and_gradients(multi):
    assert _scenario(multi, "ep_module") == "ok"


def test_fsdp_sharded_checkpoint_resumes_and_loads_into_one_process(multi):
    import bam_model
    from bam_model.data import BatchStream
    from bam_model.training import load_checkpoint, make_optimizer

    out, data = multi[0], multi[4]
    fsdp, resumed = _scenario(multi, "fsdp"), _scenario(multi, "fsdp_resume")
    assert fsdp["rc"] == 0
    assert _losses(resumed["records"]) == _losses(fsdp["records"])          # bitwise
    ckpt = out / "fsdp" / "checkpoints" / f"step-{STEPS:07d}"
    assert sorted(p.name for p in (ckpt / "sharded").iterdir()) == [
        f"shard-0000{r + 1}-model-00001-of-00001.safetensors" for r in range(WORLD)]
    assert not list(ckpt.rglob("*.metadata")) and not list(ckpt.rglob("*.distcp"))   # no pickle anywhere

    model = bam_model.BamLM(_bam_config())
    cfg = _train_cfg()
    opt = make_optimizer(model, cfg)
    stream = BatchStream(data, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed)
    assert load_checkpoint(ckpt, model, opt, stream) == STEPS
    assert stream.position == STEPS * cfg.batch_size
    final = _final_weights(out / "fsdp")
    for key, value in final.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert all(float(s["step"]) == STEPS for s in opt.state.values())


def test_distributed_options_without_a_process_group_are_refused():
    from bam_model import distributed
    from bam_model.expert_parallel import ExpertParallelMoE
    from bam_model.layers import MoE

    model = torch.nn.Linear(4, 4)
    assert distributed.prepare(model) is model
    with pytest.raises(ValueError, match="strategy must be one of"):
        distributed.prepare(model, "zero3")
    with pytest.raises(ValueError, match="strategy=fsdp needs a torch.distributed process group"):
        distributed.prepare(model, "fsdp")
    with pytest.raises(ValueError, match="expert_parallel needs a torch.distributed process group"):
        distributed.prepare(model, expert_parallel=True)
    with pytest.raises(ValueError, match="expert parallelism needs an initialised torch.distributed"):
        ExpertParallelMoE(MoE(8, 8, 2))


# --- kill -9 and damaged checkpoints -------------------------------------------------------------

def _dense_seed(path):
    import bam_model
    torch.manual_seed(0)
    cfg = bam_model.DenseConfig(vocab_size=8192, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=48,
                                tie_embeddings=True)
    bam_model.DenseLM(cfg).save_pretrained(str(path))


def _train_cmd(seed, data, out, steps=24):
    return [sys.executable, "-m", "bam_model.cli", "train", str(seed), "--data", data, "--steps", str(steps),
            "--batch-size", "4", "--seq-len", "32", "--lr", "3e-3", "--log-every", "1", "--eval-windows", "3",
            "--save-every", "1", "--keep-checkpoints", "2", "--no-progress", "--resume", "--out", str(out)]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _kill_when(cmd, ready, timeout=60.0) -> bool:
    """Start ``cmd``, SIGKILL it as soon as ``ready()`` holds; False if it finished first."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err.decode()[-4000:]
    return False


def test_sigkill_at_any_moment_then_resume_matches_uninterrupted_run(tmp_path):
    _dense_seed(tmp_path / "seed")
    data = _small_data(tmp_path / "data")

    def cmd(out):
        return _train_cmd(tmp_path / "seed", data, out)
    ref = subprocess.run(cmd(tmp_path / "ref"), env=_env(), capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-4000:]

    run = tmp_path / "run"
    ckpts = run / "checkpoints"

    def writing_checkpoint():
        return ckpts.is_dir() and any(p.name.endswith(".tmp") for p in os.scandir(ckpts))

    # 1. In the middle of a checkpoint write (the half-written folder is left behind, proof of
    # it); the next start, resuming, clears it and uses the checkpoint before.
    for _ in range(3):
        assert _kill_when(cmd(run), writing_checkpoint)
        if writing_checkpoint():
            break
    else:
        pytest.fail("three kills at a checkpoint write all came too late to leave a half-written folder")
    # 2.-3. At random moments once training is under way: after this start has logged a step
    # (metrics.jsonl already holds the earlier starts' lines, so its growth is what counts).
    rng = random.Random(1)
    metrics_file = run / "metrics.jsonl"
    for _ in range(2):
        started, logged = [], metrics_file.stat().st_size if metrics_file.is_file() else 0

        def training_for_a_while(started=started, logged=logged):
            if not started and metrics_file.is_file() and metrics_file.stat().st_size > logged:
                started.append(time.monotonic() + rng.uniform(0.0, 0.3))
            return bool(started) and time.monotonic() >= started[0]
        _kill_when(cmd(run), training_for_a_while)
    done = subprocess.run(cmd(run), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]

    def metrics(folder):
        return [json.loads(s) for s in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics(run)] == list(range(1, 25))
    assert _losses(metrics(run)) == _losses(metrics(tmp_path / "ref"))      # bitwise
    ref_w, run_w = _final_weights(tmp_path / "ref"), _final_weights(run)
    assert all(torch.equal(run_w[k], v) for k, v in ref_w.items())
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000023", "step-0000024"]


def test_damaged_checkpoints_are_refused_and_the_previous_one_is_used(tmp_path):
    import bam_model
    from bam_model.data import BatchStream
    from bam_model.training import RunOptions, load_checkpoint, make_optimizer, train, verify_checkpoint

    def model():
        torch.manual_seed(0)
        return bam_model.DenseLM(bam_model.DenseConfig(vocab_size=8192, dim=16, n_layers=1, n_heads=2,
                                                       n_kv_heads=1, ffn_dim=24))
    cfg = _train_cfg(steps=6, save_every=2, keep_checkpoints=3, batch_size=4)
    data = _small_data(tmp_path / "data")
    full = train(model(), RunOptions(data=data, out=tmp_path / "full"), cfg, progress=False)
    run = tmp_path / "run"
    shutil.copytree(tmp_path / "full", run)
    ck = {s: run / "checkpoints" / f"step-{s:07d}" for s in (2, 4, 6)}

    weights = ck[6] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])           # truncated
    with pytest.raises(ValueError,
                       match=r"model.safetensors is truncated or overwritten \(\d+ bytes, \d+ were"):
        verify_checkpoint(ck[6])
    m = model()
    with pytest.raises(ValueError, match="truncated"):
        load_checkpoint(ck[6], m, make_optimizer(m, cfg), BatchStream(data, seq_len=24, batch_size=4, seed=3))
    trainer = ck[4] / "trainer.safetensors"
    blob = bytearray(trainer.read_bytes())
    blob[-100] ^= 0x01                                                                  # one flipped bit
    trainer.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="trainer.safetensors is corrupt"):
        verify_checkpoint(ck[4])

    with pytest.warns(UserWarning) as caught:
        resumed = train(model(), RunOptions(data=data, out=run, resume=True), cfg, progress=False)
    messages = [str(w.message) for w in caught]
    assert any("step-0000006" in s and "truncated" in s for s in messages), messages
    assert any("step-0000004" in s and "corrupt" in s for s in messages), messages
    assert _losses(resumed) == _losses(full)                                            # resumed from step 2
    ref_w, run_w = _final_weights(tmp_path / "full"), _final_weights(run)
    assert all(torch.equal(run_w[k], v) for k, v in ref_w.items())
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["refused-step-0000004", "refused-step-0000006", "step-0000002", "step-0000004",
                     "step-0000006"]

    (run / "checkpoints" / "step-0000006" / "trainer.json").write_text("{not json")
    for s in (2, 4):
        (run / "checkpoints" / f"step-{s:07d}" / "trainer.json").write_text('{"step": 1}')
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no intact checkpoint to resume from: .*"
                                                  "trainer.json is corrupt"):
        train(model(), RunOptions(data=data, out=run, resume=True), cfg, progress=False)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
