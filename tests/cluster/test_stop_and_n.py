"""Stop conditions, seeded reproducibility and n > 1 through the engine, on a tiny random Llama."""
from __future__ import annotations

import pytest

from testkit.hf_compare import assert_greedy_match, engine_greedy
from testkit.hf_reference import hf_greedy
from testkit.tiny_models import load_hf_model

from pagedray.cluster import LLM, SamplingParams

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(tiny_llama, device="cpu", block_size=4)


def _gen(llm: LLM, prompts, params: SamplingParams):
    return llm.generate(prompts, params, use_tqdm=False)


def _greedy(llm: LLM, max_tokens: int = 24):
    out = _gen(llm, PROMPT, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))[0]
    return out.outputs[0].token_ids, out.outputs[0].text


def _assert_nothing_held(llm: LLM) -> None:
    stats = llm.llm_engine.get_stats()
    assert (stats.num_used_blocks, stats.num_running, stats.num_waiting) == (0, 0, 0)
    assert not llm.llm_engine.has_unfinished_requests()


# -- stop strings and stop tokens ------------------------------------------------------------------
def _boundary_stop_string(tok, tokens: list[int], text: str) -> str:
    """Four chars of `text` straddling a token boundary, first occurring there."""
    for k in range(3, len(tokens) - 2):
        head = tok.decode(tokens[:k])
        s = text[len(head) - 2:len(head) + 2]
        if (text.startswith(head) and len(s) == 4 and "\ufffd" not in s and s.strip() == s
                and text.find(s) == len(head) - 2):
            return s
    pytest.skip("the random model produced no usable boundary")   # never seen with seed 0


def test_stop_string_spanning_tokens_ends_the_request_at_once(llm):
    tok = llm.get_tokenizer()
    tokens, text = _greedy(llm)
    stop = _boundary_stop_string(tok, tokens, text)
    out = _gen(llm, PROMPT, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                           stop=["never-there", stop]))[0].outputs[0]
    cut = text.index(stop)
    assert out.text == text[:cut] and out.finish_reason == "stop"
    # The request ended with the first token whose text completes the stop string.
    m = next(m for m in range(1, len(tokens) + 1) if stop in tok.decode(tokens[:m]))
    assert out.token_ids == tokens[:m]
    _assert_nothing_held(llm)


def test_streamed_text_never_shows_the_stop_string(llm):
    tokens, text = _greedy(llm)
    stop = _boundary_stop_string(llm.get_tokenizer(), tokens, text)
    engine = llm.llm_engine
    engine.add_request("stream", PROMPT, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                        stop=[stop]))
    seen = []
    while engine.has_unfinished_requests():
        seen += [o.outputs[0].text for o in engine.step()]
    assert seen[-1] == text[:text.index(stop)]
    assert all(seen[-1].startswith(s) and stop not in s for s in seen)


def test_stop_token_id(llm):
    tokens, _ = _greedy(llm)
    k = next(i for i in range(2, len(tokens)) if tokens[i] not in tokens[:i])
    out = _gen(llm, PROMPT, SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[tokens[k]]))
    completion = out[0].outputs[0]
    assert completion.token_ids == tokens[:k + 1] and completion.finish_reason == "stop"
    # As in vLLM, the stop token's own text is not part of the output.
    assert completion.text == llm.get_tokenizer().decode(tokens[:k])


def test_min_tokens_defers_stop_tokens(llm):
    tokens, _ = _greedy(llm)
    out = _gen(llm, PROMPT, SamplingParams(temperature=0, max_tokens=12, min_tokens=3,
                                           stop_token_ids=[tokens[0]]))[0].outputs[0]
    assert len(out.token_ids) >= 3 and tokens[0] not in out.token_ids[:3]
    assert out.finish_reason == ("stop" if out.token_ids[-1] == tokens[0] else "length")


def test_max_tokens_gives_length(llm):
    out = _gen(llm, PROMPT, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


# -- seeds -----------------------------------------------------------------------------------------
def test_seeded_request_ignores_batch_order_composition_and_preemption(tiny_llama, llm):
    target = {"prompt_token_ids": [7, 8, 9, 10, 11]}
    others = [{"prompt_token_ids": list(range(20, 20 + n))} for n in (3, 17, 9)]
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=16, ignore_eos=True)
    noisy = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    alone = _gen(llm, target, params)[0].outputs[0].token_ids
    mixed = _gen(llm, [others[0], target, others[1]], [noisy, params, noisy])[1].outputs[0].token_ids
    flipped = _gen(llm, [others[2], target], [SamplingParams(seed=3, max_tokens=16), params])
    # A cache of 12 blocks of 4 cannot hold all four sequences: some are preempted and recomputed.
    small = LLM(tiny_llama, device="cpu", block_size=4, num_kv_blocks=12)
    tight = _gen(small, others + [target], [noisy] * 3 + [params])
    assert small.llm_engine.get_stats().num_preemptions > 0
    assert alone == mixed == flipped[1].outputs[0].token_ids == tight[3].outputs[0].token_ids
    other_seed = _gen(llm, target, SamplingParams(temperature=1.0, top_p=0.9, seed=12, max_tokens=16,
                                                  ignore_eos=True))[0].outputs[0].token_ids
    assert other_seed != alone


# -- n > 1 -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("prompt_len", [10, 8])
def test_n_children_share_the_prompt_blocks(tiny_llama, prompt_len, prefix_caching):
    block_size, n = 4, 4
    llm = LLM(tiny_llama, device="cpu", block_size=block_size, enable_prefix_caching=prefix_caching)
    engine = llm.llm_engine
    bm = engine.scheduler.block_manager
    engine.add_request("r", {"prompt_token_ids": list(range(10, 10 + prompt_len))},
                       SamplingParams(n=n, temperature=1.0, seed=5, max_tokens=2, ignore_eos=True))
    engine.step()   # child 0 prefills the prompt and samples; children 1..3 fork from it
    tables = [bm.get_block_ids(f"r#{i}") for i in range(n)]
    shared = (prompt_len - 1) // block_size   # blocks not holding the last prompt token
    assert all(t[:shared] == tables[0][:shared] for t in tables)
    assert len({t[shared] for t in tables}) == n   # the last prompt block: one private copy each
    assert bm.num_used_blocks == shared + n < n * -(-prompt_len // block_size)
    while engine.has_unfinished_requests():
        outs = engine.step()
    assert sorted(c.index for c in outs[0].outputs) == list(range(n))
    _assert_nothing_held(llm)


def test_n_greedy_children_all_equal_hf(tiny_llama, llm):
    hf = load_hf_model(tiny_llama)
    prompt = [5, 17, 33, 101, 7, 250, 64, 12, 90, 44, 3]
    out = _gen(llm, {"prompt_token_ids": prompt},
               SamplingParams(n=4, temperature=0, max_tokens=10, ignore_eos=True, logprobs=2))[0]
    first = engine_greedy(out.outputs[0])
    assert_greedy_match(first, hf_greedy(hf, prompt, 10, ignore_eos=True), what="child 0 vs HF")
    # The children run the same computation on the same rows: equal to each other exactly.
    assert [c.token_ids for c in out.outputs] == [first.tokens] * 4


def test_n_seeded_samples_are_distinct_and_reproducible(tiny_llama, llm):
    params = SamplingParams(n=4, temperature=1.0, seed=21, max_tokens=12, ignore_eos=True)
    first = [c.token_ids for c in _gen(llm, PROMPT, params)[0].outputs]
    other = LLM(tiny_llama, device="cpu", block_size=16, enable_prefix_caching=False)
    again = _gen(other, ["Once upon a time", PROMPT], [SamplingParams(max_tokens=5), params])[1]
    assert [c.token_ids for c in again.outputs] == first
    assert len({tuple(t) for t in first}) == 4


def test_n_when_the_first_child_stops_at_once(llm):
    out = _gen(llm, PROMPT, SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=1))[0]
    assert [len(c.token_ids) for c in out.outputs] == [1, 1, 1]
    assert all(c.finish_reason in ("length", "stop") for c in out.outputs)
    _assert_nothing_held(llm)


def test_n_with_prompt_logprobs_and_abort(llm):
    engine = llm.llm_engine
    engine.add_request("a", PROMPT, SamplingParams(n=3, max_tokens=8, prompt_logprobs=1, ignore_eos=True))
    outs = engine.step()
    assert outs and outs[0].prompt_logprobs[0] is None and all(outs[0].prompt_logprobs[1:])
    engine.abort_request("a")
    engine.step()
    _assert_nothing_held(llm)


def test_invalid_parameters_leave_nothing_allocated(llm):
    vocab = llm.llm_engine.model_config.vocab_size
    for params, field in [(SamplingParams(n=2, logprobs=vocab + 1), "logprobs"),
                          (SamplingParams(prompt_logprobs=vocab + 1), "prompt_logprobs"),
                          (SamplingParams(n=3, max_tokens=10**6), "max_tokens")]:
        with pytest.raises(ValueError, match=field):
            _gen(llm, [PROMPT, PROMPT], [SamplingParams(n=2, max_tokens=4), params])
        _assert_nothing_held(llm)
