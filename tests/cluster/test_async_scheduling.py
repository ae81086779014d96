"""Overlapped steps (async scheduling) against the plain loop, on a tiny random Llama on the CPU.

The overlapped loop schedules and launches step N+1 before it reads step N's samples; decode inputs
whose token is still in flight are gathered from the previous step's sample buffer. On the CPU the
same code runs without real overlap, so every difference here is a logic difference.
"""
from __future__ import annotations

import pytest

from pagedray.cluster import LLM, SamplingParams


# The two loops batch differently (the overlapped one admits a step later and runs a wasted step
# after a stop): conftest's one_torch_thread keeps a row's arithmetic independent of the batch.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _llm(path: str, overlapped: bool, **kw) -> LLM:
    kw = dict(device="cpu", block_size=4, max_num_batched_tokens=24, max_num_seqs=6, seed=0, **kw)
    return LLM(path, async_scheduling=overlapped, **kw)


def _workload(tok) -> tuple[list, list[SamplingParams]]:
    shared = list(range(5, 45))       # a 40-token shared prefix: prefix hits once it is cached
    prompts, params = [], []
    for i in range(10):
        prompts.append({"prompt_token_ids": shared + [50 + i] * (3 + i)})
        params.append(SamplingParams(temperature=0, max_tokens=12 + i, ignore_eos=True))
    prompts += ["The capital of France is", "Once upon a time", {"prompt_token_ids": shared + [7, 8]}]
    params += [SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=20, n=3),
               SamplingParams(temperature=0.7, seed=5, max_tokens=18, repetition_penalty=1.3,
                              frequency_penalty=0.2, min_tokens=6, logprobs=2),
               SamplingParams(temperature=0, max_tokens=16, n=2, presence_penalty=0.5)]
    return prompts, params


def _summary(outputs) -> list:
    """Everything but logprob values, which are compared within 1e-4 (`_logprob_values`): the
    loops batch differently, and a row's float sums may round differently with the batch."""
    return [(o.request_id, [(c.index, c.token_ids, c.text, c.finish_reason,
                             [sorted(lp) for lp in c.logprobs] if c.logprobs else None)
                            for c in o.outputs]) for o in outputs]


def _logprob_values(outputs) -> list[float]:
    return [v for o in outputs for c in o.outputs for lp in (c.logprobs or []) for _, v in sorted(lp.items())]


def _nothing_held(llm: LLM) -> None:
    engine = llm.llm_engine
    stats = engine.get_stats()
    assert (stats.num_used_blocks, stats.num_running, stats.num_waiting) == (0, 0, 0)
    assert not engine.has_unfinished_requests() and not engine.scheduler.requests


@pytest.mark.parametrize("num_kv_blocks", [None, 40])
def test_overlapped_outputs_equal_the_plain_loop(tiny_llama, num_kv_blocks):
    """Chunked prefill, prefix hits, n > 1, seeded sampling, penalties, min_tokens, logprobs, stop
    strings; with 40 blocks also preemption (recompute) while a step is in flight."""
    runs, values = {}, {}
    for overlapped in (False, True):
        llm = _llm(tiny_llama, overlapped, num_kv_blocks=num_kv_blocks)
        prompts, params = _workload(llm.get_tokenizer())
        first = llm.generate(prompts, params, use_tqdm=False)
        # Stop strings taken from the greedy texts of the first run, so they do occur.
        stops = [SamplingParams(temperature=0, max_tokens=p.max_tokens, ignore_eos=True,
                                stop=[o.outputs[0].text[6:9]]) if o.outputs[0].text[6:9].strip() else p
                 for o, p in zip(first[:10], params[:10])]
        second = llm.generate(prompts[:10], stops, use_tqdm=False)
        stats = llm.llm_engine.get_stats()
        runs[overlapped] = (_summary(first), _summary(second), stats.num_preemptions > 0,
                            stats.prefix_cache_hit_tokens > 0)
        values[overlapped] = _logprob_values(first)
        _nothing_held(llm)
        assert llm.llm_engine.async_scheduling is overlapped
    assert runs[True] == runs[False]
    assert values[True] and values[True] == pytest.approx(values[False], abs=1e-4)
    assert runs[True][3], "the workload had no prefix-cache hit"
    assert runs[True][2] == (num_kv_blocks is not None), "preemption expected exactly with 40 blocks"
    assert any(c[3] == "stop" for _, cs in runs[True][1] for c in cs), "no stop string ended a request"


def _drive(engine, until):
    """Step until `until(outputs)` is true for one step's outputs; return those outputs."""
    for _ in range(200):
        outs = engine.step()
        if until(outs):
            return outs
    raise AssertionError("condition never met")


def _tokens(outs, rid: str) -> list[int] | None:
    return next((o.outputs[0].token_ids for o in outs if o.request_id == rid), None)


GREEDY = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
A, B, A2 = list(range(3, 20)), list(range(30, 41)), list(range(50, 60))


def _plain(path: str, prompt: list[int], params: SamplingParams = GREEDY):
    return _llm(path, False).generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0]


def test_abort_while_the_next_step_is_in_flight_emits_nothing_past_it(tiny_llama):
    llm = _llm(tiny_llama, True)
    engine = llm.llm_engine
    engine.add_request("a", {"prompt_token_ids": A}, GREEDY)
    engine.add_request("b", {"prompt_token_ids": B}, GREEDY)
    outs = _drive(engine, lambda o: len(_tokens(o, "a") or []) >= 4)
    assert "a" in engine.core._in_flight[0].num_scheduled_tokens   # its 5th token is being computed
    engine.abort_request("a")
    # The id is reused at once with another prompt: the old "a"'s token in flight must not reach it.
    engine.add_request("a", {"prompt_token_ids": A2}, GREEDY)
    later = []
    while engine.has_unfinished_requests():
        later += engine.step()
    finals = {o.request_id: o.outputs[0].token_ids for o in later if o.finished}
    assert _tokens(outs, "a") == _plain(tiny_llama, A).token_ids[:4]
    assert finals == {"a": _plain(tiny_llama, A2).token_ids, "b": _plain(tiny_llama, B).token_ids}
    _nothing_held(llm)


def test_stop_token_arriving_with_the_next_step_in_flight(tiny_llama):
    """The step after a stop token is already running when the token arrives: its token is dropped."""
    tokens = _plain(tiny_llama, A).token_ids
    k = next(i for i in range(3, len(tokens)) if tokens[i] not in tokens[:i])
    params = SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[tokens[k]])
    llm = _llm(tiny_llama, True)
    engine = llm.llm_engine
    engine.add_request("a", {"prompt_token_ids": A}, params)
    engine.add_request("b", {"prompt_token_ids": B}, GREEDY)
    outs = _drive(engine, lambda o: any(x.request_id == "a" and x.finished for x in o))
    assert "a" in engine.core._in_flight[0].num_scheduled_tokens   # a wasted step for "a" is in flight
    done = next(x for x in outs if x.request_id == "a").outputs[0]
    assert (done.token_ids, done.finish_reason) == (tokens[:k + 1], "stop")
    assert done.token_ids == _plain(tiny_llama, A, params).token_ids
    while engine.has_unfinished_requests():
        engine.step()
    _nothing_held(llm)


# -- the engine core's deltas, directly and behind the in-process client --------------------------
def _core_run(path: str, overlapped: bool, abort_after: int | None = None):
    """Every completion's token deltas and finish reason; `abort_after`: abort request "r1" once it
    has that many tokens (its next step is in flight then, when overlapped)."""
    from pagedray.cluster.core.engine_core import EngineCore
    from pagedray.cluster.core.messages import CoreRequest
    core = EngineCore.from_kwargs(path, device="cpu", block_size=4, num_kv_blocks=24,
                                  max_num_batched_tokens=16, async_scheduling=overlapped)
    params = [SamplingParams(temperature=0, max_tokens=14, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=3, max_tokens=12, n=2),
              SamplingParams(temperature=0, max_tokens=20, logprobs=1, ignore_eos=True)]
    core.add([CoreRequest(f"r{i}", list(range(3 + i, 20 + 2 * i)), p) for i, p in enumerate(params)])
    tokens: dict[tuple[str, int], list[int]] = {}
    finished: dict[tuple[str, int], str] = {}
    while core.has_unfinished_requests():
        for out in core.step().outputs:
            key = (out.request_id, out.index)
            assert key not in finished, f"{key} got a delta after it finished"
            tokens.setdefault(key, []).extend(out.new_token_ids)
            if out.finish_reason is not None:
                finished[key] = out.finish_reason
            if abort_after is not None and key == ("r1", 0) and len(tokens[key]) >= abort_after \
                    and key not in finished:
                core.abort(["r1"])
    stats = core.get_stats()
    assert (stats.num_used_blocks, stats.num_running, stats.num_waiting) == (0, 0, 0)
    return tokens, finished, core


def test_core_deltas_equal_the_plain_loop_and_an_abort_in_flight_emits_nothing_after(tiny_llama):
    *plain, plain_core = _core_run(tiny_llama, False)
    *overlapped, core = _core_run(tiny_llama, True)
    assert overlapped == plain
    assert plain_core.scheduler.num_preemptions > 0 and core.scheduler.num_preemptions > 0
    # Abort r1 (both completions) when completion 0 has 3 tokens: its next step is in flight.
    tokens, finished, _ = _core_run(tiny_llama, True, abort_after=3)
    assert set(tokens) <= set(plain[0])
    for key, toks in tokens.items():
        if key[0] == "r1":    # cut short (an abort sends nothing), but what it got is the plain run's
            assert key not in finished and toks == plain[0][key][:len(toks)]
        else:
            assert (toks, finished[key]) == (plain[0][key], plain[1][key])
    assert len(tokens[("r1", 0)]) == 3


def test_inproc_client_streams_with_overlapped_steps(tiny_llama):
    import asyncio

    from pagedray.cluster.core.engine_core import EngineCore
    from pagedray.cluster.core.messages import CoreRequest
    from pagedray.cluster.serving.inproc_client import InprocClient
    expected = _core_run(tiny_llama, False)[0]
    core = EngineCore.from_kwargs(tiny_llama, device="cpu", block_size=4, num_kv_blocks=24,
                                  max_num_batched_tokens=16, async_scheduling=True)

    async def scenario():
        client = InprocClient(lambda: core)
        await client.start()
        params = [SamplingParams(temperature=0, max_tokens=14, ignore_eos=True),
                  SamplingParams(temperature=0.8, seed=3, max_tokens=12, n=2),
                  SamplingParams(temperature=0, max_tokens=20, logprobs=1, ignore_eos=True)]
        await client.add([CoreRequest(f"r{i}", list(range(3 + i, 20 + 2 * i)), p)
                          for i, p in enumerate(params)])
        got, left = {}, set(expected)
        async for batch in client.outputs():
            for out in batch.outputs:
                got.setdefault((out.request_id, out.index), []).extend(out.new_token_ids)
                if out.finish_reason is not None:
                    left.discard((out.request_id, out.index))
            if not left:
                break
        stats = await client.get_stats()
        await client.shutdown()
        return got, stats

    got, stats = asyncio.run(scenario())
    assert got == expected and stats.num_used_blocks == 0
