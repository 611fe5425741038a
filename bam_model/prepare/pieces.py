"""The documents of the inputs as pieces of text, each with its split, gathered into batches for the
tokenizer and read ahead in a thread of their own."""
from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator

from ..chat import ChatTemplate, assistant_spans
from ..readers import file_format, read_documents, text_pieces
from .heldout import first_by_hash, held_by_hash
from .inputs import Input

# Text given to one encode_batch call (documents are never split across calls; a long text file
# comes in pieces of TEXT_PIECE bytes, cut after a line break).
BATCH_BYTES = 8 << 20
BATCH_DOCS = 8192


def document_pieces(inputs: list[Input], text_field: str, share: float, chat: ChatTemplate | None
            ) -> Iterator[tuple[str, str, bool, int, list | None]]:
    """(text, split, ends a document, bytes of input consumed, assistant spans of a conversation or
    None) for every piece of every document."""
    texts = [i for i, inp in enumerate(inputs) if inp.split is None and file_format(inp.path) == "text"]
    sizes = [inputs[i].path.stat().st_size for i in texts]
    # A text file larger than twice the held-out share of them all is never held out whole (it would
    # leave little to train on); if no file is held out, ``balance`` cuts the last one.
    small = [j for j, size in enumerate(sizes) if size <= 2 * share * sum(sizes)]
    held_texts = {texts[small[j]] for j in first_by_hash([inputs[texts[j]].key for j in small],
                                                            [sizes[j] for j in small], share)}
    for i, inp in enumerate(inputs):
        if file_format(inp.path) == "text":
            split = inp.split or ("heldout" if i in held_texts else "train")
            for text, last, used in text_pieces(inp.path):
                yield text, split, last, used, None
            continue
        size = inp.path.stat().st_size
        seen = 0
        for doc in read_documents(inp.path, text_field):
            spans = None
            if isinstance(doc, list):           # a conversation (readers.Conversation)
                where = doc.where
                if chat is None:
                    raise ValueError(f"data: {where} is a conversation ('messages'), which is rendered with "
                                     "the model's chat template: prepare the data with bam prepare "
                                     "--tokenizer MODEL, MODEL having a chat template")
                doc, spans = assistant_spans(chat, doc, where)
            split = inp.split or ("heldout" if held_by_hash(doc, share) else "train")
            used = min(len(doc.encode("utf-8", "surrogatepass")), size - seen)
            seen += used
            yield doc, split, True, used, spans
        if size > seen:   # the rest of the file's bytes, for the progress bar
            yield "", "train", False, size - seen, None


def in_batches(pieces: Iterator) -> Iterator[list]:
    batch, size = [], 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece[0])
        if size >= BATCH_BYTES or len(batch) >= BATCH_DOCS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


@contextlib.contextmanager
def read_ahead(batches: Iterator[list], depth: int = 2):
    """``batches``, read in a thread of its own (JSON and Parquet decoding overlap the tokenizer,
    which releases the GIL); its exceptions are raised in the consumer. Leaving the block stops the
    thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done, stop = object(), threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for b in batches:
                if not put(b):
                    return
            put(done)
        except BaseException as e:  # handed to the consumer
            put(e)

    def consume():
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    t = threading.Thread(target=work, name="bam-prepare-read", daemon=True)
    t.start()
    try:
        yield consume()
    finally:
        stop.set()
        t.join()
