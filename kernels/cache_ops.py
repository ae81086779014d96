"""Launchers of the KV-cache kernels (cache_ops.cu): reshape_and_cache, copy_blocks."""
from __future__ import annotations

import torch

from pagedray.kernels import _compile as C

_PTR_TABLES: dict[tuple[int, ...], torch.Tensor] = {}


def _chunk_bytes(*sizes: int) -> int:
    """Largest access width (16, 8, 4, 2, 1 bytes) dividing every size and address given."""
    for width in (16, 8, 4, 2):
        if all(s % width == 0 for s in sizes):
            return width
    return 1


def check_cache_args(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                     value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """What reshape_and_cache (and rotary.cu's fused rotary + cache write) requires of its arguments."""
    C.check_cuda("key", key)
    dev = key.device
    for name, t in (("key", key), ("value", value)):
        C.check_cuda(name, t, dev)
        C.check_dim(name, t, 3)
        C.check_rows(name, t)
    if value.shape != key.shape:
        raise ValueError(f"value shape {tuple(value.shape)} != key shape {tuple(key.shape)}")
    if value.dtype != key.dtype:
        raise ValueError(f"value dtype {value.dtype} != key dtype {key.dtype}")
    num_tokens, num_kv_heads, head_size = key.shape
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        C.check_cuda(name, cache, dev)
        C.check_dtype(name, cache, key.dtype)
        C.check_dim(name, cache, 4)
        C.check_contiguous(name, cache)
        if cache.shape[1] != num_kv_heads or cache.shape[3] != head_size:
            raise ValueError(f"{name} shape {tuple(cache.shape)} does not match key heads/size "
                             f"({num_kv_heads}, {head_size})")
    if value_cache.shape != key_cache.shape:
        raise ValueError(f"value_cache shape {tuple(value_cache.shape)} != key_cache shape "
                         f"{tuple(key_cache.shape)}")
    C.check_cuda("slot_mapping", slot_mapping, dev)
    C.check_dtype("slot_mapping", slot_mapping, torch.int64)
    C.check_shape("slot_mapping", slot_mapping, (num_tokens,))


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                      value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write key/value [T, Hkv, D] into caches [NB, Hkv, BS, D] at slot_mapping [T] (int64; -1 skips)."""
    check_cache_args(key, value, key_cache, value_cache, slot_mapping)
    num_tokens, num_kv_heads, head_size = key.shape
    if num_tokens == 0:
        return
    item = key.element_size()
    width = _chunk_bytes(head_size * item, key.stride(0) * item, value.stride(0) * item, key.data_ptr(),
                         value.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr())
    row_chunks = head_size * item // width
    dev = C.device_of(key)
    kernel = C.get_kernel("cache_ops.cu", "reshape_and_cache", dev, CHUNK_BYTES=width)
    threads = min(256, max(32, -(-num_kv_heads * row_chunks // 32) * 32))
    C.launch(kernel, (num_tokens,), (threads,),
             (C.ptr(key), C.ptr(value), C.ptr(key_cache), C.ptr(value_cache), C.ptr(slot_mapping),
              C.i64(key.stride(0) * item // width), C.i64(value.stride(0) * item // width),
              C.i32(num_kv_heads), C.i32(row_chunks), C.i32(key_cache.shape[2])), dev)


def _ptr_table(kv_caches: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Device int64 tensor of the layers' base addresses (built once per set of caches)."""
    key = tuple(c.data_ptr() for c in kv_caches)
    table = _PTR_TABLES.get(key)
    if table is None:
        if len(_PTR_TABLES) > 16:
            _PTR_TABLES.clear()
        table = torch.tensor(key, dtype=torch.int64, device=device)
        _PTR_TABLES[key] = table
    return table


def copy_blocks(kv_caches: list[torch.Tensor], src_to_dst: list[tuple[int, int]]) -> None:
    """Copy block src to block dst in every layer's [2, NB, Hkv, BS, D] cache (K and V halves).

    A block must not be both a source and a destination in one call (the copies run in parallel).
    """
    if not kv_caches:
        raise ValueError("kv_caches must hold at least one layer's cache")
    first = kv_caches[0]
    C.check_cuda("kv_caches[0]", first)
    for i, cache in enumerate(kv_caches):
        C.check_cuda(f"kv_caches[{i}]", cache, first.device)
        C.check_contiguous(f"kv_caches[{i}]", cache)
        if cache.shape != first.shape or cache.dtype != first.dtype:
            raise ValueError(f"kv_caches[{i}] is {tuple(cache.shape)} {cache.dtype}, "
                             f"kv_caches[0] is {tuple(first.shape)} {first.dtype}")
    if first.dim() != 5 or first.shape[0] != 2:
        raise ValueError(f"kv_caches[i] must be [2, num_blocks, heads, block_size, head_size], "
                         f"got {tuple(first.shape)}")
    if not src_to_dst:
        return
    num_blocks = first.shape[1]
    for src, dst in src_to_dst:
        if not (0 <= src < num_blocks and 0 <= dst < num_blocks):
            raise ValueError(f"src_to_dst pair ({src}, {dst}) outside [0, {num_blocks})")
    block_bytes = first[0, 0].numel() * first.element_size()
    width = _chunk_bytes(block_bytes, *(c.data_ptr() for c in kv_caches))
    block_chunks = block_bytes // width
    dev = C.device_of(first)
    pairs = torch.tensor(src_to_dst, dtype=torch.int64).to(dev, non_blocking=True)
    kernel = C.get_kernel("cache_ops.cu", "copy_blocks", dev, CHUNK_BYTES=width)
    C.launch(kernel, (len(src_to_dst), len(kv_caches)), (min(256, max(32, block_chunks)),),
             (C.ptr(_ptr_table(kv_caches, dev)), C.ptr(pairs), C.i64(num_blocks * block_chunks),
              C.i32(block_chunks)), dev)
