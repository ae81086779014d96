"""Mixed-step cost: what a step carrying a prefill chunk costs next to B running decodes, against the
decode-only step at the same batch (CUDA graph, and eager) and the step's floor. It tells whether mixed
steps (which run eagerly) are bound by their launches, so that CUDA graphs for them would pay, or by
their compute, so that only fewer or cheaper prefill tokens help (issue 26).

    python benchmarks/mixed_steps.py --shape llama3-8b --batch 64 --chunks 0,64,128,256,512,1024,2048
    python benchmarks/mixed_steps.py --shape tiny --device cpu --batch 4 --chunks 0,16,64   # CPU check

B requests of --context tokens are prefilled, then each measured step is: a new request of `chunk`
prompt tokens (max_tokens=1: it ends in that step) next to the B decodes; chunk 0 is a decode-only
step. Steps run one at a time (no overlap), so each is timed alone. "span" is the runner's step
time (CUDA events from the step's first work to its samples: launch gaps included), "wall" the
engine's step() as the host sees it. Floor: max(weights read once over the copy bandwidth, 2 x layer
params x tokens over the matmul rate), both measured in this run. Last, the same decode-only step
with the graphs detached (eager): the launch-bound cost of any eager step at this batch.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch

from common import (SHAPES, copy_bandwidth, markdown_table, matmul_tflops, param_counts, random_prompts, record,
                    write_config)


def _engine(args, tmp: str):
    from pagedray.cluster.core.engine_core import EngineCore
    return EngineCore.from_kwargs(
        write_config(args.shape, tmp), load_format="dummy", dtype=args.dtype, device=args.device,
        max_model_len=args.context + args.max_tokens + 8, max_num_seqs=max(256, args.batch + 1),
        max_num_batched_tokens=args.batch + max(args.chunks), enable_prefix_caching=False,
        async_scheduling=False, gpu_memory_utilization=args.gpu_memory_utilization)


class _Spy:
    """The runner's step time of each step, as it reaches the scheduler."""

    def __init__(self, scheduler) -> None:
        self.span: float | None = None
        self._update = scheduler.update_from_output
        scheduler.update_from_output = self

    def __call__(self, sched, runner_out):
        self.span = runner_out.step_time_s
        return self._update(sched, runner_out)


def measure(core, args, vocab: int) -> tuple[dict[int, list[tuple[float, float]]], list[tuple[float, float]]]:
    from pagedray.cluster.core.messages import CoreRequest
    from pagedray.common.sampling_params import SamplingParams
    spy = _Spy(core.scheduler)
    greedy = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)  # noqa: E731
    core.add([CoreRequest(f"d{i}", p, greedy(args.max_tokens))
              for i, p in enumerate(random_prompts(args.batch, args.context, vocab, args.seed))])
    while core.scheduler.num_waiting or any(r.num_output_tokens == 0 for r in core.scheduler.running):
        core.step()
    n = 0

    def one(chunk: int) -> tuple[float, float]:
        nonlocal n
        if chunk:
            n += 1
            core.add([CoreRequest(f"p{n}", random_prompts(1, chunk, vocab, args.seed + n)[0], greedy(1))])
        start = time.perf_counter()
        core.step()
        return 1e3 * spy.span, 1e3 * (time.perf_counter() - start)

    for chunk in args.chunks:   # warm-up: kernel compiles, allocator growth
        one(chunk)
    times: dict[int, list[tuple[float, float]]] = {c: [] for c in args.chunks}
    for _ in range(args.repeats):
        for chunk in args.chunks:
            times[chunk].append(one(chunk))
    runner = core.executor.worker.runner
    graphs, runner.graphs = runner.graphs, None
    eager = [one(0) for _ in range(args.repeats)]
    runner.graphs = graphs
    return times, eager


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=list(SHAPES), default="llama3-8b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, default=64, help="running decodes next to each chunk")
    p.add_argument("--context", type=int, default=384, help="their context (prompt) length")
    p.add_argument("--chunks", type=lambda s: [int(x) for x in s.split(",")], default=[0, 64, 128, 256, 512, 1024, 2048])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if 0 not in args.chunks:
        args.chunks = [0] + args.chunks
    args.max_tokens = (len(args.chunks) + 2) * (args.repeats + 2) + 16
    cuda = args.device.startswith("cuda")
    tflops, bandwidth = (matmul_tflops(), copy_bandwidth()) if cuda else (None, None)
    params = param_counts(args.shape)
    weight_bytes = 2 * (params["layers"] + params["lm_head"])
    vocab = SHAPES[args.shape][1]["vocab_size"]
    with tempfile.TemporaryDirectory() as tmp:
        core = _engine(args, tmp)
        try:
            times, eager = measure(core, args, vocab)
        finally:
            core.shutdown()
    med = lambda xs, i: statistics.median(x[i] for x in xs)  # noqa: E731
    decode_span = med(times[0], 0)
    rows = []
    for chunk in args.chunks:
        floor = None
        if cuda:
            floor = 1e3 * max(weight_bytes / (bandwidth * 1e9), 2 * params["layers"] * (args.batch + chunk) / (tflops * 1e12))
        rows.append([f"{chunk}" if chunk else "0 (decode only)", f"{med(times[chunk], 0):.2f}",
                     f"{med(times[chunk], 1):.2f}", f"{floor:.2f}" if floor else "-",
                     f"{med(times[chunk], 0) / decode_span:.2f}x"])
    rows.append(["0 (decode only, graphs detached: eager)", f"{med(eager, 0):.2f}", f"{med(eager, 1):.2f}", "-",
                 f"{med(eager, 0) / decode_span:.2f}x"])
    table = markdown_table(["prefill chunk (tokens)", "span (ms)", "wall (ms)", "floor (ms)", "span / decode step"],
                           rows)
    notes = (f"{args.shape}, dummy weights, {args.dtype}; {args.batch} decodes at context ~{args.context}; "
             f"medians of {args.repeats}" + (f"; matmul {tflops:.0f} TFLOP/s, copy {bandwidth:.0f} GB/s" if cuda else ""))
    print(table)
    print(notes)
    figures = {f"chunk {c} span (ms)": round(med(times[c], 0), 2) for c in args.chunks}
    figures["decode-only eager span (ms)"] = round(med(eager, 0), 2)
    record(f"{args.shape} mixed steps next to {args.batch} decodes", figures, table + "\n\n" + notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
