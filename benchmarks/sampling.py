"""Sampling one decode step's logits: the Sampler's vocab-wide passes against the one-pass kernel.

    python benchmarks/sampling.py [--rows 1 32 256] [--vocab 128256] [--results FILE]

bf16 logits [rows, vocab]; temperature 1.0 (vLLM's default) and greedy rows. Columns: `Sampler.sample`
with FUSED_SAMPLING off (the passes before the kernel, "today") and on, and the kernel alone (`sample_cuda.race_sample`; for greedy
batches the Sampler keeps its single torch.argmax, so the kernel is the fused figure). GPU time is the
median over trials of a run of calls queued behind a sleeping kernel, so the calls run back to back
and host launch gaps are excluded; host µs is the wall time the host spends queueing one call. The
floor is the logits' bytes (read once) over the device-to-device copy bandwidth of the same run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from common import append_results, copy_bandwidth, markdown_table

from pagedray.kernels import reference, sample_cuda
from pagedray.kernels import options as kernel_options
from pagedray.workers.sampler import Sampler, SamplingRow
from pagedray.common.sampling_params import SamplingParams

HEADER = ["rows x vocab", "mode", "Sampler µs (today)", "Sampler µs (fused)", "speedup", "kernel µs",
          "floor µs", "kernel % of floor", "host µs today / fused", "check"]


def _sleep_cycles_per_ms() -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1000)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    return 10_000_000 / start.elapsed_time(end)


def timed(fn, cycles_per_ms: float, reps: int = 20, trials: int = 5) -> tuple[float, float, bool]:
    """(median GPU µs per call, median host µs per call, whether the queue ever ran dry)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    host_once_ms = (time.perf_counter() - t0) * 1e3
    gpu, host, dry = [], [], False
    for _ in range(trials):
        sleep_ms = 3 * reps * host_once_ms + 2.0
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(int(sleep_ms * cycles_per_ms))
        t0 = time.perf_counter()
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        queued_ms = (time.perf_counter() - t0) * 1e3
        end.synchronize()
        dry |= queued_ms > sleep_ms
        gpu.append(start.elapsed_time(end) * 1e3 / reps)
        host.append(queued_ms * 1e3 / reps)
    return statistics.median(gpu), statistics.median(host), dry


def bench(rows: int, vocab: int, mode: str, bw_gbs: float, cycles_per_ms: float) -> list[object]:
    g = torch.Generator(device="cuda").manual_seed(rows)
    logits = (torch.randn(rows, vocab, device="cuda", generator=g) * 3).to(torch.bfloat16)
    temperature = 1.0 if mode == "temperature" else 0.0
    rows_ = [SamplingRow(SamplingParams(temperature=temperature), [1], []) for _ in range(rows)]
    sampler = Sampler(seed=0)

    def call():
        return sampler.sample(logits, rows_)
    with kernel_options.override(fused_sampling=False):
        today, host_today, dry1 = timed(call, cycles_per_ms)
    with kernel_options.override(fused_sampling=True):
        fused, host_fused, dry2 = timed(call, cycles_per_ms)
    temps = torch.full((rows,), temperature, device="cuda")
    keys = torch.randint(0, 1 << 32, (rows, 2), device="cuda", generator=g)
    kernel, _, dry3 = timed(lambda: sample_cuda.race_sample(logits, temps, keys), cycles_per_ms)
    if mode == "greedy":
        fused = kernel   # the Sampler's greedy batch is one torch.argmax either way
        same = torch.equal(sample_cuda.race_sample(logits, temps, keys), logits.argmax(-1))
        check = "== argmax" if same else "**differs from argmax**"
    else:
        got = sample_cuda.race_sample(logits, temps, keys)
        agree = (got == reference.race_sample(logits, temps, keys)).float().mean().item()
        check = f"{100 * agree:.1f}% rows == reference"
    if dry1 or dry2 or dry3:
        check += "; queue ran dry (GPU time includes host gaps)"
    floor = rows * vocab * logits.element_size() / (bw_gbs * 1e3)   # µs
    return [f"{rows} x {vocab}", mode, f"{today:.1f}", f"{fused:.1f}", f"{today / fused:.1f}x", f"{kernel:.1f}",
            f"{floor:.1f}", f"{100 * floor / kernel:.0f}%", f"{host_today:.0f} / {host_fused:.0f}", check]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 32, 256])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--results", default=None, help="append the table to this markdown file")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 1
    bw = copy_bandwidth()
    cycles = _sleep_cycles_per_ms()
    table = []
    for rows in args.rows:
        for mode in ("temperature", "greedy"):
            table.append(bench(rows, args.vocab, mode, bw, cycles))
            print(" | ".join(str(x) for x in table[-1]), flush=True)
    body = markdown_table(HEADER, table) + f"\n\nCopy bandwidth {bw:.0f} GB/s (read + written).\n"
    print(body)
    append_results("Sampling one step's logits: Sampler passes vs the one-pass kernel", body, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
