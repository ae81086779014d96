"""The batched LoRA kernels in Triton (see lora.py): shrink x -> x A^T and expand y += (x A^T) B^T,
each token with its own slot's A and B.

Tokens arrive sorted by slot (`order`), so a tile of BLOCK_T tokens holds a contiguous range of
slots, mostly one or two: a program walks only the slots of its tile (from its first token's to its
last's), gathering its tokens' rows through `order`, so every output row is written by exactly one
program (deterministic). Tokens without an adapter (slot -1) are skipped and their rows left untouched.

Decode batches are a handful of tiles, so the shrink splits its long reduction (hidden or intermediate
size) over K into `splits` programs per tile to fill the GPU. Their fp32 partial sums are added up
once, by the tile's last program to finish (a per-tile arrival counter; it adds the partials in split
order, so the result does not depend on which program came last, and resets the counter to 0 for the
next launch): the shrink returns the finished [1, T, R], and each expand program reads its tile's
rows of it once instead of every split's (before: the partials cost more traffic than y itself).
The expand is one load and one store of a [BLOCK_T, BLOCK_N] tile of y per program, with the tile's
slots' deltas summed in registers in between (of a packed layer's block-diagonal B, each output column
reads only its group's block: `slices`); tile sizes follow the token count so that the grid
fills the GPU while B is re-read as little as possible (each tile reads B once per slot it holds).
Grids and arguments depend only on the token count and the stacks' shapes, so the launches are
captured in CUDA graphs as they are and replay with the indices changed in place.
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagedray.kernels import _compile as C
from pagedray.kernels import options


@triton.jit
def _tile(idx_ptr, order_ptr, num_tokens, BLOCK_T: tl.constexpr):
    """This program's token rows, their slots, whether they are real, and its slot range."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_in = offs_t < num_tokens
    rows = tl.load(order_ptr + offs_t, mask=t_in, other=0).to(tl.int64)
    slots = tl.load(idx_ptr + rows, mask=t_in, other=-1)
    lo = tl.maximum(tl.min(tl.where(t_in & (slots >= 0), slots, 2147483647), axis=0), 0)
    hi = tl.max(slots, axis=0)   # tokens are sorted by slot: the tile's slots are lo..hi
    return rows, slots, t_in, lo, hi


@triton.jit(do_not_specialize=["num_tokens", "splits"])
def _shrink_kernel(x_ptr, a_ptr, idx_ptr, order_ptr, part_ptr, out_ptr, count_ptr, num_tokens, R, K,
                   k_per_split, splits, x_stride, a_stride_s, a_stride_r, part_stride_split, part_stride_t,
                   out_stride_t, IEEE: tl.constexpr, SPLIT: tl.constexpr, BLOCK_T: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, RED: tl.constexpr, PDL: tl.constexpr):
    if PDL:   # launched before the previous kernel ended: wait for it, then let the expand launch early
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    rows, slots, t_in, lo, hi = _tile(idx_ptr, order_ptr, num_tokens, BLOCK_T)
    split = tl.program_id(1)
    k_begin = split * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    offs_r = tl.arange(0, BLOCK_R)
    r_in = offs_r < R
    if SPLIT:
        dst = part_ptr + split * part_stride_split + rows[:, None] * part_stride_t + offs_r[None, :]
    else:
        dst = out_ptr + rows[:, None] * out_stride_t + offs_r[None, :]
    for s in range(lo + tl.program_id(2), hi + 1, tl.num_programs(2)):   # (the tile's slots over grid axis 2)
        mine = t_in & (slots == s)
        acc = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
        a_base = a_ptr + s * a_stride_s
        for k0 in range(k_begin, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_in = offs_k < k_end
            x = tl.load(x_ptr + rows[:, None] * x_stride + offs_k[None, :], mask=mine[:, None] & k_in[None, :],
                        other=0.0)
            a = tl.load(a_base + offs_r[None, :] * a_stride_r + offs_k[:, None], mask=r_in[None, :] & k_in[:, None],
                        other=0.0)
            if IEEE:
                acc += tl.dot(x, a, input_precision="ieee")
            else:
                acc += tl.dot(x, a)
        tl.store(dst, acc, mask=mine[:, None] & r_in[None, :])
    if SPLIT:
        # Every thread's partial is stored before one thread takes the tile's ticket (release, GPU scope);
        # the last of the tile's splits x slot-group programs (acquire) adds them up in split order.
        tl.debug_barrier()
        ticket = tl.atomic_add(count_ptr + tl.program_id(0), 1, sem="acq_rel", scope="gpu")
        if ticket == splits * tl.num_programs(2) - 1:
            keep = t_in & (slots >= 0)
            offs_s = tl.arange(0, RED)
            total = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
            for s0 in range(0, splits, RED):
                sp = s0 + offs_s
                ptrs = (part_ptr + sp[:, None, None] * part_stride_split + rows[None, :, None] * part_stride_t
                        + offs_r[None, None, :])
                mask = (sp < splits)[:, None, None] & keep[None, :, None] & r_in[None, None, :]
                total += tl.sum(tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg"), axis=0)
            tl.store(out_ptr + rows[:, None] * out_stride_t + offs_r[None, :], total,
                     mask=keep[:, None] & r_in[None, :])
            tl.store(count_ptr + tl.program_id(0), 0)   # ready for the next launch


@triton.jit(do_not_specialize=["num_tokens", "splits"])
def _expand_kernel(p_ptr, b_ptr, idx_ptr, order_ptr, y_ptr, num_tokens, N, R, splits,
                   p_stride_split, p_stride_t, b_stride_s, b_stride_n, y_stride, end0, end1, end2,
                   IEEE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                   GROUP_R: tl.constexpr, PDL: tl.constexpr):
    rows, slots, t_in, lo, hi = _tile(idx_ptr, order_ptr, num_tokens, BLOCK_T)
    has = t_in & (slots >= 0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    r_in = offs_r < R
    b_mask = n_in[None, :] & r_in[:, None]
    if GROUP_R > 0:   # packed groups: output column n reads only its group's GROUP_R columns of B
        group_n = (offs_n >= end0).to(tl.int32) + (offs_n >= end1).to(tl.int32) + (offs_n >= end2).to(tl.int32)
        b_mask = b_mask & ((offs_r // GROUP_R)[:, None] == group_n[None, :])
    if hi >= 0:   # (a tile without adapters has nothing to do)
        y_ptrs = y_ptr + rows[:, None] * y_stride + offs_n[None, :]
        out_mask = has[:, None] & n_in[None, :]
        y = tl.load(y_ptrs, mask=out_mask, other=0.0)
        if PDL:   # (the shrink waited for everything before it: only its own sums are not ready yet)
            tl.extra.cuda.gdc_wait()
        v = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
        for split in range(0, splits):   # one for the Triton shrink (it finishes its sums itself)
            v += tl.load(p_ptr + split * p_stride_split + rows[:, None] * p_stride_t + offs_r[None, :],
                         mask=has[:, None] & r_in[None, :], other=0.0)
        delta = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        for s in range(lo, hi + 1):   # each row takes its own slot's product (the others add zeros)
            b = tl.load(b_ptr + s * b_stride_s + offs_n[None, :] * b_stride_n + offs_r[:, None], mask=b_mask,
                        other=0.0)
            vs = tl.where((slots == s)[:, None], v, 0.0)
            if IEEE:
                delta += tl.dot(vs, b, input_precision="ieee")
            else:
                delta += tl.dot(vs.to(b.dtype), b)
        tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=out_mask)


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _sms(t: torch.Tensor) -> int:
    # (under the interpreter, CPU tests: as a small GPU, so that the split path runs)
    return C.num_sms(C.device_of(t)) if t.is_cuda else 8


@dataclass(frozen=True)
class ShrinkConfig:
    block_t: int
    block_k: int
    splits: int       # programs per token tile along K (1: no partials, no counter)
    k_per_split: int
    red: int          # partials the finishing program adds per load
    slot_par: int = 1   # programs per (tile, split), each taking every slot_par-th of the tile's slots
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class ExpandConfig:
    block_t: int
    block_n: int
    num_warps: int


# Partial-sum elements the tile's last program adds up at most (splits x rows x BLOCK_R): its reduction
# runs alone at the end of the launch, so it stays a few loads long.
_MAX_REDUCE = 32768
_MAX_COUNTERS = 4096


@functools.lru_cache(maxsize=4096)   # (per forward: a launch per layer with the same few shapes)
def shrink_config(num_tokens: int, k: int, r: int, sms: int, num_slots: int = 1, block_k: int = 128) -> ShrinkConfig:
    """Tiles of 16 tokens up to 512 (decode), 64 above (prefill: A re-read less often); then as many
    K splits as bring the grid to ~2 programs per SM, each split at least one BLOCK_K step, with the
    finishing program's reduction bounded; then, where that is still short, the slots of a tile over
    several programs (16 tokens over 8 adapters: one program streaming 8 slots' A one after the other
    took 8 load latencies)."""
    block_t = 16 if num_tokens <= 512 else 64
    tiles = triton.cdiv(num_tokens, block_t)
    rows = min(num_tokens, block_t)
    block_r = _block_r(r)
    splits = max(1, min(triton.cdiv(2 * sms, tiles), k // block_k, _MAX_REDUCE // (rows * block_r)))
    if tiles > _MAX_COUNTERS:
        splits = 1
    k_per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    splits = triton.cdiv(k, k_per_split)
    red = max(1, min(triton.next_power_of_2(splits), 8192 // (block_t * block_r)))
    slot_par = max(1, min(num_slots, rows, triton.cdiv(2 * sms, tiles * splits)))
    return ShrinkConfig(block_t, block_k, splits, k_per_split, red, slot_par)


# Expand tiles (BLOCK_T, BLOCK_N) from the largest down: fewer token tiles re-read B less often (each
# reads the blocks of every slot it holds); 64 columns (128 bytes of a bf16 row) still load whole lines.
_EXPAND_TILES = ((64, 128), (32, 128), (64, 64), (16, 128), (32, 64), (16, 64), (16, 32))


@functools.lru_cache(maxsize=4096)
def expand_config(num_tokens: int, n: int, sms: int) -> ExpandConfig:
    """The first of _EXPAND_TILES whose grid covers the SMs (a decode-sized expand is one or two
    loads per program: more, smaller programs only add overhead); the smallest where none does."""
    for block_t, block_n in _EXPAND_TILES:
        if block_t > 16 and block_t > num_tokens:
            continue
        if triton.cdiv(num_tokens, block_t) * triton.cdiv(n, block_n) >= sms - sms // 8:
            return ExpandConfig(block_t, block_n, 8 if block_t * block_n >= 8192 else 4)
    return ExpandConfig(16, 32, 4)


_COUNTERS: dict[torch.device, torch.Tensor] = {}
_COUNTERS_LOCK = threading.Lock()


def _counters(device: torch.device) -> torch.Tensor:
    """Per-device arrival counters of the shrink's tiles, zero between launches (the finishing program
    of each tile resets its own). Launches on one device run on one stream at a time (a forward pass),
    so one set serves every layer. Allocated at the first launch, which must run eagerly: a buffer
    first made inside a CUDA-graph capture would be zeroed only when the graph replays."""
    with _COUNTERS_LOCK:
        buf = _COUNTERS.get(device)
        if buf is None:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("lora_shrink's first launch on a device must run outside CUDA-graph capture "
                                   "(warm up eagerly before capturing)")
            buf = _COUNTERS[device] = torch.zeros(_MAX_COUNTERS, dtype=torch.int32, device=device)
        return buf


def _pdl(t: torch.Tensor, pdl: bool | None) -> bool:
    """Programmatic dependent launch (KernelOptions.lora_pdl; Hopper and later): each kernel is launched
    while the one before it still runs and waits for it in-kernel (griddepcontrol), so the launch gap
    between the shrink and its expand is hidden and the expand loads y before the shrink's sums are in."""
    if pdl is None:
        pdl = options.current().lora_pdl
    return bool(pdl) and t.is_cuda and torch.cuda.get_device_capability(C.device_of(t))[0] >= 9


def lora_shrink(x: torch.Tensor, a: torch.Tensor, indices: torch.Tensor, order: torch.Tensor,
                config: ShrinkConfig | None = None, pdl: bool | None = None) -> torch.Tensor:
    """x A^T per token as [1, T, R] fp32 (the sum of its partials); rows of tokens without a slot unset.
    `config` overrides the tiles, `pdl` KernelOptions.lora_pdl (benchmarks and tests)."""
    num_tokens, k = x.shape
    _, r, _ = a.shape
    if x.stride(1) != 1 or a.stride(2) != 1:
        raise ValueError("lora_shrink needs row-major x and A")
    cfg = config or shrink_config(num_tokens, k, r, _sms(x), a.shape[0])
    split = cfg.splits > 1
    buf = torch.empty(cfg.splits + 1 if split else 1, num_tokens, r, dtype=torch.float32, device=x.device)
    out = buf[-1:]
    if num_tokens:
        device = C.device_of(x) if x.is_cuda else x.device
        counters = _counters(device) if split else buf
        use_pdl = _pdl(x, pdl)
        grid = (triton.cdiv(num_tokens, cfg.block_t), cfg.splits, cfg.slot_par)
        _shrink_kernel[grid](x, a, indices, order, buf, out, counters, num_tokens, r, k, cfg.k_per_split,
                             cfg.splits, x.stride(0), a.stride(0), a.stride(1), buf.stride(0), buf.stride(1),
                             out.stride(1), IEEE=x.dtype == torch.float32, SPLIT=split, BLOCK_T=cfg.block_t,
                             BLOCK_R=_block_r(r), BLOCK_K=cfg.block_k, RED=cfg.red, PDL=use_pdl,
                             num_warps=cfg.num_warps, num_stages=cfg.num_stages, launch_pdl=use_pdl)
    return out


def check_slices(slices: tuple[int, ...] | None, n: int, r: int) -> None:
    if slices is None:
        return
    if not 1 <= len(slices) <= 4 or sum(slices) != n or r % len(slices) or min(slices) <= 0:
        raise ValueError(f"lora_expand slices={tuple(slices)} must be 1 to 4 positive output sizes adding up to "
                         f"B's {n} rows, over B's {r} columns split evenly")


def lora_expand(partials: torch.Tensor, b: torch.Tensor, indices: torch.Tensor, order: torch.Tensor,
                y: torch.Tensor, slices: tuple[int, ...] | None = None,
                config: ExpandConfig | None = None, pdl: bool | None = None) -> torch.Tensor:
    """y[t] += (sum of the partials)[t] @ B[slot(t)]^T in place. `slices`: B is block-diagonal, output
    rows in consecutive groups of these sizes each over its own equal share of B's columns (a packed
    qkv/gate_up layer); only those blocks are read (the rest counts as zero)."""
    splits, num_tokens, r = partials.shape
    _, n, _ = b.shape
    if b.stride(2) != 1 or y.stride(1) != 1 or partials.stride(2) != 1:
        raise ValueError("lora_expand needs row-major partials, B and y")
    check_slices(slices, n, r)
    if num_tokens:
        cfg = config or expand_config(num_tokens, n, _sms(y))
        grid = (triton.cdiv(num_tokens, cfg.block_t), triton.cdiv(n, cfg.block_n))
        ends = [sum(slices[:i + 1]) for i in range(len(slices) - 1)] if slices else []
        ends += [n] * (3 - len(ends))
        group_r = r // len(slices) if slices and len(slices) > 1 else 0
        use_pdl = _pdl(y, pdl)
        _expand_kernel[grid](partials, b, indices, order, y, num_tokens, n, r, splits,
                             partials.stride(0), partials.stride(1), b.stride(0), b.stride(1), y.stride(0), *ends,
                             IEEE=b.dtype == torch.float32, BLOCK_T=cfg.block_t, BLOCK_N=cfg.block_n,
                             BLOCK_R=_block_r(r), GROUP_R=group_r, PDL=use_pdl, num_warps=cfg.num_warps,
                             launch_pdl=use_pdl)
    return y
