#!/usr/bin/env bash
# The GPU evidence of the suite in one command, for a GPU machine with the device's torch installed and no package
# index (run from a bare checkout: nothing is installed). Within 8 minutes on one H100 or H200 it:
#   1. measures three real-size training steps with `torchledger measure --device cuda --json --snapshot`, and
#      two small cases of the first H200 run that a test worker measured below their prediction, each in a fresh
#      process (nothing of an earlier case alive), so that their snapshots show whether the gap is the device's;
#   2. runs the CUDA verification tests (JUnit XML), recording every memory case to memory-cases.jsonl and writing a
#      memory snapshot for every case more than 1% off its prediction;
#   3. runs the full benchmark profile, one group at a time, each under its own time limit, with --benchmark-autosave
#      (the runs land in results/<device>/ as usual, and a copy goes into the archive);
#   4. packs everything into one archive under results/ and prints where it is (also copied into $OUT when set).
# The time limits add up to 400 s, leaving room for starting Python and packing; a part that runs out of time loses
# only itself. Usage: bash scripts/gpu-evidence.sh   (BUDGET_SCALE=0.5 halves every time limit)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY=${PYTHON:-python3}
scale=${BUDGET_SCALE:-1}
limit() { $PY -c "import sys; print(max(10, int(float(sys.argv[1]) * float(sys.argv[2]))))" "$1" "$scale"; }
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu-evidence: no CUDA GPU here (torch.cuda.is_available() is False)" >&2
  exit 2
fi
tag=$($PY -c "from torchledger.measuring.machine import device_tag; print(device_tag())")
stamp=$(date -u +%Y%m%dT%H%M%SZ)
work=$(mktemp -d)
ev="$work/gpu-evidence-$tag-$stamp"
mkdir -p "$ev/snapshots"
t0=$(date +%s)
el() { echo "== t=$(( $(date +%s) - t0 ))s $*" | tee -a "$ev/timeline.log"; }

el "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv || true
  $PY -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda)"
  git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -20; } > "$ev/machine.txt" 2>&1

el "measure at real size"
measure() {  # name, then the flags (MEASURE_LIMIT: seconds, default 25)
  local name=$1; shift
  timeout -k 5 "$(limit "${MEASURE_LIMIT:-25}")" $PY -m torchledger measure --device cuda --json --snapshot "$ev/snapshots/cli-$name.pickle" \
    "$@" > "$ev/cli-$name.json" 2> "$ev/cli-$name.err"
  echo "rc=$? $name" >> "$ev/timeline.log"
}
measure gpt2-small-bf16-mixed --model gpt2-small --batch-size 8 --seq-len 1024 --precision bf16-mixed
measure gpt2-small-32-true-full --model gpt2-small --batch-size 8 --seq-len 1024 --precision 32-true --checkpointing full
measure llama-7b-bf16-true --model llama-7b --seq-len 512 --precision bf16-true
el "measure the small cases measured below their prediction by a test worker, each in a fresh process"
MEASURE_LIMIT=10 measure llama-tiny-bf16-mixed-fused-full-acc4 --model llama-tiny --batch-size 4 --seq-len 128 \
  --precision bf16-mixed --optimizer adamw --optimizer-impl fused --checkpointing full --grad-accum 4
MEASURE_LIMIT=10 measure prefill-gpt-tiny-32-true-1x256 --model gpt-tiny --batch-size 1 --seq-len 256 \
  --precision 32-true --inference

el "verification (CUDA)"
timeout -k 5 "$(limit 40)" $PY -m pytest benchmarks/verification -m cuda -n 8 -q -p no:cacheprovider \
  --junitxml="$ev/verification.xml" --ledger-memory-log="$ev/memory-cases.jsonl" \
  --ledger-snapshot-dir="$ev/snapshots" > "$ev/verification.log" 2>&1
echo "rc=$? verification" >> "$ev/timeline.log"

group() {  # name, seconds, files...
  local name=$1 seconds=$2; shift 2
  el "benchmarks: $name"
  timeout -k 5 "$(limit "$seconds")" $PY -m pytest "$@" --ledger-size full -q -p no:cacheprovider --benchmark-autosave \
    --benchmark-json="$ev/bench-$name.json" --benchmark-columns=min,median,iqr,rounds >> "$ev/benchmarks.log" 2>&1
  echo "rc=$? $name" >> "$ev/timeline.log"
}
group roofline-precision 55 benchmarks/performance/test_roofline.py benchmarks/performance/test_launch.py \
  benchmarks/performance/test_precision.py
# the step-time model's calibration: about 105 short benchmarks of 2 sustained rounds each (~0.35 s)
group calibration 45 benchmarks/performance/test_matmul_shapes.py benchmarks/performance/test_kernels.py
group accumulation-checkpointing 75 benchmarks/performance/test_accumulation_checkpointing.py
group dataloader 35 benchmarks/performance/test_dataloader.py
group fusion 35 benchmarks/performance/test_fusion.py
group other 20 benchmarks/performance/test_formulas_speed.py benchmarks/performance/test_count_speed.py \
  benchmarks/performance/test_collectives.py
el "pack"

mkdir -p results
archive="results/gpu-evidence-$tag-$stamp.tar.gz"
if ! { tar -czf "$archive.partial" -C "$work" "$(basename "$ev")" && mv "$archive.partial" "$archive"; }; then
  rm -f "$archive.partial"
  echo "gpu-evidence: packing failed; everything is kept in $ev" >&2
  exit 1
fi
rm -rf "$work"
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then cp "$archive" "$OUT/"; fi
echo "gpu-evidence: $(( $(date +%s) - t0 )) s; archive: $PWD/$archive"
# every part's exit status is in timeline.log inside the archive; a part that failed or ran out of time fails this
failed=$(tar -xzOf "$archive" "$(basename "$ev")/timeline.log" | grep -c '^rc=[^0]')
if [ "$failed" -gt 0 ]; then
  echo "gpu-evidence: $failed part(s) failed or ran out of time (see timeline.log in the archive)" >&2
  exit 1
fi
