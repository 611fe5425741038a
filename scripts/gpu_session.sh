#!/usr/bin/env bash
# The one prepared command for a lent GPU machine (run from the repository root, with the
# machine's own torch and triton): the machine's facts, then every bam-bench suite, each in its
# own process with a time limit, checks on the GPU first, then timings. Results go to $OUT (the
# device tool's folder) or benchmarks/results: per suite <machine>-<suite>.{json,md,png}, e.g.
# cuda-nvidia-h200-moe.json (replacing the previous run's on that machine), with
# <machine>-machine.txt and <machine>-log.txt beside them.
# A lent machine gives one call of at most 10 minutes; the limits below keep the three suites
# inside it (each suite's checks first compile each kernel variant once, for three dtypes), and
# --quick (4k and 16k tokens, shorter do_bench) keeps every case in. FULL=1 runs the full sizes.
#   device run: bash scripts/gpu_session.sh            (timeout_s 600)
set -u
out=${OUT:-benchmarks/results}
suite_timeout=${SUITE_TIMEOUT:-moe=300,moa=170,model=100}
quick=--quick
[ "${FULL:-0}" = 1 ] && quick=
mkdir -p "$out"
machine=$(PYTHONPATH=. python3 -c "from bam_bench.runner import machine_tag; print(machine_tag('cuda'))" \
  2>/dev/null || echo cuda)
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$out/$machine-machine.txt"
set -o pipefail
PYTHONPATH=. PYTHONUNBUFFERED=1 python3 -m bam_bench --all --device cuda --out "$out" $quick \
  --suite-timeout "$suite_timeout" 2>&1 | tee "$out/$machine-log.txt"
