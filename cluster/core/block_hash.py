"""The one prefix-block hash: used by the BlockManager (prefix cache keys) and the Router (affinity).

Pure Python. A full block's key is a SHA-256 chained over (the previous block's key, the block's
token ids), so one key names the whole prefix up to and including that block; two requests share
the key of block j exactly when their first (j + 1) * block_size tokens are equal.
"""
from __future__ import annotations

import hashlib
from array import array
from typing import Sequence


def hash_block(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """The key of one full block whose prefix (the blocks before it) has key `parent` (b"" for the first)."""
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


def extend_block_hashes(keys: list[bytes], token_ids: Sequence[int], block_size: int,
                        max_blocks: int | None = None, salt: bytes = b"") -> list[bytes]:
    """Append to `keys` (the keys of the first len(keys) full blocks of `token_ids`) those of the
    following full blocks, up to `max_blocks` blocks in all; returns `keys`.

    `salt` is the first block's parent: what else the K/V depend on (a LoRA adapter's
    `cache_salt()`), so blocks computed under different adapters never share a key."""
    num_full = len(token_ids) // block_size
    if max_blocks is not None:
        num_full = min(num_full, max_blocks)
    for j in range(len(keys), num_full):
        keys.append(hash_block(keys[j - 1] if j else salt, token_ids[j * block_size:(j + 1) * block_size]))
    return keys


def block_hashes(token_ids: Sequence[int], block_size: int, max_blocks: int | None = None,
                 salt: bytes = b"") -> list[bytes]:
    """The keys of the leading full blocks of `token_ids` (at most `max_blocks`)."""
    return extend_block_hashes([], token_ids, block_size, max_blocks, salt)
