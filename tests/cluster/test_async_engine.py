"""AsyncEngine on the real engine (CPU, tiny random Llama): results equal the offline API's,
cancellation and abort free every block, the admission queue bounds, a failed step kills cleanly."""
from __future__ import annotations

import asyncio
import contextlib
import threading

import pytest

from tiny_tokenizer import make_tiny_tokenizer

from pagedray.cluster import LLM, SamplingParams
from pagedray.cluster.async_engine import AsyncEngine, DeltaTracker, EngineDeadError, QueueFullError
from pagedray.cluster.engine import LLMEngine

ENGINE_KWARGS = dict(device="cpu", block_size=4, num_kv_blocks=256)


def make_checkpoint(path) -> str:
    """A tiny random Llama (hidden 64, 2 layers, vocab 320) with a byte-level BPE tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.3, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    make_tiny_tokenizer(path, 320)
    return str(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return make_checkpoint(tmp_path_factory.mktemp("async_engine"))


def _async_engine(ckpt: str, **kwargs) -> AsyncEngine:
    return AsyncEngine(LLMEngine.from_kwargs(ckpt, **ENGINE_KWARGS), **kwargs)


def _long(max_tokens: int = 60) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True)


# Mixed on purpose: text and token prompts, seeded sampling, n=2, stop strings, logprobs.
CASES = [
    ("The capital of France is", SamplingParams(temperature=0.8, seed=1, max_tokens=12)),
    ({"prompt_token_ids": [5, 17, 99, 250]}, SamplingParams(temperature=0.0, max_tokens=10, logprobs=3)),
    ("Hello, my name is", SamplingParams(temperature=1.0, seed=7, n=2, max_tokens=9)),
    ("Once upon a time", SamplingParams(temperature=0.9, top_k=20, seed=3, max_tokens=16, stop=["e", "a"])),
    ("héllo wörld 日本語", SamplingParams(temperature=0.7, top_p=0.9, seed=11, max_tokens=14)),
]


async def _collect(engine: AsyncEngine, prompt, params, request_id):
    """Final cumulative output, and each completion's text rebuilt from the deltas."""
    tracker, rebuilt, last = DeltaTracker(), {}, None
    async for out in engine.generate(prompt, params, request_id):
        for c in tracker.delta(out).outputs:
            rebuilt[c.index] = rebuilt.get(c.index, "") + c.text
        last = out
    return last, rebuilt


def test_concurrent_results_equal_offline_api(ckpt):
    offline = LLM(ckpt, **ENGINE_KWARGS).generate([p for p, _ in CASES], [s for _, s in CASES], use_tqdm=False)

    async def scenario():
        engine = _async_engine(ckpt)
        try:
            results = await asyncio.gather(*[_collect(engine, p, s, f"r{i}") for i, (p, s) in enumerate(CASES)])
            assert (await engine.get_stats()).num_used_blocks == 0
            return results
        finally:
            await engine.shutdown()

    for (got, rebuilt), want in zip(asyncio.run(scenario()), offline):
        assert got.finished and got.prompt_token_ids == want.prompt_token_ids
        assert len(got.outputs) == len(want.outputs)
        for g, w in zip(got.outputs, want.outputs):
            assert (g.index, g.text, g.token_ids, g.finish_reason) == (w.index, w.text, w.token_ids, w.finish_reason)
            # Batches differ between the two runs, so float32 sums differ in the last bits.
            assert (g.logprobs is None) == (w.logprobs is None)
            for got_step, want_step in zip(g.logprobs or [], w.logprobs or []):
                assert got_step.keys() == want_step.keys()
                assert [got_step[k] for k in want_step] == pytest.approx(list(want_step.values()), abs=1e-4)
            assert rebuilt[g.index] == g.text  # the deltas add up to the whole text


def test_stop_string_never_streamed(ckpt):
    """Deltas never carry text a stop string later takes back."""
    async def scenario():
        engine = _async_engine(ckpt)
        try:
            # Greedy text of the prompt, then stop on a piece from its middle.
            free, _ = await _collect(engine, "Once upon a time", SamplingParams(temperature=0, max_tokens=20), "a")
            text = free.outputs[0].text
            stop = text[len(text) // 2: len(text) // 2 + 2]
            params = SamplingParams(temperature=0, max_tokens=20, stop=[stop])
            got, rebuilt = await _collect(engine, "Once upon a time", params, "b")
            return text, stop, got, rebuilt
        finally:
            await engine.shutdown()

    text, stop, got, rebuilt = asyncio.run(scenario())
    assert got.outputs[0].finish_reason == "stop"
    assert got.outputs[0].text == text[:text.index(stop)]
    assert rebuilt[0] == got.outputs[0].text


def test_closing_or_cancelling_the_stream_frees_blocks(ckpt):
    async def scenario():
        engine = _async_engine(ckpt)
        try:
            stream = engine.generate({"prompt_token_ids": list(range(3, 40))}, _long(), "closed")
            await stream.__anext__()
            await stream.__anext__()
            busy = await engine.get_stats()
            await stream.aclose()
            after_close = await engine.get_stats()

            seen = asyncio.Event()

            async def consume():
                async for _ in engine.generate("Hello, my name is", _long(), "cancelled"):
                    seen.set()

            task = asyncio.create_task(consume())
            await seen.wait()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return busy, after_close, await engine.get_stats(), engine.num_pending
        finally:
            await engine.shutdown()

    busy, after_close, after_cancel, pending = asyncio.run(scenario())
    assert busy.num_used_blocks > 0 and busy.num_running == 1
    for stats in (after_close, after_cancel):
        assert (stats.num_used_blocks, stats.num_running, stats.num_waiting) == (0, 0, 0)
    assert pending == 0


def test_abort_ends_stream_with_abort_reason(ckpt):
    async def scenario():
        engine = _async_engine(ckpt)
        try:
            outputs = []
            async for out in engine.generate("Hello", _long(), "victim"):
                outputs.append(out)
                if len(outputs) == 2:
                    await engine.abort("victim")
            return outputs, await engine.get_stats()
        finally:
            await engine.shutdown()

    outputs, stats = asyncio.run(scenario())
    last = outputs[-1]
    assert last.finished and last.outputs[0].finish_reason == "abort"
    assert last.outputs[0].token_ids[:len(outputs[1].outputs[0].token_ids)] == outputs[1].outputs[0].token_ids
    assert stats.num_used_blocks == 0 and stats.num_running == 0


def test_admission_queue_bounded(ckpt):
    async def scenario():
        engine = _async_engine(ckpt, max_pending_requests=2)
        try:
            a = engine.generate("Hello", _long(), "a")
            b = engine.generate("Hello", _long(), "b")
            await a.__anext__()
            await b.__anext__()
            with pytest.raises(QueueFullError, match="max_pending_requests=2"):
                await engine.generate("Hello", _long(), "c").__anext__()
            await a.aclose()
            out, _ = await _collect(engine, "Hello", SamplingParams(max_tokens=2, ignore_eos=True), "d")
            await b.aclose()
            return out
        finally:
            await engine.shutdown()

    assert len(asyncio.run(scenario()).outputs[0].token_ids) == 2


def test_bad_input_is_value_error_and_engine_keeps_serving(ckpt):
    async def scenario():
        engine = _async_engine(ckpt)
        try:
            with pytest.raises(ValueError, match="vocabulary"):
                await engine.generate({"prompt_token_ids": [1, 99999]}, SamplingParams(), "bad").__anext__()
            with pytest.raises(ValueError, match="max_tokens"):
                await engine.generate("Hello", SamplingParams(max_tokens=500), "bad2").__anext__()
            running = engine.generate("Hello", _long(), "dup")
            await running.__anext__()
            with pytest.raises(ValueError, match="request_id"):
                await engine.generate("Hello", _long(), "dup").__anext__()
            await running.aclose()
            out, _ = await _collect(engine, "Hello", SamplingParams(max_tokens=3, ignore_eos=True), "good")
            return out, engine.num_pending, await engine.get_stats()
        finally:
            await engine.shutdown()

    out, pending, stats = asyncio.run(scenario())
    assert len(out.outputs[0].token_ids) == 3
    assert pending == 0 and stats.num_used_blocks == 0


def test_failed_step_kills_engine_and_fails_every_request(ckpt):
    async def scenario():
        engine = _async_engine(ckpt)
        real_step, calls, deaths = engine.engine.step, [0], []

        def flaky_step():
            calls[0] += 1
            if calls[0] > 3:
                raise RuntimeError("device lost")
            return real_step()

        engine.engine.step = flaky_step
        engine.on_dead(deaths.append)
        errors = []

        async def consume(rid):
            try:
                async for _ in engine.generate("Hello", _long(), rid):
                    pass
            except EngineDeadError as exc:
                errors.append(str(exc))

        try:
            await asyncio.wait_for(asyncio.gather(consume("x"), consume("y")), timeout=30)
            with pytest.raises(EngineDeadError):
                await engine.generate("Hello", _long(), "z").__anext__()
            return errors, deaths, engine.is_healthy
        finally:
            await engine.shutdown()

    errors, deaths, healthy = asyncio.run(scenario())
    assert len(errors) == 2 and all("device lost" in e for e in errors)
    assert len(deaths) == 1 and not healthy


def test_commands_queued_behind_a_death_are_answered(ckpt):
    """A request (or stats call) waiting in the inbox when the engine dies fails; it never hangs."""
    async def scenario():
        engine = _async_engine(ckpt)
        gate = threading.Event()

        def dying_add(*args):
            gate.wait(10)  # hold the engine thread so the next commands queue up behind this one
            raise EngineDeadError("worker died")

        engine.engine.add_request = dying_add
        first = asyncio.ensure_future(engine.generate("Hello", _long(), "a").__anext__())
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(engine.generate("Hello", _long(), "b").__anext__())
        stats = asyncio.ensure_future(engine.get_stats())
        await asyncio.sleep(0.05)
        gate.set()
        results = await asyncio.wait_for(asyncio.gather(first, second, stats, return_exceptions=True), 10)
        await engine.shutdown()
        return results

    assert all(isinstance(r, EngineDeadError) for r in asyncio.run(scenario()))
