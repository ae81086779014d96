"""Every CLI command turns a user's mistake into one line on stderr and exit code 2, never a
traceback; help pages show the defaults."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from testkit.tiny_models import make_tiny_llama

from pagedray.cluster.cli import build_parser, main

# A CUDA index this machine lacks, whatever it has (cuda:0 on a CPU-only machine).
MISSING_GPU = f"cuda:{torch.cuda.device_count()}"
HERE = ", ".join(["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())])


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"))


def _one_line_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    assert lines[0].startswith(f"pagedray {argv[0]}: error: ")
    return lines[0]


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_model_not_a_folder_or_not_a_checkpoint(command, capsys, tmp_path):
    extra = ["hi"] if command == "generate" else []
    line = _one_line_error(capsys, [command, *extra, "--model", str(tmp_path / "nope")])
    assert f"{str(tmp_path / 'nope')!r} is not a local folder" in line and "nothing is downloaded" in line
    line = _one_line_error(capsys, [command, *extra, "--model", str(tmp_path)])
    assert f"{str(tmp_path)!r} is not an HF checkpoint folder: it has no config.json" in line


@pytest.mark.parametrize("command", ["serve", "generate", "chat"])
def test_device_this_machine_lacks_names_the_devices_it_has(command, model_path, capsys):
    extra = ["hi"] if command == "generate" else []
    line = _one_line_error(capsys, [command, *extra, "--model", model_path, "--device", MISSING_GPU])
    assert f"device {MISSING_GPU!r} is not on this machine" in line and line.endswith(f"devices here: {HERE}")


@pytest.mark.parametrize("argv,flag", [
    (["serve", "--auth-token-file", "{missing}"], "--auth-token-file"),
    (["serve", "--tls-cert", "{missing}", "--tls-key", "{missing}"], "--tls-cert"),
    (["serve", "--tls-cert", "{dir}", "--tls-key", "{dir}"], "--tls-cert"),
    (["client", "--prompt", "x", "--auth-token-file", "{missing}"], "--auth-token-file"),
    (["client", "--prompt", "x", "--tls-ca", "{missing}"], "--tls-ca"),
])
def test_unreadable_token_or_certificate_file(argv, flag, capsys, tmp_path, model_path):
    argv = [a.format(missing=tmp_path / "missing", dir=tmp_path) for a in argv]
    if argv[0] == "serve":
        argv += ["--model", model_path]
    line = _one_line_error(capsys, argv)
    assert f"{flag} " in line and "cannot read it (" in line


def _serve_exit(argv: list[str]) -> tuple[int, str]:
    """`pagedray serve ...` in a subprocess: its exit code and stderr."""
    done = subprocess.run([sys.executable, "-m", "pagedray.cluster.cli", "serve", *argv],
                          capture_output=True, text=True, timeout=300)
    return done.returncode, done.stderr


@pytest.mark.parametrize("flag", ["--port", "--metrics-port", "--http-port"])
def test_port_in_use_is_one_line_before_the_model_loads(flag, model_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["--model", model_path, "--device", "cpu", "--port", "0", flag, str(port)]
        code, err = _serve_exit(argv)
    # One line, no gRPC library line (add_port.cc), no model load (its log lines) before it.
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"pagedray serve: error: {flag} {port}: cannot listen on 127.0.0.1:{port}: "
                          "the port is in use"), err


def _pem_pair(folder, name: str):
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost"], check=True, capture_output=True)
    return str(cert), str(key)


@pytest.fixture(scope="module")
def flag_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flags")
    (folder / "empty").write_text("")
    (folder / "blank").write_text("  \n\t\n")
    _pem_pair(folder, "a")
    _pem_pair(folder, "b")
    return dict(empty=folder / "empty", blank=folder / "blank", cert_a=folder / "a.pem", key_b=folder / "b.key",
                missing=folder / "no-model")


@pytest.mark.parametrize("argv, says", [
    (["--auth-token-file", "{empty}"], "--auth-token-file '{empty}' is empty"),
    (["--auth-token-file", "{blank}"], "--auth-token-file '{blank}' is empty"),
    (["--tls-cert", "{cert_a}", "--tls-key", "{key_b}"], "are not a matching PEM certificate and private key"),
    (["--tls-cert", "{empty}", "--tls-key", "{empty}"], "are not a matching PEM certificate and private key"),
    (["--tls-cert", "{cert_a}"], "--tls-cert and --tls-key go together"),
    (["--host", "0.0.0.0"], "refusing to serve on 0.0.0.0 without authentication"),
    (["--replicas", "0"], "--replicas must be >= 1, got 0"),
    (["--min-replicas", "3", "--max-replicas", "2"], "--min-replicas 3 must be <= --max-replicas 2"),
    (["--replicas", "2"], "more than one replica (--replicas/--max-replicas) needs --replica-backend ray"),
    (["--tensor-parallel-size", "2"], "--tensor-parallel-size 2 needs --executor ray"),
    (["--port", "70000"], "--port must be in [0, 65535], got 70000"),
    (["--port", "5555", "--http-port", "5555"], "--http-port 5555 is also --port"),
])
def test_serve_checks_its_flags_before_loading_a_model(argv, says, capsys, flag_files):
    argv = [a.format(**flag_files) for a in argv]
    # A model path that does not exist: had the flags passed, the error would name the model instead.
    line = _one_line_error(capsys, ["serve", "--model", str(flag_files["missing"]), *argv])
    assert says.format(**flag_files) in line, line


def test_serve_beyond_loopback_with_insecure_or_a_token_passes_the_checks(capsys, tmp_path):
    (tmp_path / "token").write_text("s3cret")
    for extra in (["--insecure"], ["--auth-token-file", str(tmp_path / "token")]):
        line = _one_line_error(capsys, ["serve", "--model", str(tmp_path / "no-model"), "--host", "0.0.0.0",
                                        "--port", "0", *extra])
        assert "is not a local folder" in line   # past the checks: the model is what fails


def test_client_without_a_prompt_is_a_usage_error(capsys):
    line = _one_line_error(capsys, ["client", "--address", "127.0.0.1:1"])
    assert "give --prompt or --token-ids" in line


def _help(command: str) -> str:
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    return " ".join(sub.format_help().split())   # unwrapped


def test_help_shows_defaults():
    serve = _help("serve")
    for shown in ("--host HOST address to listen on (0.0.0.0: every interface) (default: 127.0.0.1)",
                  "(default: 50051)", "--gpu-memory-utilization GPU_MEMORY_UTILIZATION default: 0.9",
                  "--device DEVICE auto, cpu, cuda or cuda:N (default: auto)"):
        assert shown in serve
    assert "(default: 127.0.0.1:50051)" in _help("client")
    assert "default model, whose folder `pagedray info` prints" in _help("generate")


def test_client_help_says_unset_sampling_takes_vllm_defaults():
    text = _help("client")
    assert "unset take vLLM's defaults on the server: temperature 1" in text
    for flag in ("--temperature TEMPERATURE 0 is greedy", "--top-p TOP_P", "--top-k TOP_K", "--max-tokens",
                 "--seed SEED", "--n N completions per prompt, printed one by one under a label"):
        assert flag in text


def test_info_prints_the_default_model_folder(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PAGEDRAY_CACHE", str(tmp_path))
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"cache folder: {tmp_path}" in out and f"devices: {HERE} " in out
    assert f"default model folder: {tmp_path / 'models'}" in out or "default model: none (" in out


@pytest.mark.parametrize("extra, says", [(["--device", MISSING_GPU], f"device {MISSING_GPU!r} is not on this machine"),
                                         (["--tensor-parallel-size", "2"], "needs --executor ray")])
def test_serve_setting_errors_are_one_line_from_a_real_process(extra, says, model_path):
    """Checked before an engine process starts, so none of its log lines (a traceback) comes first."""
    code, err = _serve_exit(["--model", model_path, "--port", "0", *extra])
    assert code == 2 and len(err.strip().splitlines()) == 1 and says in err, err


_BIND_TAKEN = """
import socket, sys
from concurrent import futures
if sys.argv[1] == "cli":
    from pagedray.cluster.cli import quiet_grpc_logs
    quiet_grpc_logs()
import grpc
taken = socket.socket(); taken.bind(("127.0.0.1", 0)); taken.listen()
server = grpc.server(futures.ThreadPoolExecutor(1), options=[("grpc.so_reuseport", 0)])
try:
    server.add_insecure_port(f"127.0.0.1:{taken.getsockname()[1]}")
except RuntimeError:
    print("refused")
"""


def test_grpc_library_log_lines_stay_out_of_the_cli_output():
    """gRPC's C core logs a failed bind itself (add_port.cc) at its default level; every CLI command
    turns that off first (its own error says it once)."""
    def stderr(mode: str) -> str:
        env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
        done = subprocess.run([sys.executable, "-c", _BIND_TAKEN, mode], capture_output=True, text=True,
                              timeout=120, env=env)
        assert done.stdout.strip() == "refused", done
        return done.stderr
    assert "add_port.cc" in stderr("plain")     # what a user saw before
    assert stderr("cli") == ""


def test_a_server_that_cannot_be_built_shuts_its_engines_down():
    """Anything failing between the engines' start and the server's (a setting serve could not check
    first) stops the engines: a live engine process would otherwise hold the exit forever."""
    import asyncio
    from pagedray.cluster.cli import _run_server
    from pagedray.cluster.serving.lora_registry import LoRARegistry

    class Frontend:
        loras, closed = LoRARegistry(), False

        async def shutdown(self):
            self.closed = True

    args = build_parser().parse_args(["serve", "--port", "0"])
    args.auth_token, args.chat_template_text, args.tls_cert_pem, args.tls_key_pem = "  ", None, None, None
    frontend = Frontend()
    with pytest.raises(ValueError, match="auth_token must not be empty"):
        asyncio.run(_run_server(frontend, "m", args))
    assert frontend.closed


def test_pipeline_parallel_needs_the_ray_executor(capsys, model_path):
    line = _one_line_error(capsys, ["serve", "--model", model_path, "--pipeline-parallel-size", "2"])
    assert "pipeline_parallel_size must be 1, got 1 and 2 (use executor='ray')" in line
    assert "--pipeline-parallel-size PIPELINE_PARALLEL_SIZE pipeline stages per replica" in _help("serve")
