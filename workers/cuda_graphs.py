"""CUDA graphs for decode steps.

On the GPU machines one small PyTorch op costs ~46 µs of host time, so an eager
decode step of a 32-layer model spends far longer launching than computing.
Decode steps are therefore replayed from graphs captured once per batch-size
bucket, after the KV cache exists. Inputs are copied into static buffers; rows
past the real batch are padding whose K/V go to slot -1 (skipped by the cache
write) and whose outputs are dropped.

The attention kernel's grid depends only on the host-side max_seq_len, so each
graph is captured at max_model_len and replays correctly for shorter contexts.
"""
from __future__ import annotations

import logging

import torch

from pagedray.models.layers.attention import AttentionMetadata

logger = logging.getLogger(__name__)


MAX_GRAPH_BATCH = 1024


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """vLLM's buckets: 1, 2, 4, then multiples of 8, up to max_num_seqs (at most MAX_GRAPH_BATCH;
    vLLM stops at 512, but an eager decode step of ~1000 sequences is bound by its launches on the
    host); larger decode batches run eagerly."""
    limit = min(max_num_seqs, MAX_GRAPH_BATCH)
    sizes = [b for b in (1, 2, 4) if b <= limit] + list(range(8, limit + 1, 8))
    if sizes[-1] < limit:
        sizes.append(limit)
    return sizes


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], batch_sizes: list[int],
                 max_seq_len: int, block_size: int, device: torch.device) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.batch_sizes = sorted(batch_sizes)
        self.max_seq_len = max_seq_len
        self.max_blocks = -(-max_seq_len // block_size)
        n = self.batch_sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((n, self.max_blocks), dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None
        self.num_replays = 0  # decode steps served by a graph (tests and benchmarks read it)

    def _metadata(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs], block_tables=self.block_tables[:bs],
            seq_lens=self.seq_lens[:bs], query_start_loc=self.query_start_loc[:bs + 1],
            seq_lens_list=[self.max_seq_len] * bs, query_lens_list=[1] * bs,
            max_query_len=1, max_seq_len=self.max_seq_len)

    def _forward(self, bs: int) -> torch.Tensor:
        return self.model(self.input_ids[:bs], self.positions[:bs], self.kv_caches, self._metadata(bs))

    @torch.inference_mode()
    def capture(self) -> None:
        # Largest first, so smaller graphs reuse the memory pool the largest one reserved.
        for bs in reversed(self.batch_sizes):
            self._forward(bs)  # warm-up: compiles kernels, settles the allocator
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.outputs[bs] = self._forward(bs)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        logger.info("captured %d decode graphs (batch sizes %s)", len(self.graphs), self.batch_sizes)

    def can_run(self, meta: AttentionMetadata) -> bool:
        return (bool(self.graphs) and meta.is_decode_only and meta.num_seqs <= self.batch_sizes[-1]
                and meta.block_tables.shape[1] <= self.max_blocks and meta.max_seq_len <= self.max_seq_len)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        n = meta.num_seqs
        bs = next(b for b in self.batch_sizes if b >= n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.seq_lens[:n].copy_(meta.seq_lens)
        if n < bs:   # padding rows: no cache write, a 1-token context (each fill is a launch)
            self.slot_mapping[n:bs].fill_(-1)
            self.seq_lens[n:bs].fill_(1)
        width = meta.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(meta.block_tables)
        self.graphs[bs].replay()
        self.num_replays += 1
        return self.outputs[bs][:n]
