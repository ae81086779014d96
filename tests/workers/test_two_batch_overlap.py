"""Two-batch overlap of decode graphs (workers/cuda_graphs.py, workers/two_batch.py): which buckets
split, the split forward against the whole-batch one (on a CPU the halves run one after the other),
and the pipelined form's hand-over between its two host threads with the CUDA calls stubbed (the
two-stream capture itself is checked in tests/workers/test_gpu_end_to_end.py)."""
from __future__ import annotations

import contextlib
import threading
import types

import pytest
import torch

from testkit.tiny_models import allocate_block_tables, build_attn_metadata, make_tiny_llama

from pagedray.common.config import KernelOptions
from pagedray.workers import two_batch
from pagedray.workers.cuda_graphs import DecodeGraphs
from pagedray.workers.two_batch import two_batch_forward

BLOCK_SIZE = 4


def test_buckets_split_in_multiples_of_8_from_the_threshold():
    graphs = DecodeGraphs(torch.nn.Identity(), [], [1, 8, 16, 24, 64], 32, BLOCK_SIZE, torch.device("cpu"),
                          two_batch_min=24)
    assert [graphs.split_at(b) for b in (1, 8, 16, 24, 64)] == [0, 0, 0, 8, 32]
    assert DecodeGraphs(torch.nn.Identity(), [], [64], 32, BLOCK_SIZE, torch.device("cpu")).split_at(64) == 0


def test_negative_threshold_is_refused():
    with pytest.raises(ValueError, match="two_batch_overlap_min_batch must be >= 0, got -1"):
        KernelOptions(two_batch_overlap_min_batch=-1)


@torch.no_grad()
def test_split_forward_equals_the_whole_batch(tmp_path):
    from transformers import AutoConfig

    from pagedray.models import get_kv_cache_spec, get_model
    path = make_tiny_llama(tmp_path)
    config = AutoConfig.from_pretrained(path)
    model = get_model(config, path, torch.float32, torch.device("cpu"))
    layers, kv_heads, head = get_kv_cache_spec(config, 1)
    gen = torch.Generator().manual_seed(0)
    lens = [int(n) for n in torch.randint(3, 20, (10,), generator=gen)]
    tables = allocate_block_tables(lens, BLOCK_SIZE)
    num_blocks = 1 + sum(map(len, tables))

    def run(split: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        # The same random cache for both runs (the context before this step), then one decode token a sequence.
        caches = [torch.randn(2, num_blocks, kv_heads, BLOCK_SIZE, head, generator=torch.Generator().manual_seed(i))
                  for i in range(layers)]
        ids = torch.arange(len(lens)) * 7 % config.vocab_size
        meta, pos = build_attn_metadata(lens, [1] * len(lens), tables, BLOCK_SIZE)
        if not split:
            return model(ids, pos, caches, meta), caches
        halves = [build_attn_metadata(lens[a:b], [1] * (b - a), tables[a:b], BLOCK_SIZE)[0]
                  for a, b in ((0, split), (split, len(lens)))]
        return two_batch_forward(model, caches, ids, pos, *halves), caches

    whole, whole_caches = run(0)
    split, split_caches = run(4)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)
    for a, b in zip(split_caches, whole_caches):   # each half wrote its own rows' K/V, and only those
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


class _LoggedMarks(two_batch._Marks):
    """The pipelined form's marks without CUDA: records and waits logged in the order the threads
    issue them (a CUDA wait names an event already recorded; here one missing fails the wait)."""

    def __init__(self, keys: list[tuple]) -> None:
        self.events = {k: (None, threading.Event()) for k in keys}
        self.failed = False
        self.log: list[tuple[str, int, tuple]] = []
        _LoggedMarks.last = self

    def record(self, key: tuple) -> None:
        self.log.append(("record", threading.current_thread() is threading.main_thread(), key))
        self.events[key][1].set()

    def wait(self, key: tuple) -> None:
        flag = self.events[key][1]
        while not flag.wait(0.05):
            if self.failed:
                raise RuntimeError("the other half failed")
        self.log.append(("wait", threading.current_thread() is threading.main_thread(), key))


@pytest.fixture
def no_cuda_calls(monkeypatch):
    monkeypatch.setattr(two_batch, "_Marks", _LoggedMarks)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    return types.SimpleNamespace(device=torch.device("cpu"))   # the side stream


def _tiny_model(tmp_path, layers: int):
    from transformers import AutoConfig

    from pagedray.models import get_kv_cache_spec, get_model
    path = make_tiny_llama(tmp_path, num_hidden_layers=layers)
    config = AutoConfig.from_pretrained(path)
    model = get_model(config, path, torch.float32, torch.device("cpu"))
    return model, get_kv_cache_spec(config, 1), config.vocab_size


@torch.no_grad()
def test_pipelined_halves_take_turns(tmp_path, no_cuda_calls):
    """Each half's attention i after the other's last one (A's i after B's i-1, B's i after A's i),
    each half's projections after the other's previous ones, every wait on a mark already
    recorded, and the hidden states of the whole batch."""
    n = 3
    model, (layers, kv_heads, head), vocab = _tiny_model(tmp_path, n)
    lens = [5, 9, 3, 12, 7, 4]
    tables = allocate_block_tables(lens, BLOCK_SIZE)
    caches = [torch.randn(2, 1 + sum(map(len, tables)), kv_heads, BLOCK_SIZE, head,
                          generator=torch.Generator().manual_seed(i)) for i in range(layers)]
    ids = torch.arange(len(lens)) * 7 % vocab
    meta, pos = build_attn_metadata(lens, [1] * len(lens), tables, BLOCK_SIZE)
    whole = model(ids, pos, [c.clone() for c in caches], meta)
    halves = [(ids[a:b], pos[a:b], build_attn_metadata(lens[a:b], [1] * (b - a), tables[a:b], BLOCK_SIZE)[0])
              for a, b in ((0, 3), (3, 6))]
    attention = [m for m in model.modules() if isinstance(m, two_batch.Attention)]
    first, second = two_batch._pipelined(lambda i, p, m: model(i, p, caches, m), attention, halves, no_cuda_calls)
    torch.testing.assert_close(torch.cat([first, second]), whole, rtol=1e-5, atol=1e-5)

    log = _LoggedMarks.last.log
    seen = set()
    for op, _, key in log:
        assert op == "record" or key in seen, f"waited on {key} before it was recorded: {log}"
        seen.add(key) if op == "record" else None
    waits = {(main, key) for op, main, key in log if op == "wait"}
    expected = ({(True, ("attn", 1, i - 1)) for i in range(1, n)}     # A's attention i after B's i-1
                | {(False, ("attn", 0, i)) for i in range(n)}          # B's attention i after A's i
                | {(True, ("proj", 1, i)) for i in range(1, n)}        # A's projections after B's previous
                | {(False, ("proj", 0, i + 1)) for i in range(n)})     # B's projections after A's
    assert waits == expected
    assert {key for op, _, key in log if op == "record"} == (
        {(k, h, i) for k in ("attn", "proj") for h in (0, 1) for i in range(n)} | {("proj", 0, n)})


@pytest.mark.parametrize("failing_half", [0, 1])
@torch.no_grad()
def test_pipelined_failure_in_either_half_raises_without_hanging(tmp_path, no_cuda_calls, failing_half):
    model, (layers, kv_heads, head), _ = _tiny_model(tmp_path, 2)
    lens = [5, 9, 3, 12]
    tables = allocate_block_tables(lens, BLOCK_SIZE)
    caches = [torch.zeros(2, 1 + sum(map(len, tables)), kv_heads, BLOCK_SIZE, head) for _ in range(layers)]
    meta, pos = build_attn_metadata(lens, [1] * 4, tables, BLOCK_SIZE)
    ids = torch.tensor([1, 2, 3, 4])
    halves = [(ids[a:b], pos[a:b], build_attn_metadata(lens[a:b], [1] * 2, tables[a:b], BLOCK_SIZE)[0])
              for a, b in ((0, 2), (2, 4))]
    attention = [m for m in model.modules() if isinstance(m, two_batch.Attention)]

    def break_mid_forward(module, args) -> None:   # in layer 1's MLP: after some marks, before others
        if (threading.current_thread() is threading.main_thread()) == (failing_half == 0):
            raise ValueError(f"half {failing_half} broke")

    handle = model.model.layers[1].mlp.register_forward_pre_hook(break_mid_forward)
    try:
        with pytest.raises(ValueError, match=f"half {failing_half} broke"):
            two_batch._pipelined(lambda i, p, m: model(i, p, caches, m), attention, halves, no_cuda_calls)
    finally:
        handle.remove()
