"""Offline lm-evaluation-harness tasks built from bam's bundled held-out corpus.

Every lm-eval task downloads its data when it runs; these do not, so a BAM model can be evaluated
with lm-eval on a machine without a network::

    lm_eval --model hf --model_args pretrained=FOLDER,trust_remote_code=True \\
        --include_path "$(python -m bam_model.lm_eval_tasks)" --tasks bam_continuation

``bam_continuation`` (multiple choice, one subtask per domain): which of 5 continuations follows a
passage; the other 4 are continuations of other passages of the same domain. ``bam_next_words``
(generate_until): the words that follow a passage, up to the end of its line.
"""
from pathlib import Path

PATH = Path(__file__).resolve().parent
