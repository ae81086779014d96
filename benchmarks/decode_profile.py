"""Where a decode graph replay's GPU time goes, per kernel, against a plain-matmul roofline.

Used by `latency.py --profile-replays` on its engine: for each batch size, the captured graph's
static inputs are set to a context of --profile-ctx tokens per sequence (distinct blocks), and
torch.profiler records --profile-reps replays; kernels are grouped by name (time per replay, share).
The roofline: each linear layer's [batch, in] x [in, out] product timed alone as plain
`torch.matmul` (CUDA-graph replays over several weight copies, so no weight stays in L2), summed
over the layers of one step, next to the weight bytes over the copy bandwidth of the same run.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from common import SHAPES, median_ms


def linear_shapes(shape: str) -> list[tuple[str, int, int, int]]:
    """(name, in, out, count per step) of every weight product of a decode step."""
    c = SHAPES[shape][1]
    h, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    head = h // c["num_attention_heads"]
    qkv = h + 2 * c["num_key_value_heads"] * head
    return [("qkv_proj", h, qkv, layers), ("o_proj", h, h, layers), ("gate_up_proj", h, 2 * inter, layers),
            ("down_proj", inter, h, layers), ("lm_head", h, c["vocab_size"], 1)]


def graph_replay_ms(graph: torch.cuda.CUDAGraph, reps: int = 20) -> float:
    """Median GPU time of one replay (3 warm-up replays first)."""
    return median_ms(graph.replay, reps=reps)


def graph_us_per_call(fn, calls: list[tuple]) -> float:
    """µs per fn(*args): every call run once eagerly, then all captured in one CUDA graph whose
    replays are timed (launch gaps inside the graph count, host time does not)."""
    for args in calls:
        fn(*args)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for args in calls:
            fn(*args)
    return graph_replay_ms(graph) * 1e3 / len(calls)


def replay_us(fn, x: torch.Tensor, weights: list[torch.Tensor]) -> float:
    """µs per fn(x, w), over every weight copy in one graph (so none stays in L2)."""
    return graph_us_per_call(fn, [(x, w) for w in weights])


def plain_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.matmul(x, w.t())


def matmul_roofline(shape: str, batch: int, dtype: torch.dtype, copies: int = 4) -> list[tuple[str, float, int]]:
    """(name, µs per product, weight bytes) of plain matmuls of the step's shapes."""
    rows = []
    for name, k, n, _ in linear_shapes(shape):
        weights = [torch.randn(n, k, device="cuda", dtype=dtype) for _ in range(copies)]
        x = torch.randn(batch, k, device="cuda", dtype=dtype)
        rows.append((name, replay_us(plain_matmul, x, weights), n * k * weights[0].element_size()))
        del weights
    return rows


def _set_context(graphs, bs: int, ctx: int, num_blocks: int, block_size: int) -> None:
    per_seq = -(-ctx // block_size)
    if bs * per_seq > num_blocks or per_seq > graphs.max_blocks:
        raise ValueError(f"--profile-ctx {ctx} x batch {bs} needs {bs * per_seq} blocks, have {num_blocks}")
    table = torch.arange(bs * per_seq, dtype=torch.int32, device="cuda").view(bs, per_seq)
    graphs.block_tables[:bs].zero_()
    graphs.block_tables[:bs, :per_seq].copy_(table)
    graphs.seq_lens[:bs].fill_(ctx)
    graphs.positions[:bs].fill_(ctx - 1)
    graphs.slot_mapping[:bs].fill_(-1)     # no cache writes: the replays leave the cache as it was


def profile_replay(graphs, bs: int, ctx: int, num_blocks: int, block_size: int, reps: int) -> tuple[float, list[tuple[str, int, float]]]:
    """(ms per replay by events, [(kernel, launches per replay, µs per replay)] by total time)."""
    from torch.profiler import ProfilerActivity, profile
    _set_context(graphs, bs, ctx, num_blocks, block_size)
    graph = graphs.graphs[bs]
    ms = graph_replay_ms(graph)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            graph.replay()
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            totals[evt.name] += evt.device_time if hasattr(evt, "device_time") else evt.cuda_time
            counts[evt.name] += 1
    rows = sorted(((name[:90], counts[name] // reps, t / reps) for name, t in totals.items()),
                  key=lambda r: -r[2])
    return ms, rows


def report(shape: str, graphs, num_blocks: int, block_size: int, batch_sizes: list[int], ctx: int, reps: int,
           dtype: torch.dtype, bandwidth_gbs: float) -> str:
    out = []
    for bs in batch_sizes:
        if bs not in graphs.graphs:
            out.append(f"batch {bs}: no graph captured")
            continue
        ms, rows = profile_replay(graphs, bs, ctx, num_blocks, block_size, reps)
        total = sum(t for _, _, t in rows)
        lines = [f"#### Decode graph replay, batch {bs}, context {ctx}: {ms:.3f} ms by events; "
                 f"kernels sum {total / 1e3:.3f} ms", "",
                 "| kernel | launches | µs / replay | share |", "|---|---|---|---|"]
        lines += [f"| `{n}` | {c} | {t:.1f} | {t / total:.1%} |" for n, c, t in rows[:18]]
        roof = matmul_roofline(shape, bs, dtype)
        counts = {name: cnt for name, _, _, cnt in linear_shapes(shape)}
        lines += ["", "| product | plain matmul µs (x count) | weight bytes / copy BW µs | matmul / bytes |",
                  "|---|---|---|---|"]
        step_us = 0.0
        for name, us, nbytes in roof:
            floor_us = nbytes / (bandwidth_gbs * 1e3)
            step_us += us * counts[name]
            lines.append(f"| {name} | {us:.1f} (x{counts[name]}) | {floor_us:.1f} | {us / floor_us:.2f}x |")
        lines.append(f"\nPlain matmuls of one step's weights: {step_us / 1e3:.3f} ms.")
        out.append("\n".join(lines))
    return "\n\n".join(out)
