"""Offline throughput: N requests of fixed input/output length through `LLM.generate`.

    python benchmarks/throughput.py --shape llama3-8b --hf-baseline
    python benchmarks/throughput.py --shape qwen2.5-0.5b --num-requests 1000 --hf-baseline
    python benchmarks/throughput.py --shape tiny --device cpu --num-requests 8   # a CPU check

Dummy (random) weights in the named shape, random prompt token ids, `ignore_eos`
so every request yields exactly --output-len tokens, prefix caching off. Reports
requests/s, output and total tokens/s, and the time over the compute floor
(common.workload_flops over the bf16 matmul rate measured in this run), and the fraction of
the run's wall time the GPU was idle (stage_timer.GpuIdleMeter: two CUDA events per step; "n/a"
on a CPU).
--hf-baseline runs the same prompts through HF `generate` first, in a subprocess
(hf_baseline.py), with --hf-num-requests requests (its rate is per batch, so it
does not depend on N beyond that). --breakdown reruns a smaller set with a
synchronising timer around each stage of a step (host vs GPU) and a short
torch.profiler trace; the main figure never runs with those.
"""
from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
import tempfile
import time

import torch

from common import (run_hf_baseline, SHAPES, add_model_flags, add_workload_flags, append_results, copy_bandwidth,
                    markdown_table, matmul_tflops, random_prompts, KERNEL_OPTION_HELP, kernel_options, require_min,
                    timed_generate, workload_flops, write_config)
from stage_timer import GpuIdleMeter, StageTimer, format_gpu_idle, gpu_idle_report, profile_steps



def run_hf(args) -> dict | None:
    cmd = ["throughput", "--shape", args.shape, "--hf-engine", ",".join(args.hf_engines),
           "--num-requests", str(args.hf_num_requests), "--batch-size", str(args.hf_batch_size),
           "--cb-num-requests", str(args.hf_cb_num_requests),
           "--input-len", str(args.input_len), "--output-len", str(args.output_len),
           "--temperature", str(args.temperature), "--device", args.device, "--seed", str(args.seed)]
    return run_hf_baseline(cmd, args.hf_timeout)


def build_llm(args, path: str):
    from pagedray.cluster import LLM
    kwargs = dict(load_format="dummy", dtype=args.dtype, device=args.device,
                  max_model_len=args.input_len + args.output_len, max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=False,
                  gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
                  seed=args.seed, async_scheduling=False if args.no_async_scheduling else None,
                  quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
                  kernel_options=kernel_options(args.kernel_option))
    if args.num_kv_blocks:
        kwargs["num_kv_blocks"] = args.num_kv_blocks
    return LLM(path, **kwargs)


def generate(llm, prompts: list[list[int]], args, output_len: int | None = None) -> float:
    return timed_generate(llm, prompts, args.temperature, output_len or args.output_len)


def graph_replays(llm) -> int:
    graphs = getattr(llm.llm_engine.executor.worker.runner, "graphs", None)
    return graphs.num_replays if graphs is not None else 0


def triton_variants() -> int:
    """How many variants of the Triton prefill kernel this process compiled (each ~1 s: one first
    needed mid-run is a stall), or -1 where Triton does not say."""
    try:
        from pagedray.kernels import prefill_triton
        return sum(len(caches[0]) for caches in prefill_triton._prefill_kernel.device_caches.values())
    except (ImportError, AttributeError, TypeError, IndexError):
        return -1


def allocator_counts() -> dict[str, int]:
    """PyTorch caching-allocator events: cudaMalloc/cudaFree calls, and retries (an allocation that
    failed, so every cached block was freed and the device synchronised, before it was tried again)."""
    if not torch.cuda.is_available():
        return {}
    stats = torch.cuda.memory_stats()
    return {k: int(stats.get(k, 0)) for k in ("num_alloc_retries", "num_device_alloc", "num_device_free")}


def main(argv=None) -> int:
    args = parse_args(argv)
    # Kernel variants compiled mid-run show up as timed log lines.
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("pagedray.kernels._compile").setLevel(logging.INFO)
    cuda = args.device.startswith("cuda")
    tflops = matmul_tflops() if cuda else None
    bandwidth = copy_bandwidth() if cuda else None
    hf = run_hf(args) if args.hf_baseline else None
    vocab = SHAPES[args.shape][1]["vocab_size"]
    prompts = random_prompts(args.num_requests, args.input_len, vocab, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        llm = build_llm(args, write_config(args.shape, tmp))
        startup = time.perf_counter() - start
        args.kv_blocks = llm.llm_engine.num_kv_blocks
        # Compiles the Triton kernels' shapes: enough requests to fill whole token budgets and mixed steps.
        generate(llm, prompts[:args.warmup_requests], args, args.warmup_output_len)
        serial = []
        if args.serial_too and llm.llm_engine.async_scheduling:
            # Before the main run, so that any warm-up left favours the overlapped run less, not more.
            with HostWait() as wait:
                t = _serial(llm, lambda: generate(llm, prompts, args))
            serial.append((False, t, wait.seconds))
            print(f"steps not overlapped: {t:.2f} s, host blocked {wait.seconds:.2f} s", flush=True)
        if args.main_runs == 0:   # a diagnostic call: the profiled run is the first after the warm-up
            _print_profiles(llm, prompts, args)
            llm.shutdown()
            return 0
        replays0 = graph_replays(llm)
        variants0, allocs0 = triton_variants(), allocator_counts()
        elapsed, blocked, counter, idle = counted_run(llm, prompts, args)
        allocs = {k: v - allocs0.get(k, 0) for k, v in allocator_counts().items()}
        print(f"main run: {elapsed:.2f} s, host blocked {blocked:.2f} s; Triton prefill variants "
              f"compiled during it: {triton_variants() - variants0}; caching allocator during it: {allocs}",
              flush=True)
        print(counter.wall_summary(), flush=True)
        print(format_gpu_idle(idle), flush=True)
        replays = graph_replays(llm) - replays0
        for again in range(1, args.main_runs):
            t, again_blocked, again_counter, again_idle = counted_run(llm, prompts, args)
            print(f"main workload, run {again + 1} (not the reported figure): {t:.2f} s, host blocked "
                  f"{again_blocked:.2f} s. {again_counter.wall_summary()} {format_gpu_idle(again_idle)}",
                  flush=True)
        breakdown = _serial(llm, lambda: run_breakdown(llm, prompts, args)) if args.breakdown else None
        if args.gpu_idle and cuda:
            # A decode-only stretch (batch max_num_seqs) and a stretch across a wave's refill.
            n = args.max_num_seqs
            print(gpu_idle_report(llm, prompts[:n], args, 80, 30, "decode-only window"), flush=True)
            print(gpu_idle_report(llm, prompts[:2 * n], args, args.output_len - 10, 60,
                                  "window across a refill"), flush=True)
        _print_profiles(llm, prompts, args)
        llm.shutdown()
    report(args, startup, (elapsed, blocked), counter, replays, tflops, bandwidth, hf, breakdown, serial, idle)
    return 0


def counted_run(llm, prompts: list[list[int]], args) -> tuple[float, float, StageTimer, dict]:
    """One run of the workload: its seconds, the seconds the host was blocked on the GPU, the
    step counter (step kinds, wall time between steps) and the GPU-idle figures (GpuIdleMeter)."""
    counter = StageTimer(llm, sync=False, count_only=True)
    meter = GpuIdleMeter(llm)
    try:
        with HostWait() as wait:
            elapsed = generate(llm, prompts, args)
    finally:
        meter.restore()
        counter.restore()
    return elapsed, wait.seconds, counter, meter.summary(elapsed)


def _print_profiles(llm, prompts, args) -> None:
    for first, last in args.profile_steps:
        # gpu_idle_report's profiler warms up for 2 steps before it records.
        print(gpu_idle_report(llm, prompts, args, max(0, first - 3), last - first + 1,
                              f"main workload again, steps {first}-{last}", top=12), flush=True)


class HostWait:
    """Seconds the host spent blocked on CUDA events (the engine waiting for a step's samples)."""

    def __enter__(self) -> "HostWait":
        self.seconds, self._orig = 0.0, torch.cuda.Event.synchronize

        def timed(event):
            start = time.perf_counter()
            self._orig(event)
            self.seconds += time.perf_counter() - start

        torch.cuda.Event.synchronize = timed
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.Event.synchronize = self._orig


def _serial(llm, fn):
    """fn() with the engine's steps not overlapped (each step's output read before the next is
    scheduled): the synchronising breakdown times stages in series, and --serial-too compares."""
    engine = getattr(llm.llm_engine, "core", llm.llm_engine)   # the loop lives in the engine core
    overlapped, engine.async_scheduling = engine.async_scheduling, False
    try:
        return fn()
    finally:
        engine.async_scheduling = overlapped


def run_breakdown(llm, prompts, args) -> tuple[StageTimer, str]:
    timer = StageTimer(llm, sync=args.device.startswith("cuda"))
    generate(llm, prompts[:args.breakdown_requests], args)
    timer.restore()
    trace = profile_steps(llm, prompts[:args.breakdown_requests], args) if args.device.startswith("cuda") else ""
    return timer, trace


def report(args, startup, timed, counter, replays, tflops, bandwidth, hf, breakdown, serial=(), idle=None) -> None:
    elapsed, wait = timed
    n, inp, out = args.num_requests, args.input_len, args.output_len
    floor_s = workload_flops(args.shape, n, inp, out) / (tflops * 1e12) if tflops else None
    idle = idle or {"gpu_idle": "n/a"}
    idle_cell = idle["gpu_idle"] if idle["gpu_idle"] == "n/a" else f"{idle['gpu_idle']:.1%}"
    header = ["engine", "requests", "time (s)", "req/s", "output tok/s", "total tok/s", "time / compute floor",
              "host blocked on the GPU (s)", "GPU idle"]
    mode = " (eager)" if args.enforce_eager else ""
    mode += "" if args.no_async_scheduling or not args.device.startswith("cuda") else ", overlapped steps"
    rows = [["pagedray" + mode, n, f"{elapsed:.2f}", f"{n / elapsed:.2f}",
             f"{n * out / elapsed:.0f}", f"{n * (inp + out) / elapsed:.0f}",
             f"{elapsed / floor_s:.2f}x" if floor_s else "-", f"{wait:.2f}", idle_cell]]
    for overlapped, t, w in serial:
        rows.append([f"pagedray, {'overlapped steps' if overlapped else 'steps not overlapped'} (same engine, "
                     "run before the main one)", n, f"{t:.2f}", f"{n / t:.2f}", f"{n * out / t:.0f}", f"{n * (inp + out) / t:.0f}",
                     f"{t / floor_s:.2f}x" if floor_s else "-", f"{w:.2f}", "-"])
    for run in (hf or {}).get("runs", []):
        hf_floor = workload_flops(args.shape, run["num_requests"], inp, out) / (tflops * 1e12) if tflops else None
        how = (f"generate (batch {run['batch_size']})" if run["engine"] == "generate"
               else f"generate_batch (continuous batching; call {run.get('wall_s', 0):.1f} s with its set-up)")
        rows.append([f"HF transformers {hf['transformers']} {how}",
                     run["num_requests"], f"{run['elapsed_s']:.2f}", f"{run['requests_per_s']:.2f}",
                     f"{run['output_tok_per_s']:.0f}", f"{run['total_tok_per_s']:.0f}",
                     f"{run['elapsed_s'] / hf_floor:.2f}x" if hf_floor else "-", "-", "-"])
    table = markdown_table(header, rows)
    notes = [f"KV blocks {getattr(args, 'kv_blocks', '-')}; quantization={args.quantization}, kv_cache_dtype={args.kv_cache_dtype}.",
             f"Shape {args.shape}, dummy weights, {args.dtype}, {n} x {inp}/{out} tokens, ignore_eos, "
             f"temperature {args.temperature}, max_num_seqs {args.max_num_seqs}, "
             f"max_num_batched_tokens {args.max_num_batched_tokens or 'default'}, prefix caching off; "
             f"untimed warm-up of {args.warmup_requests} requests x {args.warmup_output_len or out} tokens.",
             f"Engine start-up (dummy load, profiling, KV allocation, graph capture): {startup:.1f} s "
             "(not in the time).",
             f"Steps: {counter.steps} ({counter.decode_steps} decode-only, {replays} served by CUDA graphs, "
             f"{counter.steps - counter.decode_steps} with prefill tokens).",
             format_gpu_idle(idle) + "."]
    if tflops:
        notes.append(f"Ceilings measured in this run: bf16 8192^3 matmul {tflops:.0f} TFLOP/s, "
                     f"device copy {bandwidth:.0f} GB/s. Compute floor: {floor_s:.2f} s for "
                     f"{workload_flops(args.shape, n, inp, out) / 1e15:.2f} PFLOP.")
    if hf:
        notes.append("HF peers in a subprocess of this run, each on the request count of its row "
                     f"(model init {hf['load_s']:.0f} s not counted).")
    body = table + "\n\n" + "\n".join(f"- {x}" for x in notes)
    if breakdown:
        timer, trace = breakdown
        body += ("\n\nStage breakdown (synchronising timer, separate run of "
                 f"{args.breakdown_requests} requests):\n\n" + timer.table())
        if trace and args.trace_file:
            pathlib.Path(args.trace_file).write_text(trace)
    print(body, flush=True)
    figures = {"req/s": round(n / elapsed, 2), "output tok/s": round(n * out / elapsed), "time (s)": round(elapsed, 2),
               "GPU idle": idle_cell}
    if floor_s:
        figures["time / compute floor"] = f"{elapsed / floor_s:.2f}x"
    anchors = {f"HF {run['engine']} (same run)": f"{run['requests_per_s']:.2f} req/s" for run in (hf or {}).get("runs", [])}
    fp8 = (["fp8"] if args.quantization else []) + (["fp8 KV"] if args.kv_cache_dtype == "fp8" else [])
    figures["KV blocks"] = args.kv_blocks
    name = f"{args.shape}{' ' + '+'.join(fp8) if fp8 else ''}, {n} x {inp}/{out}"  # FP8 runs: their own rows
    append_results(name, body, args.results, figures=figures, anchors=anchors)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    add_workload_flags(p)
    p.add_argument("--temperature", type=float, default=1.0, help="vLLM's benchmark samples at 1.0")
    p.add_argument("--quantization", choices=["fp8"], default=None, help="fp8: weights quantized at load")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--no-async-scheduling", action="store_true", help="read each step before the next")
    p.add_argument("--serial-too", action="store_true",
                   help="time the workload with steps not overlapped too, before the main run (same engine)")
    p.add_argument("--warmup-requests", type=int, default=16)
    p.add_argument("--warmup-output-len", type=int, default=None, help="default: --output-len")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hf-baseline", action="store_true")
    p.add_argument("--hf-timeout", type=float, default=600.0, help="seconds before the HF run is given up")
    p.add_argument("--hf-num-requests", type=int, default=256)
    p.add_argument("--hf-batch-size", type=int, default=256)
    p.add_argument("--hf-engines", type=lambda t: [e for e in t.split(",") if e],
                   default=["generate", "generate_batch"], help="HF peers: generate, generate_batch")
    p.add_argument("--hf-cb-num-requests", type=int, default=256, help="requests through generate_batch")
    p.add_argument("--breakdown", action="store_true")
    p.add_argument("--kernel-option", action="append", default=[], help=KERNEL_OPTION_HELP)
    p.add_argument("--gpu-idle", action="store_true", help="profile two windows of the overlapped loop: GPU busy vs idle")
    p.add_argument("--breakdown-requests", type=int, default=256)
    p.add_argument("--main-runs", type=int, default=1,
                   help="run the main workload this many times; the figure is the first, the rest are printed "
                        "(0: no figure, only the --profile-steps runs)")
    p.add_argument("--profile-steps", action="append", default=[],
                   type=lambda t: tuple(int(x) for x in t.split("-")),
                   help="FIRST-LAST: the main workload again under torch.profiler for those steps (1-based): "
                        "longest kernels, GPU idle gaps, GPU time by kernel")
    p.add_argument("--trace-file", default=os.path.join(os.environ.get("OUT", "."), "throughput_profile.txt"))
    p.add_argument("--results", default=None, help="also append the table to this markdown file (the run is always recorded in benchmarks/records/)")
    args = p.parse_args(argv)
    require_min(args, 1, "num_requests", "input_len", "output_len", "max_num_seqs", "warmup_requests",
                "warmup_output_len", "hf_num_requests", "hf_batch_size", "hf_cb_num_requests",
                "breakdown_requests")
    return args


if __name__ == "__main__":
    sys.exit(main())
