"""Never lose a user's files: which folders are ours, run locks, resume checks, atomic writes, modes.

Every case that writes checks the user's files byte for byte afterwards."""
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bam_model
from bam_model import DenseConfig, DenseLM, files
from bam_model.cli import main
from bam_model.formats import folder as formats_folder

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ["--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-windows", "1", "--no-progress"]


def snapshot(folder: Path) -> dict:
    """Every entry under ``folder``: file bytes, or None for a folder (lock files aside: their
    holder line is rewritten by each locker)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*")) if p.name != files.LOCK}


@pytest.fixture
def seed(tmp_path):
    cfg = DenseConfig(vocab_size=8192, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=24,
                      max_seq_len=64, tie_embeddings=True, eos_token_id=0)
    DenseLM(cfg).save_pretrained(str(tmp_path / "seed"))
    return tmp_path / "seed"


@pytest.fixture
def project(tmp_path):
    """A user's project folder: sources, a git folder, notes."""
    p = tmp_path / "proj"
    (p / "src").mkdir(parents=True)
    (p / "src" / "main.py").write_text("print('hello')\n")
    (p / ".git").mkdir()
    (p / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (p / "config.json").write_text('{"mine": true}\n')
    return p


def err_of(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# --- model folders ---------------------------------------------------------------------------------

def test_mix_refuses_a_foreign_folder_holding_a_config_json(tmp_path, seed, project, capsys, monkeypatch):
    before = snapshot(project)
    monkeypatch.chdir(project)
    assert main(["mix", "--base-model", str(seed), "--experts", str(seed), "--out", "."]) == 2
    assert "was not written by bam" in err_of(capsys)
    for fmt in ("bam", "mixtral"):
        assert main(["mix", "--base-model", str(seed), "--experts", str(seed), "--method", "btx",
                     "--format", fmt, "--out", str(project)]) == 2
        assert "was not written by bam" in err_of(capsys)
    assert snapshot(project) == before


@pytest.mark.parametrize("where", ["seed", "inside", "holds"])
def test_mix_refuses_an_output_overlapping_an_input(tmp_path, seed, capsys, where):
    before = snapshot(tmp_path)
    out = {"seed": seed, "inside": seed / "mixed", "holds": tmp_path}[where]
    assert main(["mix", "--base-model", str(seed), "--experts", str(seed), "--out", str(out)]) == 2
    message = err_of(capsys)
    assert {"seed": "is the input base_model", "inside": "is inside the input base_model",
            "holds": "holds the input base_model"}[where] in message
    assert snapshot(tmp_path) == before


def test_branch_checks_every_target_before_writing_any(tmp_path, seed, capsys):
    out = tmp_path / "branches"
    (out / "law").mkdir(parents=True)
    (out / "law" / "config.json").write_text("{}")
    before = snapshot(tmp_path)
    assert main(["branch", str(seed), "--domains", "code", "law", "--out", str(out)]) == 2
    assert "law' is not empty and was not written by bam" in err_of(capsys)
    assert snapshot(tmp_path) == before                       # no branches/code either
    assert main(["branch", str(seed), "--domains", "code", "--out", str(seed)]) == 2
    assert "is inside the input SEED" in err_of(capsys)


def test_rewriting_our_folder_replaces_only_our_files(tmp_path):
    path = tmp_path / "m"
    model = DenseLM(DenseConfig(vocab_size=64, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=24))
    model.save_pretrained(str(path), max_shard_bytes=4_000)
    assert len(list(path.glob("model-*.safetensors"))) > 1
    (path / "NOTES.md").write_text("my notes")
    other = DenseLM(model.config)
    other.save_pretrained(str(path))                          # unsharded now: the old shards go
    written = ["config.json", "configuration_bam.py", "model.safetensors", "modeling_bam.py"]
    assert sorted(os.listdir(path)) == sorted(["NOTES.md", "bam-manifest.json", *written])
    assert (path / "NOTES.md").read_text() == "my notes"
    manifest = json.loads((path / "bam-manifest.json").read_text())
    assert manifest["complete"] is True and sorted(manifest["files"]) == written
    assert manifest["files"]["model.safetensors"]["sha256"] == files.sha256(path / "model.safetensors")
    torch.testing.assert_close(bam_model.from_pretrained(str(path)).lm_head.weight, other.lm_head.weight)


def test_an_interrupted_rewrite_is_refused_on_load_and_written_again(tmp_path, monkeypatch):
    path = tmp_path / "m"
    model = DenseLM(DenseConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=24))
    model.save_pretrained(str(path))
    real_replace = os.replace

    def crash(src, dst):
        if Path(dst).name == "model.safetensors":
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(str(path))
    monkeypatch.undo()
    assert not [p for p in path.iterdir() if p.name.startswith(".")]   # the staging folder is gone
    with pytest.raises(ValueError, match="was not completely written"):
        bam_model.from_pretrained(str(path))
    model.save_pretrained(str(path))                          # still ours: written again
    assert bam_model.from_pretrained(str(path)).config == model.config


def test_a_staging_folder_left_by_a_kill_does_not_block_the_next_write(tmp_path):
    model = DenseLM(DenseConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=24))
    stage = tmp_path / "m" / f"{files.STAGING_PREFIX}x1"      # killed before its manifest
    stage.mkdir(parents=True)
    (stage / files.STAGING_MARKER).touch()
    (stage / "model.safetensors").write_bytes(b"half")
    model.save_pretrained(str(tmp_path / "m"))
    assert sorted(os.listdir(tmp_path / "m")) == ["bam-manifest.json", "config.json", "configuration_bam.py",
                                                 "model.safetensors", "modeling_bam.py"]
    # A folder of that name without our marker is not ours by its name alone: never removed.
    mine = tmp_path / "u" / f"{files.STAGING_PREFIX}notes"
    mine.mkdir(parents=True)
    (mine / "draft.txt").write_text("mine")
    with pytest.raises(ValueError, match="was not written by bam"):
        model.save_pretrained(str(tmp_path / "u"))
    assert (mine / "draft.txt").read_text() == "mine"


def test_an_empty_folder_is_written_into_and_a_file_is_refused(tmp_path):
    model = DenseLM(DenseConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=24))
    (tmp_path / "empty").mkdir()
    model.save_pretrained(str(tmp_path / "empty"))
    assert (tmp_path / "empty" / "bam-manifest.json").is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        model.save_pretrained(str(tmp_path / "file"))
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("mask, folder_mode, file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600),
                                                         (0o002, 0o775, 0o664)])
def test_saved_files_get_the_mode_the_umask_gives(tmp_path, mask, folder_mode, file_mode):
    model = DenseLM(DenseConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=24))
    old = os.umask(mask)
    try:
        model.save_pretrained(str(tmp_path / "m"))
        files.write_text_atomic(tmp_path / "t.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == folder_mode
    for p in list((tmp_path / "m").iterdir()) + [tmp_path / "t.json"]:
        assert stat.S_IMODE(p.stat().st_mode) == file_mode, p.name


# --- run folders -----------------------------------------------------------------------------------

def test_train_refuses_a_foreign_folder_before_any_work(tmp_path, seed, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "notes.txt").write_text("keep me")
    before = snapshot(tmp_path)
    assert main(["train", str(seed), "--data", "code", "--out", str(out), *TRAIN]) == 2
    assert "was not written by bam" in err_of(capsys)
    assert main(["train", str(seed), "--data", "code", "--out", str(out), "--overwrite", *TRAIN]) == 2
    assert snapshot(tmp_path) == before


def test_train_refuses_a_foreign_final_model_folder_before_training(tmp_path, seed, capsys):
    out = tmp_path / "run"
    assert main(["train", str(seed), "--data", "code", "--out", str(out), *TRAIN]) == 0
    files.clear_owned(out / "model")                           # the user puts their own model there
    (out / "model" / "config.json").write_text('{"theirs": 1}')
    before = snapshot(tmp_path)
    assert main(["train", str(seed), "--data", "code", "--out", str(out), "--overwrite", *TRAIN]) == 2
    assert "final model folder" in err_of(capsys)
    assert snapshot(tmp_path) == before                        # no step was trained: metrics unchanged


def test_overwrite_keeps_the_users_files_in_a_run_folder(tmp_path, seed, capsys):
    out = tmp_path / "run"
    assert main(["train", str(seed), "--data", "code", "--out", str(out), *TRAIN]) == 0
    (out / "checkpoints" / "notes.txt").write_text("keep me")
    (out / "model" / "README.md").write_text("my card")
    (out / "plot.png").write_bytes(b"\x89PNG")
    assert main(["train", str(seed), "--data", "code", "--out", str(out), *TRAIN]) == 2
    assert "holds a training run (checkpoint at step 2); pass --resume" in err_of(capsys)
    assert main(["train", str(seed), "--data", "code", "--out", str(out), "--overwrite", *TRAIN,
                 "--steps", "3"]) == 0
    assert (out / "checkpoints" / "notes.txt").read_text() == "keep me"
    assert (out / "model" / "README.md").read_text() == "my card"
    assert (out / "plot.png").read_bytes() == b"\x89PNG"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["notes.txt", "step-0000003"]
    assert main(["train", str(seed), "--data", "code", "--out", str(out), "--resume", "--overwrite",
                 *TRAIN]) == 2
    assert "not both" in err_of(capsys)


def test_train_refuses_an_output_inside_its_inputs(tmp_path, seed, capsys):
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("some text to train on " * 200)
    before = snapshot(tmp_path)
    assert main(["train", str(seed), "--data", str(texts), "--out", str(texts / "run"), *TRAIN]) == 2
    assert "inside the input --data" in err_of(capsys)
    assert main(["train", str(seed), "--data", "code", "--out", str(seed / "run"), *TRAIN]) == 2
    assert "inside the input MODEL" in err_of(capsys)
    assert snapshot(tmp_path) == before


def _locker(folder: Path) -> subprocess.Popen:
    code = ("import sys, time; from bam_model.files import lock_folder; "
            "lock_folder(sys.argv[1], 'bam train'); print('locked', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_locked_run_folder_is_refused_naming_the_holder_and_kill_9_frees_it(tmp_path, seed, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = _locker(out)
    try:
        assert main(["train", str(seed), "--data", "code", "--out", str(out), *TRAIN]) == 2
        err = err_of(capsys)
        assert f"is in use by another process (bam train, pid {holder.pid} on" in err
        assert sorted(os.listdir(out)) == [files.LOCK]         # nothing else was written
    finally:
        holder.send_signal(signal.SIGKILL)                     # the kernel drops the lock with the process
        holder.wait()
    assert main(["train", str(seed), "--data", "code", "--out", str(out), *TRAIN]) == 0


def test_two_train_processes_on_one_folder(tmp_path, seed):
    """Two real ``bam train`` processes started together: one trains, the other fails at once with
    one line (in use, or a finished run there), and the run folder holds one consistent run."""
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "bam_model.cli", "train", str(seed), "--data", "code", "--out", str(out),
            "--steps", "30", "--batch-size", "2", "--seq-len", "16", "--eval-windows", "1", "--no-progress",
            "--log-every", "1", "--save-every", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    err = next(e for rc, e in results if rc == 2)
    assert "Traceback" not in err and ("in use by another process" in err or "holds a training run" in err)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 31))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000030"]
    assert bam_model.from_pretrained(str(out / "model")).config.n_layers == 1


# --- resume ----------------------------------------------------------------------------------------

def test_resume_refuses_changed_settings_naming_each(tmp_path, seed, capsys):
    out = tmp_path / "run"
    base = ["train", str(seed), "--data", "code", "--out", str(out), "--batch-size", "2", "--seq-len", "16",
            "--eval-windows", "1", "--no-progress", "--steps", "4", "--save-every", "2"]
    assert main(base) == 0
    before = snapshot(tmp_path)
    for extra, named in [(["--lr", "1e-3"], "--lr 0.001 (the run has 0.0003)"),
                         (["--weight-decay", "0"], "--weight-decay 0.0 (the run has 0.1)"),
                         (["--warmup", "3"], "--warmup 3 (the run has 0)"),
                         (["--steps", "6"], "--steps 6 (the run has 4)"),
                         (["--batch-size", "4"], "--batch-size 4 (the run has 2)"),
                         (["--data", "math"], "--data 'math' (the run has 'code')")]:
        assert main([*base, "--resume", *extra]) == 2
        assert named in err_of(capsys), extra
    assert main([*base, "--resume", "--steps", "1"]) == 2
    assert "is at step 4, past --steps 1" in err_of(capsys)
    assert snapshot(tmp_path) == before
    # Flags that change only what is logged, evaluated or kept may change.
    assert main([*base, "--resume", "--log-every", "1", "--eval-windows", "2",
                 "--keep-checkpoints", "2"]) == 0


def test_an_edited_trainer_json_is_refused(tmp_path, seed, capsys):
    out = tmp_path / "run"
    base = ["train", str(seed), "--data", "code", "--out", str(out), "--batch-size", "2", "--seq-len", "16",
            "--eval-windows", "1", "--no-progress", "--steps", "4", "--save-every", "2",
            "--keep-checkpoints", "2"]
    assert main(base) == 0
    trainer = out / "checkpoints" / "step-0000004" / "trainer.json"
    state = json.loads(trainer.read_text())
    state["step"] = 9
    trainer.write_text(json.dumps(state))
    with pytest.warns(UserWarning, match="trainer.json was changed after it was written"):
        assert main([*base, "--resume"]) == 0                  # resumes from step 2 instead
    assert (out / "checkpoints" / "refused-step-0000004").is_dir()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records][-1] == 4


# --- one line for foreseeable failures -------------------------------------------------------------

def test_command_line_failures_are_one_line(tmp_path, seed, capsys, monkeypatch):
    (tmp_path / "afile").write_text("x")
    afile = str(tmp_path / "afile")
    cases = [
        (["train", str(seed), "--data", "code", "--out", afile, *TRAIN], "is a file, not a folder"),
        (["mix", "--base-model", str(seed), "--out", afile], "is a file, not a folder"),
        (["branch", str(seed), "--domains", "a", "--out", afile], "is a file, not a folder"),
        (["demo", "--quick", "--out", afile], "is a file, not a folder"),
        (["eval", str(seed), "--data", "code", "--json", str(tmp_path)], "is a folder; give a file path"),
        (["generate", str(seed), "--prompt", "x", "--device", "gpu"], "--device 'gpu' is not a device name"),
        (["eval", str(seed), "--device", "tpu"], "--device 'tpu' is not"),
    ]
    if not torch.cuda.is_available():
        cases.append((["eval", str(seed), "--device", "cuda"], "PyTorch sees no CUDA GPU"))
        cases.append((["train", str(seed), "--data", "code", "--out", str(tmp_path / "r"),
                       "--device", "cuda", *TRAIN], "PyTorch sees no CUDA GPU"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = err_of(capsys)
        assert err.startswith(f"bam {argv[0]}: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()
    for argv in (["generate", str(seed), "--prompt", "x", "--temperature", "nan"],
                 ["train", str(seed), "--data", "code", "--out", str(tmp_path / "r"), "--lr", "inf", *TRAIN]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and "is not a finite number" in err_of(capsys)


def test_a_folder_that_cannot_be_written_is_one_line(tmp_path, seed, capsys, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)   # as a non-root user sees a 0555 folder
    assert main(["mix", "--base-model", str(seed), "--out", str(tmp_path / "m")]) == 2
    assert "cannot be written" in err_of(capsys)
    monkeypatch.undo()

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "m"))
    monkeypatch.setattr(files, "write_model_folder", denied)
    monkeypatch.setattr(formats_folder, "write_model_folder", denied)
    assert main(["mix", "--base-model", str(seed), "--out", str(tmp_path / "m")]) == 2
    assert err_of(capsys).strip() == f"bam mix: error: Permission denied: '{tmp_path / 'm'}'"


def test_a_diverging_run_ends_with_one_line_naming_the_step(tmp_path, seed, capsys):
    torch.manual_seed(0)
    assert main(["train", str(seed), "--data", "code", "--out", str(tmp_path / "r"), "--lr", "1e12",
                 "--steps", "30", "--batch-size", "2", "--seq-len", "16", "--no-progress",
                 "--warmup", "0"]) == 2
    err = err_of(capsys)
    assert "bam train: error: the loss is nan at step" in err and "try a lower --lr (now 1e+12)" in err


def test_lock_holder_line_and_reentry(tmp_path):
    with files.lock_folder(tmp_path, "bam test") as lock:
        assert files.lock_folder(tmp_path) is lock                # the same process may enter again
        lock.release()
        holder = json.loads((tmp_path / files.LOCK).read_text())
        assert holder["pid"] == os.getpid() and holder["command"] == "bam test"
    started = time.time()
    with files.lock_folder(tmp_path):
        pass
    assert time.time() - started < 1
