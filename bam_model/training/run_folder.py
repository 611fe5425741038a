"""The run folder of ``bam train``: checked, claimed (our manifest) and locked before any work,
resumed from its newest intact checkpoint or cleared for a fresh run.

A run folder ``out`` holds (written by rank 0; with FSDP each rank writes its own shards)::

    metrics.jsonl                 one JSON object per logged step: step, loss, lr, tokens_per_s, ...
    checkpoints/step-NNNNNNN/     see ``checkpointing``
    model/                        the final model (``save_pretrained`` when the model has it)
    mixup-alpha.json, .png        weight mixup: the mixing coefficients per weight (``mixup``)
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import warnings
from pathlib import Path

from .. import distributed
from ..files.checks import check_output
from ..files.folders import make_folder, remove_if_unused
from ..files.locks import LOCK, FolderLock, lock_folder
from ..files.manifest import MANIFEST, claim_folder, clear_owned, read_manifest
from ..files.reading import read_json
from ..options import short_repr
from .checkpointing import (
    CHECKPOINTS,
    TRAINER_JSON,
    checkpoint_dirs,
    newest_intact,
    ours_in_checkpoints,
    refused_checkpoints,
    remove_checkpoints,
)
from .config import RunOptions, TrainConfig
from .mixup import ALPHA_JSON, ALPHA_PLOT

METRICS = "metrics.jsonl"
FINAL_MODEL = "model"
REPORTS = (ALPHA_JSON, ALPHA_PLOT)
# Flags that do not change what is trained (only what is logged, evaluated or kept): a resumed run
# may change them; any other difference from the checkpoint's run is refused.
RESUMABLE_CHANGES = ("log_every", "eval_every", "eval_windows", "save_every", "keep_checkpoints")


def _clear_leftovers(out: Path) -> None:
    """Delete what a killed run leaves behind: unfinished checkpoint, metrics and model temporaries
    (only names we make)."""
    root = out / CHECKPOINTS
    leftovers = [p for p in root.iterdir() if p.name.startswith(".") and ours_in_checkpoints(p.name)] \
        if root.is_dir() else []
    leftovers += [p for name in (METRICS, FINAL_MODEL, *REPORTS) for p in out.glob(f".{name}.tmp-*")]
    for p in leftovers:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()



def read_metrics(path: Path, upto_step: int) -> list[dict]:
    """Records with step <= upto_step (a crash may have left later ones or a torn last line). A line
    that is not a record of ours (not JSON, not an object with an int step) is dropped with a
    warning naming it: the resumed run rewrites the file from the records it keeps."""
    if not path.is_file():
        return []
    records = []
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = text.splitlines()
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            rec = None
        step = rec.get("step") if isinstance(rec, dict) else None
        if not (isinstance(step, int) and not isinstance(step, bool)):
            torn = n == len(lines) and not text.endswith("\n")     # a kill in the middle of a write
            if line.strip() and not torn:
                warnings.warn(f"{str(path)!r} line {n} is not a metrics record ({short_repr(line)}); dropped",
                              stacklevel=2)
            continue
        if step <= upto_step:
            records.append(rec)
    return records


def data_inputs(sources) -> list[tuple[str, Path]]:
    """The ``--data`` paths a run reads, for ``open_run``'s overlap check."""
    return [("--data", s.path) for s in sources if s.path is not None]



class RunFolder(contextlib.AbstractContextManager):
    """A run folder opened for writing by ``open_run``: checked, claimed (our manifest) and locked
    on rank 0 (a context manager: leaving it releases the lock). ``options`` are the run's, which
    opened it; ``resume_step`` is the checkpoint to continue from (-1: a fresh run)."""

    def __init__(self, options: RunOptions, path: Path, resume_step: int, lock: FolderLock | None,
                 made=()):
        self.options, self.path, self.resume_step, self.lock = options, path, resume_step, lock
        self.made = list(made)      # the folders open_run created (removed again by a run that fails first)

    def close(self, failed: bool = False) -> None:
        """Release the lock; after a failure before the run wrote anything (a check after the model
        was loaded), a folder ``open_run`` created is removed again."""
        lock, self.lock = self.lock, None
        if lock is None:
            return
        if failed and self.made and not _has_run(self.path):
            for name in (METRICS, MANIFEST):
                with contextlib.suppress(OSError):
                    (self.path / name).unlink()
            remove_if_unused(self.made, lock)
        lock.release()

    def __exit__(self, exc_type, *exc):
        self.close(failed=exc_type is not None)


def _has_run(out: Path) -> bool:
    """Whether ``out`` holds what a run wrote: metrics records (an empty metrics file is what a run
    refused before its first step leaves), checkpoints or a final model."""
    metrics = out / METRICS
    return ((metrics.is_file() and metrics.stat().st_size > 0) or (out / FINAL_MODEL).exists()
            or bool((out / CHECKPOINTS).is_dir() and any(ours_in_checkpoints(p.name)
                                                         for p in (out / CHECKPOINTS).iterdir())))



def _clear_run(out: Path) -> None:
    """``--overwrite``: remove what an earlier run wrote (metrics, our checkpoint folders, the
    final model's files); anything else in the folder stays."""
    for name in (METRICS, *REPORTS):
        if (out / name).is_file():
            (out / name).unlink()
    remove_checkpoints(out)
    if (out / FINAL_MODEL).is_dir():
        clear_owned(out / FINAL_MODEL, keep_claim=True)


def _check_resume(state: dict, path: Path, cfg: TrainConfig, data: str) -> None:
    """Refuse to resume a checkpoint written with other settings, naming each differing flag (a
    resumed run must continue exactly the recorded one)."""
    if cfg.steps < state["step"]:
        raise ValueError(f"--resume: the checkpoint {str(path)!r} is at step {state['step']}, "
                         f"past --steps {cfg.steps}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = TrainConfig(**{k: v for k, v in state["config"].items() if k in known})  # digest-checked
    before, now = dataclasses.asdict(saved), dataclasses.asdict(cfg)
    before["warmup"], now["warmup"] = saved.warmup_steps, cfg.warmup_steps
    before["mixup_split"], now["mixup_split"] = saved.mixup_fraction, cfg.mixup_fraction   # None: its default
    diffs = [f"--{k.replace('_', '-')} {now[k]!r} (the run has {before[k]!r})"
             for k in now if k not in RESUMABLE_CHANGES and before[k] != now[k]]
    saved_data = state["data"].get("data")
    if saved_data != data:
        diffs.insert(0, f"--data {data!r} (the run has {saved_data!r})")
    if diffs:
        raise ValueError(f"--resume: {'; '.join(diffs)}; resume with the run's own settings, or start a new "
                         "run (another --out, or --overwrite)")


def check_start(state: dict, path: Path, start: dict) -> None:
    """Refuse to resume the checkpoint ``path`` (its ``trainer.json`` is ``state``) from another model
    or other data than its run started from (``start``: the digests ``train`` records)."""
    run = str(path.parent.parent)
    saved = state.get("start")
    if not isinstance(saved, dict):   # written by an older bam: resumed, and recorded from now on
        warnings.warn(f"the checkpoint {str(path)!r} does not record what its run started from (an older bam "
                      "wrote it): resuming without checking that MODEL and the data are the run's own",
                      stacklevel=3)
        return
    if saved.get("model") != start["model"]:
        raise ValueError(f"--resume: MODEL is not the model the run in {run!r} started from (the SHA-256 of "
                         "its weights, config and tokenizer differs); resume from the same MODEL, or start a "
                         "new run (another --out, or --overwrite)")
    before = saved.get("data") if isinstance(saved.get("data"), dict) else {}
    changed = [name for name, digest in start["data"].items() if before.get(name) != digest]
    if changed:
        raise ValueError(f"--resume: the data of {', '.join(map(repr, changed))} changed since the run in "
                         f"{run!r} began (the SHA-256 of its tokens differs), so the run would not continue "
                         "the one it was; resume with the data as it was, or start a new run (another --out, "
                         "or --overwrite)")


def open_run(options: RunOptions, cfg: TrainConfig, inputs=()) -> RunFolder:
    """Check, claim and lock the run folder ``options.out`` before any work (rank 0; every rank gets
    rank 0's outcome). A fresh run needs it absent, empty or a run of ours without content;
    ``options.resume`` continues the newest intact checkpoint when there is one (after checking its
    settings against ``cfg`` and ``options.data``); ``options.overwrite`` removes an earlier run's
    files first. ``inputs`` ((name, path) pairs) may not overlap the folder."""
    if options.resume and options.overwrite:
        raise ValueError("give --resume or --overwrite, not both")
    out = Path(os.path.abspath(options.out))
    ctx = distributed.current()
    error, run = None, None
    if ctx.is_main:
        try:
            run = _open_run_main(options, out, cfg, inputs)
        except (ValueError, OSError) as e:
            error = e
    if distributed.broadcast_int(0 if error is None else 1):
        if error is not None:
            raise error
        raise ValueError(f"rank 0 refused the run folder {str(out)!r} (its message says why)")
    resume_step = distributed.broadcast_int(run.resume_step if run is not None else -1)
    return run if run is not None else RunFolder(options, out, resume_step, None)


def _open_run_main(options: RunOptions, out: Path, cfg: TrainConfig, inputs) -> RunFolder:
    check_output(out, "run", inputs=inputs)
    made = make_folder(out)
    try:
        lock = lock_folder(out, "bam train")
    except BaseException:
        remove_if_unused(made)
        raise
    try:
        check_output(out, "run", inputs=inputs)      # again, under the lock
        # Claimed when new, and again when an older bam claimed it (it gets the names added since);
        # otherwise left as it is, so that a refused command changes nothing.
        entries = [METRICS, CHECKPOINTS, FINAL_MODEL, *REPORTS, LOCK]
        manifest = read_manifest(out)
        if manifest is None or not set(entries) <= set(manifest["files"]):
            claim_folder(out, "run", entries)
        if (out / CHECKPOINTS).exists() and not (out / CHECKPOINTS).is_dir():
            raise ValueError(f"{str(out / CHECKPOINTS)!r} is a file; the run keeps its checkpoints in a "
                             "folder there")
        check_output(out / FINAL_MODEL, "model", flag="the run's final model folder")
        _clear_leftovers(out)
        resume_step = -1
        if _has_run(out):
            if options.overwrite:
                _clear_run(out)
            elif options.resume:
                resume_step = newest_intact(out)
                if resume_step >= 0:  # _newest_intact verified it: its trainer.json is read, not hashed again
                    path = out / CHECKPOINTS / f"step-{resume_step:07d}"
                    _check_resume(read_json(str(path / TRAINER_JSON)), path, cfg, options.data)
                elif refused_checkpoints(out):
                    raise ValueError(f"--resume: the run in {str(out)!r} has no intact checkpoint (refused: "
                                     f"{', '.join(refused_checkpoints(out))}); start afresh with --overwrite")
            else:
                steps = [step for step, _ in checkpoint_dirs(out)]
                at = f" (checkpoint at step {steps[-1]})" if steps else ""
                raise ValueError(f"--out {str(out)!r} holds a training run{at}; pass --resume to continue "
                                 "it or --overwrite to start afresh")
        return RunFolder(options, out, resume_step, lock, made)
    except BaseException:
        RunFolder(options, out, -1, lock, made).close(failed=True)    # a folder made here goes again
        raise

