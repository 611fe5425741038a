"""The file system, safely: atomic writes, fsync, hashes, which folders are ours, and run locks.

Rules every writer of the package follows (see docs/reliability.md):

- A file is written under a temporary name beside its target, fsynced and renamed into place, so a
  crash leaves the old file or the new one, never half of one. New files and folders get the mode
  the user's umask gives (as ``cp`` would); a replaced file keeps its mode.
- A folder is ours only when it holds ``bam-manifest.json``, written by us, which lists the entries
  we wrote. An existing folder is written into only when it is empty or ours; inside it only the
  entries the manifest lists are replaced or removed. Anything else is refused before work starts.
- Every writer of a folder (a model, a run, a demo) locks it for the whole command (``fcntl.flock``
  on ``.bam-lock`` inside it: released by the kernel when the process dies, so ``kill -9`` never
  leaves a stale lock); a second writer fails at once with a message naming the holder. The lock
  file is never opened through a link, and a folder that did not exist is created to hold it (and
  removed again when the command fails before writing anything there).
- An output *file* (``bam eval --json``) is ours when it holds our format marker; a file without
  it is never replaced.

One module per job:

- ``atomic``: writing one file (atomically, fsynced), hashes;
- ``room``: physical memory, free disk space, sizes in words;
- ``reading``: JSON files, a user's (errors name the file) and our own output files;
- ``locks``: the run lock (``FolderLock``, ``lock_folder``);
- ``manifest``: which folders are ours, what a folder of each kind holds, what a killed write left;
- ``checks``: before any work, whether a path may receive a folder or a results file of ours;
- ``folders``: holding an output folder for a command (``reserve_output``), writing one whole
  (``write_folder``).

The names below are the ones used from outside the package (scripts, the benchmark runner, tests).
"""
from .atomic import sha256, write_atomic, write_json_atomic, write_text_atomic
from .checks import check_output, check_output_file
from .folders import reserve_output, write_model_folder
from .locks import LOCK, LOCK_MAX_BYTES, FolderLock, _held, lock_folder
from .manifest import STAGING_MARKER, STAGING_PREFIX, check_complete, claim_folder, clear_owned
from .room import check_free_space, physical_memory

__all__ = ["LOCK", "LOCK_MAX_BYTES", "STAGING_MARKER", "STAGING_PREFIX", "FolderLock", "_held",
           "check_complete", "check_free_space", "check_output", "check_output_file", "claim_folder",
           "clear_owned", "lock_folder", "physical_memory", "reserve_output", "sha256", "write_atomic",
           "write_json_atomic", "write_model_folder", "write_text_atomic"]
