"""Flat inputs of a step that verifies proposals.

A request verifying k proposals runs k + 1 query tokens: its last known token, then the proposals.
Each of them becomes a one-token pseudo-sequence that shares the request's block-table row and sees
the context up to and including itself (seq_len = position + 1). Attention then needs no
multi-token-query path: every layer writes all the step's K/V into the cache before it attends, so
the pseudo-sequence of proposal j reads the K/V of proposals 1..j-1 written in the same layer, which
is exactly causal attention over the k + 1 tokens. A step of verifications only is a decode step of
B·(k+1) rows, which the decode kernel runs and the decode CUDA graphs replay (bucketed by rows).

Other requests of the step (prefill chunks, plain decodes) keep their usual one sequence.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pagedray.models.layers.attention import AttentionMetadata


@dataclass
class SpecStepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn_metadata: AttentionMetadata
    # Requests that sample this step, with their first logits row and their proposals ([] for none):
    # their logits rows are row0 .. row0 + len(proposals).
    groups: list[tuple[str, int, list[int]]]
    logits_rows: torch.Tensor          # [sum(k + 1)] flat rows whose logits the step needs
    prompt_spans: list[tuple[str, int, int, int]]
    # Per scheduled request: (req_id, first flat row, number of rows, start position), for a drafter.
    spans: list[tuple[str, int, int, int]]
    num_tokens: int
    # Groups whose proposals are the drafter's of the last step, still on the device (overlapped
    # steps): their input ids were gathered there; `groups` gets their ids once the forward is queued.
    deferred: list[tuple[int, int]] = field(default_factory=list)   # (group index, proposals)


def build_spec_inputs(runner, sched) -> SpecStepInputs:
    """The step's inputs with each verifying request split into one-token pseudo-sequences."""
    bs = runner.block_size
    proposals = sched.scheduled_spec_decode_tokens
    ids: list[int] = []
    seq_rows: list[int] = []       # block-table row of each (pseudo-)sequence
    seq_starts: list[int] = []     # its first position
    seq_counts: list[int] = []     # its query tokens
    groups: list[tuple[str, int, list[int]]] = []
    logits_rows: list[int] = []
    prompt_spans: list[tuple[str, int, int, int]] = []
    spans: list[tuple[str, int, int, int]] = []
    fills: list[tuple[int, int, int]] = []    # (first flat row, row in the drafter's tensor, proposals)
    deferred: list[tuple[int, int]] = []
    max_blocks = 0
    requests = runner.requests
    # The n-gram lookup's proposals of the last step, for the driver's placeholders (overlapped steps).
    host_drafts = runner.spec.host_drafts() if proposals else None
    # The last step, not read yet, whose argmax is each request's input token (runner._can_defer).
    last = runner.spec.deferred_rows()
    token_fills: list[tuple[int, int]] = []    # (flat row, row in the last step's argmax)
    for req_id, n in sched.num_scheduled_tokens.items():
        state = requests[req_id]
        start, tokens, row = state.num_computed_tokens, state.token_ids, state.table_row
        from_last = last is not None and start == len(tokens) and n == 1 and req_id in last[0]
        if from_last:   # its input token is the last step's argmax, still on the device: gathered below
            token_fills.append((len(ids), last[0][req_id]))
        elif start >= len(tokens):
            raise RuntimeError(f"request {req_id!r}: its input token at position {start} is not on this worker "
                               f"({len(tokens)} tokens known)")
        max_blocks = max(max_blocks, len(state.block_ids))
        drafts = proposals.get(req_id)   # (none where from_last: that step verifies nothing)
        if drafts and drafts[0] < 0 and host_drafts is not None:   # placeholders for the lookup's proposals
            drafts = host_drafts.get(req_id, ())[:len(drafts)]   # (fewer where it made fewer, as below)
            n = len(drafts) + 1
        elif drafts and drafts[0] < 0:   # the driver's placeholders (overlapped steps): this worker's own
            row_in_drafts = runner.spec.device_draft_row(req_id, len(drafts))
            if row_in_drafts is None:
                # (fewer where it made fewer: the rows of the missing ones are not run, and the
                # driver counts them as rejected)
                drafts = runner.spec.own_drafts(req_id, len(drafts))
            else:      # gathered on the device below, without waiting for the drafter
                fills.append((len(ids) + 1, row_in_drafts, len(drafts)))
                deferred.append((len(groups), len(drafts)))
                drafts = [0] * len(drafts)
            n = len(drafts) + 1
        first = len(ids)
        spans.append((req_id, first, n, start))
        if drafts:
            if n != len(drafts) + 1 or start != len(tokens) - 1:
                raise RuntimeError(f"request {req_id!r}: {n} tokens scheduled for {len(drafts)} proposals "
                                   f"at position {start} of {len(tokens)} known")
            ids.append(tokens[start])
            ids.extend(drafts)
            # (lists by C loops: this runs for every verifying request every step)
            seq_rows += [row] * n
            seq_starts += range(start, start + n)
            seq_counts += [1] * n
            groups.append((req_id, len(logits_rows), list(drafts)))
            logits_rows += range(first, first + n)
            continue
        end = start + n
        if state.sampling_params.prompt_logprobs is not None:
            num_prompt_lp = min(end, state.num_prompt_tokens - 1) - start
            if num_prompt_lp > 0:
                prompt_spans.append((req_id, first, start, num_prompt_lp))
        ids.extend((0,) if from_last else tokens[start:end])
        seq_rows.append(row)
        seq_starts.append(start)
        seq_counts.append(n)
        if end >= len(tokens):
            groups.append((req_id, len(logits_rows), []))
            logits_rows.append(first + n - 1)
    inputs = _to_inputs(runner, ids, seq_rows, seq_starts, seq_counts, max_blocks, groups, logits_rows,
                        prompt_spans, spans, bs)
    if token_fills:
        index = runner._to_device([np.array([r for r, _ in token_fills], dtype=np.int64),
                                   np.array([s for _, s in token_fills], dtype=np.int64)], torch.int64)
        inputs.input_ids[index[0]] = last[1][index[1]]
    if fills:
        inputs.deferred = deferred
        table = runner.spec.device_drafts()
        dst = [row0 + j for row0, _, n in fills for j in range(n)]
        src = [r * table.shape[1] + j for _, r, n in fills for j in range(n)]
        index = runner._to_device([np.array(dst, dtype=np.int64), np.array(src, dtype=np.int64)], torch.int64)
        inputs.input_ids[index[0]] = table.reshape(-1)[index[1]]
    return inputs


def _to_inputs(runner, ids, seq_rows, seq_starts, seq_counts, max_blocks, groups, logits_rows,
               prompt_spans, spans, bs) -> SpecStepInputs:
    num_seqs, num_tokens = len(seq_counts), len(ids)
    rows = np.array(seq_rows, dtype=np.intp)
    start_a = np.array(seq_starts, dtype=np.int64)
    count_a = np.array(seq_counts, dtype=np.int64)
    qsl = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(count_a, out=qsl[1:])
    seq_of_token = np.repeat(np.arange(num_seqs), count_a)
    positions = np.arange(num_tokens) - qsl[seq_of_token] + start_a[seq_of_token]
    seq_lens = start_a + count_a
    table = runner.block_table.table
    slots = table[rows[seq_of_token], positions // bs].astype(np.int64) * bs + positions % bs
    longs = runner._to_device([np.array(ids, dtype=np.int64), positions, slots,
                               np.array(logits_rows, dtype=np.int64)], torch.int64)
    tables_d, seq_lens_d, qsl_d = runner._to_device(
        [table[rows, :max_blocks], seq_lens.astype(np.int32), qsl.astype(np.int32)], torch.int32)
    seq_lens_list = seq_lens.tolist()
    meta = AttentionMetadata(
        slot_mapping=longs[2], block_tables=tables_d, seq_lens=seq_lens_d, query_start_loc=qsl_d,
        seq_lens_list=seq_lens_list, query_lens_list=list(seq_counts),
        max_query_len=max(seq_counts), max_seq_len=max(seq_lens_list))
    return SpecStepInputs(longs[0], longs[1], meta, groups, longs[3], prompt_spans, spans, num_tokens)
