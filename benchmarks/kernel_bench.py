"""Kernel benchmark: each CUDA kernel against its PyTorch reference and the HBM roofline.

    python benchmarks/kernel_bench.py [--results FILE]

The roofline is the fewest bytes a kernel must move (inputs read once, outputs
written once) over the device-to-device copy bandwidth measured in the same
run (bytes read + written). CUDA kernels are timed as CUDA-graph replays of
several calls (launch gaps excluded), references eagerly; medians of several
trials, with CUDA events. Sizes exceed the L2 cache.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys

import torch

from pagedray.kernels import attention_cuda, cache_ops, elementwise, reference
from pagedray.kernels import options as kernel_options


def bench(fn, reps: int = 10, trials: int = 7, graph: bool = True) -> float:
    """Median milliseconds per call."""
    fn()
    fn()
    torch.cuda.synchronize()
    g = None
    if graph:
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            for _ in range(reps):
                fn()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        if g is not None:
            g.replay()
        else:
            for _ in range(reps):
                fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def ref_bench(fn) -> float:
    """References run eagerly: some are not capturable (boolean indexing, host tensors)."""
    return bench(fn, reps=3, trials=5, graph=False)


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy, counting bytes read and written."""
    a = torch.randint(0, 255, (1 << 30,), dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(200):  # about half a second of copies first: clocks leave their idle state
        b.copy_(a)
    # Eagerly: inside a CUDA graph the copy becomes a memcpy node that ran ~35% slower on an H200.
    ms = bench(lambda: b.copy_(a), reps=10, trials=9, graph=False)
    return 2 * a.numel() / (ms * 1e-3)


class Table:
    def __init__(self, copy_bw: float) -> None:
        self.copy_bw = copy_bw
        self.rows: list[tuple[str, ...]] = []

    def add(self, name: str, shape: str, nbytes: float, cuda_ms: float, ref_ms: float | None,
            note: str = "") -> None:
        bw = nbytes / (cuda_ms * 1e-3)
        self.rows.append((name, shape, f"{cuda_ms * 1e3:.1f}", f"{ref_ms * 1e3:.1f}" if ref_ms else "-",
                          f"{ref_ms / cuda_ms:.1f}x" if ref_ms else "-", f"{bw / 1e9:.0f}",
                          f"{100 * bw / self.copy_bw:.0f}%", note))
        print(" | ".join(self.rows[-1]), flush=True)

    def markdown(self) -> str:
        head = ("| kernel | shape | CUDA µs | reference µs | speedup | GB/s | % of copy BW | note |\n"
                "|---|---|---|---|---|---|---|---|\n")
        return head + "".join("| " + " | ".join(r) + " |\n" for r in self.rows)


def _paged(num_seqs, ctx, kv_heads, head_size, block_size, dtype):
    """Caches holding `num_seqs` contexts of `ctx` tokens in shuffled blocks (random data)."""
    per = -(-ctx // block_size)
    kc = torch.randn(num_seqs * per, kv_heads, block_size, head_size, device="cuda").to(dtype)
    vc = torch.randn_like(kc)
    bt = torch.randperm(num_seqs * per, device="cuda", dtype=torch.int32).view(num_seqs, per).contiguous()
    return kc, vc, bt


def bench_decode(t: Table, num_seqs=64, ctx=2048, heads=32, kv_heads=8, head_size=128, block_size=16,
                 dtype=torch.bfloat16, with_ref=True) -> None:
    kc, vc, bt = _paged(num_seqs, ctx, kv_heads, head_size, block_size, dtype)
    q = torch.randn(num_seqs, heads, head_size, device="cuda").to(dtype)
    sl = torch.full((num_seqs,), ctx, dtype=torch.int32, device="cuda")
    scale = head_size ** -0.5
    nbytes = 2 * kc.element_size() * num_seqs * ctx * kv_heads * head_size + 2 * q.numel() * q.element_size()
    ref_ms = None
    if with_ref:
        want = reference.paged_attention(q, kc, vc, bt, [ctx] * num_seqs, [1] * num_seqs, scale)
        ref_ms = ref_bench(lambda: reference.paged_attention(q, kc, vc, bt, [ctx] * num_seqs, [1] * num_seqs,
                                                             scale))
    shape = f"B{num_seqs} ctx{ctx} H{heads}/{kv_heads}x{head_size} bs{block_size} {str(dtype)[6:]}"
    variants = ((None, None), (0, 0)) if with_ref else ((None, None),)
    for xpose, prefetch in variants:
        fixed = {} if xpose is None else {"SCORE_XPOSE": xpose, "PREFETCH": prefetch}
        with kernel_options.override(attention_variant=fixed):
            for label, part in (("1-pass", 0), ("split512", 512), ("split256", 256)):
                if part == 256 and (not with_ref or xpose is not None):
                    continue

                def run(part=part):
                    return attention_cuda.paged_attention_decode(q, kc, vc, bt, sl, scale, max_seq_len=ctx,
                                                                 partition_size=part)
                note = label + (", default variant" if xpose is None else ", plain variant")
                if with_ref:
                    err = (run().float() - want.float()).abs().max().item()
                    note += f", max|err| {err:.1e}"
                t.add("paged_attention decode", shape, nbytes, bench(run), ref_ms, note)
    hpb = attention_cuda.heads_per_cta(heads // kv_heads)
    split = attention_cuda.use_split(num_seqs * heads // hpb, ctx, torch.cuda.get_device_properties(0).multi_processor_count)
    print(f"  ({shape}: the launcher's default picks {'split512' if split else '1-pass'})", flush=True)


def bench_prefill(t: Table, num_seqs=8, prompt=1024, heads=32, kv_heads=8, head_size=128, dtype=torch.bfloat16):
    from pagedray.kernels.prefill_triton import paged_prefill
    kc, vc, bt = _paged(num_seqs, prompt, kv_heads, head_size, 16, dtype)
    q = torch.randn(num_seqs * prompt, heads, head_size, device="cuda").to(dtype)
    lens, scale = [prompt] * num_seqs, head_size ** -0.5
    flops = 4 * num_seqs * (prompt * (prompt + 1) / 2) * heads * head_size
    ms = bench(lambda: paged_prefill(q, kc, vc, bt, lens, lens, scale), graph=False)
    ref_ms = ref_bench(lambda: reference.paged_attention(q, kc, vc, bt, lens, lens, scale))
    err = (paged_prefill(q, kc, vc, bt, lens, lens, scale).float()
           - reference.paged_attention(q, kc, vc, bt, lens, lens, scale).float()).abs().max().item()
    nbytes = 2 * kc.numel() * kc.element_size() + 2 * q.numel() * q.element_size()
    t.add("paged prefill (Triton)", f"B{num_seqs} prompt{prompt} H{heads}/{kv_heads}x{head_size} bf16", nbytes,
          ms, ref_ms, f"{flops / (ms * 1e-3) / 1e12:.0f} TFLOP/s, max|err| {err:.1e}")


def bench_elementwise(t: Table, dtype=torch.bfloat16) -> None:
    e = torch.tensor([], dtype=dtype).element_size()
    n, hidden = 16384, 4096
    x = torch.randn(n, hidden, device="cuda").to(dtype)
    r = torch.randn_like(x)
    w = torch.randn(hidden, device="cuda").to(dtype)
    t.add("rms_norm", f"{n}x{hidden} bf16", 2 * x.numel() * e, bench(lambda: elementwise.rms_norm(x, w, 1e-6)),
          ref_bench(lambda: reference.rms_norm(x, w, 1e-6)))
    t.add("fused_add_rms_norm", f"{n}x{hidden} bf16", 4 * x.numel() * e,
          bench(lambda: elementwise.fused_add_rms_norm(x, r, w, 1e-6)),
          ref_bench(lambda: reference.fused_add_rms_norm(x, r, w, 1e-6)))
    del x, r
    heads, kv_heads, d = 32, 8, 128
    q = torch.randn(n, heads, d, device="cuda").to(dtype)
    k = torch.randn(n, kv_heads, d, device="cuda").to(dtype)
    pos = torch.randint(0, 8192, (n,), device="cuda")
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    freqs = torch.outer(torch.arange(8192, device="cuda").float(), inv)
    cs = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    nbytes = 2 * (q.numel() + k.numel()) * e
    ref_rot = ref_bench(lambda: reference.rotary_embedding(pos, q, k, cs, True))
    t.add("rotary_embedding neox", f"T{n} H{heads}/{kv_heads}x{d} bf16", nbytes,
          bench(lambda: elementwise.rotary_embedding(pos, q, k, cs, True)), ref_rot, "out of place")
    t.add("rotary_embedding neox", f"T{n} H{heads}/{kv_heads}x{d} bf16", nbytes,
          bench(lambda: elementwise.rotary_embedding(pos, q, k, cs, True, inplace=True)), ref_rot, "in place")
    t.add("rotary_embedding gptj", f"T{n} H{heads}/{kv_heads}x{d} bf16", nbytes,
          bench(lambda: elementwise.rotary_embedding(pos, q, k, cs, False)),
          ref_bench(lambda: reference.rotary_embedding(pos, q, k, cs, False)), "out of place")
    del q, k
    rows, inter = 8192, 14336
    x = torch.randn(rows, 2 * inter, device="cuda").to(dtype)
    nbytes = 1.5 * x.numel() * e
    t.add("silu_and_mul", f"{rows}x{2 * inter} bf16", nbytes, bench(lambda: elementwise.silu_and_mul(x)),
          ref_bench(lambda: reference.silu_and_mul(x)))
    t.add("gelu_and_mul tanh", f"{rows}x{2 * inter} bf16", nbytes,
          bench(lambda: elementwise.gelu_and_mul(x, "tanh")), ref_bench(lambda: reference.gelu_and_mul(x, "tanh")))
    t.add("gelu_and_mul erf", f"{rows}x{2 * inter} bf16", nbytes,
          bench(lambda: elementwise.gelu_and_mul(x, "none")), ref_bench(lambda: reference.gelu_and_mul(x, "none")))


def bench_cache_ops(t: Table, dtype=torch.bfloat16) -> None:
    e = torch.tensor([], dtype=dtype).element_size()
    kv_heads, d, bs, num_blocks = 8, 128, 16, 4096
    for tokens in (16384, 64):
        kc = torch.randn(num_blocks, kv_heads, bs, d, device="cuda").to(dtype)
        vc = torch.randn_like(kc)
        key = torch.randn(tokens, kv_heads, d, device="cuda").to(dtype)
        val = torch.randn_like(key)
        slots = torch.randperm(num_blocks * bs, device="cuda")[:tokens]
        t.add("reshape_and_cache", f"T{tokens} {kv_heads}x{d} bs{bs} bf16", 4 * key.numel() * e,
              bench(lambda: cache_ops.reshape_and_cache(key, val, kc, vc, slots)),
              ref_bench(lambda: reference.reshape_and_cache(key, val, kc, vc, slots)))
    del kc, vc
    layers, blocks = 16, 2048
    caches = [torch.randn(2, blocks, kv_heads, bs, d, device="cuda").to(dtype) for _ in range(layers)]
    perm = torch.randperm(blocks).tolist()
    pairs = list(zip(perm[:256], perm[256:512]))
    nbytes = 2 * 2 * len(pairs) * layers * kv_heads * bs * d * e
    t.add("copy_blocks", f"{layers} layers x {len(pairs)} pairs, 64 KiB blocks", nbytes,
          bench(lambda: cache_ops.copy_blocks(caches, pairs), graph=False),
          ref_bench(lambda: reference.copy_blocks(caches, pairs)), "eager (host builds pairs)")


def host_overhead_us() -> float:
    """Host time of one decode launcher call (tiny problem, so the GPU never limits)."""
    import time
    kc, vc, bt = _paged(1, 16, 1, 64, 16, torch.bfloat16)
    q = torch.randn(1, 1, 64, device="cuda", dtype=torch.bfloat16)
    sl = torch.full((1,), 16, dtype=torch.int32, device="cuda")
    call = lambda: attention_cuda.paged_attention_decode(q, kc, vc, bt, sl, 0.1, max_seq_len=16)  # noqa: E731
    for _ in range(10):
        call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(200):
        call()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / 200 * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=None, help="also append the table to this markdown file")
    ap.add_argument("--skip", default="", help="comma list of: decode,prefill,elementwise,cache")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    card = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    print(f"{card}: device-to-device copy {bw / 1e12:.2f} TB/s (read + written)", flush=True)
    t = Table(bw)
    if "decode" not in skip:
        bench_decode(t)  # the key figure
        bench_decode(t, num_seqs=8, ctx=8192, with_ref=False)
        bench_decode(t, num_seqs=256, ctx=1024, with_ref=False)
        bench_decode(t, num_seqs=64, ctx=2048, heads=64, kv_heads=8, head_size=128, with_ref=False)
        bench_decode(t, num_seqs=64, ctx=2048, heads=32, kv_heads=32, head_size=64, with_ref=False)
    if "prefill" not in skip:
        bench_prefill(t)
    if "elementwise" not in skip:
        bench_elementwise(t)
    if "cache" not in skip:
        bench_cache_ops(t)
    host = host_overhead_us()
    section = (f"\n## Kernels — {card}, {datetime.date.today().isoformat()}\n\n"
               f"Command: `python benchmarks/kernel_bench.py` (torch {torch.__version__}). "
               f"Copy bandwidth measured in the same run: {bw / 1e12:.2f} TB/s (1 GiB device-to-device, "
               f"read + written). Host time of one decode launcher call: {host:.0f} µs.\n\n" + t.markdown())
    print(section)
    from common import append_results   # the run's record (benchmarks/records/)
    append_results(f"Kernels vs PyTorch references ({card})", section.split("\n\n", 1)[1], args.results)


if __name__ == "__main__":
    sys.exit(main())
