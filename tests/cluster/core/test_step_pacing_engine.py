"""Prefill pacing end to end on a tiny random Llama: the runner's step times reach the scheduler's
fits, and pacing changes when prompts run, never what they generate."""
from __future__ import annotations

import pytest
import torch

from testkit.tiny_models import make_tiny_llama

from pagedray.cluster.core.engine_core import EngineCore
from pagedray.cluster.core.messages import CoreRequest
from pagedray.common.sampling_params import SamplingParams
from pagedray.workers.step_output import StepTimer


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"), tokenizer=False)


def _staggered(core: EngineCore, prompts: list[list[int]], every: int = 3) -> dict[str, list[int]]:
    """Add a prompt every `every` steps (arrivals next to running decodes), step until idle."""
    tokens: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    for n in range(2000):
        if pending and n % every == 0:
            i, prompt = pending.pop(0)
            core.add([CoreRequest(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))])
        if not pending and not core.has_unfinished_requests():
            break
        for out in core.step().outputs:
            assert out.error is None
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert not core.has_unfinished_requests()
    return tokens


NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3,
         "backoff_after_failed_steps": 0}   # (every step with proposals verifies)


def test_step_times_flow_up_and_pacing_keeps_the_outputs(model_path):
    """Greedy outputs: pacing off == on == on with speculative decoding (its proposals count as decode
    tokens; the verifier's steps are timed too)."""
    prompts = [[1 + (7 * i + j) % 300 for j in range(20 + 3 * i)] for i in range(10)]
    outputs = []
    for ratio, spec in ((None, None), (1.2, None), (1.2, NGRAM)):
        core = EngineCore.from_kwargs(model_path, device="cpu", block_size=4, num_kv_blocks=256,
                                      max_num_batched_tokens=24, tpot_target_ratio=ratio,
                                      min_prefill_chunk_tokens=4, speculative_config=spec)
        try:
            outputs.append(_staggered(core, prompts))
            pacer = core.scheduler.pacer
            if ratio is not None:
                # Measured CPU step times reached both fits (decode-only steps and steps with prefill).
                assert pacer.model.decode.count > 0 and pacer.model.mixed.count > 0
                assert pacer.model.decode_step(4, 100) > 0
            else:
                assert pacer is None
            if spec is not None:
                assert core.get_stats().spec_num_draft_tokens > 0
        finally:
            core.shutdown()
    assert outputs[0] == outputs[1] == outputs[2] and len(outputs[0]) == len(prompts)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_timer_spans_the_device_work():
    """The timer's span covers work queued between its markers, not the host's launch time."""
    torch.cuda.synchronize()
    timer = StepTimer(torch.device("cuda"))
    torch.cuda._sleep(50_000_000)     # tens of ms of device time, queued in microseconds
    timer.stop()
    assert timer.seconds() > 0.005
    idle = StepTimer(torch.device("cuda"))
    idle.stop()
    assert idle.seconds() < 0.005
