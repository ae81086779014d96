"""Turns one SchedulerOutput into flat tensors, runs the model, samples.

Keeps per-request state between steps so that running requests arrive as
deltas (new tokens, new blocks) rather than whole.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pagedray.models.layers.attention import AttentionMetadata
from pagedray.kernels import ops
from pagedray.workers.messages import Logprobs, ModelRunnerOutput, SchedulerOutput
from pagedray.workers.sampler import Sampler, SamplingRow, logprob_entries
from pagedray.workers.sampling_params import SamplingParams


@dataclass
class CachedRequestState:
    token_ids: list[int]
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    output_start: int = field(init=False)

    def __post_init__(self) -> None:
        self.output_start = self.num_prompt_tokens


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn_metadata: AttentionMetadata
    sample_req_ids: list[str]       # requests that reach the end of their known tokens
    sample_rows: torch.Tensor       # their last-token row in the flat batch
    # Requests that asked for prompt_logprobs, with prompt positions in this chunk that predict a
    # prompt token: (req_id, flat row of the first such position, its position, how many).
    prompt_spans: list[tuple[str, int, int, int]] = field(default_factory=list)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, block_size: int, device: torch.device,
                 seed: int = 0, sample: bool = True) -> None:
        self.model = model
        # Under tensor parallelism every rank computes logits (a collective) but only rank 0 samples.
        self.sample = sample
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler(seed)
        self.requests: dict[str, CachedRequestState] = {}
        self.kv_caches: list[torch.Tensor] = []
        self.graphs = None  # DecodeGraphs once captured

    # -- state ---------------------------------------------------------------
    def update_states(self, sched: SchedulerOutput) -> None:
        for req_id in sched.finished_req_ids:
            self.requests.pop(req_id, None)
        for new in sched.scheduled_new_reqs:
            self.requests[new.req_id] = CachedRequestState(
                list(new.token_ids), new.num_prompt_tokens, new.sampling_params,
                list(new.block_ids), new.num_computed_tokens)
        for delta in sched.scheduled_cached_reqs:
            state = self.requests[delta.req_id]
            state.token_ids.extend(delta.new_token_ids)
            state.block_ids.extend(delta.new_block_ids)
            state.num_computed_tokens = delta.num_computed_tokens

    # -- inputs --------------------------------------------------------------
    def prepare_inputs(self, sched: SchedulerOutput) -> StepInputs:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        query_lens: list[int] = []
        tables: list[list[int]] = []
        sample_ids: list[str] = []
        sample_rows: list[int] = []
        prompt_spans: list[tuple[str, int, int, int]] = []
        for req_id, n in sched.num_scheduled_tokens.items():
            state = self.requests[req_id]
            start = state.num_computed_tokens
            end = start + n
            # The hidden state at position p predicts token p + 1: prompt logprobs need p < P - 1.
            num_prompt_lp = min(end, state.num_prompt_tokens - 1) - start
            if state.sampling_params.prompt_logprobs is not None and num_prompt_lp > 0:
                prompt_spans.append((req_id, len(input_ids), start, num_prompt_lp))
            input_ids.extend(state.token_ids[start:end])
            pos = range(start, end)
            positions.extend(pos)
            slots.extend(state.block_ids[p // bs] * bs + p % bs for p in pos)
            seq_lens.append(end)
            query_lens.append(n)
            tables.append(state.block_ids)
            if end == len(state.token_ids):
                sample_ids.append(req_id)
                sample_rows.append(len(input_ids) - 1)
        max_blocks = max(len(t) for t in tables)
        table = [t + [0] * (max_blocks - len(t)) for t in tables]
        dev = self.device
        qsl = [0]
        for q in query_lens:
            qsl.append(qsl[-1] + q)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=torch.tensor(table, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens_list=seq_lens, query_lens_list=query_lens,
            max_query_len=max(query_lens), max_seq_len=max(seq_lens))
        return StepInputs(torch.tensor(input_ids, dtype=torch.long, device=dev),
                          torch.tensor(positions, dtype=torch.long, device=dev), meta,
                          sample_ids, torch.tensor(sample_rows, dtype=torch.long, device=dev),
                          prompt_spans)

    # -- step ----------------------------------------------------------------
    @torch.inference_mode()
    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self.update_states(sched)
        if sched.blocks_to_copy:
            ops.copy_blocks(self.kv_caches, sched.blocks_to_copy)
        if sched.is_empty:
            return ModelRunnerOutput({})
        inputs = self.prepare_inputs(sched)
        hidden = self._forward(inputs)
        prompt_logprobs = self._prompt_logprobs(hidden, inputs.prompt_spans)
        if not inputs.sample_req_ids:
            return ModelRunnerOutput({}, prompt_logprobs=prompt_logprobs)
        logits = self.model.compute_logits(hidden[inputs.sample_rows])
        if not self.sample:
            return ModelRunnerOutput({})
        rows = [self._sampling_row(r) for r in inputs.sample_req_ids]
        out = self.sampler(logits, rows)
        return ModelRunnerOutput(
            sampled_token_ids=dict(zip(inputs.sample_req_ids, out.token_ids)),
            logprobs={r: lp for r, lp in zip(inputs.sample_req_ids, out.logprobs) if lp is not None},
            prompt_logprobs=prompt_logprobs)

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        meta = inputs.attn_metadata
        if self.graphs is not None and self.graphs.can_run(meta):
            return self.graphs.run(inputs.input_ids, inputs.positions, meta)
        return self.model(inputs.input_ids, inputs.positions, self.kv_caches, meta)

    def capture_graphs(self, batch_sizes: list[int], max_seq_len: int) -> None:
        """Capture decode graphs over the allocated KV cache (CUDA only)."""
        from pagedray.workers.cuda_graphs import DecodeGraphs
        graphs = DecodeGraphs(self.model, self.kv_caches, batch_sizes, max_seq_len, self.block_size,
                              self.device)
        graphs.capture()
        self.graphs = graphs

    # Rows of vocabulary-wide logits held at once for prompt logprobs (bounds the memory).
    _PROMPT_LOGPROBS_ROWS = 512

    def _prompt_logprobs(self, hidden: torch.Tensor,
                         spans: list[tuple[str, int, int, int]]) -> dict[str, list[Logprobs]]:
        """Logprobs of this chunk's prompt tokens (from the 2nd) for requests that asked.

        The engine places a chunk by the request's computed tokens before the step. Every rank
        computes logits (a collective under tensor parallelism); only a sampling rank keeps them.
        """
        out: dict[str, list[Logprobs]] = {}
        for req_id, row, pos, count in spans:
            state = self.requests[req_id]
            entries: list[Logprobs] = []
            for off in range(0, count, self._PROMPT_LOGPROBS_ROWS):
                num = min(self._PROMPT_LOGPROBS_ROWS, count - off)
                logits = self.model.compute_logits(hidden[row + off:row + off + num])
                if not self.sample:
                    continue
                targets = state.token_ids[pos + off + 1:pos + off + 1 + num]
                lp = torch.log_softmax(logits.float(), dim=-1)
                target_t = torch.tensor(targets, dtype=torch.long, device=lp.device)
                entries += logprob_entries(lp, target_t, [state.sampling_params.prompt_logprobs] * num)
            if self.sample:
                out[req_id] = entries
        return out

    def _sampling_row(self, req_id: str) -> SamplingRow:
        state = self.requests[req_id]
        return SamplingRow(state.sampling_params, state.token_ids[:state.num_prompt_tokens],
                           state.token_ids[state.num_prompt_tokens:])

    @torch.inference_mode()
    def profile_run(self, num_tokens: int, num_seqs: int, empty_caches: list[torch.Tensor]) -> None:
        """A worst-case forward (the step's full token budget) without a KV cache."""
        num_seqs = max(1, min(num_seqs, num_tokens))
        lens = [num_tokens // num_seqs] * num_seqs
        lens[-1] += num_tokens - sum(lens)
        qsl = [0]
        for q in lens:
            qsl.append(qsl[-1] + q)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.full((num_tokens,), -1, dtype=torch.long, device=dev),
            block_tables=torch.zeros((num_seqs, 1), dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens_list=lens, query_lens_list=lens, max_query_len=max(lens), max_seq_len=max(lens))
        input_ids = torch.zeros(num_tokens, dtype=torch.long, device=dev)
        positions = torch.cat([torch.arange(n, device=dev) for n in lens])
        hidden = self.model(input_ids, positions, empty_caches, meta)
        self.model.compute_logits(hidden[torch.tensor(qsl[1:], device=dev) - 1])
