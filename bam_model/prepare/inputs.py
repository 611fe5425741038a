"""The files a corpus is read from: files and folders, Hugging Face ``datasets`` folders and their
splits (``list_inputs``)."""
from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..files.manifest import plain_name
from ..files.reading import read_json
from .prepared import is_prepared


@dataclass(frozen=True)
class Input:
    """One file to read: ``key`` names it in the corpus (its path relative to the source given, for
    the held-out choice of text files); ``split`` is given for files that are already split (the
    bundled corpus), else None (chosen by document)."""
    path: Path
    key: str
    split: str | None = None


# A Hugging Face ``datasets`` folder (``Dataset.save_to_disk``) holds these beside its Arrow files;
# one of a ``DatasetDict`` holds DATASET_DICT and a folder per split.
DATASET_FILES = ("state.json", "dataset_info.json")
DATASET_DICT = "dataset_dict.json"
# A DatasetDict's splits, by the start of their names: those that train and those held out as they
# are ("train_sft", "test_sft", "validation", ...).
TRAIN_SPLITS = ("train",)
HELDOUT_SPLITS = ("valid", "test", "eval", "dev", "heldout")


def _split_kind(name: str) -> str | None:
    low = name.lower()
    return "train" if low.startswith(TRAIN_SPLITS) else "heldout" if low.startswith(HELDOUT_SPLITS) else None


def _dataset_arrow_files(folder: Path) -> list[Path]:
    """The Arrow files of a ``datasets`` folder, in its own order (``state.json``'s data files)."""
    state = read_json(str(folder / "state.json"))
    listed = state.get("_data_files")
    names = [d.get("filename") for d in listed if isinstance(d, dict)] if isinstance(listed, list) else []
    if not names or not all(isinstance(n, str) and plain_name(n) for n in names):
        raise ValueError(f"data: {str(folder)!r} looks like a datasets folder, but its state.json lists no "
                         "data files")
    for n in names:
        if not (folder / n).is_file():
            raise ValueError(f"data: {str(folder / n)!r}, listed in {str(folder / 'state.json')!r}, is "
                             "missing")
    return [folder / n for n in names]


def _folder_files(path: Path) -> list[tuple[Path, str | None]]:
    """(file, split or None) of a folder, recursively, hidden entries left out; a ``datasets``
    folder gives its Arrow files. A DatasetDict with training splits ("train...") and held-out ones
    ("valid...", "test...", "eval...", "dev...") keeps them; one of training splits only is split by
    document; a split of another name is refused (give the split folders to read instead)."""
    if (path / DATASET_DICT).is_file():
        splits = read_json(str(path / DATASET_DICT)).get("splits")
        if not (isinstance(splits, list) and splits and all(isinstance(s, str) and plain_name(s)
                                                            for s in splits)):
            raise ValueError(f"data: {str(path / DATASET_DICT)!r} lists no splits")
        kinds = {s: _split_kind(s) for s in splits}
        unknown = [s for s, k in kinds.items() if k is None]
        if unknown:
            raise ValueError(f"data: the DatasetDict {str(path)!r} has the split(s) "
                             f"{', '.join(map(repr, unknown))}, neither training (train...) nor held out "
                             "(valid..., test..., eval..., dev...): give the split folders to read instead, "
                             f"e.g. {str(path / splits[0])!r}")
        given = set(kinds.values()) == {"train", "heldout"}
        return [(f, kinds[s] if given else None) for s in splits for f in _dataset_arrow_files(path / s)]
    if all((path / n).is_file() for n in DATASET_FILES):
        return [(f, None) for f in _dataset_arrow_files(path)]
    if is_prepared(path):
        raise ValueError(f"data: {str(path)!r} is prepared data (bam prepare wrote it), not a source to "
                         "read: give it to --data as it is, or prepare the files it was prepared from")
    out = []
    for entry in sorted(path.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and not entry.is_symlink():     # as rglob: links to folders are not followed
            out += _folder_files(entry)
        elif entry.is_file():
            out.append((entry, None))
    return out


def list_inputs(sources: Iterable[str | os.PathLike]) -> list[Input]:
    """The files of ``sources`` (files, or folders read recursively without hidden entries), in
    order; a ValueError for a path that does not exist, an empty folder, a name that is not UTF-8."""
    inputs: list[Input] = []
    for source in sources:
        path = Path(os.path.abspath(source))
        if path.is_file():
            inputs.append(Input(path, path.name))
            continue
        if not path.is_dir():
            problem = "does not exist" if not os.path.lexists(path) else "is neither a file nor a folder"
            raise ValueError(f"data: {str(source)!r} {problem}")
        found = _folder_files(path)
        if not found:
            raise ValueError(f"data: folder {str(source)!r} holds no files")
        for p, split in found:
            try:
                str(p).encode("utf-8")
            except UnicodeEncodeError:   # a name of bytes that are not UTF-8 (read as lone surrogates)
                raise ValueError(f"data: {ascii(str(p))} has a file name that is not UTF-8; rename it or "
                                 "move it out of the folder") from None
            inputs.append(Input(p, f"{path.name}/{p.relative_to(path).as_posix()}", split))
    if not inputs:
        raise ValueError("data: no source given")
    return inputs
