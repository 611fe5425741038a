"""The guarantees of docs/reliability.md, broken by a fault review and held since: every output path
under the ownership rules, every writer of a folder under its lock, resumes that check what they
continue, bounded values, and one line (never a traceback) for a full disk, a bad record or an odd
value. Each case failed before its fix; the concurrency and disk cases use real processes and a
real full file system."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bam_model
from bam_model import DenseConfig, DenseLM, files
from bam_model.cli import main

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
TRAIN = ["--batch-size", "2", "--seq-len", "16", "--eval-windows", "1", "--no-progress"]
CFG = DenseConfig(vocab_size=8192, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=24, max_seq_len=64,
                  tie_embeddings=True, eos_token_id=0)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(folder.rglob("*"))}


def one_line(capsys) -> str:
    """The error a command printed: one line (the steps a run said before it aside)."""
    err = "".join(line for line in capsys.readouterr().err.splitlines(keepends=True)
                  if not line.startswith(("train: step ", "data: preparing ")))
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


@pytest.fixture
def seed(tmp_path):
    torch.manual_seed(0)
    DenseLM(CFG).save_pretrained(str(tmp_path / "seed"))
    return tmp_path / "seed"


def _locker(*folders: Path) -> subprocess.Popen:
    """Another process holding the locks of ``folders`` as ``bam mix`` would, until killed."""
    code = ("import sys, time; from bam_model.files import lock_folder\n"
            "for f in sys.argv[1:]: lock_folder(f, 'bam mix')\n"
            "print('locked', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, *map(str, folders)], stdout=subprocess.PIPE,
                            text=True, env=ENV)
    assert proc.stdout.readline().strip() == "locked"
    return proc


# --- data loss -------------------------------------------------------------------------------------

def test_eval_json_never_replaces_a_file_bam_did_not_write(tmp_path, seed, capsys):
    config = (seed / "config.json").read_bytes()
    mine = tmp_path / "notes.json"
    mine.write_text('{"my": "notes"}')
    argv = ["eval", str(seed), "--data", "code", "--seq-len", "16", "--max-windows", "1", "--no-progress"]
    assert main([*argv, "--json", str(seed / "config.json")]) == 2
    assert "is inside the input MODEL" in one_line(capsys)
    assert main([*argv, "--json", str(mine)]) == 2
    assert "exists and is not a results file written by bam" in one_line(capsys)
    assert (seed / "config.json").read_bytes() == config and mine.read_text() == '{"my": "notes"}'
    out = tmp_path / "res" / "eval.json"
    out.parent.mkdir()
    out.write_text(json.dumps({"code": {"loss": 1.0, "ppl": 2.7, "bpb": 1.0, "tokens": 5},
                               "avg": {"loss": 1.0, "ppl": 2.7, "bpb": 1.0}}))   # an earlier bam eval's
    for _ in range(2):                                        # ours, then our own again: replaced
        assert main([*argv, "--json", str(out)]) == 0
        written = json.loads(out.read_text())
        assert written["format"] == "bam-eval" and set(written["results"]) == {"code", "avg"}


@pytest.mark.parametrize("entry", ["file", "folder"])
def test_a_name_bam_writes_is_checked_before_any_work(tmp_path, seed, capsys, entry):
    """A user's mix.yaml (a file our manifest does not list) or a folder where a file goes, in a
    model folder of ours: refused before the mixture is built; the folder stays complete and loads."""
    out = tmp_path / "mixed"
    bam_model.upcycle(seed, [seed]).save_pretrained(str(out))     # ours, without a mix.yaml
    if entry == "file":
        (out / "mix.yaml").write_text("# my own recipe\n")
    else:
        (out / "mix.yaml").mkdir()
    before = snapshot(out)
    assert main(["mix", "--base-model", str(seed), "--experts", str(seed), "--out", str(out)]) == 2
    assert ("which bam did not write" if entry == "file" else "holds a folder 'mix.yaml'") in one_line(capsys)
    with pytest.raises(ValueError, match="which bam did not write|holds a folder"):
        bam_model.upcycle(seed, [seed]).save_pretrained(str(out), extra_files={"mix.yaml": "x"})
    assert snapshot(out) == before
    assert bam_model.from_pretrained(str(out)).config.num_experts == 2     # complete: not marked otherwise


def test_a_planted_lock_link_or_foreign_lock_file_is_never_written_through(tmp_path, seed, capsys):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    bare, ours, hard = tmp_path / "bare", tmp_path / "ours", tmp_path / "hard"
    bare.mkdir()
    (bare / files.LOCK).symlink_to(target)
    DenseLM(CFG).save_pretrained(str(ours))
    (ours / files.LOCK).symlink_to(target)
    hard.mkdir()
    os.link(target, hard / files.LOCK)
    for out, message in [(bare, "was not written by bam"), (ours, "is a symbolic link"),
                         (hard, "was not written by bam")]:
        assert main(["mix", "--base-model", str(seed), "--experts", str(seed), "--out", str(out)]) == 2
        assert message in one_line(capsys), out
    with pytest.raises(ValueError, match="is not bam's lock file"):
        files.lock_folder(hard)
    assert target.read_text() == "keep me"


def test_a_second_writer_of_a_model_folder_fails_at_once_naming_the_first(tmp_path, seed, capsys):
    outs = [tmp_path / name for name in ("mixed", "exported", "x")]
    for out in outs:
        out.mkdir()
    holder = _locker(*outs)
    try:
        commands = (["mix", "--base-model", str(seed), "--experts", str(seed), "--out", str(outs[0])],
                    ["export", str(seed), "--out", str(outs[1])],
                    ["branch", str(seed), "--domains", "x", "--out", str(tmp_path)])
        for out, argv in zip(outs, commands):
            assert main(argv) == 2
            assert f"is in use by another process (bam mix, pid {holder.pid} on" in one_line(capsys)
            assert sorted(os.listdir(out)) == [files.LOCK]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_two_mix_processes_on_one_folder_leave_one_whole_mixture(tmp_path, seed):
    """Two real ``bam mix`` processes on one --out, the second started while the first is at work
    (its mixing held by a wrapper until the second has ended), on a new folder and then on ours: the
    second ends at once with one line naming the first; the first writes one whole mixture."""
    slow = ("import importlib, sys\nfrom bam_model.cli import main\n"
            "u = importlib.import_module('bam_model.cli.mix')\n"
            "real = u.upcycle\n"
            "def upcycle(*a, **k):\n    print('mixing', flush=True)\n    sys.stdin.readline()\n"
            "    return real(*a, **k)\n"
            "u.upcycle = upcycle\nsys.exit(main(sys.argv[1:]))\n")
    out = tmp_path / "mixed"
    argv = ["mix", "--base-model", str(seed), "--experts", str(seed), "--out", str(out)]
    for _ in range(2):
        first = subprocess.Popen([sys.executable, "-c", slow, *argv], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        assert first.stdout.readline().strip() == "mixing"           # it holds the folder's lock
        second = subprocess.run([sys.executable, "-m", "bam_model.cli", *argv, "--router-seed", "1"],
                                capture_output=True, text=True, env=ENV, timeout=300)
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
        assert f"is in use by another process (bam mix, pid {first.pid} on" in second.stderr, second.stderr
        first.stdin.write("go on\n")     # the first mixes only once the second has been refused
        first.stdin.close()
        assert first.wait(timeout=300) == 0, first.stderr.read()
        assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
        files.check_complete(out)
        assert bam_model.from_pretrained(str(out)).config.num_experts == 2


def test_a_lock_released_while_it_is_taken_and_a_long_command_line(tmp_path, monkeypatch):
    """The holder removes its lock file between another's open and flock: the other opens anew and
    gets the lock. A holder line is whole (valid JSON) whatever the command line's length, so a
    lock file left by a kill -9 is still one of ours."""
    first = files.lock_folder(tmp_path, "first")
    files._held.clear()                                 # the first stands for another process
    real_open = files.FolderLock._open

    def racing_open(path):
        fd = real_open(path)
        monkeypatch.setattr(files.FolderLock, "_open", staticmethod(real_open))
        first.remove_file()
        os.close(first.fd)
        first.fd = None
        return fd
    monkeypatch.setattr(files.FolderLock, "_open", staticmethod(racing_open))
    second = files.lock_folder(tmp_path, "second")
    assert json.loads((tmp_path / files.LOCK).read_text())["command"] == "second"
    second.release()
    monkeypatch.setattr(sys, "argv", ["bam", "x" * 5000, *["y" * 300] * 40])
    lock = files.lock_folder(tmp_path, "bam mix")
    files._held.clear()                                 # as a kill -9 leaves it: the file stays
    os.close(lock.fd)
    text = (tmp_path / files.LOCK).read_text()
    assert len(text.encode()) <= files.LOCK_MAX_BYTES and json.loads(text)["command"] == "bam mix"
    assert files.check_output(tmp_path, "model") == "new"
    files.lock_folder(tmp_path).release()


def test_two_demos_into_one_folder_the_second_fails_at_once(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    holder = _locker(out)
    try:
        assert main(["demo", "--quick", "--out", str(out)]) == 2
        assert "is in use by another process" in one_line(capsys)
        assert sorted(os.listdir(out)) == [files.LOCK]
    finally:
        holder.kill()
        holder.wait()


def test_bam_bench_never_replaces_a_users_file(tmp_path, capsys):
    from bam_bench.runner import machine_tag
    from bam_bench.runner import main as bench_main

    (tmp_path / f"{machine_tag('cpu')}-moe.md").write_text("my notes")
    with pytest.raises(SystemExit):
        bench_main(["moe", "--device", "cpu", "--quick", "--out", str(tmp_path)])
    assert "bam-bench did not write it" in capsys.readouterr().err
    (tmp_path / "mine.json").write_text("[1, 2]")
    with pytest.raises(SystemExit):
        bench_main(["moe", "--device", "cpu", "--quick", "--json", str(tmp_path / "mine.json")])
    assert "is not a bam-bench results file" in capsys.readouterr().err
    assert (tmp_path / "mine.json").read_text() == "[1, 2]"


def test_a_killed_first_write_leaves_nothing_beside_and_the_next_write_clears_it(tmp_path):
    """``kill -9`` in the middle of writing a new model folder (a real SIGKILL, inside the write)."""
    code = ("import os, signal, sys\nfrom bam_model.files import write_model_folder\n"
            "def write(stage):\n    (stage / 'model.safetensors').write_bytes(b'x' * 100000)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "write_model_folder(sys.argv[1], write)\n")
    parent = tmp_path / "p"
    parent.mkdir()
    proc = subprocess.run([sys.executable, "-c", code, str(parent / "m")], env=ENV)
    assert proc.returncode == -signal.SIGKILL
    assert os.listdir(parent) == ["m"]                                  # no hidden temporary beside it
    assert files.check_output(parent / "m", "model") == "new"           # what is inside counts as empty
    DenseLM(CFG).save_pretrained(str(parent / "m"))
    assert not [p for p in (parent / "m").iterdir() if p.name.startswith(".")]
    assert bam_model.from_pretrained(str(parent / "m")).config == CFG


# --- silent wrong results --------------------------------------------------------------------------

def test_resume_refuses_changed_data_another_model_and_twice_no_checkpoint(tmp_path, seed, capsys):
    text = tmp_path / "text.txt"
    text.write_text("the first words of a corpus, " * 400)
    other = tmp_path / "other"
    DenseLM(CFG).save_pretrained(str(other))                 # same shapes, other weights
    out = tmp_path / "run"
    base = ["train", str(seed), "--data", str(text), "--out", str(out), "--steps", "2", *TRAIN]
    assert main(base) == 0
    capsys.readouterr()
    before = snapshot(out)
    assert main(["train", str(other), *base[2:], "--resume"]) == 2
    assert "MODEL is not the model the run in" in one_line(capsys)
    text.write_text("the first words of a corpus, " * 399 + "edited")
    assert main([*base, "--resume"]) == 2
    assert f"the data of {str(text)!r} changed since the run" in one_line(capsys)
    assert snapshot(out) == before
    # A checkpoint of an older bam (no record of the start) resumes, with a warning.
    from bam_model.training.checkpointing import _trainer_digest
    text.write_text("the first words of a corpus, " * 400)
    trainer = out / "checkpoints" / "step-0000002" / "trainer.json"
    state = {k: v for k, v in json.loads(trainer.read_text()).items() if k not in ("start", "digest")}
    trainer.write_text(json.dumps({**state, "digest": _trainer_digest(state)}))
    with pytest.warns(UserWarning, match="does not record what its run started from"):
        assert main([*base, "--resume"]) == 0
    # No intact checkpoint: the first --resume says so; so does the second (not a silent step 0).
    ckpt = out / "checkpoints" / "step-0000002" / "model.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    with pytest.warns(UserWarning, match="truncated or overwritten"):
        assert main([*base, "--resume"]) == 2
    assert "no intact checkpoint to resume from" in one_line(capsys)
    assert main([*base, "--resume"]) == 2
    assert "has no intact checkpoint (refused: refused-step-0000002)" in one_line(capsys)


def test_float16_outside_its_range_is_refused_before_anything_is_written(tmp_path, capsys):
    big = DenseLM(CFG)
    with torch.no_grad():
        big.model.embed_tokens.weight[3, 5] = 1e5
    big.save_pretrained(str(tmp_path / "big"))
    src = str(tmp_path / "big")
    for argv in (["branch", src, "--domains", "a", "--out", str(tmp_path / "br")],
                 ["export", src, "--out", str(tmp_path / "ex")],
                 ["mix", "--base-model", src, "--experts", src, "--out", str(tmp_path / "mx")]):
        assert main([*argv, "--dtype", "float16"]) == 2
        assert "'model.embed_tokens.weight' holds 100000, beyond the largest float16" in one_line(capsys)
    assert sorted(os.listdir(tmp_path)) == ["big"]
    run = ["train", src, "--data", "code", "--out", str(tmp_path / "run"), "--steps", "1", *TRAIN]
    assert main([*run, "--dtype", "float16"]) == 2
    assert "--resume and another --dtype" in one_line(capsys)
    assert main([*run, "--dtype", "bfloat16", "--resume"]) == 0      # the model written from the checkpoint
    assert bam_model.from_pretrained(str(tmp_path / "run" / "model")).dtype == torch.bfloat16


# --- hangs and unbounded work ----------------------------------------------------------------------

def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path, seed, capsys):
    keys = ["kv_init", "merge", "ffn_routing", "attention", "method", "dtype", "fisher_data", "experts"]
    lines = [f'{keys[0]}: &k0 [{", ".join(["x"] * 9)}]']
    lines += [f"{k}: &k{i} [{', '.join([f'*k{i - 1}'] * 9)}]" for i, k in enumerate(keys[1:], 1)]
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + f"\nbase_model: {seed}\n")
    assert (tmp_path / "bomb.yaml").stat().st_size < 1000        # 9**9 strings once expanded
    started = time.perf_counter()
    assert main(["mix", "--config", str(tmp_path / "bomb.yaml"), "--out", str(tmp_path / "m")]) == 2
    assert time.perf_counter() - started < 5
    assert "mix recipe key 'kv_init' must be" in one_line(capsys)


def test_sizes_beyond_the_machine_are_refused_before_work(tmp_path, seed, capsys, monkeypatch):
    assert main(["train", str(seed), "--data", "code", "--out", str(tmp_path / "r"), "--steps", "1",
                 "--batch-size", "100000000", "--seq-len", "16", "--no-progress"]) == 2
    assert "lower --batch-size or raise --grad-accum" in one_line(capsys)
    (tmp_path / "r.yaml").write_text(f"base_model: {seed}\nmethod: sparse\nnum_experts: 100000\n")
    assert main(["mix", "--config", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "m")]) == 2
    assert "num_experts must be an int in [1, 1024], got 100000" in one_line(capsys)
    assert sorted(os.listdir(tmp_path)) == ["r.yaml", "seed"]
    from bam_model.training import TrainConfig, loop
    moe = bam_model.upcycle(seed, [seed, seed], method="sparse")
    weights = sum(p.numel() * p.element_size() for p in moe.parameters())
    experts = sum(p.numel() * p.element_size() for n, p in moe.named_parameters() if ".experts." in n)
    cfg = TrainConfig(steps=1, batch_size=2, seq_len=16)
    batch = 8 * 1 * 16 * 8192 + 16 * 1 * 16              # a micro-batch's logits and the rank's token ids
    monkeypatch.setattr(files, "physical_memory", lambda: 4 * weights - experts + batch)
    with pytest.raises(ValueError, match="shard them with --strategy fsdp"):
        loop._check_memory(moe, cfg, "ddp", False, 2)
    loop._check_memory(moe, cfg, "ddp", True, 2)              # each rank holds half the experts
    loop._check_memory(moe, cfg, "fsdp", False, 2)
    import importlib
    monkeypatch.setattr(importlib.import_module("bam_model.upcycle"), "physical_memory", lambda: weights // 2)
    with pytest.raises(ValueError, match=r"the mixture has .* \(16 experts\), .* more than this machine's"):
        bam_model.upcycle(seed, [seed], method="sparse", num_experts=16)
    with pytest.raises(ValueError, match="more than the .* free on the disk"):
        files.check_free_space(tmp_path, shutil.disk_usage(tmp_path).free + 2**30, "the weights")


# --- one line, not a traceback ---------------------------------------------------------------------

def _namespaces_work() -> bool:
    try:
        return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


needs_namespaces = pytest.mark.skipif(not _namespaces_work(), reason="needs unshare with user and mount "
                                      "namespaces, to mount a small tmpfs (a real full disk) without root")


def _on_full_disk(disk: Path, size_kb: int, *argv) -> tuple[subprocess.CompletedProcess, list[str]]:
    """``bam ARGV`` in its own mount namespace, where ``disk`` is a tmpfs of ``size_kb`` KiB; and
    what the tmpfs holds afterwards (seen from inside: the mount goes with the namespace)."""
    disk.mkdir()
    command = (f"mount -t tmpfs -o size={size_kb}k tmpfs {disk} && {sys.executable} -m bam_model.cli "
               + " ".join(map(str, argv)) + f"; rc=$?; echo LEFT; ls -A {disk}; exit $rc")
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", command],
                       capture_output=True, text=True, env=ENV, timeout=300)
    return r, r.stdout.split("LEFT\n")[-1].split()


@pytest.mark.slow
@needs_namespaces
def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, seed):
    """The weights (about 540 KiB) pass the free-space check of a 600 KiB tmpfs, then the disk fills
    under safetensors (the tokenizer and code are written first); a 64 KiB one is refused before
    anything is written. A failed model write leaves nothing; a failed checkpoint, the run folder."""
    cases = [(600, "No space left on device", ["branch", seed, "--domains", "a", "b", "--out", "{d}/br"], []),
             (64, "free on the disk of", ["export", seed, "--out", "{d}/ex"], []),
             (900, "No space left on device", ["train", seed, "--data", "code", "--out", "{d}/run", "--steps",
                                               "1", *TRAIN], ["run"])]
    for i, (size, message, argv, left) in enumerate(cases):
        disk = tmp_path / f"disk{i}"
        r, found = _on_full_disk(disk, size, *[str(a).format(d=disk) for a in argv])
        assert r.returncode == 2 and "Traceback" not in r.stderr and message in r.stderr, (argv, r.stderr)
        assert r.stderr.strip().splitlines()[-1].startswith(f"bam {argv[0]}: error: "), r.stderr
        assert found == left, (argv, found)


@pytest.mark.slow
@needs_namespaces
def test_unreadable_inputs_for_a_user_without_rights_are_one_line(seed):
    """As ``nobody`` (a user namespace without a mapping): a recipe and a data file it may not read
    (and the model's weights, which the recipe and the run read after them)."""
    home = Path(f"/tmp/bam-unreadable-{os.getpid()}")      # pytest's tmp folders are 0700: not for nobody
    try:
        shutil.copytree(seed, home / "seed")
        (home / "text").mkdir()
        (home / "text" / "a.txt").write_text("words " * 500)
        (home / "r.yaml").write_text(f"base_model: {home / 'seed'}\nexperts: [{home / 'seed'}]\n")
        for p in (home / "seed" / "model.safetensors", home / "text" / "a.txt", home / "r.yaml"):
            p.chmod(0)
        for p in (home, home / "seed", home / "text"):
            p.chmod(0o755)
        cases = [["mix", "--config", home / "r.yaml", "--out", home / "m"],
                 ["train", home / "seed", "--data", home / "text", "--out", home / "run", "--steps", "1",
                  *TRAIN]]
        for argv in cases:
            r = subprocess.run(["unshare", "--user", sys.executable, "-m", "bam_model.cli", *map(str, argv)],
                               capture_output=True, text=True, env=ENV, timeout=300)
            assert r.returncode == 2 and "Permission denied" in r.stderr, r.stderr
            assert "Traceback" not in r.stderr, r.stderr
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_metrics_lines_that_are_not_records_are_dropped_on_resume(tmp_path, seed):
    out = tmp_path / "run"
    base = ["train", str(seed), "--data", "code", "--out", str(out), "--steps", "2", "--log-every", "1",
            *TRAIN]
    assert main(base) == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('[1, 2]\n5\nnull\n{"step": "x"}\n')
    with pytest.warns(UserWarning, match="is not a metrics record"):
        assert main([*base, "--resume"]) == 0
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_generate_edge_values_and_weights_it_cannot_compute_in(tmp_path, seed, capsys):
    for extra in (["--temperature", "1", "--top-p", "1e-300"], ["--temperature", "1e-300"]):
        assert main(["generate", str(seed), "--prompt", "hi", "--max-new-tokens", "2", "--seed", "1",
                     *extra]) == 0
        assert capsys.readouterr().out.startswith("hi")
    # Bytes that are not UTF-8 reach argv as lone surrogates: a real process, given such bytes.
    r = subprocess.run([sys.executable.encode(), b"-m", b"bam_model.cli", b"generate", str(seed).encode(),
                        b"--prompt", b"caf\xe9"], capture_output=True, env=ENV, timeout=300)
    assert r.returncode == 2 and b"--prompt is not UTF-8 text" in r.stderr and b"Traceback" not in r.stderr
    from safetensors.torch import load_file, save_file
    shutil.copytree(seed, tmp_path / "f8")
    tensors = load_file(str(seed / "model.safetensors"))
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in tensors.items()},
              str(tmp_path / "f8" / "model.safetensors"))
    assert main(["generate", str(tmp_path / "f8"), "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    assert "is float8_e4m3fn, which bam's models do not compute in" in one_line(capsys)
    assert main(["generate", str(tmp_path / "f8"), "--prompt", "hi", "--max-new-tokens", "2", "--dtype",
                 "float32"]) == 0


def test_checks_before_work_leave_no_folder(tmp_path, seed, capsys):
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "a.txt").write_text("words " * 500)
    (odd / "b.txt").write_text("more words " * 500)
    os.rename(odd / "b.txt", os.fsencode(odd) + b"/\xff.txt")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    run = ["train", str(seed), "--out", str(tmp_path / "r"), "--steps", "1", *TRAIN]
    mix = ["mix", "--base-model", str(seed), "--experts", str(seed)]
    cases = [([*run, "--data", "code", "--seq-len", "128"], "--seq-len 128 is longer than MODEL's context"),
             ([*run, "--data", "code", "--seed", str(2**64)], "seed must be an int in [0, "),
             ([*run, "--data", str(odd)], "\\udcff.txt' has a file name that is not UTF-8"),
             ([*mix, "--router-seed", str(10**23), "--out", str(tmp_path / "m")], "router_seed must be"),
             ([*mix, "--out", str(tmp_path / "dangling")], "is a symbolic link to")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in one_line(capsys), argv
    assert sorted(os.listdir(tmp_path)) == ["dangling", "odd", "seed"]
    assert main([*run, "--data", "code"]) == 0                 # the corrected command runs


def test_data_weights_that_sum_past_the_float_range_keep_their_shares():
    from bam_model.data import parse_data_spec

    assert [w for _, w in parse_data_spec("code:1.7e308,math:1.7e308")] == [0.5, 0.5]
    assert [w for _, w in parse_data_spec("code:1.5e308,math:0.5e308")] == pytest.approx([0.75, 0.25])


def test_kernel_arguments_named_in_their_messages():
    import bam_kernels as bk
    from bam_kernels.routing import routing_plan

    with pytest.raises(ValueError, match=r"num_experts must be an int >= 1, got -1"):
        routing_plan(torch.zeros(3, 1, dtype=torch.long), -1)
    q, k, mix = torch.randn(1, 3, 2, 1, 8), torch.randn(1, 3, 1, 8), torch.rand(1, 3, 2)
    for scale in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale must be a finite float"):
            bk.moa_attention(q, k, k, mix, scale=scale)
