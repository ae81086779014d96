"""The one prefix-block hash, shared by the BlockManager's prefix cache and the Router's affinity."""
from __future__ import annotations

from pagedray.cluster.core import block_hash
from pagedray.cluster.core.block_hash import block_hashes, extend_block_hashes
from pagedray.cluster.core.block_manager import BlockManager
from pagedray.cluster.core.request import Request
from pagedray.common.sampling_params import SamplingParams

BLOCK = 4


def test_one_key_per_full_block_depth_naming_the_whole_prefix():
    a = block_hashes(list(range(10)), BLOCK)
    b = block_hashes(list(range(8)) + [99, 98, 97], BLOCK)
    assert len(a) == 2 and a == b                        # the partial third block does not count
    assert block_hashes(list(range(3)), BLOCK) == []
    # Same second block, different first block: a different key (the key chains the prefix).
    assert block_hashes([0, 1, 2, 4] + [4, 5, 6, 7], BLOCK)[1] != a[1]
    assert block_hashes([0, 1, 2, 3, 5, 5, 6, 7], BLOCK)[1] != a[1]
    assert len(block_hashes(list(range(100)), BLOCK, max_blocks=3)) == 3
    # Extending keeps the keys already computed and appends the same ones a fresh call gives.
    keys = block_hashes(list(range(5)), BLOCK)
    assert extend_block_hashes(keys, list(range(13)), BLOCK) == block_hashes(list(range(13)), BLOCK)


def test_block_manager_and_router_use_the_same_function(monkeypatch):
    tokens = list(range(11))
    bm = BlockManager(8, BLOCK, enable_prefix_caching=True)
    request = Request("r", tokens, SamplingParams(max_tokens=1))
    assert bm._block_hashes(request) == block_hashes(tokens, BLOCK)
    # Not a copy of the formula: both resolve the one function (patching it changes both).
    from pagedray.cluster.serving import router
    calls = []
    real = block_hash.hash_block
    monkeypatch.setattr(block_hash, "hash_block", lambda p, t: calls.append(list(t)) or real(p, t))
    bm._block_hashes(Request("s", tokens, SamplingParams(max_tokens=1)))
    assert router.block_hashes is block_hashes and calls == [tokens[:4], tokens[4:8]]
