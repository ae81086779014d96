"""Hostile and careless clients (issue 23), each request as a client would send it, over gRPC and
HTTP against one served stack (a tiny Llama on CPU, 8 batch seats): the status and message the
client gets, then the server side: it keeps serving (a canary call completes), nothing stays in
flight and no KV block is held."""
from __future__ import annotations

import asyncio
import json
import os
import logging
import threading
import time

import grpc
import msgspec
import pytest
from grpc_health.v1 import health_pb2

from testkit.grpc_cases import make_request
from testkit.served_stack import ServedStack
from testkit.tiny_models import make_tiny_llama

from pagedray.cluster.serving import openai_fields
from pagedray.protos import generate_pb2 as pb

VOCAB = 320
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    ckpt = make_tiny_llama(tmp_path_factory.mktemp("hostile"), max_position_embeddings=256)
    served = ServedStack(ckpt, max_num_seqs=8, block_size=4, num_kv_blocks=512, chat_template=TEMPLATE,
                         http_kwargs=dict(header_timeout=1.0, body_timeout=1.0, max_connections=16))
    yield served
    served.close()


@pytest.fixture
def keeps_serving(stack, caplog):
    """After the test: health SERVING, a canary call completes, nothing in flight, 0 blocks held,
    and no traceback logged for a client's input."""
    caplog.set_level(logging.WARNING)
    yield
    assert stack.health() == SERVING
    stack.canary()
    assert stack.wait_idle().num_used_blocks == 0
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]


def _grpc_error(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call(request, timeout=30)
        if not hasattr(result, "completions"):
            list(result)
    return info.value


# -- 1. client ids never collide with the engine's ----------------------------------------------------
def test_a_client_id_that_looks_like_a_sample_id_does_not_collide(stack, keeps_serving):
    first = stack.stub.GenerateStream(make_request("hello", request_id="v#1", max_tokens=40, ignore_eos=True,
                                                   temperature=0.0), timeout=60)
    head = next(first)   # running
    second = stack.stub.Generate(make_request("hi", request_id="v", n=2, max_tokens=4, ignore_eos=True), timeout=60)
    rest = list(first)
    assert head.request_id == "v#1" and all(r.request_id == "v#1" for r in rest)
    assert sum(len(r.completions[0].token_ids) for r in [head, *rest]) == 40
    assert second.request_id == "v" and sorted(len(c.token_ids) for c in second.completions) == [4, 4]
    assert stack.client.is_healthy and stack.frontend.router.num_ready == 1   # the core never failed


# -- 2. values the engine or the wire cannot hold -----------------------------------------------------
HTTP_UNHOLDABLE = [
    ({"seed": 2 ** 64}, "seed"), ({"seed": 10 ** 100}, "seed"), ({"seed": -2 ** 63 - 1}, "seed"),
    ({"top_k": 10 ** 20}, "top_k"), ({"stop_token_ids": [10 ** 20]}, "stop_token_ids"),
    ({"stop_token_ids": [VOCAB + 5]}, "stop_token_ids"), ({"min_tokens": 10 ** 20, "max_tokens": None}, "min_tokens"),
    ({"min_tokens": 300, "max_tokens": None}, "min_tokens"), ({"n": 10 ** 20}, "n"),
    ({"max_tokens": 2 ** 64}, "max_tokens"), ({"logprobs": 2 ** 70}, "logprobs"),
]


@pytest.mark.parametrize("fields, param", HTTP_UNHOLDABLE)
def test_http_values_beyond_what_the_engine_holds_are_400(stack, keeps_serving, fields, param):
    status, body = stack.completion(prompt="hi", **fields)
    assert status == 400, body
    assert body["error"]["param"] == param and param in body["error"]["message"], body


def test_http_lone_surrogates_are_400_naming_the_field(stack, keeps_serving):
    cases = {"stop": '{"model": "tiny", "prompt": "hi", "stop": ["\\ud800"]}',
             "prompt": '{"model": "tiny", "prompt": "a\\udc00b"}'}
    for param, raw in cases.items():
        status, body = stack.post("/v1/completions", raw)
        assert (status, body["error"]["param"]) == (400, param), body
        assert "lone surrogate" in body["error"]["message"]
    status, body = stack.post("/v1/chat/completions",
                              '{"model": "tiny", "messages": [{"role": "user", "content": "x\\ud83d"}]}')
    assert (status, body["error"]["param"]) == (400, "messages"), body
    assert "messages[0].content" in body["error"]["message"]


def test_http_json_nested_100k_deep_is_400(stack, keeps_serving):
    status, body = stack.post("/v1/completions", "[" * 100_000 + "]" * 100_000)
    assert status == 400 and "nested deeper than" in body["error"]["message"], body
    status, body = stack.post("/v1/completions", '{"model": "tiny", "prompt": "hi", "x": ' + "[" * 40 + "]" * 40 + "}")
    assert status == 400 and "x" in body["error"]["message"] and "nested deeper" in body["error"]["message"]


GRPC_UNHOLDABLE = [
    ("stop_token_ids", make_request("hi", stop_token_ids=[2 ** 31 - 1])),
    ("min_tokens", make_request("hi", min_tokens=2 ** 31 - 1)),
    ("n", make_request("hi", n=2 ** 31 - 1)),
    ("top_k", make_request("hi", top_k=-(2 ** 31))),
]


@pytest.mark.parametrize("field, request_", GRPC_UNHOLDABLE, ids=[c[0] for c in GRPC_UNHOLDABLE])
def test_grpc_values_beyond_what_the_engine_holds_are_invalid_argument(stack, keeps_serving, field, request_):
    for call in (stack.stub.Generate, stack.stub.GenerateStream):
        error = _grpc_error(call, request_)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and field in error.details(), error


def test_a_request_the_client_cannot_hand_over_fails_at_once(stack, keeps_serving):
    """Whatever validation missed: a failure to hand a request to its core fails that call now."""
    real_add = stack.client.add

    async def broken_add(requests):
        raise msgspec.EncodeError("Integer value out of range")
    stack.client.add = broken_add
    try:
        start = time.monotonic()
        error = _grpc_error(stack.stub.Generate, make_request("hi", max_tokens=2))
        status, body = stack.completion(prompt="hi", max_tokens=2)
        elapsed = time.monotonic() - start
    finally:
        stack.client.add = real_add
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "could not be handed" in error.details()
    assert status == 503 and "Integer value out of range" in body["error"]["message"]
    assert elapsed < 20 and stack.frontend.num_pending == 0


def test_admission_never_admits_past_its_limit(stack, keeps_serving):
    frontend = stack.frontend
    peak = []
    real_place = frontend._place

    def place(req, *args, **kwargs):
        peak.append(len(frontend._requests))
        return real_place(req, *args, **kwargs)

    async def flood():
        frontend.max_pending_requests, frontend._place = 4, place
        try:
            calls = [frontend.generate("x" * 40, None, f"flood-{i}", final_only=True) for i in range(40)]
            results = await asyncio.gather(*[anext(c) for c in calls], return_exceptions=True)
            await asyncio.gather(*[c.aclose() for c in calls])
            return results
        finally:
            frontend.max_pending_requests = 1024
            del frontend._place
    results = stack.run(flood())
    refused = [r for r in results if isinstance(r, Exception)]
    assert max(peak) <= 4 and len(refused) >= 36
    assert all("max_pending_requests=4" in str(r) for r in refused)


# -- 3, 4. chat: bounded before rendering, rendered off the event loop -------------------------------
def test_grpc_chat_renders_on_the_chat_thread_not_the_event_loop(stack, keeps_serving):
    threads = []
    real = stack.grpc.service.chat.prompt

    def spy(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)
    stack.grpc.service.chat.prompt = spy
    try:
        messages = [pb.ChatMessage(role="user", content=f"m{i}") for i in range(20)]
        reply = stack.stub.Generate(pb.GenerateRequest(chat=pb.ChatMessages(messages=messages),
                                                       sampling=pb.SamplingParams(max_tokens=2)), timeout=60)
    finally:
        del stack.grpc.service.chat.prompt
    assert len(reply.completions[0].token_ids) == 2
    assert threads and all(t.startswith("chat-template") for t in threads), threads


def test_chat_over_the_byte_bound_is_refused_before_rendering(stack, keeps_serving):
    rendered = []
    for renderer in (stack.grpc.service.chat, stack.http.chat):
        renderer.prompt = lambda *args, real=renderer.prompt: rendered.append(1) or real(*args)
    try:
        big = "word " * 200_000   # 1 MB: far more tokens than max_model_len=256
        error = _grpc_error(stack.stub.Generate, pb.GenerateRequest(chat=pb.ChatMessages(
            messages=[pb.ChatMessage(role="user", content=big)])))
        status, body = stack.post("/v1/chat/completions", {"model": "tiny",
                                                           "messages": [{"role": "user", "content": big}]})
        many = _grpc_error(stack.stub.Generate, pb.GenerateRequest(chat=pb.ChatMessages(
            messages=[pb.ChatMessage(role="user", content="") for _ in range(1000)])))
    finally:
        del stack.grpc.service.chat.prompt, stack.http.chat.prompt
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "messages is 1000000 bytes" in error.details()
    assert status == 400 and body["error"]["param"] == "messages" and "max_model_len=256" in body["error"]["message"]
    assert many.code() == grpc.StatusCode.INVALID_ARGUMENT and "messages holds 1000 messages" in many.details()
    assert not rendered


# -- 7. one request cannot take the batch -------------------------------------------------------------
def test_n_is_capped_at_half_the_batch_seats(stack, keeps_serving):
    error = _grpc_error(stack.stub.Generate, make_request("hi", n=5, max_tokens=2))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "n must be <= 4" in error.details()
    status, body = stack.completion(prompt="hi", n=5, max_tokens=2)
    assert status == 400 and body["error"]["param"] == "n" and "max_num_seqs=8" in body["error"]["message"]
    status, body = stack.completion(prompt=["a", "b", "c"], n=2, max_tokens=2)
    assert status == 400 and "3 prompts x n=2" in body["error"]["message"]


def test_a_small_request_runs_beside_the_largest_one(stack, keeps_serving):
    """The largest n a call may have leaves seats free: a small call admitted after it finishes first."""
    big = stack.stub.GenerateStream(make_request("big", n=4, max_tokens=120, ignore_eos=True), timeout=120)
    next(big)   # its samples hold their seats
    small = stack.stub.Generate(make_request("small", max_tokens=2, ignore_eos=True), timeout=60)
    big_left = [r for r in big]
    assert len(small.completions[0].token_ids) == 2
    assert sum(len(c.token_ids) for r in big_left for c in r.completions) > 0   # still running when small ended


# -- 8. slow senders ----------------------------------------------------------------------------------
def _closed_within(sock, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while data := sock.recv(4096):
            if b"408" in data:
                return True
        return True
    except TimeoutError:
        return False
    finally:
        sock.close()


def test_http_half_sent_headers_and_bodies_are_cut_off(stack, keeps_serving):
    headers = stack.connect()
    headers.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")   # the headers never end
    body = stack.connect()
    body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"model\":")                 # the body never ends
    idle = stack.connect()                                                 # says nothing at all
    assert _closed_within(headers, 10) and _closed_within(body, 10) and _closed_within(idle, 10)


def test_http_connections_are_bounded(stack, keeps_serving):
    socks = [stack.connect() for _ in range(16)]
    try:
        extra = stack.connect()
        assert _closed_within(extra, 5)     # refused at once: the 16 slots are taken
    finally:
        for s in socks:
            s.close()
    deadline = time.monotonic() + 10
    while stack.http.num_connections and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stack.completion(prompt="hi", max_tokens=2)[0] == 200


def test_metrics_endpoint_cuts_off_idle_connections_and_keeps_answering(stack, keeps_serving):
    port = stack.grpc.metrics_port
    idle = [stack.connect(port) for _ in range(50)]
    threads_before = threading.active_count()
    text = _get(port, "/metrics")
    assert "pagedray_kv_cache_used_blocks" in text
    assert threading.active_count() <= threads_before   # no thread per connection
    assert all(_closed_within(s, 15) for s in idle[:3])
    for s in idle[3:]:
        s.close()


def _get(port: int, path: str) -> str:
    import urllib.request
    return urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10).read().decode()


# -- fuzz: random bodies built from the field lists ----------------------------------------------------
# The endpoints' own field lists (new fields are fuzzed as they are added), plus a field no endpoint knows.
_HTTP_FIELDS = sorted(openai_fields.COMPLETION_FIELDS | openai_fields.CHAT_FIELDS) + ["not_a_field"]
_GRPC_INTS = {"top_k": 32, "max_tokens": 32, "min_tokens": 32, "n": 32, "logprobs": 32, "seed": 64}
_GRPC_FLOATS = ["temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"]


def _value(rng, depth: int = 0):
    """A JSON value that hits edges: integer and float limits, odd strings, wrong shapes."""
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return rng.choice([0, 1, -1, 2, 3, 255, VOCAB, 2 ** 31 - 1, 2 ** 31, 2 ** 63 - 1, 2 ** 63, 2 ** 64,
                           -2 ** 63 - 1, 10 ** 20, -10 ** 20])
    if kind == 1:
        return rng.choice([0.0, 0.5, 1.0, -0.5, 1e-9, 2.5, 1e30, -1e30, float("nan"), float("inf")])
    if kind == 2:
        return rng.choice(["", "hi", "tiny", "\ud800", "a\udfffb", "日本語", "x" * 3000, "\x00", "</s>",
                           "json_object", "json_schema", "text", "auto", "none", "[a-z]+", "(", "function"])
    if kind == 3:
        return rng.choice([True, False, None])
    if kind in (4, 5):
        return [rng.randrange(-2, VOCAB + 3) for _ in range(rng.randrange(0, 6))]
    if kind in (6, 7):
        return [_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    keys = ["role", "content", "type", "text", "include_usage", "x", "json_schema", "schema", "json", "regex",
            "choice", "name", "function", "parameters", "properties"]
    return {rng.choice(keys): _value(rng, depth + 1) for _ in range(rng.randrange(0, 3))}


def _http_body(rng) -> str:
    body = {"model": "tiny", "max_tokens": rng.choice([1, 2, 4])}
    if rng.random() < 0.5:
        body["prompt"] = rng.choice(["hi", [5, 6, 7], ["a", "b"]])
    else:
        body["messages"] = [{"role": "user", "content": "hi"}]
    for name in rng.sample(_HTTP_FIELDS, rng.randrange(0, 5)):
        body[name] = _value(rng)
    return json.dumps(body)   # NaN and Infinity as JSON's extensions; lone surrogates as \\ud800 escapes


def _grpc_request(rng) -> pb.GenerateRequest:
    request = pb.GenerateRequest(model=rng.choice(["", "tiny", "other"]), request_id=rng.choice(["", "r", "v#1"]))
    which = rng.randrange(3)
    if which == 0:
        request.prompt = rng.choice(["", "hi", "日本語", "x" * 2000])
    elif which == 1:
        request.prompt_token_ids.ids.extend(rng.randrange(-5, VOCAB + 5) for _ in range(rng.randrange(0, 8)))
    else:
        request.chat.messages.add(role=rng.choice(["user", "wizard", ""]), content=rng.choice(["hi", ""]))
    s = request.sampling
    s.max_tokens = rng.choice([1, 2, 3])
    for name in rng.sample(sorted(_GRPC_INTS), rng.randrange(0, 4)):
        bits = _GRPC_INTS[name]
        setattr(s, name, rng.choice([0, 1, -1, 2, 5, 2 ** (bits - 1) - 1, -2 ** (bits - 1)]))
    for name in rng.sample(_GRPC_FLOATS, rng.randrange(0, 3)):
        setattr(s, name, rng.choice([0.0, 0.5, 1.0, -1.0, 3.0, float("nan"), float("inf"), 1e30]))
    if rng.random() < 0.3:
        s.stop_token_ids.extend(rng.choice([[2], [VOCAB], [2 ** 31 - 1], [-1]]))
    if rng.random() < 0.3:
        s.stop.extend(rng.choice([["a"], [""], ["x" * 500]]))
    if rng.random() < 0.2:
        s.logit_bias[rng.choice([0, 5, VOCAB, -1, 2 ** 31 - 1])] = rng.choice([0.0, 100.0, -1e30, float("nan")])
    if rng.random() < 0.2:
        constraint = s.structured_outputs
        kind = rng.randrange(4)
        if kind == 0:
            constraint.json = rng.choice(['{"type": "object"}', "{", '{"type": "nonsense"}', "[]", ""])
        elif kind == 1:
            constraint.regex = rng.choice(["[a-z]+", "(", "a{99999}", ""])
        elif kind == 2:
            constraint.choice.values.extend(rng.choice([["yes", "no"], [""], []]))
        else:
            constraint.json_object = True
    return request


def test_fuzz_random_bodies_get_no_5xx_and_no_hang(stack, keeps_serving):
    import random
    rng = random.Random(int(os.environ.get("FUZZ_SEED", "23")))   # FUZZ_SEED=n explores other bodies
    ok_codes = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}
    seen, deadline = {"http": {}, "grpc": {}}, time.monotonic() + 30
    for i in range(1200):
        if time.monotonic() > deadline:
            break
        if i % 2:
            body = _http_body(rng)
            status, reply = stack.post("/v1/chat/completions" if '"messages"' in body else "/v1/completions",
                                       body, timeout=20)   # a hang is a socket timeout: the test fails
            assert status < 500, (body, reply)
            seen["http"][status] = seen["http"].get(status, 0) + 1
            continue
        request = _grpc_request(rng)
        call = stack.stub.GenerateStream if rng.random() < 0.5 else stack.stub.Generate
        try:
            reply = call(request, timeout=20)
            if not hasattr(reply, "completions"):
                list(reply)
            code = grpc.StatusCode.OK
        except grpc.RpcError as err:
            code = err.code()
            assert code in ok_codes, (request, code, err.details())
        seen["grpc"][code.name] = seen["grpc"].get(code.name, 0) + 1
    assert sum(seen["http"].values()) >= 20 and sum(seen["grpc"].values()) >= 20, seen
    assert seen["http"].get(200) and seen["http"].get(400) and seen["grpc"].get("OK"), seen
    print("fuzz statuses:", seen)
