"""The command line on a real pretrained model (SmolLM2-135M-Instruct, a Q4_1 GGUF): each model
tokenizes with its own tokenizer, a fresh BAM mixture of the seed keeps the seed's function, and a
trained model generates without being told its tokenizer. A few windows and one training step keep it
within the CI budget."""
import json
import math
import os

import pytest
import torch
import transformers

from bam_model import data
from bam_model.cli import main
from bam_model.tokenizer import EOS_TOKEN
from tests.support.real_models import smollm2_gguf

WINDOWS = ["--data", "code", "--max-windows", "3", "--seq-len", "64", "--no-progress"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("smollm2")


def eval_ppl(model, capsys) -> float:
    assert main(["eval", model, *WINDOWS]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("code "))
    return float(line.split()[1])


def greedy(model, capsys, prompt="def fibonacci(n):") -> str:
    assert main(["generate", model, "--prompt", prompt, "--max-new-tokens", "8"]) == 0
    return capsys.readouterr().out


def test_eval_uses_the_models_own_tokenizer(capsys):
    """bam eval's perplexity of the seed equals transformers' with the GGUF's own tokenizer (1%)."""
    gguf = smollm2_gguf()
    ours = eval_ppl(gguf, capsys)
    folder, name = os.path.split(gguf)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    eos = tok.convert_tokens_to_ids(EOS_TOKEN)
    ids = []
    for doc in data.Source("code").documents("heldout"):
        ids += tok(doc, add_special_tokens=False).input_ids + [eos]
        if len(ids) > 3 * 64:
            break
    windows = torch.tensor([ids[i * 63:i * 63 + 64] for i in range(3)])   # overlapping by one, as bam eval
    with torch.no_grad():
        logits = hf(windows).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten())
    assert ours == pytest.approx(math.exp(nll.item()), rel=0.01)
    assert ours < 100         # with the bundled BPE's ids it was in the thousands


def test_a_fresh_bam_mixture_keeps_the_seeds_perplexity_and_tokens(work, capsys):
    gguf = smollm2_gguf()
    assert main(["branch", gguf, "--domains", "code", "math", "--out", str(work / "br")]) == 0
    assert (work / "br" / "code" / "tokenizer.json").is_file()
    assert (work / "br" / "code" / "tokenizer_config.json").is_file()
    assert main(["mix", "--base-model", gguf, "--experts", str(work / "br" / "code"),
                 str(work / "br" / "math"), "--method", "bam", "--out", str(work / "mixed")]) == 0
    capsys.readouterr()
    seed_ppl, mixed_ppl = eval_ppl(gguf, capsys), eval_ppl(str(work / "mixed"), capsys)
    assert mixed_ppl == pytest.approx(seed_ppl, rel=1e-3)
    assert greedy(str(work / "mixed"), capsys) == greedy(gguf, capsys)


def test_a_trained_model_generates_with_its_own_tokenizer(work, capsys):
    if not (work / "br" / "code").is_dir():
        assert main(["branch", smollm2_gguf(), "--domains", "code", "--out", str(work / "br")]) == 0
    assert main(["train", str(work / "br" / "code"), "--data", "code", "--steps", "1", "--batch-size", "1",
                 "--seq-len", "32", "--eval-windows", "1", "--lr", "1e-5", "--no-progress",
                 "--out", str(work / "run")]) == 0
    out = capsys.readouterr().out
    loss = float(out.split("loss ")[1].split(";")[0])
    assert loss < 5          # SmolLM2's own ids: about 1 to 3 nats; the bundled BPE's ids gave 9.4
    assert (work / "run" / "model" / "tokenizer.json").is_file()
    # The GGUF's chat template went through branch and train into the trained model's folder.
    from bam_model.formats.gguf import gguf_chat_template
    written = json.loads((work / "run" / "model" / "tokenizer_config.json").read_text())
    template = gguf_chat_template(smollm2_gguf())
    assert written["chat_template"] == template and "<|im_start|>" in template
    text = greedy(str(work / "run" / "model"), capsys)
    assert text.startswith("def fibonacci(n):") and len(text) > len("def fibonacci(n):\n")


def test_the_mixture_loads_in_transformers_with_bams_logits(work):
    """The SmolLM2 mixture's own folder in AutoModelForCausalLM (the classes import bam_model
    registers): the logits of bam_model.from_pretrained, and the same greedy tokens for a
    left-padded batch as bam generates for each prompt alone."""
    import bam_model

    mixed = work / "mixed"
    if not mixed.is_dir():
        gguf = smollm2_gguf()
        assert main(["mix", "--base-model", gguf, "--experts", gguf, "--out", str(mixed)]) == 0
    ours = bam_model.from_pretrained(str(mixed))
    hf = transformers.AutoModelForCausalLM.from_pretrained(mixed).eval()
    tok = transformers.AutoTokenizer.from_pretrained(mixed, padding_side="left")
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat.startswith("<|im_start|>system\n") and chat.endswith("<|im_start|>user\nHi<|im_end|>\n"
                                                                     "<|im_start|>assistant\n")
    tok.pad_token = tok.eos_token
    batch = tok(["def fibonacci(n):", "The LORD said unto Moses,"], return_tensors="pt", padding=True)
    full = int(batch["attention_mask"].all(-1).nonzero()[0])  # the longer prompt: no padding
    with torch.no_grad():
        got = hf(**batch).logits[full]
        want = ours(batch["input_ids"][full:full + 1]).logits[0]
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    out = hf.generate(**batch, max_new_tokens=6, do_sample=False)
    width = batch["input_ids"].shape[1]
    for i, (row, mask) in enumerate(zip(batch["input_ids"], batch["attention_mask"])):
        prompt = row[mask.bool()][None]
        alone = ours.generate(prompt, max_new_tokens=6)[0, prompt.shape[1]:]
        assert torch.equal(out[i, width:], alone), f"prompt {i}"


def test_weight_mixup_training_of_a_smollm2_copy_gives_a_model_bam_eval_reads(work, capsys):
    """bam train --mixup on a copy of SmolLM2 (its weights are the frozen base), one step, then
    bam eval of the mixed model."""
    if not (work / "br" / "code").is_dir():
        assert main(["branch", smollm2_gguf(), "--domains", "code", "--out", str(work / "br")]) == 0
    assert main(["train", str(work / "br" / "code"), "--data", "code", "--steps", "1", "--batch-size", "2",
                 "--seq-len", "32", "--eval-windows", "1", "--no-progress", "--mixup",
                 "--out", str(work / "mixup")]) == 0
    assert "weight mixup: mean coefficient" in capsys.readouterr().out
    assert (work / "mixup" / "mixup-alpha.png").is_file()
    ppl = eval_ppl(str(work / "mixup" / "model"), capsys)
    assert math.isfinite(ppl) and ppl < 100      # half the seed's weights, half one step from them
