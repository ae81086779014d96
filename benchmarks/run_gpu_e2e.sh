#!/bin/bash
# One device call for the end-to-end GPU work: the GPU correctness test, then the latency and
# throughput benchmarks with their HF peers. Logs, results and the profile go to $OUT.
#   bash benchmarks/run_gpu_e2e.sh [steps...]   (default: e2e latency tput8b tputqwen)
set -u
export PYTHONUNBUFFERED=1
R=$OUT/results.md
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv > "$OUT/env.txt" 2>&1
python3 -c "import torch, transformers, cupy; print(torch.__version__, transformers.__version__, cupy.__version__)" >> "$OUT/env.txt" 2>&1
step() {
  local name=$1 limit=$2; shift 2
  echo "== $name $(date +%T)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "rc=$? $name $(date +%T)"
  grep -v Warning "$OUT/$name.log" | tail -"${TAIL:-22}"
}
run() {
  case $1 in
    e2e) step e2e 110 python3 -m pytest tests/workers/test_gpu_end_to_end.py -q --tb=short -p no:cacheprovider ;;
    latency) step latency 100 python3 benchmarks/latency.py --shape llama3-8b --hf-baseline --iters 2 --hf-output-len 16 --results "$R" ;;
    tput8b) step tput8b 170 python3 benchmarks/throughput.py --shape llama3-8b --hf-baseline --breakdown \
              --breakdown-requests 128 --results "$R" --trace-file "$OUT/profile_8b.txt" ;;
    tputqwen) step tputqwen 100 python3 benchmarks/throughput.py --shape qwen2.5-0.5b --hf-baseline --hf-timeout 45 --results "$R" ;;
  esac
}
for s in ${@:-e2e latency tput8b tputqwen}; do run "$s"; done
