"""The model runner's speculative step: verify the scheduled proposals, then let a drafter propose.

`ModelRunner.execute_model_async` hands a step here when it verifies proposals, or always when a
drafter (draft model / EAGLE head) runs: the drafter must see every token the target computes.
The target's forward is the runner's own (`_forward`: a decode-graph replay when the step is
verifications and decodes only); the step waits for the device once, for the verified tokens, and
the drafter's k proposals cost no further wait until the next step's output is read.
"""
from __future__ import annotations

import torch

from pagedray.common.messages import ModelRunnerOutput, SchedulerOutput
from pagedray.common.speculative import SpeculativeConfig
from pagedray.kernels import ops
from pagedray.workers.spec_decode.inputs import build_spec_inputs
from pagedray.workers.spec_decode.rejection import verify
from pagedray.workers.step_output import StepOutput


class SpecDecodeRunner:
    def __init__(self, config: SpeculativeConfig, drafter=None) -> None:
        self.config = config
        self.drafter = drafter
        self.num_steps = 0     # speculative steps run (tests read it)

    def handles(self, sched: SchedulerOutput) -> bool:
        return self.drafter is not None or bool(sched.scheduled_spec_decode_tokens)

    @property
    def has_draft_graphs(self) -> bool:
        from pagedray.workers.spec_decode.drafter import ModelDrafter
        return isinstance(self.drafter, ModelDrafter)

    @property
    def draft_bytes_per_block(self) -> int:
        """KV bytes per block the drafter adds (its cache has as many blocks as the target's)."""
        return self.drafter.kv_spec.bytes_per_block if self.drafter is not None else 0

    def allocate_cache(self, num_blocks: int, device) -> None:
        if self.drafter is not None:
            from pagedray.workers.cache_engine import CacheEngine
            self.drafter.kv_caches = CacheEngine(self.drafter.kv_spec, num_blocks, device).kv_caches

    def drafter_end_step(self) -> None:
        if self.drafter is not None:
            self.drafter.end_step()

    @property
    def needs_eager_target(self) -> bool:
        return self.drafter is not None and self.drafter.needs_eager_target

    def capture_graphs(self, max_num_seqs: int, max_seq_len: int, block_size: int, device) -> None:
        """Decode graphs for a draft model's catch-up and propose steps (an EAGLE head runs eagerly)."""
        if self.has_draft_graphs:
            from pagedray.workers.cuda_graphs import DecodeGraphs, graph_batch_sizes
            # Up to k + 2 catch-up rows per sequence (its verified tokens and the new one).
            rows = graph_batch_sizes(max_num_seqs * (self.config.num_speculative_tokens + 2))
            graphs = DecodeGraphs(self.drafter.model, self.drafter.kv_caches, rows, max_seq_len, block_size, device)
            graphs.capture()
            self.drafter.graphs = graphs

    def copy_blocks(self, src_to_dst: list[tuple[int, int]]) -> None:
        """Copy-on-write reaches the drafter's KV cache too (it shares the target's block ids)."""
        if self.drafter is not None and self.drafter.kv_caches:
            ops.copy_blocks(self.drafter.kv_caches, src_to_dst)

    def execute(self, runner, sched: SchedulerOutput) -> StepOutput:
        self.num_steps += 1
        inputs = build_spec_inputs(runner, sched)
        if self.needs_eager_target:
            # EAGLE-3 reads target layers through hooks, which a graph replay does not run.
            hidden = runner.model(inputs.input_ids, inputs.positions, runner.kv_caches, inputs.attn_metadata)
        else:
            hidden = runner._forward(inputs)
        prompt_logprobs = runner._prompt_logprobs(hidden, inputs.prompt_spans)
        groups = inputs.groups
        tokens: list[list[int]] = []
        out = ModelRunnerOutput({}, prompt_logprobs=prompt_logprobs)
        if groups:
            every_row = len(inputs.logits_rows) == inputs.num_tokens    # (then they are all, in order)
            logits = runner.model.compute_logits(hidden if every_row else hidden[inputs.logits_rows])
            if not runner.sample:
                return StepOutput.done(ModelRunnerOutput({}))
            rows = [runner.requests[rid].sampling_row for rid, _, _ in groups]
            tokens, logprobs = verify(runner.sampler, logits, rows, groups)
            for (rid, _, _), toks, lp in zip(groups, tokens, logprobs):
                out.sampled_token_ids[rid] = toks[0]
                out.accepted_token_ids[rid] = toks
                if lp is not None:
                    out.accepted_logprobs[rid] = lp
        if self.drafter is not None:
            accepted = {rid: toks for (rid, _, _), toks in zip(groups, tokens)}
            with torch.inference_mode():
                out.draft_token_ids = self.drafter.propose(runner, inputs, hidden, accepted)
        return StepOutput.done(out)
