"""Drafters that run on the worker: a draft model, or an EAGLE / EAGLE-3 head over the target.

A drafter has its own paged KV cache with as many blocks as the target's and uses the target's
block ids (the driver reserves `num_speculative_tokens` lookahead slots per request for the
proposals' K/V), so prefix caching, copy-on-write and preemption cover it with no bookkeeping of
its own. Per step it
1. catches up: runs every token the target computed this step that is now known — for a request
   that sampled, its verified positions and the new token — so its cache stays valid below the
   request's computed tokens (everything at and past them is rewritten by a later step);
2. proposes k tokens greedily, one decode forward each, the proposals staying on the device; the
   host reads all of them once, when the next step's inputs or this step's output need them
   (runner.Drafts), so the host's work meanwhile overlaps these forwards.

Draft model: any registered architecture with the target's vocabulary; its own embeddings and head.
EAGLE (Li et al. 2024): one decoder layer over fc([embed(next token), target feature]); the feature
is the target's final hidden state, the head is the target's LM head. EAGLE-3: fc over several
target layers' hidden states, a layer whose attention reads [norm(embed), norm(feature)], its own
norm and (possibly smaller) vocabulary mapped onto the target's with `d2t`.
"""
from __future__ import annotations

import numpy as np
import torch

from pagedray.models.layers.attention import AttentionMetadata
from pagedray.workers.sampler import to_device


class Drafter:
    """The shared catch-up / propose loop; subclasses say how one forward runs."""
    needs_eager_target = False

    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], k: int,
                 max_model_len: int, device: torch.device) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.k = k
        self.max_model_len = max_model_len
        self.device = device
        self.graphs = None   # DecodeGraphs of the draft model's propose steps (draft model, CUDA)

    # -- per method ----------------------------------------------------------
    def catch_up_tokens(self, tokens: list[int], start: int, n: int, new: list[int] | None) -> tuple[list[int], int]:
        """The tokens the catch-up forward runs for one request and how many target rows feed it."""
        raise NotImplementedError

    def forward(self, input_ids, positions, meta, feature):
        """-> (hidden for the head, feature for the next propose step)."""
        raise NotImplementedError

    def logits_to_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden).argmax(dim=-1)

    # -- the loop ------------------------------------------------------------
    def propose(self, runner, inputs, target_hidden: torch.Tensor, accepted: dict[str, list[int]],
                skip: set[str] = frozenset()) -> tuple[list[str], torch.Tensor, list[int]] | None:
        """(requests, their proposals [requests, <= k] on the device, how many of each to keep), or
        None when no request samples this step, or all that do are in `skip` (their speculation is
        backed off: they catch up, which keeps the cache valid for a later probe, but draft nothing)."""
        bs, table = runner.block_size, runner.block_table.table
        ids: list[int] = []
        rows: list[int] = []          # block-table row per sequence
        starts: list[int] = []
        counts: list[int] = []
        feature_rows: list[int] = []  # target rows feeding the catch-up (EAGLE)
        proposing: list[tuple[str, int, int]] = []   # (req, last catch-up row, first proposal position)
        for req_id, first, n, start in inputs.spans:
            state = runner.requests[req_id]
            new = accepted.get(req_id)
            toks, num_feature_rows = self.catch_up_tokens(state.token_ids, start, n, new)
            if not toks:
                continue
            feature_rows.extend(range(first, first + num_feature_rows))
            ids.extend(toks)
            rows.append(state.table_row)
            starts.append(start)
            counts.append(len(toks))
            if new is not None and req_id not in skip:
                proposing.append((req_id, len(ids) - 1, start + len(toks)))
        if not proposing:
            if ids:
                self._run(runner, ids, rows, starts, counts, table, bs, target_hidden, feature_rows)
            self.end_step()
            return None
        hidden, feature = self._run(runner, ids, rows, starts, counts, table, bs, target_hidden, feature_rows)
        # (to_device: a plain torch.tensor(..., device=cuda) would wait for the queued work)
        last = to_device([r for _, r, _ in proposing], torch.int64, hidden.device)
        tokens = self.logits_to_tokens(hidden[last])
        feature = feature[last] if feature is not None else None
        drafts = [tokens]
        req_rows = np.array([runner.requests[r].table_row for r, _, _ in proposing], dtype=np.intp)
        first_pos = np.array([p for _, _, p in proposing], dtype=np.int64)
        # Proposals stop where positions would pass max_model_len; the driver cuts them anyway.
        steps = min(self.k, int(self.max_model_len - first_pos.max()))
        for j in range(1, max(1, steps)):
            positions = first_pos + (j - 1)
            meta, pos_d = self._decode_meta(runner, req_rows, positions, table, bs)
            hidden, feature = self._step(tokens, pos_d, meta, feature)
            tokens = self.logits_to_tokens(hidden)
            drafts.append(tokens)
        self.end_step()
        limit = (self.max_model_len - first_pos).tolist()
        return [req_id for req_id, _, _ in proposing], torch.stack(drafts, dim=1), limit

    def _step(self, tokens, positions, meta, feature):
        if self.graphs is not None and feature is None and self.graphs.can_run(meta):
            hidden = self.graphs.run(tokens, positions, meta)
            return hidden, None
        return self.forward(tokens, positions, meta, feature)

    def _run(self, runner, ids, rows, starts, counts, table, bs, target_hidden, feature_rows):
        rows_a = np.array(rows, dtype=np.intp)
        start_a = np.array(starts, dtype=np.int64)
        count_a = np.array(counts, dtype=np.int64)
        qsl = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(count_a, out=qsl[1:])
        seq_of = np.repeat(np.arange(len(counts)), count_a)
        positions = np.arange(len(ids)) - qsl[seq_of] + start_a[seq_of]
        if self.graphs is not None and max(counts) <= self.k + 2:
            # A catch-up of decodes and verifications only: one-token pseudo-sequences (as the
            # target's verification), a decode step the draft model's graphs replay.
            rows_a, start_a, count_a = rows_a[seq_of], positions, np.ones(len(ids), dtype=np.int64)
            qsl = np.arange(len(ids) + 1, dtype=np.int64)
            counts = [1] * len(ids)
        seq_lens = start_a + count_a
        slots = table[rows_a[np.repeat(np.arange(len(counts)), count_a)], positions // bs].astype(np.int64) * bs \
            + positions % bs
        max_blocks = int(seq_lens.max() - 1) // bs + 1
        ids_d, pos_d, slots_d = runner._to_device([np.array(ids, dtype=np.int64), positions, slots], torch.int64)
        tables_d, lens_d, qsl_d = runner._to_device(
            [table[rows_a, :max_blocks], seq_lens.astype(np.int32), qsl.astype(np.int32)], torch.int32)
        meta = AttentionMetadata(slot_mapping=slots_d, block_tables=tables_d, seq_lens=lens_d,
                                 query_start_loc=qsl_d, seq_lens_list=seq_lens.tolist(),
                                 query_lens_list=list(counts), max_query_len=max(counts),
                                 max_seq_len=int(seq_lens.max()))
        feature = None
        if feature_rows:
            index = to_device(feature_rows, torch.int64, target_hidden.device)
            feature = self.target_features(target_hidden)[index]
        return self._step(ids_d, pos_d, meta, feature)

    def target_features(self, target_hidden: torch.Tensor) -> torch.Tensor:
        return target_hidden

    def end_step(self) -> None:
        """Drop what the step kept for the drafter (EAGLE-3: the target layers' outputs)."""

    def _decode_meta(self, runner, req_rows, positions, table, bs):
        n = len(req_rows)
        slots = table[req_rows, positions // bs].astype(np.int64) * bs + positions % bs
        seq_lens = positions + 1
        max_blocks = int(seq_lens.max() - 1) // bs + 1
        pos_d, slots_d = runner._to_device([positions, slots], torch.int64)
        tables_d, lens_d, qsl_d = runner._to_device(
            [table[req_rows, :max_blocks], seq_lens.astype(np.int32), np.arange(n + 1, dtype=np.int32)],
            torch.int32)
        meta = AttentionMetadata(slot_mapping=slots_d, block_tables=tables_d, seq_lens=lens_d,
                                 query_start_loc=qsl_d, seq_lens_list=seq_lens.tolist(),
                                 query_lens_list=[1] * n, max_query_len=1, max_seq_len=int(seq_lens.max()))
        return meta, pos_d


class ModelDrafter(Drafter):
    """An independent small causal LM of the target's vocabulary."""

    def catch_up_tokens(self, tokens, start, n, new):
        if new is None:                       # mid-prefill: the chunk the target ran
            return tokens[start:start + n], 0
        return tokens[start:] + new, 0        # the target's known input, its verified tokens, the new one

    def forward(self, input_ids, positions, meta, feature):
        return self.model(input_ids, positions, self.kv_caches, meta), None


class EagleDrafter(Drafter):
    """An EAGLE or EAGLE-3 head (models/eagle.py) reading the target's hidden states."""

    def __init__(self, model, kv_caches, k, max_model_len, device, target) -> None:
        super().__init__(model, kv_caches, k, max_model_len, device)
        self.target = target
        self.needs_eager_target = model.aux_layer_ids is not None   # hooks read the target's layers
        self._aux: list[torch.Tensor] = []
        if model.aux_layer_ids is not None:
            layers = target.model.layers
            for i in model.aux_layer_ids:
                layers[i].register_forward_pre_hook(self._capture)

    def _capture(self, module, args):
        hidden, residual = args[1], args[4]
        self._aux.append(hidden if residual is None else hidden + residual)

    def target_features(self, target_hidden):
        if self.model.aux_layer_ids is None:
            return target_hidden
        # The hooks ran in this step's target forward (the last ones appended).
        return torch.cat(self._aux[-len(self.model.aux_layer_ids):], dim=-1)

    def end_step(self) -> None:
        self._aux = []

    def catch_up_tokens(self, tokens, start, n, new):
        # Position p reads the target's feature at p and the token at p + 1.
        if new is None:
            return tokens[start + 1:start + n + 1], n
        # The known tokens after `start` and the new ones: one per target row whose token is now
        # verified (a prefill chunk's rows; a verification's input and accepted proposals).
        shifted = tokens[start + 1:] + new
        return shifted, len(shifted)

    def forward(self, input_ids, positions, meta, feature):
        return self.model(input_ids, positions, self.kv_caches, meta, feature,
                          self.target.model.embed_tokens)

    def logits_to_tokens(self, hidden):
        return self.model.draft_tokens(hidden, self.target)


def make_drafter(worker) -> Drafter:
    """Load the configured draft model or EAGLE head on the worker's device, with its KV cache
    allocated later by `allocate_cache` (the block count is the target's)."""
    from transformers import AutoConfig
    from pagedray.models import get_model
    from pagedray.models.registry import get_kv_cache_spec
    from pagedray.workers.cache_engine import KVCacheSpec
    config = worker.speculative_config
    mc = worker.model_config
    hf = AutoConfig.from_pretrained(config.model)
    # Under tensor parallelism the drafter's parallel layers shard it over the target's ranks and
    # process group (their weight_loaders keep this rank's part); tensor_parallel.py says how the
    # ranks stay in step.
    if config.method == "draft_model":
        model = get_model(hf, config.model, worker.dtype, worker.device, mc.load_format, mc.seed)
        spec = get_kv_cache_spec(hf, worker.parallel_config.tensor_parallel_size)
        drafter_cls, extra = ModelDrafter, ()
    else:
        from pagedray.models.eagle import EagleHead
        model = EagleHead.load(hf, config, mc.hf_config, worker.dtype, worker.device, mc.load_format, mc.seed)
        spec = (1, model.num_kv_heads, model.head_dim)
        drafter_cls, extra = EagleDrafter, (worker.runner.model,)
    kv = KVCacheSpec(spec[0], spec[1], spec[2], worker.cache_config.block_size, worker.dtype)
    drafter = drafter_cls(model, [], config.num_speculative_tokens, mc.max_model_len, worker.device, *extra)
    drafter.kv_spec = kv
    return drafter
