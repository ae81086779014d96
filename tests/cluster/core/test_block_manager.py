"""BlockManager: free-list accounting, ref counts, prefix-cache reuse, LRU eviction, copy-on-write."""
import pytest

from pagedray.cluster.core.block_manager import BlockManager
from pagedray.cluster.core.request import Request
from pagedray.common.sampling_params import SamplingParams

BS = 4


def make_req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams())


def admit(bm: BlockManager, req: Request, num_new: int | None = None) -> list[int] | None:
    """What the scheduler does at admission: claim cached blocks, allocate the rest."""
    blocks, computed = bm.get_computed_blocks(req)
    new = bm.allocate_slots(req, req.num_tokens - computed if num_new is None else num_new, blocks)
    if new is not None:
        req.num_computed_tokens = computed
    return new


def finish_step(req: Request, num_new: int) -> None:
    req.num_computed_tokens += num_new


def test_allocation_and_free_accounting():
    bm = BlockManager(10, BS, enable_prefix_caching=False)
    a = make_req("a", list(range(10)))           # 10 tokens -> 3 blocks
    assert admit(bm, a) == [0, 1, 2]
    assert (bm.num_free_blocks, bm.num_used_blocks) == (7, 3)
    finish_step(a, 10)
    a.append_output_token(99)                     # token 11 still fits block 2
    assert bm.allocate_slots(a, 1) == []
    finish_step(a, 1)
    a.append_output_token(98)                     # token 12 fits block 2 (offset 3)
    assert bm.allocate_slots(a, 1) == []
    finish_step(a, 1)
    a.append_output_token(97)                     # token 13 needs a 4th block
    assert bm.allocate_slots(a, 1) == [3]
    assert bm.get_block_ids("a") == [0, 1, 2, 3] and bm.num_free_blocks == 6
    bm.free("a")
    assert bm.num_free_blocks == 10 and bm.get_block_ids("a") == []
    bm.free("a")                                  # idempotent
    assert bm.num_free_blocks == 10


def test_allocation_is_all_or_nothing():
    bm = BlockManager(3, BS, enable_prefix_caching=False)
    assert admit(bm, make_req("a", list(range(8)))) == [0, 1]
    big = make_req("b", list(range(100, 109)))    # needs 3 blocks, 1 free
    assert admit(bm, big) is None
    assert bm.num_free_blocks == 1 and bm.get_block_ids("b") == []
    with pytest.raises(ValueError, match="num_new_tokens"):
        bm.allocate_slots(big, -1)
    with pytest.raises(ValueError, match="known tokens"):
        bm.allocate_slots(make_req("c", [1]), 2)


def test_prefix_reuse_shares_blocks_and_counts_hits():
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    a = make_req("a", list(range(12)) + [50, 51])           # 3 full blocks + 2
    assert admit(bm, a) == [0, 1, 2, 3]
    assert (bm.prefix_cache_query_tokens, bm.prefix_cache_hit_tokens) == (14, 0)
    b = make_req("b", list(range(8)) + [60, 61, 62, 63, 64])   # shares the first 2 blocks only
    blocks, computed = bm.get_computed_blocks(b)
    assert (blocks, computed) == ([0, 1], 8)
    assert bm.allocate_slots(b, b.num_tokens - computed, blocks) == [4, 5]
    assert bm.get_block_ids("b") == [0, 1, 4, 5]
    assert [bm.get_ref_count(i) for i in range(6)] == [2, 2, 1, 1, 1, 1]
    assert (bm.prefix_cache_query_tokens, bm.prefix_cache_hit_tokens) == (27, 8)
    assert bm.hit_rate == pytest.approx(8 / 27)
    # A different first block breaks the chain even when later blocks match token for token.
    c = make_req("c", [7, 7, 7, 7] + list(range(4, 12)) + [1])
    assert bm.get_computed_blocks(c) == ([], 0)
    bm.free("a")
    assert [bm.get_ref_count(i) for i in range(4)] == [1, 1, 0, 0]
    bm.free("b")
    assert bm.num_free_blocks == 16


def test_fully_cached_prompt_recomputes_its_last_block():
    bm = BlockManager(8, BS, enable_prefix_caching=True)
    a = make_req("a", list(range(8)))
    admit(bm, a)
    bm.free("a")
    again = make_req("a2", list(range(8)))
    # All 8 tokens are cached but the last one must be recomputed for logits: whole blocks only.
    assert bm.get_computed_blocks(again) == ([0], 4)
    longer = make_req("a3", list(range(9)))
    assert bm.get_computed_blocks(longer) == ([0, 1], 8)


def test_blocks_filled_during_decode_are_cached():
    bm = BlockManager(8, BS, enable_prefix_caching=True)
    a = make_req("a", [1, 2, 3])
    admit(bm, a)
    finish_step(a, 3)
    a.append_output_token(4)                      # the 4th token fills block 0 when computed
    bm.allocate_slots(a, 1)
    finish_step(a, 1)
    a.append_output_token(5)
    probe = make_req("p", [1, 2, 3, 4, 9])
    assert bm.get_computed_blocks(probe) == (bm.get_block_ids("a")[:1], 4)


def test_evictable_blocks_count_as_free_and_evict_lru_only_when_needed():
    bm = BlockManager(6, BS, enable_prefix_caching=True)
    x = make_req("x", list(range(0, 8)) + [0])    # blocks 0,1 full, 2 partial
    y = make_req("y", list(range(20, 28)) + [0])  # blocks 3,4 full, 5 partial
    admit(bm, x)
    admit(bm, y)
    bm.free("x")                                  # released first: least recently used
    bm.free("y")
    assert bm.num_free_blocks == 6 and bm.num_used_blocks == 0
    # Two never-keyed blocks (the partial ones) are taken before any cached block is evicted.
    admit(bm, make_req("z", [90, 91, 92, 93, 94]))
    assert sorted(bm.get_block_ids("z")) == [2, 5]
    assert bm.get_computed_blocks(make_req("x2", list(range(8)) + [1]))[1] == 8
    assert bm.get_computed_blocks(make_req("y2", list(range(20, 28)) + [1]))[1] == 8
    # Now eviction: x's blocks go first, tail block (1) before its parent (0).
    new = admit(bm, make_req("w", [70]))
    assert new == [1]
    assert bm.get_computed_blocks(make_req("x3", list(range(8)) + [1]))[1] == 4
    assert bm.get_computed_blocks(make_req("y3", list(range(20, 28)) + [1]))[1] == 8


def test_reused_cached_block_is_revived_not_evicted():
    bm = BlockManager(3, BS, enable_prefix_caching=True)
    a = make_req("a", list(range(8)) + [1])
    admit(bm, a)
    bm.free("a")
    # b reuses both evictable cached blocks and needs 1 more: 3 "free" blocks, but only one may be taken.
    b = make_req("b", list(range(8)) + [2, 3])
    assert admit(bm, b) is not None
    assert bm.get_block_ids("b") == [0, 1, 2] and b.num_computed_tokens == 8
    assert bm.num_free_blocks == 0
    assert admit(bm, make_req("c", [5])) is None


def test_stale_computed_blocks_are_rejected():
    bm = BlockManager(4, BS, enable_prefix_caching=True)
    a = make_req("a", list(range(8)) + [1])
    with pytest.raises(ValueError, match="computed_blocks"):
        bm.allocate_slots(a, 1, [3])


def test_fork_shares_blocks_and_copy_on_write_reports_pair():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    parent = make_req("p", [1, 2, 3, 4, 5, 6])     # block 0 full, block 1 holds 2 tokens
    admit(bm, parent)
    finish_step(parent, 6)
    child = make_req("c", [1, 2, 3, 4, 5, 6])
    child.num_computed_tokens = 6
    bm.fork("p", "c")
    assert bm.get_block_ids("c") == [0, 1]
    assert bm.get_ref_count(0) == bm.get_ref_count(1) == 2
    child.append_output_token(7)                   # writes offset 2 of the shared partial block 1
    assert bm.allocate_slots(child, 1) == []
    assert bm.take_pending_copies() == [(1, 2)]
    assert bm.take_pending_copies() == []
    assert bm.get_block_ids("c") == [0, 2]
    assert [bm.get_ref_count(i) for i in range(3)] == [2, 1, 1]
    parent.append_output_token(8)                  # block 1 is private again: no copy
    bm.allocate_slots(parent, 1)
    assert bm.take_pending_copies() == [] and bm.get_block_ids("p") == [0, 1]
    bm.free("p")
    bm.free("c")
    assert bm.num_free_blocks == 8


def test_copy_on_write_needs_a_free_block():
    bm = BlockManager(2, BS, enable_prefix_caching=False)
    parent = make_req("p", [1, 2, 3, 4, 5])
    admit(bm, parent)
    parent.num_computed_tokens = 5
    bm.fork("p", "c", num_tokens=5)
    child = make_req("c", [1, 2, 3, 4, 5, 6])
    child.num_computed_tokens = 5
    assert bm.copy_on_write("c", 5) is False      # no free block for the copy
    assert bm.allocate_slots(child, 1) is None
    bm.free("p")                                   # block 1 is the child's alone now
    assert bm.allocate_slots(child, 1) == [] and bm.take_pending_copies() == []
    with pytest.raises(ValueError, match="parent"):
        bm.fork("nobody", "x")
