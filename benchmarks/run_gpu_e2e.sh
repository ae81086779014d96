#!/bin/bash
# One device call for the end-to-end GPU work: the GPU correctness and kernel tests, then the
# throughput, latency (with a per-kernel profile of decode replays), shared-prefix and Qwen-shape
# benchmarks with their HF peers. Logs and results go to $OUT.
#   bash benchmarks/run_gpu_e2e.sh [steps...]   (default: e2e kernels tput8b latency shared tputqwen)
# overlap: overlapped vs not-overlapped steps alone (no HF peers, ~75 s); shared: 200 requests
# (shared1000: the full 1000, ~2 min at 8B); tput8b includes both HF peers (~3 min) at the batch and budget
# of the recorded figure; tput8b-profile: the default batch with the stage breakdown and a trace.
# fp8, fp8tput, fp8kv: FP8 tests and benchmarks beside bf16 in the same call (not in the default list);
# pacing: prefill pacing off vs on under Poisson load (not in the default list).
# tputqwen-ab: the Qwen shape on a baseline tree ($BASE_TREE) and on this one (not in the default list).
# flash, loraprof, spec: what is still unmeasured from 2026-12-05 (not in the default list).
# gpusuite: every test file that runs on CUDA, in one process (~8 min on an H100; not in the default list):
# engines built one after another in one process are what exposed profile_run's out-of-bounds read.
# specoverlap: n-gram speculation with overlapped vs serial steps (oracle/random proposals; not in the default list).
# specbackoff: speculation's per-request back-off, on vs off, overlapped and serial (not in the default list).
# $OUT defaults to benchmarks/gpu-runs/<time>; each benchmark's record goes to $OUT/records (copy the files
# into benchmarks/records/ and run `python benchmarks/records.py` to update RESULTS.md).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/gpu-runs/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
export PAGEDRAY_RECORDS_DIR=${PAGEDRAY_RECORDS_DIR:-$OUT/records}
R=$OUT/results.md
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv > "$OUT/env.txt" 2>&1
python3 -c "import torch, transformers, cupy; print(torch.__version__, transformers.__version__, cupy.__version__)" >> "$OUT/env.txt" 2>&1
step() {
  local name=$1 limit=$2; shift 2
  echo "== $name $(date +%T)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "rc=$? $name $(date +%T)"
  grep -v Warning "$OUT/$name.log" | tail -"${TAIL:-14}"
}
run() {
  case $1 in
    e2e) step e2e 60 python3 -m pytest tests/workers/test_gpu_end_to_end.py -q --tb=short -p no:cacheprovider ;;
    kernels) step kernels 420 python3 -m pytest tests/kernels -q --tb=short -p no:cacheprovider ;;
    gpusuite) step gpusuite 580 python3 -m pytest -q --tb=short -p no:cacheprovider tests/kernels \
                $(grep -rlE "cuda.is_available|needs a CUDA" tests --include='test_*.py' | grep -v '^tests/kernels/' | sort) ;;
    overlap) step overlap 100 python3 benchmarks/throughput.py --shape llama3-8b --serial-too --results "$R" ;;
    latency) step latency 95 python3 benchmarks/latency.py --shape llama3-8b --hf-baseline --iters 2 --hf-output-len 16 \
               --batch-sizes 1,32,256 --hf-batch-sizes 1,32 --profile-replays 1,256 --results "$R" ;;
    tput8b) step tput8b 200 python3 benchmarks/throughput.py --shape llama3-8b --max-num-seqs 1024 --max-num-batched-tokens 16384 \
              --warmup-requests 1024 --warmup-output-len 8 --hf-baseline --hf-cb-num-requests 128 --hf-timeout 110 \
              --results "$R" ;;
    tput8b-profile) step tput8b-profile 180 python3 benchmarks/throughput.py --shape llama3-8b --serial-too --breakdown \
              --breakdown-requests 64 --results "$R" --trace-file "$OUT/profile_8b.txt" ;;
    shared) step shared 60 python3 benchmarks/shared_prefix.py --shape llama3-8b --num-requests 200 --max-num-seqs 128 \
              --results "$R" ;;
    shared1000) step shared1000 150 python3 benchmarks/shared_prefix.py --shape llama3-8b --max-num-seqs 512 \
                  --max-num-batched-tokens 8192 --results "$R" ;;
    # FP8 (issue 25): tests; kernels vs bf16 and the weight-bytes floor; batch-1 decode bf16 vs fp8 (~3.5 min).
    fp8) step fp8-tests 150 python3 -m pytest tests/kernels/test_fp8_kernels.py tests/kernels/test_fp8_kv_cache.py \
           tests/workers/test_gpu_fp8.py -q --tb=short -p no:cacheprovider
         step fp8-kernels 60 python3 benchmarks/fp8.py --results "$R"
         for q in "" "--quantization fp8"; do
           step "fp8-latency${q:+-fp8}" 70 python3 benchmarks/latency.py --shape llama3-8b --batch-sizes 1 --iters 2 \
             --output-len 64 $q --results "$R"
         done ;;
    # 1000 x 256/256, bf16 then fp8 weights, same settings (~4 min).
    fp8tput) for q in "" "--quantization fp8"; do
               step "fp8tput${q:+-fp8}" 130 python3 benchmarks/throughput.py --shape llama3-8b --max-num-seqs 1024 \
                 --max-num-batched-tokens 16384 --warmup-requests 256 --warmup-output-len 4 $q --results "$R"
             done ;;
    # FP8 KV cache at a long context: KV blocks and throughput, fp8 weights, bf16 vs fp8 cache (~5 min).
    fp8kv) for kv in auto fp8; do
             step "fp8kv-$kv" 160 python3 benchmarks/throughput.py --shape llama3-8b --num-requests 1000 --input-len 2048 \
               --output-len 256 --max-num-seqs 1024 --max-num-batched-tokens 16384 --warmup-requests 64 \
               --warmup-output-len 4 --quantization fp8 --kv-cache-dtype $kv --results "$R"
           done ;;
    # Prefill pacing off vs on (issue 26): the CUDA step timer's test, what a mixed step costs next to 64 decodes
    # (launch- or compute-bound: ~40 s), then Poisson 20 req/s, 500 x 256/256, each side with a decode-only
    # reference at its mean running batch (~2.5 min).
    # (pacing's server is `pagedray serve`: the device needs grpcio, grpcio-health-checking, grpcio-reflection
    # and protobuf — carry their cp312 wheels; without them the server exits with 2, as on 2026-12-05.)
    pacing) step pacing-tests 60 python3 -m pytest tests/cluster/core/test_step_pacing_engine.py -q --tb=short \
              -p no:cacheprovider
            step mixed-steps 120 python3 benchmarks/mixed_steps.py --shape llama3-8b --batch 64 --context 384
            step pacing 330 python3 benchmarks/serving.py --synthetic 8b --device cuda:0 --compare-pacing 1.25 \
              --num-prompts 500 --input-len 256 --output-len 256 --request-rate 20 --json "$OUT/pacing.json" ;;
    # Qwen2.5-0.5B shape at batch ~1000 (host-bound): the engine of $BASE_TREE (a `git archive` of the
    # baseline commit $BASE_COMMIT; benchmarks/base_tree.sh), then this tree's, same settings, each with
    # its GPU-idle fraction (~3 min).
    tputqwen-ab) for side in base new; do
                   pre=(); [ "$side" = base ] && pre=(env PAGEDRAY_COMMIT="${BASE_COMMIT:-base}" bash benchmarks/base_tree.sh "${BASE_TREE:-.base}")
                   step "tputqwen-$side" 120 ${pre[@]+"${pre[@]}"} python3 benchmarks/throughput.py --shape qwen2.5-0.5b \
                     --max-num-seqs 1024 --max-num-batched-tokens 16384 --warmup-requests 1024 --warmup-output-len 8 \
                     --results "$R"
                 done ;;
    # What the session of 2026-12-05 could not run (its device time ran out), in the order to run it:
    # the flash prefill kernel in the engine (the gate to making it the default), LoRA's kernel profile,
    # speculative decoding's open figures, then the issue-26 runs above (tput8b with the flash kernel).
    flash) step flash-tests 200 python3 -m pytest tests/kernels/test_prefill_flash.py tests/workers/test_gpu_prefill_flash.py \
             tests/kernels/test_prefill_triton.py -q --tb=short -p no:cacheprovider
           step flash-tput 220 python3 benchmarks/throughput.py --shape llama3-8b --max-num-seqs 1024 \
             --max-num-batched-tokens 16384 --warmup-requests 1024 --warmup-output-len 8 --results "$R" \
             --kernel-option prefill_backend=triton_flash --kernel-option prefill_variant.BLOCK_N=128 \
             --kernel-option prefill_variant.NEW_KV=2 ;;
    loraprof) step lora-gpu-tests 120 python3 -m pytest tests/workers/test_spec_decode_gpu.py -k lora -q --tb=short \
                -p no:cacheprovider
              step loraprof 200 python3 benchmarks/lora.py --shape llama3-8b --num-requests 300 --profile-steps 24 ;;
    # (--part smollm2 needs the default model, whose 93 MB GGUF does not fit the lent machines' 64 MiB transfer.)
    spec) step spec-drafts 420 python3 benchmarks/spec_decode.py --part 8b --runs draft_identical,draft_small,eagle --serial-too
          step spec-batch64 300 python3 benchmarks/spec_decode.py --part batch64 --runs oracle,random,ngram ;;
    # n-gram speculation's deferred verification read (h27host): its GPU tests, then oracle/random proposals
    # overlapped vs serial at batch 1 beside the baseline (the <= 5 % goal with acceptance 0).
    specoverlap) step spec-ngram-gpu-tests 150 python3 -m pytest tests/workers/test_spec_decode_gpu.py -k ngram -q \
                   --tb=short -p no:cacheprovider
                 step spec-overlap 420 python3 benchmarks/spec_decode.py --part 8b --runs oracle,random --overlap ;;
    # back-off of failing proposals (h27back): the GPU test of deferred paused steps under graphs, then
    # oracle/random at batch 1 with back-off on (the default) and off (every step verifies) beside the baseline.
    specbackoff) step spec-backoff-gpu-tests 150 python3 -m pytest tests/workers/test_spec_decode_gpu.py -k "ngram or backed_off" \
                   -q --tb=short -p no:cacheprovider
                 step spec-backoff 600 python3 benchmarks/spec_decode.py --part 8b --runs oracle,random --overlap \
                   --backoff-off-too --repeats 1 ;;
    tputqwen) step tputqwen 90 python3 benchmarks/throughput.py --shape qwen2.5-0.5b --hf-baseline --hf-engines generate \
                --hf-timeout 30 --results "$R" ;;
  esac
}
for s in ${@:-e2e kernels tput8b latency shared tputqwen}; do run "$s"; done
