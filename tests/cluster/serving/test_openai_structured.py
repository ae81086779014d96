"""Structured outputs, tool calls and the rest of the OpenAI surface, with the official `openai`
client against `pagedray serve --http-port --tool-call-parser hermes` (a tiny random checkpoint and
a Hermes-style tool template), and the same constraints over gRPC."""
from __future__ import annotations

import json
import re
import urllib.request

import grpc
import jsonschema
import openai
import pytest

from testkit.grpc_cases import make_request
from testkit.serve_process import ServeProcess
from testkit.tiny_models import make_tiny_llama

from pagedray.cluster import LLM, SamplingParams
from pagedray.protos import generate_pb2 as pb
from pagedray.protos import generate_pb2_grpc as pb_grpc

READY = (r"ready: serving model '(?P<name>[^']+)' on 127\.0\.0\.1:(?P<grpc>\d+) .*OpenAI HTTP API on "
         r"(?P<http>http\S+/v1)")
# Tools go in a <tools> block; calls and tool results go back in Hermes' shape.
TEMPLATE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>\n{% endif %}"
    "{% for m in messages %}{% if m.role == 'tool' %}tool[{{ m.tool_call_id }}]: {{ m.content }}\n"
    "{% elif m.tool_calls %}assistant: {% for c in m.tool_calls %}<tool_call>{\"name\": \"{{ c.function.name }}\", "
    "\"arguments\": {{ c.function.arguments | tojson }}}</tool_call>{% endfor %}\n"
    "{% else %}{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}assistant:")
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[A-Z][a-z]{1,8}$"},
                                           "days": {"type": "integer", "minimum": 1, "maximum": 9}},
          "required": ["city", "days"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": SCHEMA}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("so-http")
    ckpt = make_tiny_llama(folder / "ckpt", max_position_embeddings=1024)
    (folder / "template.jinja").write_text(TEMPLATE)
    proc = ServeProcess(["--port", "0", "--http-port", "0", "--device", "cpu", "--model", ckpt,
                         "--served-model-name", "tiny", "--block-size", "4", "--num-kv-blocks", "1024",
                         "--chat-template", str(folder / "template.jinja"), "--tool-call-parser", "hermes"])
    ready = proc.wait_for(READY, timeout=300)
    client = openai.OpenAI(base_url=ready["http"], api_key="x", max_retries=0, timeout=120)
    yield client, ready, ckpt
    assert proc.stop() == 0


def _grpc(ready, request, method="Generate"):
    with grpc.insecure_channel(f"127.0.0.1:{ready['grpc']}") as channel:
        return getattr(pb_grpc.GenerationStub(channel), method)(request, timeout=120)


def test_response_format_json_schema_on_chat_and_completions(served):
    client, _, _ = served
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}}
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, response_format=fmt, max_tokens=60,
                                          temperature=1.0, seed=1, n=2)
    for choice in chat.choices:
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    text = client.completions.create(model="tiny", prompt="Weather:", max_tokens=60, temperature=0,
                                     extra_body={"response_format": fmt})
    jsonschema.validate(json.loads(text.choices[0].text), SCHEMA)
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, response_format=fmt, max_tokens=60,
                                            temperature=1.0, seed=1, n=2, stream=True)
    parts = {}
    for chunk in stream:
        for c in chunk.choices:
            parts[c.index] = parts.get(c.index, "") + (c.delta.content or "")
    assert [parts[i] for i in range(2)] == [c.message.content for c in chat.choices]   # seeded: the same
    obj = client.chat.completions.create(model="tiny", messages=MESSAGES, response_format={"type": "json_object"},
                                         max_tokens=80, temperature=1.0, seed=2)
    assert obj.choices[0].message.content.startswith("{")
    plain = client.chat.completions.create(model="tiny", messages=MESSAGES, response_format={"type": "text"},
                                           max_tokens=4, temperature=0)
    assert plain.choices[0].finish_reason == "length"


def test_vllm_structured_outputs_extra(served):
    client, _, _ = served
    regex = client.completions.create(model="tiny", prompt="Code:", max_tokens=20, temperature=1.0, seed=3,
                                      extra_body={"structured_outputs": {"regex": r"[A-Z]{2}-[0-9]{3}"}})
    assert re.fullmatch(r"[A-Z]{2}-[0-9]{3}", regex.choices[0].text)
    choice = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=1.0,
                                            extra_body={"structured_outputs": {"choice": ["sunny", "rainy"]}})
    assert choice.choices[0].message.content in ("sunny", "rainy")
    grammar = 'root ::= "[" [a-c] ("," [a-c])* "]"'
    out = client.completions.create(model="tiny", prompt="List:", max_tokens=30, temperature=1.0, seed=4,
                                    extra_body={"structured_outputs": {"grammar": grammar}})
    assert re.fullmatch(r"\[[a-c](,[a-c])*\]", out.choices[0].text)


@pytest.mark.parametrize("extra, param", [
    ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs"),
    ({"structured_outputs": {"grammar": "root ::= ???"}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"guided_json": {"type": "object"}}, "guided_json"),        # an unknown field: never dropped silently
    ({"logit_bias": {"999999": 5}}, "logit_bias"),
    ({"logit_bias": {"5": 500}}, "logit_bias"),
    ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
])
def test_bad_constraints_are_400_naming_the_parameter(served, extra, param):
    client, _, _ = served
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="Hi", max_tokens=4, extra_body=extra)
    assert info.value.body["param"] == param, info.value.body


def test_grpc_structured_outputs_and_invalid_argument(served):
    _, ready, _ = served
    so = pb.StructuredOutputs(json=json.dumps(SCHEMA))
    reply = _grpc(ready, make_request("Weather:", max_tokens=60, temperature=0.0, structured_outputs=so))
    jsonschema.validate(json.loads(reply.completions[0].text), SCHEMA)
    choice = _grpc(ready, make_request("Sky:", max_tokens=10, structured_outputs=pb.StructuredOutputs(
        choice=pb.Choices(values=["blue", "grey"]))))
    assert choice.completions[0].text in ("blue", "grey")
    biased = _grpc(ready, make_request("Sky:", max_tokens=3, temperature=0.0, ignore_eos=True, logit_bias={77: 100}))
    assert list(biased.completions[0].token_ids) == [77, 77, 77]
    with pytest.raises(grpc.RpcError) as err:
        _grpc(ready, make_request("Hi", max_tokens=4, structured_outputs=pb.StructuredOutputs(regex="[a-")))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "structured_outputs.regex" in err.value.details()


def test_tool_choice_required_and_named_are_enforced(served):
    client, _, _ = served
    required = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=[WEATHER, TIME],
                                              tool_choice="required", max_tokens=120, temperature=1.0, seed=5)
    choice = required.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function"
        schema = {"get_weather": SCHEMA, "get_time": TIME["function"]["parameters"]}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), schema)
    one = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=[WEATHER, TIME],
                                         tool_choice="required", parallel_tool_calls=False, max_tokens=120,
                                         temperature=1.0, seed=5)
    assert len(one.choices[0].message.tool_calls) == 1
    named = {"type": "function", "function": {"name": "get_weather"}}
    unary = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=[WEATHER, TIME], tool_choice=named,
                                           max_tokens=60, temperature=1.0, seed=6)
    [call] = unary.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and unary.choices[0].message.content is None
    jsonschema.validate(json.loads(call.function.arguments), SCHEMA)
    # Streamed: OpenAI's tool-call deltas, which the client's stream helper folds back together.
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, tools=[WEATHER, TIME],
                                                 tool_choice=named, max_tokens=60, temperature=1.0, seed=6,
                                                 stream=True))
    deltas = [tc for c in chunks for ch in c.choices for tc in (ch.delta.tool_calls or [])]
    assert [d.function.name for d in deltas] == ["get_weather"]
    assert deltas[0].function.arguments == call.function.arguments and deltas[0].id.startswith("call_")
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_auto_parses_hermes_calls_and_tool_results_go_back(served):
    client, ready, ckpt = served
    call = '<tool_call>\\n\\{"name": "get_weather", "arguments": \\{"city": "Paris", "days": 2\\}\\}\\n</tool_call>'
    forced = {"structured_outputs": {"regex": r"Let me check\. " + call}}
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=[WEATHER], max_tokens=200,
                                         extra_body=forced)
    message = out.choices[0].message
    assert out.choices[0].finish_reason == "tool_calls" and message.content == "Let me check."
    [tc] = message.tool_calls
    assert tc.function.name == "get_weather" and json.loads(tc.function.arguments) == {"city": "Paris", "days": 2}
    stream = list(client.chat.completions.create(model="tiny", messages=MESSAGES, tools=[WEATHER], max_tokens=200,
                                                 extra_body=forced, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    calls = [t for c in stream for t in (c.choices[0].delta.tool_calls or [])]
    assert content.strip() == "Let me check." and "<tool_call>" not in content
    assert [t.function.name for t in calls] == ["get_weather"]
    # The call and its result go back through the template.
    history = MESSAGES + [{"role": "assistant", "content": None, "tool_calls": [tc.model_dump()]},
                          {"role": "tool", "tool_call_id": tc.id, "content": "sunny, 21 C"}]
    reply = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER], tool_choice="none",
                                           max_tokens=4, temperature=0, logprobs=True)
    assert reply.choices[0].finish_reason == "length" and reply.choices[0].message.tool_calls is None
    rendered = _post(ready, "/tokenize", {"messages": history, "tools": [WEATHER], "return_token_strs": True})
    from transformers import AutoTokenizer
    text = AutoTokenizer.from_pretrained(ckpt).decode(rendered["tokens"])
    assert f"tool[{tc.id}]: sunny, 21 C" in text and '<tool_call>{"name": "get_weather"' in text
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=MESSAGES, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert info.value.body["param"] == "tool_choice"


def _post(ready, path: str, body: dict) -> dict:
    base = ready["http"].removesuffix("/v1")
    request = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=60).read())


def test_models_retrieve_tokenize_detokenize(served):
    client, ready, ckpt = served
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-9")
    assert "gpt-9" in info.value.body["message"]
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(ckpt)
    got = _post(ready, "/tokenize", {"model": "tiny", "prompt": "Hello, my name is Ada"})
    assert got["tokens"] == tok.encode("Hello, my name is Ada") and got["count"] == len(got["tokens"])
    assert got["max_model_len"] == 1024
    assert _post(ready, "/detokenize", {"tokens": got["tokens"]})["prompt"] == "Hello, my name is Ada"


def test_logprobs_zero_has_the_sampled_token_and_echo_scores_the_prompt(served):
    client, _, ckpt = served
    zero = client.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0, logprobs=0)
    lp = zero.choices[0].logprobs
    assert all(len(top) == 1 and list(top.values())[0] == v for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    ids = [5, 17, 99, 250, 31]
    scored = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=1)
    choice = scored.choices[0]
    assert scored.usage.completion_tokens == 0 and choice.logprobs.token_logprobs[0] is None
    assert len(choice.logprobs.token_logprobs) == len(ids)
    offline = LLM(ckpt, device="cpu", block_size=4).generate(
        {"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
    want = [entry[t] for entry, t in zip(offline.prompt_logprobs[1:], ids[1:])]
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    extra = client.completions.create(model="tiny", prompt=ids, max_tokens=1, extra_body={"prompt_logprobs": 0})
    got = [next(iter(e.values()))["logprob"] for e in extra.choices[0].model_extra["prompt_logprobs"][1:]]
    assert extra.choices[0].model_extra["prompt_logprobs"][0] is None and got == pytest.approx(want, abs=1e-4)
