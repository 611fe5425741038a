"""Prepared data: a corpus tokenized once into flat token files that training and evaluation map.

A prepared-data folder (``bam prepare SOURCE... --tokenizer MODEL --out DIR``) holds, per split
("train", "heldout"):

- ``{split}.tokens``: every document's token ids followed by the end-of-document token, one flat
  little-endian array (``uint16`` when the vocabulary has at most 65,536 tokens, else ``uint32``),
  as nanoGPT's ``train.bin`` and Megatron-LM's ``.bin`` keep them;
- ``{split}.docs``: ``uint64``, where each document ends in ``{split}.tokens`` (cumulative, the EOS
  included), as Megatron-LM's ``.idx`` keeps them;
- ``{split}.mask`` (only when the corpus holds conversations): ``uint8`` per token, 1 where it is in
  the loss (a conversation's assistant turns, and every token of other documents);

and ``bam-data.json``, the index: the tokenizer (its SHA-256, vocabulary size, end-of-document id),
the sources (each file's path, size and SHA-256), per split the token and document counts and each
file's size, SHA-256 and modification time. ``bam-manifest.json`` (kind "data") makes the folder
ours; the folder is written under the ownership rules of docs/reliability.md (staged inside the
target, ``bam-data.json`` moved in last, so a killed prepare leaves nothing that loads).

Reading (``PreparedData``) maps the files (``numpy.memmap``): start-up time and memory do not grow
with the corpus. Every open checks the files' sizes against the index (a truncated copy is refused
at once) and, for a file whose modification time differs from the one recorded, its SHA-256 (an
edit after preparing is refused; a copy that kept no times, ``cp`` without ``-p``, is hashed once
per process).

The held-out split is chosen by document, from the documents alone (the same corpus always splits
the same way): a text file is one document, and text files are held out whole, the first in the
order of the SHA-256 of their relative path until they hold ``heldout`` of the text files' bytes
(at least one, never all); a record (a JSON Lines, JSON or Parquet record) is held out when the
SHA-256 of its text falls in the first ``heldout`` of the hash range (copies of a document land
together). If one split is left empty, the last document of the other moves to it; a corpus of one
document is cut near ``1 - heldout`` of its tokens, after a line break.

Raw ``--data`` paths and the bundled corpus go through the same code into a cache folder
(``cache_root``), keyed by the files' paths, sizes and modification times and the tokenizer.

One module per job:

- ``index``: the index (``bam-data.json``): format, token dtype, tokenizer digest, its check;
- ``prepared``: opening a folder (``PreparedData``, ``is_prepared``);
- ``inputs``: the files a corpus is read from (``list_inputs``);
- ``heldout``: which documents are held out, where a lone document is cut;
- ``pieces``: the documents as pieces of text with their split, in batches, read ahead;
- ``writer``: the files of one split as they are written, and leaving neither split empty;
- ``write``: tokenizing a corpus (``write_prepared``) into an output folder (``prepare``);
- ``cache``: prepared data opened once per process, the cache of raw paths (``cached``).

The names below are the ones used from outside the package (the ``bam prepare`` command aside).
"""
from .cache import _OPEN, cache_root, cached, open_prepared
from .index import INDEX, SPLITS, describe, tokenizer_digest
from .inputs import list_inputs
from .pieces import BATCH_BYTES
from .prepared import PreparedData, is_prepared
from .write import prepare

__all__ = ["BATCH_BYTES", "INDEX", "SPLITS", "_OPEN", "PreparedData", "cache_root", "cached", "describe",
           "is_prepared", "list_inputs", "open_prepared", "prepare", "tokenizer_digest"]
