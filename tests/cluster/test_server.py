"""The gRPC endpoint end to end: a server on 127.0.0.1 (port 0) over the real engine on CPU
with a tiny random Llama, called through grpc.aio clients."""
from __future__ import annotations

import asyncio
import contextlib
import math
import random
import subprocess
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from testkit.grpc_cases import CASES
from testkit.grpc_cases import make_request as _request
from testkit.grpc_cases import read_stream as _read_stream
from testkit.tiny_tokenizer import make_tiny_tokenizer

from pagedray.cluster import LLM, SamplingParams
from pagedray.cluster.serving.frontend import Frontend
from pagedray.cluster.serving.inproc_client import InprocClient
from pagedray.cluster.serving.server import GenerateServer
from pagedray.protos import generate_pb2 as pb
from pagedray.protos import generate_pb2_grpc as pb_grpc

VOCAB = 320
MAX_LEN = 128
ENGINE_KWARGS = dict(device="cpu", block_size=4, num_kv_blocks=2048)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def make_checkpoint(path) -> str:
    """A tiny random Llama (hidden 64, 2 layers, vocab 320) with a byte-level BPE tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_LEN,
                         initializer_range=0.3, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    make_tiny_tokenizer(path, VOCAB)
    return str(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return make_checkpoint(tmp_path_factory.mktemp("server"))


@contextlib.asynccontextmanager
async def serving(ckpt: str, *, max_pending_requests: int = 1024, step_delay: float = 0.0, **server_kwargs):
    """Yields (server, stub, channel); `step_delay` slows each engine step (for deadlines, drains)."""
    client = InprocClient.for_model(ckpt, name="inproc", **ENGINE_KWARGS)
    frontend = await Frontend.start_with([client], max_pending_requests=max_pending_requests)
    if step_delay:
        real_step = client.core.step

        def slow_step():
            time.sleep(step_delay)
            return real_step()

        client.core.step = slow_step
    server = GenerateServer(frontend, "tiny", host="127.0.0.1", port=0, **server_kwargs)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield server, pb_grpc.GenerationStub(channel), channel
    finally:
        await channel.close()
        await server.stop(grace=2)


async def wait_idle(server: GenerateServer, timeout: float = 10.0):
    """Blocks are freed by the server after the client gives up: poll until none are held."""
    deadline = time.monotonic() + timeout
    while True:
        stats = await server.frontend.get_stats()
        if (stats.num_used_blocks, stats.num_running, stats.num_waiting, server.frontend.num_pending) == (0, 0, 0, 0):
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"KV blocks still held {timeout}s after the call ended: {stats}")
        await asyncio.sleep(0.02)


def _long(prompt="Hello", max_tokens=100) -> pb.GenerateRequest:
    return _request(prompt, max_tokens=max_tokens, ignore_eos=True)


_REASON = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}


def _check_completion(got_text, got_ids, got_reason, got_logprobs, want, num_logprobs):
    assert got_text == want.text
    assert list(got_ids) == want.token_ids
    assert got_reason == _REASON[want.finish_reason]
    if want.logprobs is None:
        assert not got_logprobs
        return
    assert [lp.token_id for lp in got_logprobs] == want.token_ids
    # Batches differ between the two runs, so float32 sums differ in the last bits.
    for lp, entry, token in zip(got_logprobs, want.logprobs, want.token_ids):
        assert lp.logprob == pytest.approx(entry[token], abs=1e-4)
        top = sorted(entry.items(), key=lambda kv: -kv[1])[:num_logprobs]
        assert [t.token_id for t in lp.top] == [t for t, _ in top]
        assert [t.logprob for t in lp.top] == pytest.approx([v for _, v in top], abs=1e-4)
        assert all(t.text for t in lp.top)


def test_unary_and_stream_equal_offline_api(ckpt):
    offline = LLM(ckpt, **ENGINE_KWARGS).generate([p for _, p, _ in CASES], [s for _, _, s in CASES],
                                                   use_tqdm=False)

    async def scenario():
        async with serving(ckpt) as (server, stub, _):
            unary = await asyncio.gather(*[stub.Generate(r) for r, _, _ in CASES])
            streams = await asyncio.gather(*[_read_stream(stub.GenerateStream(r)) for r, _, _ in CASES])
            return unary, streams, await wait_idle(server)

    unary, streams, _ = asyncio.run(scenario())
    for (request, _, params), want, whole, messages in zip(CASES, offline, unary, streams):
        n_logprobs = params.logprobs
        assert [c.index for c in whole.completions] == [c.index for c in want.outputs]
        for got, w in zip(whole.completions, want.outputs):
            _check_completion(got.text, got.token_ids, got.finish_reason, got.logprobs, w, n_logprobs)
        usage = pb.Usage(prompt_tokens=len(want.prompt_token_ids),
                         completion_tokens=sum(len(c.token_ids) for c in want.outputs),
                         cached_prompt_tokens=whole.usage.cached_prompt_tokens)
        assert whole.usage == usage
        # Stream: deltas add up; finish_reason only on a completion's last message; usage only at the end.
        assert all(m.HasField("usage") == (i == len(messages) - 1) for i, m in enumerate(messages))
        assert messages[-1].usage.completion_tokens == usage.completion_tokens
        for w in want.outputs:
            parts = [c for m in messages for c in m.completions if c.index == w.index]
            assert all(c.token_ids or c.finish_reason for c in parts)  # nothing empty is sent
            assert [c.finish_reason != pb.FINISH_REASON_UNSPECIFIED for c in parts] == [False] * (len(parts) - 1) + [True]
            _check_completion("".join(c.text for c in parts), [t for c in parts for t in c.token_ids],
                              parts[-1].finish_reason, [lp for c in parts for lp in c.logprobs], w, n_logprobs)
        assert len({m.request_id for m in messages}) == 1


def test_200_concurrent_streams_each_get_their_own_text(ckpt):
    rng = random.Random(0)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(2, 12))] for _ in range(200)]
    offline = LLM(ckpt, **ENGINE_KWARGS).generate(
        [{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
        use_tqdm=False)

    async def scenario():
        async with serving(ckpt) as (server, stub, _):
            calls = [stub.GenerateStream(_request(p, temperature=0, max_tokens=4, ignore_eos=True),
                                         timeout=120) for p in prompts]
            results = await asyncio.gather(*[_read_stream(c) for c in calls])
            return results, await wait_idle(server)

    results, _ = asyncio.run(scenario())
    assert len(results) == 200
    for messages, want in zip(results, offline):
        completions = [c for m in messages for c in m.completions]
        assert [t for c in completions for t in c.token_ids] == want.outputs[0].token_ids
        assert "".join(c.text for c in completions) == want.outputs[0].text
        assert completions[-1].finish_reason == pb.FINISH_REASON_LENGTH


# (field the message must name, request)
BAD_REQUESTS = [
    ("prompt", pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=2))),
    ("prompt", _request("", max_tokens=2)),
    ("prompt", _request([], max_tokens=2)),
    ("vocabulary", _request([5, VOCAB], max_tokens=2)),
    ("vocabulary", _request([-1], max_tokens=2)),
    ("max_model_len", _request([5] * MAX_LEN, max_tokens=2)),
    ("temperature", _request("hi", temperature=-1.0)),
    ("top_p", _request("hi", top_p=0.0)),
    ("top_p", _request("hi", top_p=1.5)),
    ("top_k", _request("hi", top_k=-2)),
    ("min_p", _request("hi", min_p=1.5)),
    ("max_tokens", _request("hi", max_tokens=0)),
    ("max_tokens", _request("hi", max_tokens=MAX_LEN)),
    ("min_tokens", _request("hi", min_tokens=-1)),
    ("min_tokens", _request("hi", min_tokens=20, max_tokens=10)),
    ("stop", _request("hi", stop=[""])),
    ("stop_token_ids", _request("hi", stop_token_ids=[-3])),
    ("n", _request("hi", n=0)),
    ("n", _request("hi", n=100000)),
    ("logprobs", _request("hi", logprobs=-1)),
    ("logprobs", _request("hi", logprobs=21)),
    ("presence_penalty", _request("hi", presence_penalty=3.0)),
    ("frequency_penalty", _request("hi", frequency_penalty=-2.5)),
    ("repetition_penalty", _request("hi", repetition_penalty=0.0)),
    # Values that once passed validation and then failed on the way to the core (issue 23).
    ("stop_token_ids", _request("hi", stop_token_ids=[VOCAB + 5])),
    ("min_tokens", _request("hi", min_tokens=2 ** 31 - 1)),
    ("n", _request("hi", n=200)),   # over half the 256 batch seats
    ("seed", None),  # filled below: an int64 seed is valid, so it must pass
    ("request_id", pb.GenerateRequest(prompt="hi", request_id="x" * 300)),
]


def test_every_bad_field_is_invalid_argument_and_server_keeps_serving(ckpt):
    async def scenario():
        async with serving(ckpt) as (server, stub, _):
            for field, request in BAD_REQUESTS:
                if request is None:
                    ok = await stub.Generate(_request("hi", seed=-(2 ** 63), max_tokens=2))
                    assert len(ok.completions[0].token_ids) >= 1
                    continue
                for call in (stub.Generate(request), _read_stream(stub.GenerateStream(request))):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await call
                    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, info.value)
                    assert field in info.value.details(), (field, info.value.details())
            good = await stub.Generate(_request("Hello", max_tokens=3, ignore_eos=True))
            return good, await wait_idle(server)

    good, stats = asyncio.run(scenario())
    assert len(good.completions[0].token_ids) == 3
    assert stats.num_used_blocks == 0


def test_unknown_model_is_not_found(ckpt):
    async def scenario():
        async with serving(ckpt) as (_, stub, _):
            named = await stub.Generate(pb.GenerateRequest(model="tiny", prompt="Hi",
                                                           sampling=pb.SamplingParams(max_tokens=2)))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Generate(pb.GenerateRequest(model="gpt-9", prompt="Hi"))
            listed = await stub.ListModels(pb.ListModelsRequest())
            return named, info.value, listed

    named, error, listed = asyncio.run(scenario())
    assert len(named.completions) == 1
    assert error.code() == grpc.StatusCode.NOT_FOUND and "gpt-9" in error.details()
    assert [(m.name, m.architecture, m.max_model_len, m.tensor_parallel_size, m.replicas, m.replicas_total)
            for m in listed.models] == [("tiny", "LlamaForCausalLM", MAX_LEN, 1, 1, 1)]


def test_cancelled_stream_and_expired_deadline_free_all_blocks(ckpt):
    async def scenario():
        async with serving(ckpt, step_delay=0.02) as (server, stub, _):
            call = stub.GenerateStream(_long(list(range(3, 30))))
            await call.read()
            await call.read()
            busy = await server.frontend.get_stats()
            call.cancel()
            after_cancel = await wait_idle(server)

            with pytest.raises(grpc.aio.AioRpcError) as unary_info:
                await stub.Generate(_long(list(range(3, 30))), timeout=0.3)
            after_unary_deadline = await wait_idle(server)

            with pytest.raises(grpc.aio.AioRpcError) as stream_info:
                await _read_stream(stub.GenerateStream(_long(), timeout=0.3))
            after_stream_deadline = await wait_idle(server)
            return (busy, after_cancel, unary_info.value, after_unary_deadline, stream_info.value,
                    after_stream_deadline)

    busy, after_cancel, unary_err, after_unary, stream_err, after = asyncio.run(scenario())
    assert busy.num_used_blocks >= math.ceil(27 / 4) and busy.num_running == 1
    assert unary_err.code() == stream_err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert after_cancel.num_used_blocks == after_unary.num_used_blocks == after.num_used_blocks == 0


def test_auth_token_required_except_for_health(ckpt):
    async def scenario():
        async with serving(ckpt, auth_token="s3cret") as (_, stub, channel):
            codes = []
            for metadata in (None, [("authorization", "Bearer wrong")], [("authorization", "s3cret")]):
                for call in (stub.Generate(_request("Hi", max_tokens=2), metadata=metadata),
                             _read_stream(stub.GenerateStream(_request("Hi", max_tokens=2), metadata=metadata)),
                             stub.ListModels(pb.ListModelsRequest(), metadata=metadata)):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await call
                    codes.append(info.value.code())
            good = await stub.Generate(_request("Hi", max_tokens=2), metadata=[("authorization", "Bearer s3cret")])
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            return codes, good, health

    codes, good, health = asyncio.run(scenario())
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 9
    assert len(good.completions[0].token_ids) >= 1
    assert health.status == SERVING


def test_health_not_serving_when_engine_fails(ckpt):
    async def scenario():
        async with serving(ckpt) as (server, stub, channel):
            health = health_pb2_grpc.HealthStub(channel)
            before = [(await health.Check(health_pb2.HealthCheckRequest(service=s))).status
                      for s in ("", "pagedray.v1.Generation")]

            def broken_step():
                raise RuntimeError("CUDA error: an illegal memory access")

            server.frontend.router.replicas[0].core.step = broken_step
            with pytest.raises(grpc.aio.AioRpcError) as in_flight:
                await stub.Generate(_request("Hi", max_tokens=5))
            await asyncio.sleep(0.05)  # the health update is scheduled on the loop
            after = [(await health.Check(health_pb2.HealthCheckRequest(service=s))).status
                     for s in ("", "pagedray.v1.Generation")]
            with pytest.raises(grpc.aio.AioRpcError) as later:
                await stub.Generate(_request("Hi", max_tokens=5))
            return before, in_flight.value, after, later.value

    before, in_flight, after, later = asyncio.run(scenario())
    assert before == [SERVING, SERVING] and after == [NOT_SERVING, NOT_SERVING]
    assert in_flight.code() == later.code() == grpc.StatusCode.UNAVAILABLE
    assert "illegal memory access" in in_flight.details()


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def test_metrics_exposed_and_moving(ckpt):
    async def scenario():
        async with serving(ckpt, metrics_port=0) as (server, stub, _):
            before = await asyncio.to_thread(_scrape, server.metrics_port)
            await asyncio.gather(*[stub.Generate(_request([5 + i, 6, 7], max_tokens=6, ignore_eos=True))
                                   for i in range(4)])
            call = stub.GenerateStream(_long(max_tokens=60))
            await call.read()
            await call.read()
            during = await asyncio.to_thread(_scrape, server.metrics_port)
            call.cancel()
            await wait_idle(server)
            after = await asyncio.to_thread(_scrape, server.metrics_port)
            return before, during, after

    before, during, after = asyncio.run(scenario())
    assert after["pagedray_generation_tokens_total"] - before["pagedray_generation_tokens_total"] >= 24 + 2
    assert after["pagedray_prompt_tokens_total"] - before["pagedray_prompt_tokens_total"] >= 12
    assert after["pagedray_time_to_first_token_seconds_count"] == 5
    assert after["pagedray_time_per_output_token_seconds_count"] == 4
    assert after['pagedray_completions_finished_total{finish_reason="length"}'] == 4
    assert during["pagedray_num_requests_running"] == 1 and during["pagedray_kv_cache_used_blocks"] > 0
    assert 0 < during["pagedray_kv_cache_usage_ratio"] < 1
    assert during["pagedray_generation_tokens_per_second"] > 0
    assert after["pagedray_kv_cache_used_blocks"] == 0 and after["pagedray_num_requests_running"] == 0
    assert "pagedray_prefix_cache_hit_rate" in after and "pagedray_num_requests_waiting" in after


def test_full_admission_queue_is_resource_exhausted(ckpt):
    async def scenario():
        async with serving(ckpt, max_pending_requests=1, step_delay=0.01) as (server, stub, _):
            first = stub.GenerateStream(_long())
            await first.read()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Generate(_request("Hi", max_tokens=2))
            first.cancel()
            await wait_idle(server)
            after = await stub.Generate(_request("Hi", max_tokens=2, ignore_eos=True))
            return info.value, after

    error, after = asyncio.run(scenario())
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_pending_requests=1" in error.details()
    assert len(after.completions[0].token_ids) == 2


def test_graceful_stop_drains_in_flight_and_refuses_new(ckpt):
    async def scenario():
        async with serving(ckpt, step_delay=0.02) as (server, stub, channel):
            call = stub.GenerateStream(_long(max_tokens=20))
            first = await call.read()
            stopping = asyncio.create_task(server.stop(grace=30))
            await asyncio.sleep(0.05)
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Generate(_request("Hi", max_tokens=2))
            rest = await _read_stream(call)
            await stopping
            return [first] + rest, health, refused.value

    messages, health, refused = asyncio.run(scenario())
    tokens = [t for m in messages for c in m.completions for t in c.token_ids]
    assert len(tokens) == 20 and messages[-1].completions[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert health.status == NOT_SERVING
    assert refused.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_and_reflection(ckpt, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True)

    async def scenario():
        async with serving(ckpt, tls_cert=cert.read_bytes(), tls_key=key.read_bytes()) as (server, _, _):
            credentials = grpc.ssl_channel_credentials(cert.read_bytes())
            async with grpc.aio.secure_channel(f"127.0.0.1:{server.port}", credentials) as channel:
                reply = await pb_grpc.GenerationStub(channel).Generate(_request("Hi", max_tokens=2, ignore_eos=True))
                reflect = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
                services = [s.name async for r in reflect for s in r.list_services_response.service]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as plain:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await pb_grpc.GenerationStub(plain).Generate(_request("Hi"), timeout=5)
            return reply, services, info.value

    reply, services, plain_error = asyncio.run(scenario())
    assert len(reply.completions[0].token_ids) == 2
    assert {"pagedray.v1.Generation", "grpc.health.v1.Health"} <= set(services)
    assert plain_error.code() == grpc.StatusCode.UNAVAILABLE


# -- endpoint edges: port binding, malformed bodies, auth before parsing, short quotes, reply size --
def _raw_calls(channel):
    """Generate and GenerateStream taking raw bytes, so a test can send a body that does not parse."""
    unary = channel.unary_unary("/pagedray.v1.Generation/Generate", request_serializer=None,
                                response_deserializer=pb.GenerateResponse.FromString)
    stream = channel.unary_stream("/pagedray.v1.Generation/GenerateStream", request_serializer=None,
                                  response_deserializer=pb.GenerateResponse.FromString)
    return unary, stream


def _malformed_bodies() -> dict[str, bytes]:
    good = _request("Hello", max_tokens=2).SerializeToString()
    tag = pb.GenerateRequest.DESCRIPTOR.fields_by_name["prompt"].number << 3 | 2
    return {"truncated": good[:-1], "invalid utf-8": bytes([tag, 2, 0xff, 0xfe])}


async def _code_and_details(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details()


def test_malformed_body_is_invalid_argument_with_one_log_line(ckpt, caplog):
    async def scenario():
        async with serving(ckpt) as (_, stub, channel):
            unary, stream = _raw_calls(channel)
            got = []
            for body in _malformed_bodies().values():
                got.append(await _code_and_details(unary(body)))
                got.append(await _code_and_details(_read_stream(stream(body))))
            return got, await stub.Generate(_request("Hello", max_tokens=2, ignore_eos=True))

    with caplog.at_level("WARNING", logger="pagedray.cluster.serving.server"):
        got, good = asyncio.run(scenario())
    for code, details in got:
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("malformed request body (")
    logged = [r for r in caplog.records if "malformed request body" in r.getMessage()]
    assert len(logged) == 4 and all(r.exc_info is None and "\n" not in r.getMessage() for r in logged)
    assert len(good.completions[0].token_ids) == 2   # and the server keeps serving


def test_unauthenticated_call_is_refused_before_its_body_is_parsed(ckpt, caplog):
    async def scenario():
        async with serving(ckpt, auth_token="s3cret") as (_, _, channel):
            unary, stream = _raw_calls(channel)
            body = _malformed_bodies()["truncated"]
            return [await _code_and_details(unary(body)), await _code_and_details(_read_stream(stream(body)))]

    with caplog.at_level("WARNING", logger="pagedray.cluster.serving.server"):
        got = asyncio.run(scenario())
    assert got == [(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")] * 2
    assert not [r for r in caplog.records if "malformed" in r.getMessage()]   # never parsed


def test_errors_quote_a_short_prefix_of_a_huge_value(ckpt):
    huge_name = "m" * 20_000
    stops = ["a"] * 50_000 + [""]

    async def scenario():
        async with serving(ckpt) as (_, stub, _):
            named = await _code_and_details(stub.Generate(pb.GenerateRequest(model=huge_name, prompt="Hi")))
            stopped = await _code_and_details(stub.Generate(_request("Hi", max_tokens=2, stop=stops)))
            return named, stopped

    (named_code, named), (stop_code, stop) = asyncio.run(scenario())
    assert named_code == grpc.StatusCode.NOT_FOUND and "... (20000 chars) is not served here" in named
    assert stop_code == grpc.StatusCode.INVALID_ARGUMENT and stop.startswith("stop must be") and "(50001 items)" in stop
    assert len(named) < 300 and len(stop) < 300


def test_unary_reply_over_the_limit_is_refused_up_front(ckpt, monkeypatch):
    # About 128 x 120 x 300 bytes = 4.4 MiB; the tiny model's context (128) allows 120 tokens.
    big = _request("Hi", n=128, logprobs=20, max_tokens=120, ignore_eos=True)

    async def scenario():
        async with serving(ckpt) as (server, stub, _):
            real = server.frontend.generate
            monkeypatch.setattr(server.frontend, "generate", lambda *a, **k: pytest.fail("the work started"))
            refused = await _code_and_details(stub.Generate(big))
            monkeypatch.setattr(server.frontend, "generate", real)
            call = stub.GenerateStream(big)   # the stream has no such limit
            first = await call.read()
            call.cancel()
            await wait_idle(server)
            return refused, first

    (code, details), first = asyncio.run(scenario())
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "over the 4 MiB limit of a unary reply: use GenerateStream" in details and "n=128" in details
    assert first.completions


def test_port_in_use_is_an_error_for_grpc_and_metrics(ckpt):
    async def scenario():
        async with serving(ckpt, metrics_port=0) as (first, _, _):
            errors = []
            for kwargs in (dict(port=first.port), dict(port=0, metrics_port=first.metrics_port)):
                second = GenerateServer(first.frontend, "tiny", host="127.0.0.1", **kwargs)
                with pytest.raises(OSError) as info:
                    await second.start()
                errors.append(str(info.value))
                await second.server.stop(0)
            return first.port, first.metrics_port, errors

    port, metrics_port, errors = asyncio.run(scenario())
    assert errors[0] == (f"cannot listen on 127.0.0.1:{port}: the port is in use "
                         f"(or the host is not an address of this machine)")
    assert errors[1].startswith(f"metrics: cannot listen on 127.0.0.1:{metrics_port}: ")


def test_unary_reply_size_estimate_is_close_to_the_real_reply(ckpt):
    from pagedray.cluster.serving.server import sampling_from_proto, unary_reply_bytes
    request = _request("Hello", n=4, logprobs=20, max_tokens=40, ignore_eos=True)

    async def scenario():
        async with serving(ckpt) as (_, stub, _):
            return await stub.Generate(request)

    reply = asyncio.run(scenario())
    estimate = unary_reply_bytes(sampling_from_proto(request.sampling), MAX_LEN)
    assert estimate / 2 <= reply.ByteSize() <= estimate, (reply.ByteSize(), estimate)
