"""Turns one SchedulerOutput into flat tensors, runs the model, samples.

Keeps per-request state between steps so that running requests arrive as
deltas (new tokens, new blocks) rather than whole. The host work of a step is
on the GPU's critical path (it idles meanwhile), so it stays small per request:
block ids live in one persistent table updated by deltas, the flat inputs are
computed with numpy and reach the device in two transfers, and each request
keeps one sampling row (no per-step copies of its prompt or outputs).

Overlapped steps: `execute_model_async` queues a step and returns before its sampled ids reach
the host (see step_output.py). A decode scheduled while its input token is still in flight (the
request sampled it in the previous step; the scheduler holds a placeholder) gets that token on
the device, gathered from the previous step's sampled-id buffer; the id itself arrives with a
later delta like any other.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import attrgetter, getitem

import numpy as np
import torch

from pagedray.models.layers.attention import AttentionMetadata
from pagedray.models.layers.pipeline import PipelineStage
from pagedray.kernels import ops
from pagedray.common.lora import LoRARequest
from pagedray.common.messages import CachedRequestData, Logprobs, ModelRunnerOutput, SchedulerOutput
from pagedray.workers.sampler import Sampler, SamplingRow, logprob_entries
from pagedray.workers.pipeline_stage import StageIO
from pagedray.workers.step_output import StepOutput, StepTimer
from pagedray.common.sampling_params import SamplingParams


# Per-request fields read with map() over a step's requests: the loop runs in C, not in bytecode
# (a decode step at batch ~1000 is bound by the host's per-request work).
_NUM_COMPUTED = attrgetter("num_computed_tokens")
_TOKEN_IDS = attrgetter("token_ids")
_BLOCK_IDS = attrgetter("block_ids")
_TABLE_ROW = attrgetter("table_row")
_SAMPLING_ROW = attrgetter("sampling_row")
_WAITS_FOR_IDS = attrgetter("has_penalty")
_CONSTRAINED = attrgetter("constrained")


def _may_wait_for_ids(rows: list) -> bool:
    """Whether some row's sampling reads its in-flight token's id (penalties, a grammar or a bias)."""
    return any(map(_WAITS_FOR_IDS, rows)) or any(map(_CONSTRAINED, rows))


def _set_all(objects: list, name: str, value) -> None:
    """`obj.name = value` for each object, looped in C."""
    _set_each(objects, name, repeat(value))


def _set_each(objects: list, name: str, values) -> None:
    """`obj.name = value` for each object and its value, looped in C."""
    _consume(map(setattr, objects, repeat(name), values))


def _consume(calls) -> None:
    """Run an iterator of calls for their effect, in C (a for loop would run bytecodes per item)."""
    deque(calls, maxlen=0)


@dataclass
class CachedRequestState:
    token_ids: list[int]
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    table_row: int = -1   # this request's row in the runner's BlockTable
    lora_request: LoRARequest | None = None
    # The sampler's view, kept for the request's lifetime (outputs are appended as they arrive).
    sampling_row: SamplingRow = field(init=False)

    def __post_init__(self) -> None:
        self.sampling_row = SamplingRow(self.sampling_params, self.token_ids[:self.num_prompt_tokens],
                                        self.token_ids[self.num_prompt_tokens:])

    def append_tokens(self, new_token_ids: list[int]) -> None:
        tokens = self.token_ids
        skip = self.num_prompt_tokens - len(tokens)   # (only outputs arrive as deltas)
        tokens.extend(new_token_ids)
        self.sampling_row.output_token_ids.extend(new_token_ids[skip:] if skip > 0 else new_token_ids)


class BlockTable:
    """Every running request's block ids in one int32 array [rows, blocks], updated by deltas.

    A request keeps its row until it is dropped; entries past its blocks are 0 (the padding
    the attention metadata has always carried). Rows and columns grow by doubling.
    """

    def __init__(self, rows: int = 16, cols: int = 16) -> None:
        self.table = np.zeros((rows, cols), dtype=np.int32)
        self._free_rows = list(range(rows - 1, -1, -1))

    def add(self, block_ids: list[int]) -> int:
        if not self._free_rows:
            rows, cols = self.table.shape
            self.table = np.concatenate([self.table, np.zeros((rows, cols), dtype=np.int32)])
            self._free_rows = list(range(2 * rows - 1, rows - 1, -1))
        row = self._free_rows.pop()
        self.append(row, 0, block_ids)
        return row

    def append(self, row: int, start: int, block_ids: list[int]) -> None:
        if not block_ids:
            return
        end = start + len(block_ids)
        cols = self.table.shape[1]
        if end > cols:
            while cols < end:
                cols *= 2
            grown = np.zeros((self.table.shape[0], cols), dtype=np.int32)
            grown[:, :self.table.shape[1]] = self.table
            self.table = grown
        self.table[row, start:end] = block_ids

    def remove(self, row: int, num_blocks: int) -> None:
        self.table[row, :num_blocks] = 0
        self._free_rows.append(row)


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn_metadata: AttentionMetadata
    sample_req_ids: list[str]       # requests that reach the end of their known tokens
    # Their last-token row in the flat batch; None when every row samples, in order (decode steps).
    sample_rows: torch.Tensor | None
    # Requests that asked for prompt_logprobs, with prompt positions in this chunk that predict a
    # prompt token: (req_id, flat row of the first such position, its position, how many).
    prompt_spans: list[tuple[str, int, int, int]] = field(default_factory=list)
    # Requests whose input token is the previous step's sample, not yet on the host.
    pending_req_ids: list[str] = field(default_factory=list)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, block_size: int, device: torch.device,
                 seed: int = 0, sample: bool = True, stage: PipelineStage | None = None) -> None:
        self.model = model
        # Under pipeline parallelism only the last stage computes logits; the others hand their
        # output to the next stage (StageIO) and return no samples.
        self.stage = stage or PipelineStage()
        self.stage_io = StageIO(model, device) if self.stage.num_stages > 1 else None
        # Under tensor parallelism every rank computes logits (a collective) but only rank 0 samples.
        self.sample = sample
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler(seed)
        self.requests: dict[str, CachedRequestState] = {}
        self.block_table = BlockTable()
        # One packed transfer per dtype instead of a tensor each (on by default only where a
        # transfer costs something: a GPU).
        self.pack_inputs = device.type != "cpu"
        self.kv_caches: list[torch.Tensor] = []
        self.graphs = None  # DecodeGraphs once captured
        self.last_output: StepOutput | None = None   # the latest step that sampled
        self.spec = None   # SpecDecodeRunner when speculative decoding is on (workers/spec_decode/)
        self.lora = None   # a workers.lora.LoRAManager when LoRA is enabled
        # Time each step for the scheduler's prefill pacing (two timing events, ~10 us of host a step).
        self.time_steps = True

    # -- state ---------------------------------------------------------------
    def update_states(self, sched: SchedulerOutput) -> None:
        spec = self.spec   # (speculation appends each step's tokens here before the driver sends them)
        if spec is not None:
            spec.before_update(self, sched)
        for req_id in sched.finished_req_ids:
            self._drop(req_id)
        for new in sched.scheduled_new_reqs:
            self._drop(new.req_id)
            state = CachedRequestState(list(new.token_ids), new.num_prompt_tokens, new.sampling_params,
                                       list(new.block_ids), new.num_computed_tokens,
                                       lora_request=new.lora_request)
            state.table_row = self.block_table.add(state.block_ids)
            self.requests[new.req_id] = state
        self._apply_deltas(sched.scheduled_cached_reqs, spec)
        if spec is not None:
            spec.after_update(self, sched)

    def _apply_deltas(self, cached: CachedRequestData, spec) -> None:
        """The running requests' deltas, column by column; the per-request loops run in C (map) but for
        the rows that carry blocks (one a block_size steps) or a cut table (speculative decoding)."""
        if not cached.req_ids:
            return
        states = list(map(self.requests.__getitem__, cached.req_ids))
        tokens = cached.new_token_ids if spec is None else list(map(spec.unseen, cached.req_ids, cached.new_token_ids))
        _consume(map(CachedRequestState.append_tokens, states, tokens))
        for rid, start in cached.block_starts.items():   # the driver cut the table (speculative decoding)
            state = self.requests[rid]
            self.block_table.table[state.table_row, start:len(state.block_ids)] = 0
            del state.block_ids[start:]
        for state, blocks in compress(zip(states, cached.new_block_ids), cached.new_block_ids):
            self.block_table.append(state.table_row, len(state.block_ids), blocks)
            state.block_ids.extend(blocks)
        _set_each(states, "num_computed_tokens", cached.num_computed_tokens)

    def _drop(self, req_id: str) -> None:
        state = self.requests.pop(req_id, None)
        if state is not None:
            self.block_table.remove(state.table_row, len(state.block_ids))

    # -- inputs --------------------------------------------------------------
    def prepare_inputs(self, sched: SchedulerOutput) -> StepInputs:
        bs = self.block_size
        input_ids: list[int] = []
        table_rows: list[int] = []
        starts: list[int] = []
        counts: list[int] = []
        sample_ids: list[str] = []
        sample_rows: list[int] = []
        prompt_spans: list[tuple[str, int, int, int]] = []
        fill_rows: list[int] = []       # flat rows whose input is gathered from the last step's samples
        fill_src: list[int] = []
        pending: list[str] = []
        max_blocks = 0
        requests = self.requests
        decode = (self._decode_rows(sched) if sched.total_num_scheduled_tokens == len(sched.num_scheduled_tokens)
                  else None)
        if decode is not None:
            input_ids, table_rows, starts, fill_rows, fill_src, pending, max_blocks = decode
            counts = [1] * len(starts)
            sample_ids = list(sched.num_scheduled_tokens)
            sample_rows = counts   # (only its length is read: every row samples)
        for req_id, n in (sched.num_scheduled_tokens.items() if decode is None else ()):
            state = requests[req_id]
            start = state.num_computed_tokens
            end = start + n
            if state.sampling_params.prompt_logprobs is not None:
                # The hidden state at position p predicts token p + 1: prompt logprobs need p < P - 1.
                num_prompt_lp = min(end, state.num_prompt_tokens - 1) - start
                if num_prompt_lp > 0:
                    prompt_spans.append((req_id, len(input_ids), start, num_prompt_lp))
            tokens = state.token_ids
            if n == 1:
                if start < len(tokens):
                    input_ids.append(tokens[start])
                else:   # its token is in flight: gathered on the device below
                    fill_rows.append(len(input_ids))
                    fill_src.append(self._last_row(req_id, start, len(tokens)))
                    pending.append(req_id)
                    input_ids.append(0)
            else:
                input_ids.extend(tokens[start:end])
            table_rows.append(state.table_row)
            starts.append(start)
            counts.append(n)
            if len(state.block_ids) > max_blocks:
                max_blocks = len(state.block_ids)
            if end >= len(tokens):
                sample_ids.append(req_id)
                sample_rows.append(len(input_ids) - 1)
        num_seqs, num_tokens = len(counts), len(input_ids)
        rows = np.array(table_rows, dtype=np.intp)
        start_a = np.array(starts, dtype=np.int64)
        if num_tokens == num_seqs:       # decode only: one token per sequence
            positions, token_rows = start_a, rows
            seq_lens = start_a + 1
            qsl = np.arange(num_seqs + 1, dtype=np.int64)
        else:
            count_a = np.array(counts, dtype=np.int64)
            qsl = np.zeros(num_seqs + 1, dtype=np.int64)
            np.cumsum(count_a, out=qsl[1:])
            seq_of_token = np.repeat(np.arange(num_seqs), count_a)
            positions = np.arange(num_tokens) - qsl[seq_of_token] + start_a[seq_of_token]
            token_rows = rows[seq_of_token]
            seq_lens = start_a + count_a
        table = self.block_table.table
        slots = table[token_rows, positions // bs].astype(np.int64) * bs + positions % bs
        all_rows_sample = len(sample_rows) == num_tokens   # then they are 0..T-1 in order
        longs = [np.array(input_ids, dtype=np.int64), positions, slots]
        if fill_rows:
            longs += [np.array(fill_rows, dtype=np.int64), np.array(fill_src, dtype=np.int64)]
        if not all_rows_sample:
            longs.append(np.array(sample_rows, dtype=np.int64))
        longs_d = self._to_device(longs, torch.int64)
        if fill_rows:
            longs_d[0][longs_d[3]] = self.last_output.token_ids[longs_d[4]]
        tables_d, seq_lens_d, qsl_d = self._to_device(
            [table[rows, :max_blocks], seq_lens.astype(np.int32), qsl.astype(np.int32)], torch.int32)
        seq_lens_list = seq_lens.tolist()
        meta = AttentionMetadata(
            slot_mapping=longs_d[2], block_tables=tables_d, seq_lens=seq_lens_d, query_start_loc=qsl_d,
            seq_lens_list=seq_lens_list, query_lens_list=counts,
            max_query_len=max(counts), max_seq_len=max(seq_lens_list))
        return StepInputs(longs_d[0], longs_d[1], meta, sample_ids,
                          None if all_rows_sample else longs_d[-1], prompt_spans, pending)

    def _decode_rows(self, sched: SchedulerOutput) -> tuple | None:
        """prepare_inputs' per-request pass for a step where every request runs one token and
        samples (a decode step): (input ids, table rows, starts, fill rows, their sources, pending
        ids, max blocks), read with C loops (map) and numpy. None when some request does not fit
        that (a one-token prompt chunk, a missing sample): the general pass then handles the step."""
        ids = list(sched.num_scheduled_tokens)
        states = list(map(self.requests.__getitem__, ids))
        starts = list(map(_NUM_COMPUTED, states))
        token_lists = list(map(_TOKEN_IDS, states))
        known = list(map(len, token_lists))
        table_rows = list(map(_TABLE_ROW, states))
        max_blocks = max(map(len, map(_BLOCK_IDS, states)))
        n = len(ids)
        if starts == known:
            # Every input token is in flight (the overlapped loop): gathered on the device from the
            # previous step's samples.
            last = self.last_output
            src = list(map(last.rows.get, ids)) if last is not None else [None]
            if None in src:
                return None
            return [0] * n, table_rows, starts, list(range(n)), src, ids, max_blocks
        start_a, known_a = np.array(starts), np.array(known)
        in_flight = start_a == known_a
        if not np.all(in_flight | (start_a == known_a - 1)):
            return None   # a one-token prompt chunk: it does not sample
        if not in_flight.any():
            return list(map(getitem, token_lists, starts)), table_rows, starts, [], [], [], max_blocks
        fill_rows = np.flatnonzero(in_flight).tolist()
        pending = [ids[i] for i in fill_rows]
        last = self.last_output
        src = list(map(last.rows.get, pending)) if last is not None else [None]
        if None in src:
            return None
        input_ids = [0] * n
        for i in np.flatnonzero(~in_flight).tolist():
            input_ids[i] = token_lists[i][starts[i]]
        return input_ids, table_rows, starts, fill_rows, src, pending, max_blocks

    def _last_row(self, req_id: str, start: int, num_known: int) -> int:
        """Row of the request's in-flight token in the previous step's samples."""
        last = self.last_output
        row = last.rows.get(req_id) if last is not None and start == num_known else None
        if row is None:
            raise RuntimeError(f"request {req_id!r} is scheduled at position {start} but the workers know "
                               f"{num_known} of its tokens and the previous step did not sample it "
                               "(an overlapped step needs the previous step's samples on this rank)")
        return row

    def _to_device(self, arrays: list[np.ndarray], dtype: torch.dtype) -> list[torch.Tensor]:
        """Fresh host arrays of one dtype -> device tensors.

        On the CPU they are shared as they are. On a GPU they travel in one asynchronous transfer
        from pinned memory (instead of one synchronous pageable copy each): each becomes a
        contiguous view of one device buffer, starting on a 16-byte boundary. The pinned buffer
        comes from PyTorch's pinned-memory cache, which does not hand it out again before the
        copy is done.
        """
        if not self.pack_inputs:
            return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
        align = 16 // torch.empty(0, dtype=dtype).element_size()
        offsets, total = [], 0
        for a in arrays:
            offsets.append(total)
            total += -(-a.size // align) * align
        host = torch.empty(total, dtype=dtype, pin_memory=self.device.type == "cuda")
        flat = host.numpy()
        for a, off in zip(arrays, offsets):
            flat[off:off + a.size] = a.ravel()
        buf = host.to(self.device, non_blocking=True)
        return [buf[off:off + a.size].view(a.shape) for a, off in zip(arrays, offsets)]

    # -- step ----------------------------------------------------------------
    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.execute_model_async(sched).get()

    @torch.inference_mode()
    def execute_model_async(self, sched: SchedulerOutput) -> StepOutput:
        """Queue the step; the result's `get()` waits for its sampled ids."""
        timer = StepTimer(self.device) if self.time_steps else None
        self.update_states(sched)
        if sched.blocks_to_copy:
            ops.copy_blocks(self.kv_caches, sched.blocks_to_copy)
            if self.spec is not None:
                self.spec.copy_blocks(sched.blocks_to_copy)
        if sched.is_empty:
            return StepOutput.done(ModelRunnerOutput({}))
        if self.spec is not None and self.spec.handles(sched):
            return self.spec.execute(self, sched, timer)
        inputs = self.prepare_inputs(sched)
        if self.lora is not None:   # each token's adapter slot, in the flat batch's order
            self.lora.set_step([self.requests[r].lora_request for r in sched.num_scheduled_tokens],
                               list(sched.num_scheduled_tokens.values()))
        hidden = self._forward(inputs)
        if hidden is None:   # not the last pipeline stage: the output went to the next stage
            return StepOutput.done(ModelRunnerOutput({}))
        prompt_logprobs = self._prompt_logprobs(hidden, inputs.prompt_spans)
        if not inputs.sample_req_ids:
            return StepOutput.done(ModelRunnerOutput({}, prompt_logprobs=prompt_logprobs))
        sampled = hidden if inputs.sample_rows is None else hidden[inputs.sample_rows]
        logits = self.model.compute_logits(sampled)
        if not self.sample:
            return StepOutput.done(ModelRunnerOutput({}))
        rows, pending_rows = self._sampling_rows(inputs)
        out = StepOutput(inputs.sample_req_ids, self.sampler.sample(logits, rows), prompt_logprobs, timer)
        if pending_rows:
            _set_all(pending_rows, "num_pending", 0)
            if _may_wait_for_ids(pending_rows):
                for row in pending_rows:
                    if row.pending_token_ids:
                        row.pending_token_ids = []
        self.last_output = out
        return out

    def _sampling_rows(self, inputs: StepInputs) -> tuple[list[SamplingRow], list[SamplingRow]]:
        """The rows of this step's samples, and those whose previous token is in flight: such a row
        counts it, and when it has penalties or a grammar the host waits for that token's id (the
        step's forward is already queued, so the device keeps busy meanwhile)."""
        get = self.requests.__getitem__
        rows = list(map(_SAMPLING_ROW, map(get, inputs.sample_req_ids)))
        pending = list(map(_SAMPLING_ROW, map(get, inputs.pending_req_ids)))
        if pending:
            _set_all(pending, "num_pending", 1)
            if _may_wait_for_ids(pending):
                last = self.last_output
                for rid, row in zip(inputs.pending_req_ids, pending):
                    if row.has_penalty or row.params.structured_outputs is not None:   # (a grammar advances by it)
                        row.pending_token_ids = [last.token_list()[last.rows[rid]]]
        return rows, pending

    def _forward(self, inputs: StepInputs) -> torch.Tensor | None:
        meta = inputs.attn_metadata
        if self.stage_io is not None:
            return self.stage_io.forward(self.stage, inputs.input_ids, inputs.positions, self.kv_caches, meta)
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

    @torch.inference_mode()
    def warm_up_logits(self, max_rows: int) -> None:
        """compute_logits once at every row count a step can sample, 1 to max_rows (CUDA only).

        cuBLAS picks the LM head's kernel by the row count, and CUDA loads a kernel when it first
        runs (lazy loading), which waits for the work already queued on the device. A row count
        first met mid-run therefore stalls that step and the overlap with it; mixed steps sample
        any count up to max_num_seqs, so every count is met here, at start-up.
        """
        head = getattr(self.model, getattr(self.model, "lm_head_name", ""), None)
        if self.device.type != "cuda" or head is None or not self.stage.is_last:
            return
        hidden = torch.zeros(max_rows, head.weight.shape[1], dtype=head.weight.dtype, device=self.device)
        for rows in range(1, max_rows + 1):
            self.model.compute_logits(hidden[:rows])
        torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def profile_run(self, num_tokens: int, num_seqs: int, empty_caches: list[torch.Tensor], *,
                    max_seq_len: int) -> None:
        """A worst-case forward (the step's full token budget) without a KV cache.

        No sequence runs past max_seq_len (the model's length): its positions index the rotary
        table, which has no rows beyond it. A budget larger than num_seqs * max_seq_len is more
        than any step can schedule, so the forward runs what one can.
        """
        num_seqs = max(1, min(num_seqs, num_tokens))
        num_tokens = min(num_tokens, num_seqs * max_seq_len)
        share, extra = divmod(num_tokens, num_seqs)
        lens = [share + 1] * extra + [share] * (num_seqs - extra)   # (none longer than max_seq_len)
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
        received = None
        if not self.stage.is_first:   # zeros in place of the previous stage's output (nothing is sent)
            received = {n: t.zero_() for n, t in self.stage_io.buffers(num_tokens).items()}
        hidden = self.model(input_ids, positions, empty_caches, meta, received) if received is not None \
            else self.model(input_ids, positions, empty_caches, meta)
        if self.stage.is_last:
            self.model.compute_logits(hidden[torch.tensor(qsl[1:], device=dev) - 1])
