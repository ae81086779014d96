"""KV-cache block accounting on the driver: free list, reference counts, block tables, prefix cache.

Pure Python (no torch). The workers own the memory; this class only decides which block ids each
request's tokens live in, so token `p` of a request sits in slot `table[p // block_size]`, offset
`p % block_size`.

Prefix caching (vLLM's automatic prefix caching, V1 flavour):
- Every FULL block is keyed by `block_hash.hash_block`, a SHA-256 chained over (parent block key, the
  block's token ids), so a key names the whole prefix up to and including that block.
- A block is registered in the cache as soon as it is allocated for a step that fills it (its
  tokens are known then). Requests admitted later in the same step may reuse it: the attention layer
  writes every new K/V into the cache before any sequence reads it.
- At admission a request reuses the cached blocks of its longest cached prefix of full blocks, but
  never all of its tokens: the last token must be recomputed to get logits. Hits are whole blocks,
  so a fully cached prompt reuses all but its last block and recomputes that block (vLLM V1; this
  also means nobody ever writes into a shared cached block).
- A cached block whose reference count drops to 0 is "evictable": it keeps its contents and key and
  counts as free. It is evicted (key dropped) only when the plain free list is empty, least recently
  released first. A request's blocks are released tail first, so the deepest blocks of a chain,
  which are the least likely to be shared, go before the prefix they hang from.

Copy-on-write (for forked sequences): `fork` shares a parent's blocks with a child (ref count up).
Whenever a request is about to write into a block whose ref count is above 1, it gets a fresh block
instead and a (src, dst) copy is queued; `take_pending_copies` hands them to the step, which copies
before the forward.
"""
from __future__ import annotations

from collections import OrderedDict, deque

from pagedray.cluster.core.block_hash import extend_block_hashes
from pagedray.cluster.core.request import Request


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def check_fits_kv_cache(num_tokens: int, num_prompt_tokens: int, max_tokens: int | None, max_model_len: int,
                        num_blocks: int, block_size: int, lookahead: int = 0) -> None:
    """ValueError when a request could outgrow the whole KV cache (it could never finish).

    The one capacity check: the front's validation and the scheduler both call it. A request of
    `num_tokens` tokens now may grow to min(max_model_len, prompt + max_tokens) tokens, minus the
    last sampled one, whose K/V is never computed.
    """
    final = max_model_len if max_tokens is None else min(max_model_len, num_prompt_tokens + max_tokens)
    needed = max(num_tokens, final - 1) + lookahead
    capacity = num_blocks * block_size
    if needed > capacity:
        extra = f" (with {lookahead} lookahead slots of speculative decoding)" if lookahead else ""
        raise ValueError(f"max_tokens={max_tokens} cannot fit: the prompt ({num_prompt_tokens} tokens) plus "
                         f"max_tokens may need {needed} tokens of KV cache{extra}, above its capacity of {capacity} "
                         f"tokens ({num_blocks} blocks of {block_size}): lower max_tokens")


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an integer >= 1, got {num_blocks!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._key: list[bytes | None] = [None] * num_blocks   # set only while a block is in _cached
        self._free: deque[int] = deque(range(num_blocks))     # ref 0, no key
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0, keyed; oldest first
        self._cached: dict[bytes, int] = {}
        self._tables: dict[str, list[int]] = {}
        self._hashes: dict[str, list[bytes]] = {}    # per request: keys of its full blocks so far
        self._num_keyed: dict[str, int] = {}         # per request: leading blocks already offered to the cache
        self._pending_copies: list[tuple[int, int]] = []
        # Per request: the lowest table index copy-on-write replaced since `take_replaced` (the
        # scheduler resends a request whose blocks already on the workers changed).
        self._replaced: dict[str, int] = {}
        self.prefix_cache_hit_tokens = 0
        self.prefix_cache_query_tokens = 0

    # -- stats ---------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take: never used, or cached with no user (evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def hit_rate(self) -> float:
        q = self.prefix_cache_query_tokens
        return self.prefix_cache_hit_tokens / q if q else 0.0

    def get_ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def get_block_ids(self, request_id: str) -> list[int]:
        """A copy of the request's block table ([] when it holds none)."""
        return list(self._tables.get(request_id, ()))

    def block_table(self, request_id: str) -> list[int]:
        """The request's live block table, without a copy: read it, never change it."""
        return self._tables[request_id]

    @property
    def tables(self) -> dict[str, list[int]]:
        """Every request's live block table by id, without copies: read them, never change them."""
        return self._tables

    def has_replaced(self) -> bool:
        """Whether copy-on-write replaced a block of any request since its `take_replaced`."""
        return bool(self._replaced)

    def take_replaced(self, request_id: str) -> int | None:
        """The lowest index of the request's table that copy-on-write replaced since the last call."""
        return self._replaced.pop(request_id, None) if self._replaced else None

    # -- prefix cache --------------------------------------------------------
    def _block_hashes(self, request: Request) -> list[bytes]:
        """Keys of the request's full blocks, extended incrementally (tokens only ever get appended)."""
        keys = self._hashes.setdefault(request.request_id, [])
        return extend_block_hashes(keys, request.all_token_ids, self.block_size, salt=request.cache_salt)

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """The cached blocks of the request's longest cached prefix, and the tokens they hold.

        No side effect on blocks or stats; pass the block ids to `allocate_slots` to claim them.
        Capped so that at least the request's last token is left to compute. A request that asks
        for prompt_logprobs gets no hits (as in vLLM): skipped positions would have no logits.
        """
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        keys = self._block_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for key in keys[:max_blocks]:
            block = self._cached.get(key)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def _offer_full_blocks(self, request: Request, num_tokens: int) -> None:
        """Register the request's blocks that are full once `num_tokens` tokens are computed.

        Only blocks of known tokens: one holding a token still in flight (a placeholder) has no key
        yet and is offered by a later allocation.
        """
        rid = request.request_id
        num_tokens = min(num_tokens, request.num_tokens)
        if num_tokens // self.block_size <= self._num_keyed[rid]:
            return   # no block became full (most decode steps)
        keys, table = self._block_hashes(request), self._tables[rid]
        for j in range(self._num_keyed[rid], num_tokens // self.block_size):
            block, key = table[j], keys[j]
            # A duplicate of an already cached block stays private and goes to the free list when released.
            if self._key[block] is None and key not in self._cached:
                self._key[block] = key
                self._cached[key] = block
        self._num_keyed[rid] = max(self._num_keyed[rid], num_tokens // self.block_size)

    # -- block primitives ----------------------------------------------------
    def _take_block(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._cached[self._key[block]]
            self._key[block] = None
        self._ref[block] = 1
        return block

    def _claim(self, block: int) -> None:
        if self._ref[block] == 0:
            del self._evictable[block]
        self._ref[block] += 1

    def _release(self, block: int) -> None:
        self._ref[block] -= 1
        if self._ref[block] == 0:
            if self._key[block] is not None:
                self._evictable[block] = None     # most recently released goes last
            else:
                self._free.append(block)

    def _copy_on_write(self, request_id: str, index: int) -> None:
        table = self._tables[request_id]
        src, dst = table[index], self._take_block()
        self._release(src)
        table[index] = dst
        self._pending_copies.append((src, dst))
        self._replaced[request_id] = min(index, self._replaced.get(request_id, index))
        # The private copy is offered to the cache again once it is full (a duplicate key is skipped).
        self._num_keyed[request_id] = min(self._num_keyed[request_id], index)

    # -- public API ----------------------------------------------------------
    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[int] | None = None,
                       num_lookahead_tokens: int = 0) -> list[int] | None:
        """Make room for the request's next `num_new_tokens` tokens; all or nothing.

        First call for a request (admission): `computed_blocks` are the ids from `get_computed_blocks`
        and the caller then sets `request.num_computed_tokens = len(computed_blocks) * block_size`.
        Later calls: slots start at `request.num_computed_tokens`. Shared blocks about to be written
        get copied (see `take_pending_copies`). Returns the block ids appended to the request's table,
        or None (nothing changed) when the free blocks do not suffice. `num_lookahead_tokens`
        more slots are reserved past them (speculative decoding: a step's proposals, unknown tokens).
        """
        if num_new_tokens == 1 and not num_lookahead_tokens and not computed_blocks and self.fits_one_token(request):
            return []   # the common decode step, first
        rid, bs = request.request_id, self.block_size
        table = self._tables.get(rid)
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        if table is not None and not computed_blocks and self._fits_private(request, table, num_new_tokens,
                                                                            num_lookahead_tokens):
            # The common decode step: the tokens go into blocks the request alone holds.
            if self.enable_prefix_caching:
                self._offer_full_blocks(request, request.num_computed_tokens + num_new_tokens)
            return []
        admitting = table is None
        if admitting:
            table = list(computed_blocks or [])
            self._check_computed(request, table)
            start = len(table) * bs
        else:
            if computed_blocks:
                raise ValueError(f"computed_blocks is only for the first allocation of request {rid!r}")
            table, start = self._tables[rid], request.num_computed_tokens
        end = start + num_new_tokens
        if end > request.num_tokens + request.num_output_placeholders + len(request.spec_token_ids):
            raise ValueError(f"cannot allocate past the request's {request.num_tokens} known tokens, "
                             f"{request.num_output_placeholders} in flight and {len(request.spec_token_ids)} "
                             f"proposed (asked for {start} + {num_new_tokens})")
        num_new_blocks = max(0, _cdiv(end + num_lookahead_tokens, bs) - len(table))
        reserved = end + num_lookahead_tokens
        written = range(start // bs, min(len(table), _cdiv(reserved, bs))) if num_new_tokens else range(0)
        cow = [j for j in written if self._ref[table[j]] > 1]
        revived = sum(1 for b in table if self._ref[b] == 0) if admitting else 0
        if num_new_blocks + len(cow) > self.num_free_blocks - revived:
            return None
        if admitting:
            for block in table:
                self._claim(block)
            self._tables[rid], self._num_keyed[rid] = table, len(table)
            if self.enable_prefix_caching:
                self.prefix_cache_query_tokens += request.num_tokens
                self.prefix_cache_hit_tokens += start
        for j in cow:
            self._copy_on_write(rid, j)
        new_blocks = [self._take_block() for _ in range(num_new_blocks)]
        table.extend(new_blocks)
        if self.enable_prefix_caching:
            self._offer_full_blocks(request, end)
        return new_blocks

    def fits_one_token(self, request: Request) -> bool:
        """`allocate_slots(request, 1)` for a running request that has one token to run (the caller
        knows: that is its decode step) and whose next token goes into a block it alone holds: True,
        with nothing to allocate (prefix caching: the block is offered once full). False: nothing
        changed, ask allocate_slots."""
        table = self._tables.get(request.request_id)
        if table is None:
            return False
        pos = request.num_computed_tokens
        index = pos // self.block_size
        if index >= len(table) or self._ref[table[index]] != 1:
            return False
        if self.enable_prefix_caching:
            self._offer_full_blocks(request, pos + 1)
        return True

    def _fits_private(self, request: Request, table: list[int], num_new_tokens: int, lookahead: int = 0) -> bool:
        """Whether the next tokens need no new block and no copy (every block written has ref 1)."""
        start = request.num_computed_tokens
        end = start + num_new_tokens + lookahead
        if (num_new_tokens == 0 or end > len(table) * self.block_size
                or end - lookahead > request.num_tokens + request.num_output_placeholders
                + len(request.spec_token_ids)):
            return False
        ref, bs = self._ref, self.block_size
        first, last = start // bs, (end - 1) // bs
        if first == last:
            return ref[table[first]] == 1
        return all(ref[table[j]] == 1 for j in range(first, last + 1))

    def _check_computed(self, request: Request, blocks: list[int]) -> None:
        if not blocks:
            return
        keys = self._block_hashes(request)
        if len(blocks) > min(len(keys), (request.num_tokens - 1) // self.block_size) or any(
                self._key[b] != k for b, k in zip(blocks, keys)):
            raise ValueError(f"computed_blocks of request {request.request_id!r} are not its cached "
                             "prefix (stale result of get_computed_blocks?)")

    def free(self, request_id: str) -> None:
        """Release every block the request holds (tail first, for eviction order). Unknown id: no-op."""
        for block in reversed(self._tables.pop(request_id, [])):
            self._release(block)
        self._replaced.pop(request_id, None)
        self._hashes.pop(request_id, None)
        self._num_keyed.pop(request_id, None)

    def trim(self, request_id: str, num_tokens: int) -> int:
        """Release the request's blocks past those holding its first `num_tokens` tokens (speculative
        decoding: the slots of rejected proposals). Returns the table's new length."""
        table = self._tables[request_id]
        keep = _cdiv(num_tokens, self.block_size)
        while len(table) > keep:
            self._release(table.pop())
        self._num_keyed[request_id] = min(self._num_keyed[request_id], keep)
        return keep

    def fork(self, parent_req_id: str, child_req_id: str, num_tokens: int | None = None) -> None:
        """Share the parent's blocks (those holding its first `num_tokens` tokens; default all) with a child."""
        if parent_req_id not in self._tables:
            raise ValueError(f"fork: parent request {parent_req_id!r} holds no blocks")
        if child_req_id in self._tables:
            raise ValueError(f"fork: child request {child_req_id!r} already holds blocks")
        parent = self._tables[parent_req_id]
        if num_tokens is None:
            num_tokens = len(parent) * self.block_size
        if not 0 <= num_tokens <= len(parent) * self.block_size:
            raise ValueError(f"fork: num_tokens must be in [0, {len(parent) * self.block_size}] "
                             f"(the parent's slots), got {num_tokens}")
        shared = parent[:_cdiv(num_tokens, self.block_size)]
        for block in shared:
            self._ref[block] += 1
        self._tables[child_req_id] = list(shared)
        self._num_keyed[child_req_id] = min(self._num_keyed[parent_req_id], num_tokens // self.block_size)

    def copy_on_write(self, request_id: str, position: int) -> bool:
        """Give the request a private copy of the block holding token `position` if that block is shared.

        Returns False (nothing changed) when no free block is left for the copy.
        """
        table = self._tables.get(request_id, [])
        index = position // self.block_size
        if index >= len(table) or self._ref[table[index]] <= 1:
            return True
        if self.num_free_blocks == 0:
            return False
        self._copy_on_write(request_id, index)
        return True

    def take_pending_copies(self) -> list[tuple[int, int]]:
        """The (src, dst) block copies queued since the last call; the step must do them before the forward."""
        copies, self._pending_copies = self._pending_copies, []
        return copies
