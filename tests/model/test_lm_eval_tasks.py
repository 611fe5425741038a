"""The offline lm-eval tasks' documents: deterministic, from the held-out corpus, and answerable (the
true continuation and the rest of the line follow the context in the source text)."""
from bam_model.lm_eval_tasks import bam_tasks


def test_continuation_items_are_passages_of_their_domain_with_one_true_ending():
    for domain in bam_tasks.DOMAINS:
        texts = bam_tasks._texts(domain)
        docs = bam_tasks.continuation_docs(domain)
        assert docs == bam_tasks.continuation_docs(domain)  # the same items every time
        assert len(docs) == bam_tasks.PER_DOMAIN
        for doc in docs:
            assert len(doc["choices"]) == bam_tasks.CHOICES == len(set(doc["choices"]))
            true = doc["choices"][doc["label"]]
            assert any(doc["context"] + true in text for text in texts), doc["id"]


def test_next_words_targets_are_the_rest_of_the_line():
    docs = bam_tasks.next_words_docs()
    assert len(docs) == 8 * len(bam_tasks.DOMAINS)
    for doc in docs:
        target = doc["target"]
        assert target.strip() and "\n" not in target and len(target) <= bam_tasks.LINE_CHARS
        texts = bam_tasks._texts(doc["domain"])
        assert any(doc["context"] + target + "\n" in text for text in texts), doc["id"]
