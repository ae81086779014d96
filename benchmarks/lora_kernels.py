"""Batched LoRA kernels: the Triton shrink/expand (kernels/lora_triton.py) against their fee3b59 versions
(benchmarks/lora_triton_fee3b59.py) and the HBM roofline, on llama3-8b's four LoRA'd linears.

    python benchmarks/lora_kernels.py [--tokens 1,16,64,256,1024] [--slots 8] [--rank 16] [--sweep]
                                      [--results FILE]
    TRITON_INTERPRET=1 python benchmarks/lora_kernels.py --device cpu    (smoke: tiny shapes, interpreter)

Shapes (TP=1): qkv (K 4096 -> N 6144, packed R = 3 x rank), o (4096 -> 4096, R = rank), gate_up
(4096 -> 28672, R = 2 x rank), down (14336 -> 4096, R = rank), a packed layer's B block-diagonal over
its groups as the layers build it (the new expand is told the groups and reads only those blocks; the
old read all of B); T tokens spread evenly over --slots
adapters (sorted by slot, as the model runner sorts them), every token with an adapter. Each kernel is
timed as a CUDA-graph replay of calls that cycle through enough copies of x, A, B and y to exceed the
L2 cache (each layer's weights arrive cold in a forward), median of trials. "Must move" counts x, the
A rows and B blocks of the slots in use, y read and written, and the fp32 [T, R] in between once; GB/s is that
over the time, against a 1 GiB device copy measured in the same run (bytes read + written). The last
lines add the four pairs up x 32 layers: the LoRA cost of one forward at each batch size.
--sweep also times other tiles of the new kernels (for tuning; a few minutes).
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import statistics
import sys
import time

import torch

from common import append_results, markdown_table

LAYERS = 32
# name -> (K, N, packed groups' output sizes: R = rank x groups, B block-diagonal over them)
SHAPES_8B = {"qkv": (4096, 6144, (4096, 1024, 1024)), "o": (4096, 4096, (4096,)), "gate_up": (4096, 28672, (14336, 14336)),
             "down": (14336, 4096, (4096,))}
SHAPES_TINY = {"qkv": (256, 384, (256, 64, 64)), "down": (512, 128, (128,))}
L2_BYTES = 50 << 20


def bench(fn, reps: int, trials: int = 7) -> float:
    """Median ms per call of `fn(i)` for i in range(reps), replayed from one CUDA graph."""
    for i in range(min(reps, 2)):
        fn(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(0)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        for i in range(reps):
            fn(i)
    g.replay()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy, read + written (eagerly, clocks warmed)."""
    a = torch.randint(0, 255, (1 << 30,), dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(100):
        b.copy_(a)
    torch.cuda.synchronize()
    times = []
    for _ in range(9):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return 2 * a.numel() / (statistics.median(times) * 1e-3)


class Case:
    """`copies` sets of (x, A, B, y) of one shape, T tokens over `slots` adapters."""

    def __init__(self, tokens: int, slots: int, rank: int, k: int, groups: tuple[int, ...], device: str,
                 dtype=torch.bfloat16, min_bytes: int = 0) -> None:
        n, r = sum(groups), rank * len(groups)
        self.tokens, self.slots, self.r, self.k, self.n, self.rank = tokens, slots, r, k, n, rank
        self.slices = groups if len(groups) > 1 else None
        per_set = (tokens * (k + n) + slots * r * (k + n)) * 2
        self.copies = max(1, min(64, math.ceil(min_bytes / per_set)))
        g = torch.Generator(device=device).manual_seed(0)   # (drawn on the device: ~200 MB of copies)

        def randn(*shape):
            return torch.randn(*shape, generator=g, device=device)
        self.x = [randn(tokens, k).to(dtype) for _ in range(self.copies)]
        self.a = [(randn(slots, r, k) / k ** 0.5).to(dtype) for _ in range(self.copies)]
        mask = torch.zeros(n, r, device=device)   # a packed layer's B: each group's rows over its own rank columns
        for i, size in enumerate(groups):
            start = sum(groups[:i])
            mask[start:start + size, i * rank:(i + 1) * rank] = 1
        self.b = [(randn(slots, n, r) * mask / rank ** 0.5).to(dtype)
                  for _ in range(self.copies)]
        self.y = [randn(tokens, n).to(dtype) for _ in range(self.copies)]
        idx = (torch.arange(tokens) * slots // max(tokens, 1)).to(torch.int32)   # sorted, evenly spread
        self.idx, self.order = idx.to(device), torch.arange(tokens, dtype=torch.int32).to(device)
        self.used = min(slots, tokens)

    def bytes(self, which: str) -> int:
        """x, the slots' A and the blocks of their B (a packed layer's zeros need no reading), y twice,
        the fp32 [T, R] once each way."""
        t, k, n, r, u = self.tokens, self.k, self.n, self.r, self.used
        shrink = 2 * t * k + 2 * u * r * k + 4 * t * r
        expand = 4 * t * n + 2 * u * n * self.rank + 4 * t * r
        return {"shrink": shrink, "expand": expand, "pair": shrink + expand}[which]

    def calls(self, mod, shrink_cfg=None, expand_cfg=None, pdl: bool = False) -> dict:
        """{"shrink", "expand", "pair"}: fn(i) launching on copy i % copies."""
        kw_s = {"config": shrink_cfg} if shrink_cfg else {}
        kw_e = self.expand_kw(mod, expand_cfg)
        if pdl:
            kw_s["pdl"] = kw_e["pdl"] = True
        parts = [mod.lora_shrink(self.x[c], self.a[c], self.idx, self.order, **kw_s) for c in range(self.copies)]
        m = self.copies
        return {
            "shrink": lambda i: mod.lora_shrink(self.x[i % m], self.a[i % m], self.idx, self.order, **kw_s),
            "expand": lambda i: mod.lora_expand(parts[i % m], self.b[i % m], self.idx, self.order, self.y[i % m],
                                                **kw_e),
            "pair": lambda i: mod.lora_expand(mod.lora_shrink(self.x[i % m], self.a[i % m], self.idx, self.order,
                                                              **kw_s), self.b[i % m], self.idx, self.order,
                                              self.y[i % m], **kw_e),
        }

    def expand_kw(self, mod, cfg=None) -> dict:
        """The new expand is told a packed layer's groups (and reads only their blocks of B), as the layers
        tell it; the old one had no such argument."""
        kw = {"config": cfg} if cfg else {}
        if self.slices and "slices" in inspect.signature(mod.lora_expand).parameters:
            kw["slices"] = self.slices
        return kw

    def error(self, mod, pdl: bool = False) -> float:
        """max |Δ| of one shrink + expand against the PyTorch reference (fp32), copy 0."""
        from pagedray.kernels.lora import lora_expand_reference, lora_shrink_reference
        y = self.y[0].clone()
        kw = {"pdl": True} if pdl else {}
        got = mod.lora_expand(mod.lora_shrink(self.x[0], self.a[0], self.idx, self.order, **kw), self.b[0], self.idx,
                              self.order, y.clone(), **self.expand_kw(mod), **kw)
        ref = lora_expand_reference(lora_shrink_reference(self.x[0], self.a[0], self.idx), self.b[0], self.idx,
                                    y.float().clone())
        return (got.float() - ref).abs().max().item()


def old_module():
    import lora_triton_fee3b59
    return lora_triton_fee3b59


def run_cpu(args) -> None:
    """Interpreter smoke: every kernel of both versions once on tiny shapes, checked against the reference."""
    import triton.runtime.interpreter  # noqa: F401  (fails loudly if this Triton has none)
    from pagedray.kernels import lora_triton as new
    old = old_module()
    rows = []
    for name, (k, n, groups) in SHAPES_TINY.items():
        for tokens in (1, 16):
            case = Case(tokens, 3, 8, k, groups, "cpu", dtype=torch.float16)
            for label, mod in (("old", old), ("new", new)):
                err = case.error(mod)
                if not err < 5e-2:
                    raise SystemExit(f"{label} {name} T={tokens}: max |Δ| {err:.3g} against the reference")
                rows.append([label, name, tokens, f"{err:.1e}"])
    print(markdown_table(["kernels", "shape", "T", "max |Δ|"], rows))
    print("cpu smoke ok (interpreter: no timings)")


def triton_next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def sweep_configs(new, case: Case, sms: int) -> tuple[list, list]:
    """The launchers' choice first, then its neighbours: fewer/more K splits (one reduction pass of the
    finishing program; BLOCK_K 64), other slot spreads and warp counts; expand tiles and warps."""
    s0 = new.shrink_config(case.tokens, case.k, case.r, sms, case.slots)

    def shrink(block_k=s0.block_k, splits=s0.splits, slot_par=s0.slot_par, num_warps=s0.num_warps):
        kps = -(-(-(-case.k // max(1, splits))) // block_k) * block_k
        splits = -(-case.k // kps)
        red = max(1, min(triton_next_pow2(splits), 8192 // (s0.block_t * new._block_r(case.r))))
        return new.ShrinkConfig(s0.block_t, block_k, splits, kps, red, slot_par, num_warps)
    shrinks = [s0]
    for cfg in (shrink(splits=s0.splits // 2), shrink(splits=s0.splits // 4), shrink(splits=s0.red),
                shrink(block_k=64, splits=2 * s0.splits), shrink(slot_par=1), shrink(slot_par=2 * s0.slot_par),
                shrink(num_warps=2), shrink(num_warps=8)):
        if cfg not in shrinks and cfg.slot_par <= case.slots:
            shrinks.append(cfg)
    e0 = new.expand_config(case.tokens, case.n, sms)
    expands = [e0] + [new.ExpandConfig(bt, bn, w) for bt in (16, 32, 64) for bn in (32, 64, 128, 256) for w in (4, 8)
                      if (bt, bn, w) != (e0.block_t, e0.block_n, e0.num_warps) and bt <= max(16, case.tokens)]
    return shrinks, expands


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1,16,64,256,1024")
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--sweep", action="store_true", help="also time other tiles of the new kernels")
    ap.add_argument("--results", default=None)
    args = ap.parse_args()
    if args.device == "cpu":
        return run_cpu(args)
    t0 = time.time()
    from pagedray.kernels import lora_triton as new
    old = old_module()
    bw = copy_bandwidth()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e9:.0f} GB/s (read + write), {sms} SMs; "
          f"torch {torch.__version__}", flush=True)
    tokens_list = [int(t) for t in args.tokens.split(",")]
    rows, per_forward, figures, done = [], {}, {}, {}
    for tokens in tokens_list:
        for name, (k, n, groups) in SHAPES_8B.items():
            case = Case(tokens, args.slots, args.rank, k, groups, "cuda", min_bytes=4 * L2_BYTES)
            times = {}
            errors = {}   # (before any timing adds into y)
            for label, mod in (("old", old), ("new", new), ("new pdl", new)):
                try:
                    errors[label] = case.error(mod, pdl=label.endswith("pdl"))
                except Exception as exc:   # (PDL needs Hopper)
                    print(f"T={tokens} {name} {label}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            for label, mod in (("old", old), ("new", new), ("new pdl", new)):
                if label not in errors:
                    continue
                err = errors[label]
                try:
                    fns = case.calls(mod, pdl=label.endswith("pdl"))
                    for which in ("shrink", "expand", "pair"):
                        times[(label, which)] = bench(fns[which], reps=case.copies * max(1, 16 // case.copies))
                except Exception as exc:   # (PDL needs Hopper, and CUDA-graph capture of it)
                    print(f"T={tokens} {name} {label}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                    continue
                per_forward[(label, tokens)] = per_forward.get((label, tokens), 0.0) + times[(label, "pair")] * LAYERS
                done[(label, tokens)] = done.get((label, tokens), 0) + 1
                cells = []
                for which in ("shrink", "expand", "pair"):
                    ms = times[(label, which)]
                    gbs = case.bytes(which) / (ms * 1e-3)
                    cells.append(f"{ms * 1e3:.1f} µs {gbs / 1e9:.0f} GB/s ({100 * gbs / bw:.0f}%)")
                floor = case.bytes("pair") / bw * 1e6
                rows.append([tokens, name, label, *cells, f"{floor:.1f}", f"{err:.1e}" + ("" if err < 0.5 else " WRONG")])
                print(" | ".join(str(c) for c in rows[-1]), f"({time.time() - t0:.0f} s)", flush=True)
            if args.sweep:
                shrinks, expands = sweep_configs(new, case, sms)
                fns = {}
                for cfg in shrinks:
                    ms = bench(case.calls(new, shrink_cfg=cfg)["shrink"], reps=case.copies * max(1, 16 // case.copies))
                    print(f"  sweep T={tokens} {name} shrink {cfg}: {ms * 1e3:.1f} µs", flush=True)
                for cfg in expands:
                    ms = bench(case.calls(new, expand_cfg=cfg)["expand"], reps=case.copies * max(1, 16 // case.copies))
                    print(f"  sweep T={tokens} {name} expand {cfg}: {ms * 1e3:.1f} µs", flush=True)
            del case
            torch.cuda.empty_cache()
    body = markdown_table(["T", "linear", "kernels", "shrink", "expand", "shrink + expand", "floor µs (pair bytes / copy BW)",
                           "max |Δ| vs reference"], rows)
    lines = []
    for tokens in tokens_list:
        o, nw = per_forward[("old", tokens)], per_forward[("new", tokens)]
        pdl = per_forward.get(("new pdl", tokens))
        pdl_text = f", new with PDL {pdl:.3f} ms" if pdl and done[("new pdl", tokens)] == len(SHAPES_8B) else ""
        lines.append(f"T={tokens}: LoRA per forward (4 linears x {LAYERS} layers) old {o:.3f} ms, new {nw:.3f} ms "
                     f"({o / nw:.2f}x){pdl_text}")
        figures[f"new ms/forward T={tokens}"] = round(nw, 3)
        figures[f"old ms/forward T={tokens}"] = round(o, 3)
    body += "\n\n" + "\n".join(f"- {line}" for line in lines)
    body += f"\n- copy bandwidth {bw / 1e9:.0f} GB/s (1 GiB device copy, read + write, same run); {args.slots} slots, rank {args.rank}"
    print(body, flush=True)
    figures["copy GB/s"] = round(bw / 1e9)
    head = "new ms/forward T=256" if 256 in tokens_list else None
    append_results(f"Batched LoRA kernels, llama3-8b linears, {args.slots} x rank {args.rank} (benchmarks/lora_kernels.py)",
                   body, args.results, figures=figures, headline=head)
    print(f"total {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
