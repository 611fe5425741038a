"""Data: the bundled corpus and tokenizer, ``--data`` specs, and a resumable, shardable batch stream.

A ``--data`` spec is a bundled domain (``code``), a mixture (``code:0.25,math:0.75``; weights are
normalised) or a path: a folder of prepared data (``bam prepare``), or a file or folder of files
(read by ``readers``: a text file is one document, a JSON Lines, JSON or Parquet file one document
per record, its ``text``); mixture parts may be paths too. How documents are held out:
``bam_model.prepare``'s package doc.

Every source is tokenized once, into prepared data (``bam_model.prepare``; a bundled domain or a raw path
into the cache, once per corpus and tokenizer), and mapped from there: documents joined by the
end-of-document token, cut into windows of ``seq_len`` tokens that overlap by one token, so that
with the model's own shift (labels are the input ids, as in Hugging Face) every token after the
first is predicted exactly once per pass. ``BatchStream`` draws windows in a seeded order that
depends only on the seed, the spec, ``seq_len`` and how many samples were drawn before, so it can
be saved (``state_dict``, plain JSON) and restored exactly, and split across ranks without loss or
overlap.

One module per job:

- ``sources``: the bundled domains, ``Source``, ``parse_data_spec``;
- ``splits``: a source's tokens and loss mask, of a split or of a part of its training documents;
- ``sampler``: ``BatchStream``, the training batches;
- ``windows``: the evaluation windows;
- ``token_bytes``: the bytes of text each token stands for (bits per byte).

The names below are the ones other modules, scripts and tests use (the tokenizer's two among them).
"""
from ..prepare.heldout import HELDOUT_FRACTION
from ..tokenizer import eos_token_id, load_tokenizer
from .sampler import Batch, BatchStream
from .sources import _RESOLVED, CORPUS_DIR, DOMAINS, SPLITS, Source, forget_sources, parse_data_spec
from .splits import TRAIN_PARTS, loss_mask, source_digest, split_train, token_arrays, tokens
from .token_bytes import token_byte_lengths
from .windows import eval_rows, eval_window_count, eval_windows, scored_windows

__all__ = ["CORPUS_DIR", "DOMAINS", "HELDOUT_FRACTION", "SPLITS", "TRAIN_PARTS", "_RESOLVED", "Batch",
           "BatchStream", "Source", "eos_token_id", "eval_rows", "eval_window_count", "eval_windows",
           "forget_sources", "load_tokenizer", "loss_mask", "parse_data_spec", "scored_windows",
           "source_digest", "split_train", "token_arrays", "token_byte_lengths", "tokens"]
