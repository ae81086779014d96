"""EngineCore on a tiny random Llama: token deltas per step, refusals, aborts, n > 1, resume."""
from __future__ import annotations

import pytest

from testkit.tiny_models import make_tiny_llama

from pagedray.cluster import LLM
from pagedray.cluster.core.engine_core import EngineCore
from pagedray.cluster.core.messages import CoreOutputs, CoreRequest, completion_id
from pagedray.common.sampling_params import SamplingParams

PROMPT = [1, 17, 42, 99, 7, 250, 3, 64, 12]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def core(model_path):
    core = EngineCore.from_kwargs(model_path, device="cpu", block_size=4)
    yield core
    core.shutdown()


def _run(core: EngineCore, requests: list[CoreRequest], max_steps: int = 500) -> dict:
    """Step until idle; per (request_id, index): [tokens, finish_reason, error, outputs seen]."""
    core.add(requests)
    seen: dict = {}
    for _ in range(max_steps):
        if not core.has_unfinished_requests():
            break
        batch = core.step()
        assert isinstance(batch, CoreOutputs)
        for out in batch.outputs:
            entry = seen.setdefault((out.request_id, out.index), [[], None, None, 0])
            assert entry[1] is None, "output after the completion finished"
            entry[0].extend(out.new_token_ids)
            entry[1], entry[2], entry[3] = out.finish_reason, out.error, entry[3] + 1
    assert not core.has_unfinished_requests()
    stats = core.get_stats()
    assert (stats.num_used_blocks, stats.num_running, stats.num_waiting) == (0, 0, 0)
    return seen


def _greedy(max_tokens: int = 12) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def test_core_loads_no_tokenizer(model_path, monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("the engine core loaded a tokenizer")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    core = EngineCore.from_kwargs(model_path, device="cpu", block_size=4, num_kv_blocks=16)
    assert core.info.vocab_size == 320 and core.info.eos_token_ids == [2] and core.info.num_kv_blocks == 16
    assert not hasattr(core, "tokenizer")
    core.shutdown()


def test_steps_carry_one_new_token_each_and_match_offline_generate(core, model_path):
    seen = _run(core, [CoreRequest("a", PROMPT, _greedy())])
    tokens, reason, error, num_outputs = seen[("a", 0)]
    assert reason == "length" and error is None and len(tokens) == 12
    assert num_outputs == 12   # deltas: one new token per step, never a cumulative copy
    llm = LLM(model_path, device="cpu", block_size=4)
    ref = llm.generate({"prompt_token_ids": PROMPT}, _greedy(), use_tqdm=False)[0].outputs[0].token_ids
    llm.shutdown()
    assert tokens == ref


def test_a_refused_request_comes_back_as_an_abort_with_the_reason(core):
    too_long = CoreRequest("long", PROMPT, SamplingParams(max_tokens=10_000))
    bad_token = CoreRequest("vocab", [1, 5000], _greedy())
    seen = _run(core, [too_long, bad_token, CoreRequest("good", PROMPT, _greedy(4))])
    assert seen[("long", 0)][1] == "abort" and "max_tokens=10000" in seen[("long", 0)][2]
    assert seen[("vocab", 0)][1] == "abort" and "vocabulary" in seen[("vocab", 0)][2]
    assert seen[("good", 0)][1] == "length" and len(seen[("good", 0)][0]) == 4


def test_a_duplicate_id_is_refused_and_the_first_request_runs_on(core):
    core.add([CoreRequest("dup", PROMPT, _greedy(4))])
    core.step()
    core.add([CoreRequest("dup", PROMPT, _greedy(4))])
    refusal = [o for o in core.step().outputs if o.error is not None]
    assert len(refusal) == 1 and refusal[0].finish_reason == "abort" and "already in use" in refusal[0].error
    seen = _run(core, [])
    assert seen[("dup", 0)][1] == "length" and len(seen[("dup", 0)][0]) == 2


def test_abort_frees_blocks_and_sends_nothing_more(core):
    core.add([CoreRequest("x", PROMPT, _greedy(50)), CoreRequest("y", PROMPT, _greedy(3))])
    core.step()
    core.abort(["x", "unknown"])
    later = []
    while core.has_unfinished_requests():
        later.extend(core.step().outputs)
    assert {o.request_id for o in later} == {"y"}
    assert core.get_stats().num_used_blocks == 0


def test_n_completions_carry_their_index_and_one_can_be_aborted_alone(core):
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True)
    core.add([CoreRequest("n", PROMPT, params)])
    core.step()
    core.step()
    core.abort([completion_id("n", 1)])
    seen = _run(core, [])
    assert sorted(k[1] for k in seen) == [0, 2]
    assert all(v[1] == "length" for v in seen.values())
    full = _run(core, [CoreRequest("m", PROMPT, params)])
    assert sorted(k[1] for k in full) == [0, 1, 2]
    assert full[("m", 0)][0] != full[("m", 1)][0]   # distinct seeded streams


@pytest.mark.parametrize("params", [_greedy(16), SamplingParams(temperature=1.0, seed=11, max_tokens=16,
                                                                 ignore_eos=True)], ids=["greedy", "seeded"])
def test_a_resumed_request_continues_its_own_stream(core, params):
    whole = _run(core, [CoreRequest("w", PROMPT, params.clone())])[("w", 0)][0]
    for k in (1, 7, 15):
        rest = _run(core, [CoreRequest(f"r{k}", PROMPT, params.clone(), output_token_ids=whole[:k])])
        tokens, reason, _, _ = rest[(f"r{k}", 0)]
        assert whole[:k] + tokens == whole and reason == "length"   # max_tokens counts those produced


def test_resume_with_nothing_left_to_generate_is_refused(core):
    seen = _run(core, [CoreRequest("done", PROMPT, _greedy(4), output_token_ids=[5, 6, 7, 8])])
    assert seen[("done", 0)][1] == "abort" and "nothing is left" in seen[("done", 0)][2]


def test_final_only_sends_the_first_token_then_everything_at_the_finish(core):
    """CoreRequest.final_only (LLM.generate): a completion's first output as usual (TTFT), then one
    more when it finishes with every token since; the same tokens as per-step deltas. With logprobs
    the core keeps to per-step deltas; a resumed request gets only what follows its given tokens."""
    def req(rid, params, final_only=True, given=()):
        return CoreRequest(rid, PROMPT, params, list(given), final_only=final_only)
    seen = _run(core, [req("delta", _greedy(), final_only=False), req("final", _greedy()),
                       req("final-n", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, n=2, seed=1)),
                       req("final-lp", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1))])
    tokens = seen[("delta", 0)][0]
    assert len(tokens) == 12 and seen[("delta", 0)][3] == 12
    assert seen[("final", 0)][:2] == [tokens, "length"] and seen[("final", 0)][3] == 2
    assert [seen[("final-n", i)][3] for i in (0, 1)] == [2, 1]
    assert seen[("final-n", 0)][0] == seen[("final-n", 1)][0] == tokens
    assert seen[("final-lp", 0)][:2] == [tokens, "length"] and seen[("final-lp", 0)][3] == 12
    resumed = _run(core, [req("resumed", _greedy(), given=tokens[:5])])
    assert resumed[("resumed", 0)][:2] == [tokens[5:], "length"] and resumed[("resumed", 0)][3] == 2
