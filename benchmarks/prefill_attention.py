"""Prefill attention: the flash Triton kernel's tiles against the current one, SDPA and the matmul roofline.

    python benchmarks/prefill_attention.py [--contexts 512,1024,2048,4096,8192,16384] [--tokens 16384]
                                           [--budget-s 140] [--results FILE]

Causal bf16, llama3-8b attention (32 query / 8 KV heads x 128), block 16, contexts 512..16k with
`--tokens` new tokens per launch (batch = tokens / context; fresh prompts), plus a chunked-prefill
shape (512 new tokens over 3584 cached); queries and the step's K/V are slices of one fused QKV
tensor, as in the models. For each kernel and tile (kernels/prefill_flash.py's
VARIANT_KEYS; the current kernels/prefill_triton.py with its own tiles as the baseline), TFLOP/s
(4 * heads * head size * visible query-key pairs over the time of back-to-back launcher calls), and
its max |Δ| against SDPA at 4k. Peers in the same run: bf16 torch.matmul (8192^3, the roofline) and
torch SDPA (flash and cuDNN backends; contiguous K/V, the same causal shape, GQA). A tile that fails
to compile is printed and skipped; past --budget-s the remaining tiles are skipped.
"""
from __future__ import annotations

import argparse
import statistics
import time
import traceback

import torch
import torch.nn.functional as F

from common import append_results, markdown_table, matmul_tflops
from pagedray.kernels import prefill_flash, prefill_triton

HEADS, KV_HEADS, HEAD, BLOCK = 32, 8, 128, 16
DEVICE, DTYPE = "cuda", torch.bfloat16
# (label, kernel, tile): the current kernel (its shipped tile) first, then the new one's most likely
# winners (a run past --budget-s drops the tail), then the rest of the sweep; "newkv"/"tma": the step's
# new K/V read from the step's tensors by pointers / TMA descriptors instead of through the block table.
VARIANTS = [
    ("current", "old", {}),
    ("flash 128x64 w8 s3", "new", {}),
    ("flash 128x64 w8 s3 tma", "new", {"NEW_KV": 2}),
    ("flash 128x128 w8 s2 tma", "new", {"BLOCK_N": 128, "NUM_STAGES": 2, "NEW_KV": 2}),
    ("flash 128x128 w8 s2", "new", {"BLOCK_N": 128, "NUM_STAGES": 2}),
    # One warpgroup per CTA, two CTAs per SM (their registers and shared memory fit two; 8-warp tiles fit one).
    ("flash 64x64 w4 s2 tma", "new", {"BLOCK_M": 64, "NUM_WARPS": 4, "NUM_STAGES": 2, "NEW_KV": 2}),
    ("flash 64x64 w4 s2", "new", {"BLOCK_M": 64, "NUM_WARPS": 4, "NUM_STAGES": 2}),
    ("flash 128x64 w8 s3 newkv", "new", {"NEW_KV": 1}),
    ("flash 128x128 w8 s3 tma", "new", {"BLOCK_N": 128, "NEW_KV": 2}),
    ("flash 128x64 w8 s2", "new", {"NUM_STAGES": 2}),
    ("flash 128x128 w8 s3", "new", {"BLOCK_N": 128}),
    ("flash 128x64 w8 s3 unsplit", "new", {"SPLIT": 0}),
    ("flash 64x64 w4 s3", "new", {"BLOCK_M": 64, "NUM_WARPS": 4}),
    ("flash 128x128 w8 s2 newkv", "new", {"BLOCK_N": 128, "NUM_STAGES": 2, "NEW_KV": 1}),
    ("current 128x64 w8 s2", "old", {"BLOCK_M": 128, "NUM_WARPS": 8}),
    ("current 128x64 w8 s3", "old", {"BLOCK_M": 128, "NUM_WARPS": 8, "NUM_STAGES": 3}),
]


def time_ms(fn, calls: int = 8, trials: int = 5) -> float:
    """Median ms per call over `trials` runs of `calls` back-to-back calls (the launcher's host work
    overlaps the previous kernel, as in a forward pass)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


class Shape:
    """`batch` sequences of `ctx` tokens, the last `new` of them this launch's queries, in a shuffled paged
    cache; dense copies of the same K/V for SDPA."""

    def __init__(self, label: str, batch: int, ctx: int, new: int) -> None:
        self.label, self.batch, self.ctx, self.new = label, batch, ctx, new
        per = -(-ctx // BLOCK)
        g = torch.Generator(device=DEVICE).manual_seed(0)
        self.kc = torch.randn(batch * per, KV_HEADS, BLOCK, HEAD, device=DEVICE, generator=g).to(DTYPE)
        self.vc = torch.randn(batch * per, KV_HEADS, BLOCK, HEAD, device=DEVICE, generator=g).to(DTYPE)
        self.bt = torch.randperm(batch * per, device=DEVICE, generator=g).to(torch.int32).view(batch, per)
        # q and the step's new K/V as slices of one fused QKV projection output, as the models pass them.
        fused = torch.randn(batch * new, (HEADS + 2 * KV_HEADS) * HEAD, device=DEVICE, generator=g).to(DTYPE)
        self.q = fused[:, :HEADS * HEAD].view(-1, HEADS, HEAD)
        self.key = fused[:, HEADS * HEAD:(HEADS + KV_HEADS) * HEAD].view(-1, KV_HEADS, HEAD)
        self.value = fused[:, (HEADS + KV_HEADS) * HEAD:].view(-1, KV_HEADS, HEAD)
        k, v = self.dense_kv()
        self.key.copy_(k[:, :, ctx - new:].transpose(1, 2).reshape(-1, KV_HEADS, HEAD))
        self.value.copy_(v[:, :, ctx - new:].transpose(1, 2).reshape(-1, KV_HEADS, HEAD))
        self.seq_lens, self.query_lens = [ctx] * batch, [new] * batch
        self.pairs = batch * (new * (ctx - new) + new * (new + 1) // 2)   # visible (query, key) pairs

    def flops(self) -> float:
        return 4.0 * HEADS * HEAD * self.pairs

    def dense_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[batch, KV_HEADS, ctx, HEAD] copies of the cache contents (contiguous)."""
        def gather(cache):
            return cache[self.bt.long()].permute(0, 2, 1, 3, 4).reshape(self.batch, KV_HEADS, -1, HEAD)[:, :, :self.ctx]
        return gather(self.kc).contiguous(), gather(self.vc).contiguous()

    def call(self, kernel: str, tile: dict):
        scale = HEAD ** -0.5
        if kernel == "old":
            return lambda: prefill_triton.paged_prefill(self.q, self.kc, self.vc, self.bt, self.seq_lens,
                                                        self.query_lens, scale, tile=tile)
        return lambda: prefill_flash.paged_prefill(self.q, self.kc, self.vc, self.bt, self.seq_lens,
                                                   self.query_lens, scale, variant_overrides=tile, key=self.key,
                                                   value=self.value)


def sdpa_call(shape: Shape, backend):
    """SDPA over dense K/V (fresh prompts only: its causal mask is top-left aligned)."""
    from torch.nn.attention import sdpa_kernel
    k, v = shape.dense_kv()
    q = shape.q.reshape(shape.batch, shape.ctx, HEADS, HEAD).transpose(1, 2).contiguous()

    def run():
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=HEAD ** -0.5, enable_gqa=True)
    try:
        run()
    except RuntimeError:  # a backend without GQA: the same FLOPs on repeated K/V heads
        k, v = k.repeat_interleave(HEADS // KV_HEADS, 1), v.repeat_interleave(HEADS // KV_HEADS, 1)
        run()
    return run, lambda out: out.transpose(1, 2).reshape(shape.q.shape)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="512,1024,2048,4096,8192,16384")
    ap.add_argument("--tokens", type=int, default=16384, help="new tokens per launch (batch = tokens / context)")
    ap.add_argument("--budget-s", type=float, default=140.0, help="skip the remaining tiles past this many seconds")
    ap.add_argument("--variants", default=None, help="comma list of variant labels to run (default: all)")
    ap.add_argument("--results", default=None)
    args = ap.parse_args()
    t0 = time.time()
    contexts = [int(c) for c in args.contexts.split(",")]
    shapes = [Shape(f"{c}", max(1, args.tokens // c), c, c) for c in contexts]
    shapes.append(Shape("chunk 512/4096", max(1, args.tokens // 4096), 4096, 512))
    ref_shape = next((s for s in shapes if s.ctx == 4096 and s.new == 4096), shapes[0])
    roof = matmul_tflops()
    print(f"{torch.cuda.get_device_name()}: bf16 matmul {roof:.0f} TFLOP/s; torch {torch.__version__}", flush=True)

    rows, best, results = [], {}, {}
    from torch.nn.attention import SDPBackend
    sdpa_out = None
    for name, backend in (("SDPA flash", SDPBackend.FLASH_ATTENTION), ("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION)):
        cells = []
        for s in shapes:
            if s.new != s.ctx:
                cells.append("-")
                continue
            try:
                run, unflat = sdpa_call(s, backend)
                if s is ref_shape and name == "SDPA flash":
                    sdpa_out = unflat(run())
                ms = time_ms(run)
                cells.append(f"{s.flops() / ms / 1e9:.0f}")
                results[(name, s.label)] = s.flops() / ms / 1e9
            except Exception as exc:  # a backend this build or card lacks
                cells.append("n/a")
                print(f"{name} at {s.label}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        rows.append([name, "-"] + cells)
        print(" | ".join(rows[-1]), flush=True)

    wanted = set(args.variants.split(",")) if args.variants else None
    for label, kernel, tile in VARIANTS:
        if wanted and label not in wanted:
            continue
        if time.time() - t0 > args.budget_s:
            print(f"{label}: skipped (past --budget-s {args.budget_s:.0f})", flush=True)
            continue
        cells, err = [], float("nan")
        try:
            out = ref_shape.call(kernel, tile)()
            if sdpa_out is not None:
                err = (out.float() - sdpa_out.float()).abs().max().item()
            for s in shapes:
                ms = time_ms(s.call(kernel, tile))
                tf = s.flops() / ms / 1e9
                results[(label, s.label)] = tf
                cells.append(f"{tf:.0f}")
        except Exception as exc:  # a tile this card or Triton cannot compile: report it and go on
            print(f"{label}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            traceback.print_exc(limit=2)
            cells += ["fail"] * (len(shapes) - len(cells))
        ok = not err > 5e-2   # NaN (no SDPA) counts as unchecked, not wrong
        if ok and (label, ref_shape.label) in results:
            best.setdefault(kernel, (label, tile, results[(label, ref_shape.label)]))
            if results[(label, ref_shape.label)] > best[kernel][2]:
                best[kernel] = (label, tile, results[(label, ref_shape.label)])
        rows.append([label + ("" if ok else " WRONG"), f"{err:.1e}"] + cells)
        print(" | ".join(rows[-1]), f"({time.time() - t0:.0f} s)", flush=True)

    body = markdown_table(["kernel / tile", "max|Δ| vs SDPA (4k)"] + [f"{s.label} TFLOP/s" for s in shapes], rows)
    figures = {}
    if "new" in best:
        figures["flash TFLOP/s 4k"] = round(best["new"][2], 1)
    if ("current", ref_shape.label) in results:
        figures["current TFLOP/s 4k"] = round(results[("current", ref_shape.label)], 1)
    if ("SDPA flash", ref_shape.label) in results:
        figures["SDPA flash TFLOP/s 4k"] = round(results[("SDPA flash", ref_shape.label)], 1)
    if ("SDPA cuDNN", ref_shape.label) in results:
        figures["SDPA cuDNN TFLOP/s 4k"] = round(results[("SDPA cuDNN", ref_shape.label)], 1)
    figures["matmul TFLOP/s"] = round(roof, 1)
    notes = [f"bf16 matmul roofline {roof:.0f} TFLOP/s (8192^3, same run).",
             f"{args.tokens} new tokens per launch; causal, heads {HEADS}/{KV_HEADS} x {HEAD}, block {BLOCK}, "
             "shuffled blocks; TFLOP/s counts 4 x heads x head size per visible query-key pair."]
    for kernel, (label, tile, tf) in best.items():
        notes.append(f"best {kernel} at 4k: {label} ({tf:.0f} TFLOP/s, {tf / roof:.0%} of matmul)")
        if kernel == "new":
            opts = " ".join(f"--kernel-option prefill_variant.{k}={v}" for k, v in tile.items())
            notes.append(f"engine: --kernel-option prefill_backend=triton_flash {opts}".rstrip())
            figures["best flash tile"] = label
    body += "\n\n" + "\n".join(f"- {n}" for n in notes)
    print(body, flush=True)
    append_results("Prefill attention, causal bf16 32/8x128, 512..16k (benchmarks/prefill_attention.py)", body,
                   args.results, figures=figures, headline="flash TFLOP/s 4k" if "new" in best else None,
                   anchors={"target": "≥ 450 TFLOP/s at 4k (issue 26)"})
    print(f"total {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
