"""`pagedray generate` on a tiny random Llama: output equals the offline API's, flags reach
SamplingParams, bad flags fail before loading with the field named, --help works."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from testkit.tiny_models import make_tiny_llama

from pagedray.cluster import LLM, SamplingParams
from pagedray.cluster.cli import main


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"))


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["generate", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_everywhere():
    for argv in (["--help"], ["generate", "--help"]):
        done = subprocess.run([sys.executable, "-m", "pagedray.cluster.cli", *argv],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "generate" in done.stdout
    assert "--top-p" in done.stdout and "--logprobs" in done.stdout and "PROMPT" in done.stdout


def test_greedy_output_equals_the_offline_api(model_path, capsys):
    prompt = "The capital of France is"
    code, out, _ = _run(capsys, prompt, "--model", model_path, "--max-tokens", "8", "--device", "cpu",
                        "--ignore-eos")
    expected = LLM(model_path, device="cpu").generate(
        prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    assert code == 0
    assert out == prompt + expected.outputs[0].text + "\n"


def test_json_batch_with_sampling_flags(model_path, capsys):
    argv = ["A prompt", "Another one", "--model", model_path, "--device", "cpu", "--json",
            "--temperature", "0.9", "--top-p", "0.8", "--top-k", "50", "--min-p", "0.01", "--seed", "4",
            "--n", "2", "--max-tokens", "6", "--logprobs", "2", "--ignore-eos"]
    code, out, _ = _run(capsys, *argv)
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["prompt_index"], r["index"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(len(r["token_ids"]) == 6 and len(r["logprobs"]) == 6 for r in rows)
    assert all(str(t) in step for r in rows for t, step in zip(r["token_ids"], r["logprobs"]))
    # Seeded: the same command prints the same completions.
    assert _run(capsys, *argv)[1] == out


def test_logprobs_text_output(model_path, capsys):
    code, out, _ = _run(capsys, "Hello", "--model", model_path, "--device", "cpu", "--max-tokens", "4",
                        "--logprobs", "1", "--ignore-eos")
    assert code == 0 and out.startswith("Hello")
    per_token = out.splitlines()[-4:]
    assert all(line.startswith("  ") and line.count("\t") in (1, 2) for line in per_token)


def test_stop_string_flag(model_path, capsys):
    base = ["Hello", "--model", model_path, "--device", "cpu", "--max-tokens", "8", "--ignore-eos", "--json"]
    text = json.loads(_run(capsys, *base)[1])["text"]
    stop = text[2:4]
    assert len(stop) == 2
    row = json.loads(_run(capsys, *base, "--stop", stop)[1])
    assert row["text"] == text[:text.index(stop)] and row["finish_reason"] == "stop"


@pytest.mark.parametrize("flag,value,field", [("--top-p", "1.5", "top_p"), ("--temperature", "-1", "temperature"),
                                              ("--n", "0", "n"), ("--min-p", "2", "min_p")])
def test_bad_flag_names_the_field_without_loading(flag, value, field, capsys, monkeypatch):
    import pagedray.cluster.llm as llm_module
    monkeypatch.setattr(llm_module, "LLM", lambda *a, **k: pytest.fail("the model was loaded"))
    code, out, err = _run(capsys, "x", flag, value)
    assert code == 2 and out == ""
    assert f"{field} must be" in err


def test_unknown_model_folder_is_an_error(capsys, tmp_path):
    code, _, err = _run(capsys, "x", "--model", str(tmp_path / "nope"), "--device", "cpu")
    assert code != 0 and "pagedray generate: error" in err


def test_model_from_environment(model_path, capsys, monkeypatch):
    monkeypatch.setenv("PAGEDRAY_MODEL", model_path)
    code, out, _ = _run(capsys, "Hi", "--device", "cpu", "--max-tokens", "3", "--ignore-eos")
    assert code == 0 and out.startswith("Hi")
