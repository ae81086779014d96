"""Constrained decoding through the offline API on a tiny random Llama (its byte-level BPE tokenizer):
every constraint kind, seeds, n > 1, stop strings, max_tokens, preemption, resume (migration),
logit_bias, bad grammars refused without stalling other requests."""
from __future__ import annotations

import json
import re
import time

import jsonschema
import pytest


from pagedray.cluster import LLM, SamplingParams
from pagedray.cluster.core.engine_core import EngineCore
from pagedray.cluster.core.messages import CoreRequest
from pagedray.common.sampling_params import StructuredOutputsParams as SO

# (A pattern bounds the string: xgrammar 0.2.9 lets control characters into strings with maxLength.)
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[A-Z][a-z]{0,7}$"},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]},
                                                    "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(tiny_llama, device="cpu", block_size=4)


def _one(llm, so: SO, **kw) -> str:
    kw.setdefault("max_tokens", 200)
    out = llm.generate(PROMPT, SamplingParams(structured_outputs=so, **kw), use_tqdm=False)[0]
    return out.outputs


def test_every_kind_constrains_the_output(llm):
    for temperature in (0.0, 1.0):
        schema_out = _one(llm, SO(json=SCHEMA), temperature=temperature, seed=3)[0]
        assert schema_out.finish_reason == "stop"
        jsonschema.validate(json.loads(schema_out.text), SCHEMA)
        objects = [_one(llm, SO(json_object=True), temperature=1.0, seed=seed, max_tokens=100)[0]
                   for seed in range(4)]
        assert all(o.text.startswith("{") for o in objects)
        done = [o for o in objects if o.finish_reason == "stop"]   # (a random model may write a long string)
        assert done and all(isinstance(json.loads(o.text), dict) for o in done)
        regex = _one(llm, SO(regex=r"[0-9]{3}-[a-z]{2,4}"), temperature=temperature, seed=3)[0]
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", regex.text), regex.text
        choice = _one(llm, SO(choice=["Paris", "Rome", "naïve café"]), temperature=temperature, seed=3)[0]
        assert choice.text in ("Paris", "Rome", "naïve café")
        grammar = 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'
        text = _one(llm, SO(grammar=grammar), temperature=temperature, seed=3, max_tokens=60)[0].text
        assert re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", text), text


def test_unconstrained_output_is_not_json_so_the_mask_did_the_work(llm):
    free = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    with pytest.raises(ValueError):
        json.loads(free[0].outputs[0].text)


def test_seeded_sampling_under_a_grammar_is_reproducible_and_n_gt_1(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=200, structured_outputs=SO(json=SCHEMA))
    first = llm.generate(PROMPT, params, use_tqdm=False)[0].outputs
    # Batched differently (another request beside it), the seeded completions do not change.
    again = llm.generate([PROMPT, "Hello"], [params, SamplingParams(max_tokens=30)], use_tqdm=False)[0].outputs
    assert [c.text for c in first] == [c.text for c in again]
    for c in first:
        jsonschema.validate(json.loads(c.text), SCHEMA)
    assert len({c.text for c in first}) > 1


def test_overlapped_steps_give_the_same_constrained_tokens(llm, tiny_llama):
    """Async scheduling (the next step launched before the last one's tokens are read): each
    grammar advances by the in-flight token, so seeded outputs equal the synchronous engine's."""
    overlapped = LLM(tiny_llama, device="cpu", block_size=4, async_scheduling=True)
    assert overlapped.llm_engine.core.async_scheduling
    params = [SamplingParams(n=2, temperature=1.0, seed=s, max_tokens=60, structured_outputs=SO(json=SCHEMA))
              for s in range(3)] + [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)]
    prompts = [PROMPT] * 3 + ["Hello"]
    want = [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params, use_tqdm=False)]
    got = [[c.token_ids for c in o.outputs] for o in overlapped.generate(prompts, params, use_tqdm=False)]
    assert got == want


def test_stop_strings_and_max_tokens_cut_a_grammar(llm):
    cut = _one(llm, SO(json=SCHEMA), temperature=0, max_tokens=3)[0]
    assert cut.finish_reason == "length" and len(cut.token_ids) == 3 and cut.text.startswith("{")
    stopped = _one(llm, SO(json=SCHEMA), temperature=0, stop=['"age"'])[0]
    assert stopped.finish_reason == "stop" and '"age"' not in stopped.text and stopped.text.startswith('{"name"')


def test_logit_bias_moves_the_greedy_token(llm):
    base = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    forced = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                                 logit_bias={"77": 100.0}), use_tqdm=False)
    assert forced[0].outputs[0].token_ids == [77] * 4 != base[0].outputs[0].token_ids
    banned = base[0].outputs[0].token_ids[0]
    other = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=1, logit_bias={banned: -100}),
                         use_tqdm=False)
    assert other[0].outputs[0].token_ids[0] != banned
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate(PROMPT, SamplingParams(logit_bias={10**6: 1.0}), use_tqdm=False)
    with pytest.raises(ValueError, match=r"logit_bias\[3\]"):
        SamplingParams(logit_bias={3: 101})


@pytest.mark.parametrize("so, field", [
    (dict(regex="[a-"), "structured_outputs.regex"),
    (dict(grammar="root ::= ???"), "structured_outputs.grammar"),
    (dict(json={"type": "nonsense"}), "structured_outputs.json"),
    (dict(json="{not json"), "structured_outputs.json"),
    (dict(regex="a", choice=["b"]), "exactly one"),
    (dict(choice=[]), "structured_outputs.choice"),
    (dict(wrong=1), "unknown field"),
])
def test_bad_constraints_are_refused_naming_the_field(llm, so, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        llm.generate(PROMPT, SamplingParams(structured_outputs=so, max_tokens=4), use_tqdm=False)
    ok = llm.generate(PROMPT, SamplingParams(max_tokens=2), use_tqdm=False)   # the engine goes on
    assert len(ok[0].outputs[0].token_ids) == 2


def _core(path: str, **kw) -> EngineCore:
    return EngineCore.from_kwargs(path, device="cpu", block_size=4, **kw)


def _run(core: EngineCore, requests: list[CoreRequest], limit: float = 120.0):
    core.add(requests)
    tokens = {r.request_id: [] for r in requests}
    errors = {}
    deadline = time.monotonic() + limit
    while core.has_unfinished_requests() and time.monotonic() < deadline:
        for out in core.step().outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.error:
                errors[out.request_id] = out.error
    return tokens, errors


def test_preemption_and_resume_rebuild_the_grammar_state(tiny_llama):
    """A tiny KV cache preempts requests mid-grammar (recomputed from their tokens), and a request
    resumed with tokens produced elsewhere (a migration) continues its grammar: every output validates."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    core = _core(tiny_llama, num_kv_blocks=40, max_num_seqs=8)
    prompt = tok.encode(PROMPT)
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=60, structured_outputs=SO(json=SCHEMA))
              for i in range(6)]
    tokens, errors = _run(core, [CoreRequest(f"r{i}", prompt, p) for i, p in enumerate(params)])
    assert not errors and core.scheduler.num_preemptions > 0
    for ids in tokens.values():
        jsonschema.validate(json.loads(tok.decode(ids, skip_special_tokens=True)), SCHEMA)
    # The same seeded request, resumed on a fresh core after 5 tokens, ends with the same tokens.
    whole = tokens["r0"]
    fresh = _core(tiny_llama)
    rest, errors = _run(fresh, [CoreRequest("m", prompt, params[0].clone(), output_token_ids=whole[:5])])
    assert not errors and whole[:5] + rest["m"] == whole


def test_a_slow_grammar_does_not_stall_other_requests(tiny_llama, monkeypatch):
    """A grammar still compiling after compile_timeout_s is refused; meanwhile a free request runs."""
    from pagedray.workers import structured_output
    core = _core(tiny_llama)
    core.grammars.compile_timeout_s = 0.5
    real = structured_output.GrammarBackend._compile

    def slow(self, kind, source):
        if "slow" in source:
            time.sleep(3)
        return real(self, kind, source)
    monkeypatch.setattr(structured_output.GrammarBackend, "_compile", slow)
    free = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    core.add([CoreRequest("slow", [5, 6, 7], SamplingParams(max_tokens=4, structured_outputs=SO(regex="slow[0-9]")))])
    start = time.monotonic()
    tokens, errors = _run(core, [CoreRequest("free", [5, 6, 7], free)])
    assert len(tokens["free"]) == 8 and "compile_timeout_s" in errors["slow"]
    assert time.monotonic() - start < 3   # refused at its deadline, not after the compile


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_with_overlapped_steps(tiny_llama):
    """On the GPU (async scheduling on by default, pinned bitmask transfers, the fused race sampler for
    the free rows): constrained outputs validate and seeded ones equal the synchronous engine's."""
    params = [SamplingParams(n=2, temperature=1.0, seed=s, max_tokens=60, structured_outputs=SO(json=SCHEMA))
              for s in range(4)] + [SamplingParams(temperature=0.8, max_tokens=16, ignore_eos=True),
                                    SamplingParams(max_tokens=20, structured_outputs=SO(regex=r"[0-9]{3}-[a-z]{2,4}"))]
    prompts = [PROMPT] * 5 + ["Hello"]
    outs = {}
    for overlap in (True, False):
        llm = LLM(tiny_llama, device="cuda", dtype="float32", async_scheduling=overlap)
        assert llm.llm_engine.core.async_scheduling is overlap
        outs[overlap] = llm.generate(prompts, params, use_tqdm=False)
        llm.shutdown()
    for o in outs[True][:4]:
        for c in o.outputs:
            jsonschema.validate(json.loads(c.text), SCHEMA)
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", outs[True][5].outputs[0].text)
    seeded = lambda run: [[c.token_ids for c in o.outputs] for o in run[:4]]   # noqa: E731
    assert seeded(outs[True]) == seeded(outs[False])
