"""LoRA adapters through `pagedray serve --enable-lora --lora-modules`: the official `openai` client
with model=<adapter>, gRPC's lora_name (tokens equal PEFT's), /v1/models and ListModels with the
parent, and /v1/load_lora_adapter + /v1/unload_lora_adapter (behind the token) while a stream runs."""
from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import grpc
import openai
import pytest

from testkit.grpc_cases import make_request
from testkit.hf_compare import Greedy, assert_greedy_match
from testkit.hf_reference import hf_greedy
from testkit.lora_adapters import load_peft_model, make_peft_adapter
from testkit.serve_process import ServeProcess
from testkit.tiny_models import make_tiny_llama

from pagedray.protos import generate_pb2 as pb
from pagedray.protos import generate_pb2_grpc as pb_grpc

TOKEN = "s3cret"
READY = (r"ready: serving model '(?P<name>[^']+)' on 127\.0\.0\.1:(?P<grpc>\d+) .*"
         r"OpenAI HTTP API on (?P<http>http\S+/v1)")
PROMPT = [5, 17, 99, 250, 31, 7]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora_http")
    ckpt = make_tiny_llama(folder / "ckpt")
    paths = {n: make_peft_adapter(ckpt, str(folder / n), seed=s, r=r)
             for n, s, r in (("a", 1, 8), ("b", 2, 4), ("big", 3, 16))}
    other = make_tiny_llama(folder / "other", tokenizer=False, hidden_size=32, intermediate_size=64)
    paths["foreign"] = make_peft_adapter(other, str(folder / "foreign"), seed=4, r=4, targets=["q_proj"])
    (folder / "token").write_text(TOKEN + "\n")
    proc = ServeProcess(["--port", "0", "--http-port", "0", "--device", "cpu", "--model", ckpt,
                         "--served-model-name", "tiny", "--block-size", "4", "--num-kv-blocks", "512",
                         "--auth-token-file", str(folder / "token"), "--enable-lora", "--lora-modules",
                         f"a={paths['a']}", "--max-loras", "2", "--max-lora-rank", "8"])
    ready = proc.wait_for(READY, timeout=300)
    yield ckpt, paths, ready
    assert proc.stop() == 0


def _client(ready) -> openai.OpenAI:
    return openai.OpenAI(base_url=ready["http"], api_key=TOKEN, max_retries=0, timeout=60)


def _grpc(ready, method: str, request):
    with grpc.insecure_channel(f"127.0.0.1:{ready['grpc']}") as channel:
        return getattr(pb_grpc.GenerationStub(channel), method)(
            request, metadata=[("authorization", f"Bearer {TOKEN}")], timeout=60)


def _post(ready, path: str, body: dict, token: str | None = TOKEN) -> tuple[int, str]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(ready["http"].removesuffix("/v1") + path, json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_adapter_by_name_matches_peft_over_grpc_and_openai(served):
    ckpt, paths, ready = served
    request = make_request(PROMPT, max_tokens=8, temperature=0.0, logprobs=2, ignore_eos=True)
    request.lora_name = "a"
    reply = _grpc(ready, "Generate", request).completions[0]
    ours = Greedy(list(reply.token_ids), [{t.token_id: t.logprob for t in lp.top} | {lp.token_id: lp.logprob}
                                          for lp in reply.logprobs])
    assert_greedy_match(ours, hf_greedy(load_peft_model(ckpt, paths["a"]), PROMPT, 8, ignore_eos=True),
                        atol=1e-4, what="adapter a over gRPC")
    client = _client(ready)
    text = client.completions.create(model="a", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    assert text == reply.text
    base = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    assert base != text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)


def test_models_list_adapters_with_their_parent(served):
    _, paths, ready = served
    models = {m.id: m for m in _client(ready).models.list().data}
    assert models["a"].parent == "tiny" and models["a"].root == paths["a"]
    assert models["tiny"].parent is None
    listed = {m.name: m for m in _grpc(ready, "ListModels", pb.ListModelsRequest()).models}
    assert listed["a"].parent == "tiny" and listed["tiny"].parent == ""


def test_load_and_unload_while_a_stream_runs(served):
    _, paths, ready = served
    client = _client(ready)
    stream = client.completions.create(model="a", prompt=PROMPT, max_tokens=120, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    chunks = [next(stream)]
    assert _post(ready, "/v1/load_lora_adapter", {"lora_name": "b", "lora_path": paths["b"]})[0] == 200
    assert client.completions.create(model="b", prompt=PROMPT, max_tokens=4, temperature=0).choices[0].text
    assert _post(ready, "/v1/unload_lora_adapter", {"lora_name": "a"})[0] == 200
    chunks += list(stream)   # the running request finishes with its adapter
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="a", prompt=PROMPT, max_tokens=2)
    # Errors: no token, unknown name, rank above --max-lora-rank, a name in use.
    assert _post(ready, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": paths["b"]}, token=None)[0] == 401
    assert _post(ready, "/v1/unload_lora_adapter", {"lora_name": "a"})[0] == 404
    status, body = _post(ready, "/v1/load_lora_adapter", {"lora_name": "big", "lora_path": paths["big"]})
    assert status == 400 and re.search(r"r=16 is above max_lora_rank=8", body)
    assert _post(ready, "/v1/load_lora_adapter", {"lora_name": "b", "lora_path": paths["b"]})[0] == 400
    assert _post(ready, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": paths["a"]})[0] == 200
    assert client.completions.create(model="a", prompt=PROMPT, max_tokens=4, temperature=0).choices[0].text
    # An adapter of another base model passes the front's config check; the engine refuses its first request (400),
    # parsing it off the step loop, and goes on serving.
    assert _post(ready, "/v1/load_lora_adapter", {"lora_name": "foreign", "lora_path": paths["foreign"]})[0] == 200
    with pytest.raises(openai.BadRequestError, match="another base model"):
        client.completions.create(model="foreign", prompt=PROMPT, max_tokens=2)
    assert client.completions.create(model="b", prompt=PROMPT, max_tokens=2, temperature=0).choices[0].text
