"""Rotary + KV-cache write: the fused kernel (rotary.cu: rotary_and_cache) against the rotary kernel
then reshape_and_cache, at decode and small-prefill token counts.

    python benchmarks/rotary_cache.py [--tokens 1 32 256] [--results FILE]

Shape: Llama-3-8B's attention (32 query / 8 KV heads x 128, bf16, float32 cos/sin, block size 16),
q/k/v as views of one fused QKV output as the model passes them. Each variant is one CUDA graph of
LAYERS calls, each on its own layer's QKV and cache (as a decode step's layers run them), timed by
replays (launch gaps inside the graph included, host time excluded): µs per layer. The fused
results are checked bit for bit against the unfused ones first.
"""
from __future__ import annotations

import argparse

import torch

from common import append_results, markdown_table
from decode_profile import graph_us_per_call

from pagedray.kernels import cache_ops, elementwise

HEADS, KV_HEADS, HEAD_SIZE, BLOCK_SIZE, LAYERS = 32, 8, 128, 16, 32


def _layers(tokens: int, dtype: torch.dtype) -> list[tuple]:
    """Per layer: (positions, q, k, v, cos_sin, key_cache, value_cache, slot_mapping)."""
    inv = 1.0 / (500000 ** (torch.arange(0, HEAD_SIZE, 2, device="cuda").float() / HEAD_SIZE))
    freqs = torch.outer(torch.arange(8192, device="cuda").float(), inv)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    num_blocks = max(64, 2 * tokens // BLOCK_SIZE)
    positions = torch.randint(0, 8192, (tokens,), device="cuda")
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device="cuda")[:tokens]
    out = []
    for _ in range(LAYERS):
        qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_SIZE, device="cuda", dtype=dtype)
        q, k, v = qkv.split([HEADS * HEAD_SIZE, KV_HEADS * HEAD_SIZE, KV_HEADS * HEAD_SIZE], dim=-1)
        cache = torch.zeros(2, num_blocks, KV_HEADS, BLOCK_SIZE, HEAD_SIZE, device="cuda", dtype=dtype)
        out.append((positions, q.view(tokens, HEADS, HEAD_SIZE), k.view(tokens, KV_HEADS, HEAD_SIZE),
                    v.view(tokens, KV_HEADS, HEAD_SIZE), cos_sin, cache[0], cache[1], slots))
    return out


def fused(pos, q, k, v, cs, kc, vc, slots) -> torch.Tensor:
    return elementwise.rotary_embedding_and_cache(pos, q, k, v, cs, True, kc, vc, slots)


def unfused(pos, q, k, v, cs, kc, vc, slots) -> torch.Tensor:
    q, k = elementwise.rotary_embedding(pos, q, k, cs, True)
    cache_ops.reshape_and_cache(k, v, kc, vc, slots)
    return q


def rotary_only(pos, q, k, v, cs, kc, vc, slots) -> torch.Tensor:
    return elementwise.rotary_embedding(pos, q, k, cs, True)[0]


def cache_only(pos, q, k, v, cs, kc, vc, slots) -> None:
    cache_ops.reshape_and_cache(k, v, kc, vc, slots)


def identical(layers: list[tuple]) -> bool:
    """Fused and unfused give the same rotated q and the same caches, bit for bit."""
    for args in layers[:2]:
        kc, vc = args[5], args[6]
        got_q = fused(*args)
        got_k, got_v = kc.clone(), vc.clone()
        want_q = unfused(*args)
        if not (torch.equal(got_q, want_q) and torch.equal(got_k, kc) and torch.equal(got_v, vc)):
            return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 32, 256])
    ap.add_argument("--results", default=None, help="markdown file to append the table to")
    args = ap.parse_args()
    rows = []
    for tokens in args.tokens:
        layers = _layers(tokens, torch.bfloat16)
        same = identical(layers)
        us = {name: graph_us_per_call(fn, layers) for name, fn in
              (("fused", fused), ("unfused", unfused), ("rotary", rotary_only), ("cache", cache_only))}
        rows.append([tokens, f"{us['fused']:.2f}", f"{us['unfused']:.2f}", f"{us['rotary']:.2f}",
                     f"{us['cache']:.2f}", f"{us['unfused'] - us['fused']:.2f}",
                     f"{(us['unfused'] - us['fused']) * LAYERS:.1f}", same])
        print(rows[-1], flush=True)
        del layers
    table = markdown_table(["T", "fused µs", "rotary + cache µs", "rotary µs", "cache µs", "saved µs/layer",
                            f"saved µs/step ({LAYERS} layers)", "bit-identical"], rows)
    print(table)
    append_results(f"Rotary + cache write, fused vs two kernels ({HEADS}/{KV_HEADS}x{HEAD_SIZE} bf16)", table,
                   args.results)


if __name__ == "__main__":
    main()
