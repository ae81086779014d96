"""`pagedray serve` in a subprocess (port 0, logged when ready) and `pagedray client` against it."""
from __future__ import annotations

import json
import signal

import pytest

from testkit.serve_process import ServeProcess as _Server
from testkit.tiny_tokenizer import make_tiny_tokenizer

from pagedray.cluster import LLM, SamplingParams
from pagedray.cluster.cli import build_parser, main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    path = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 initializer_range=0.3, bos_token_id=1, eos_token_id=2)
                     ).save_pretrained(path, safe_serialization=True)
    make_tiny_tokenizer(path, 320)
    return str(path)


def test_serve_then_client(ckpt, tmp_path, capsys):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    server = _Server(["--model", ckpt, "--served-model-name", "tiny", "--port", "0", "--device", "cpu",
                      "--block-size", "4", "--num-kv-blocks", "256", "--auth-token-file", str(token),
                      "--metrics-port", "0"])
    try:
        ready = server.wait_for(r"ready: serving model 'tiny' on 127\.0\.0\.1:(\d+)")
        address = f"127.0.0.1:{ready.group(1)}"
        base = ["client", "--address", address, "--auth-token-file", str(token)]
        prompt = ["--prompt", "Once upon a time", "--max-tokens", "6", "--temperature", "0", "--ignore-eos"]

        assert main(base + prompt) == 0
        unary = capsys.readouterr().out
        assert main(base + prompt + ["--stream"]) == 0
        streamed = capsys.readouterr().out
        assert main(base + ["--list-models"]) == 0
        models = json.loads(capsys.readouterr().out)
        assert main(["client", "--address", address, "--health"]) == 0
        health = capsys.readouterr().out
        assert main(["client", "--address", address] + prompt) == 1
        denied = capsys.readouterr().err
        assert main(base + prompt + ["--n", "2"]) == 0
        labelled = capsys.readouterr().out
        assert main(base + prompt + ["--n", "2", "--stream"]) == 0
        labelled_stream = capsys.readouterr().out
    finally:
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(timeout=60)
    server.wait_for("stopped", timeout=5)

    want = LLM(ckpt, device="cpu").generate("Once upon a time", SamplingParams(temperature=0, max_tokens=6,
                                                                              ignore_eos=True), use_tqdm=False)
    text = want[0].outputs[0].text
    assert unary == streamed == text + "\n"
    # --n: each sample under its label (greedy, so both are the offline text).
    assert labelled == labelled_stream == "".join(f"--- sample {i} (finish: length) ---\n{text}\n" for i in range(2))
    assert models["models"][0]["name"] == "tiny" and models["models"][0]["maxModelLen"] == 128
    assert health.strip() == "SERVING"
    assert "UNAUTHENTICATED" in denied
    assert code == 0


def test_cli_is_built_from_subparsers():
    """Other subcommands plug in as one more subparser."""
    parser = build_parser()
    args = parser.parse_args(["serve", "--model", "m", "--port", "0", "--tls-cert", "c", "--tls-key", "k"])
    assert (args.command, args.port, args.executor, args.host) == ("serve", 0, "local", "127.0.0.1")
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--executor", "slurm"])


def test_a_second_signal_cuts_the_drain_short(tmp_path):
    """SIGTERM drains (up to --drain-timeout); a second signal stops at once, cancelling what runs."""
    import grpc
    from testkit.grpc_cases import make_request
    from testkit.tiny_models import make_tiny_llama
    from pagedray.protos import generate_pb2_grpc as pb_grpc
    ckpt = make_tiny_llama(tmp_path / "long", max_position_embeddings=4096)
    server = _Server(["--model", ckpt, "--port", "0", "--device", "cpu", "--block-size", "16",
                      "--num-kv-blocks", "300", "--drain-timeout", "600"])
    try:
        port = server.wait_for(r"ready: serving model '\S+' on 127\.0\.0\.1:(\d+)").group(1)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stream = pb_grpc.GenerationStub(channel).GenerateStream(
                make_request("long", max_tokens=4000, ignore_eos=True), timeout=300)
            next(stream)                                   # running: the drain has to wait for it
            server.proc.send_signal(signal.SIGTERM)
            server.wait_for("draining", timeout=30)
            server.proc.send_signal(signal.SIGINT)
            server.wait_for("second signal: stopping now", timeout=30)
            with pytest.raises(grpc.RpcError):             # cut off, not run to its 4000 tokens
                for _ in stream:
                    pass
        assert server.proc.wait(timeout=60) == 0
    finally:
        server.stop()
