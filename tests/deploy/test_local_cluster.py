"""The README's cluster steps, end to end on 127.0.0.1: `ray up deploy/local-cluster.yaml`,
`ray submit --tmux` of deploy/serve.py with a tiny checkpoint, `pagedray client` Generate and
GenerateStream against the offline API's tokens, load that makes the autoscaling policy add a
replica (ListModels shows it), then `ray down`.

The node is this machine behind its own sshd (deploy/local/node.py). Its processes carry a scope
id, so `ray down`'s `ray stop` stops them only: a second Ray started here, outside the cluster,
must survive it, and no process of the cluster may outlive it. Needs openssh-server, rsync,
netcat and tmux (.ci/run installs them). Phase times are printed (pytest -s).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from testkit.launcher_tools import require_tools
from testkit.ray_clusters import LOOPBACK_ENV, REPO, free_ports, head_port_args, scoped_ray

from pagedray.cluster import LLM, SamplingParams

TOOLS = {"/usr/sbin/sshd": "openssh-server", "rsync": "rsync", "nc": "netcat-openbsd", "tmux": "tmux"}
BIN = Path(sys.executable).parent
TOKENS = 12
# The streamed request: long enough (~0.1 s of steps here) that it cannot all be generated while the server's event
# loop waits for a CPU — a 12-token one takes ~20 ms, and under load came back as one merged reply (deltas that
# queue up while the server is not running are merged, as they should be).
STREAM_TOKENS = 96


@pytest.fixture(scope="module")
def node():
    require_tools(TOOLS)
    out = subprocess.run([sys.executable, str(REPO / "deploy/local/node.py"), "up", "--num-cpus", "4"],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    exports = dict(line.removeprefix("export ").split("=", 1) for line in out.splitlines())
    yield exports
    subprocess.run([sys.executable, str(REPO / "deploy/local/node.py"), "down", exports["PAGEDRAY_LOCAL_NODE"]],
                   timeout=60)


def _run(env: dict, *args: str, timeout: float = 120) -> str:
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n" \
                                 f"{done.stderr[-3000:]}"
    return done.stdout


def _client(env: dict, address: str, *args: str) -> str:
    return _run(env, str(BIN / "pagedray"), "client", "--address", address, *args, timeout=60)


def _replicas(env: dict, address: str, auth: list[str]) -> int:
    return json.loads(_client(env, address, *auth, "--list-models"))["models"][0]["replicas"]


def _other_ray(tmp: Path) -> tuple[str, list[int]]:
    """A Ray head that is no part of the cluster (its own scope, ports and temp dir)."""
    scope = f"other-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, **LOOPBACK_ENV, scoped_ray.SCOPE_VAR: scope, "RAY_TMPDIR": str(tmp)}
    subprocess.run([str(BIN / "ray"), "start", "--head", f"--temp-dir={tmp}/ray", "--num-cpus=0",
                    *head_port_args(), "--disable-usage-stats"], env=env, check=True, timeout=120,
                   stdout=subprocess.DEVNULL)
    return scope, sorted(scoped_ray.processes(scope))


def test_ray_up_submit_client_scale_down(node, tmp_path_factory):
    from testkit.tiny_models import make_tiny_llama
    t0 = time.monotonic()
    times: dict[str, float] = {}
    mark = lambda what: times.setdefault(what, round(time.monotonic() - t0, 1))  # noqa: E731
    ckpt = make_tiny_llama(tmp_path_factory.mktemp("served"), max_position_embeddings=2048)
    token = tmp_path_factory.mktemp("secret") / "token"
    token.write_text(uuid.uuid4().hex)
    port = free_ports(1)[0]
    address = f"127.0.0.1:{port}"
    name = f"pagedray-e2e-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, **LOOPBACK_ENV, **node, "PATH": f"{BIN}:{os.environ['PATH']}"}
    cluster = ["deploy/local-cluster.yaml", "--cluster-name", name]
    scope = node["PAGEDRAY_RAY_SCOPE_OF_NODE"]
    other_scope, other_pids = _other_ray(Path(node["PAGEDRAY_LOCAL_NODE"]) / "o")
    try:
        _run(env, str(BIN / "ray"), "up", "-y", "--no-config-cache", *cluster)
        mark("ray up")
        _run(env, str(BIN / "ray"), "submit", "--tmux", *cluster, "deploy/serve.py", "--",
             "--model", ckpt, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
             "--block-size", "16", "--num-kv-blocks", "512", "--auth-token-file", str(token),
             "--min-replicas", "1", "--max-replicas", "2", "--target-ongoing-requests", "1",
             "--upscale-delay", "0")
        _wait_serving(env, address, node)
        mark("ray submit: serving")
        auth = ["--auth-token-file", str(token)]
        offline = LLM(ckpt, device="cpu")
        params = SamplingParams(temperature=0.0, max_tokens=TOKENS)
        want_text = offline.generate(["hello world"], params, use_tqdm=False)[0].outputs[0].token_ids
        want_ids = offline.generate([{"prompt_token_ids": [5, 17, 42, 9]}],
                                    SamplingParams(temperature=0.0, max_tokens=STREAM_TOKENS, ignore_eos=True),
                                    use_tqdm=False)[0].outputs[0].token_ids
        offline.shutdown()
        reply = json.loads(_client(env, address, *auth, "--prompt", "hello world", "--max-tokens", str(TOKENS),
                                   "--temperature", "0", "--json"))
        assert [int(t) for t in reply["completions"][0]["tokenIds"]] == want_text
        lines = _client(env, address, *auth, "--token-ids", "5,17,42,9", "--max-tokens", str(STREAM_TOKENS),
                        "--temperature", "0", "--ignore-eos", "--stream", "--json").splitlines()
        assert len(lines) > 1    # streamed, not one reply
        streamed = [int(t) for line in lines for c in json.loads(line)["completions"] for t in c.get("tokenIds", [])]
        assert streamed == want_ids
        refused = subprocess.run([str(BIN / "pagedray"), "client", "--address", address, "--prompt", "hi"],
                                 env=env, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
        mark("Generate + GenerateStream == offline")
        assert _replicas(env, address, auth) == 1
        load = [subprocess.Popen([str(BIN / "pagedray"), "client", "--address", address, *auth, "--token-ids",
                                  f"3,{i},8", "--max-tokens", "1500", "--ignore-eos"], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(3)]
        deadline = time.monotonic() + 120
        while _replicas(env, address, auth) < 2:
            assert time.monotonic() < deadline, "the autoscaling policy did not add a replica under load"
            time.sleep(1.0)
        mark("load: 2 replicas listed")
        for proc in load:
            proc.kill()
            proc.wait()
        _run(env, str(BIN / "ray"), "down", "-y", *cluster)
        mark("ray down")
        left = scoped_ray.processes(scope)
        assert not left, f"processes of the cluster outlived `ray down`: {_describe(left)}"
        assert sorted(scoped_ray.processes(other_scope)) == other_pids, "`ray down` touched another Ray"
    finally:
        scoped_ray.stop(scope)
        scoped_ray.stop(other_scope)
        for suffix in ("state", "lock"):   # the local provider's record of the cluster, on this side
            Path(f"/tmp/ray/cluster-{name}.{suffix}").unlink(missing_ok=True)
    print("local cluster timeline (s):", times)


def _wait_serving(env: dict, address: str, node: dict, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        done = subprocess.run([str(BIN / "pagedray"), "client", "--address", address, "--health", "--timeout", "2"],
                              env=env, capture_output=True, text=True, timeout=30)
        if done.returncode == 0 and done.stdout.strip() == "SERVING":
            return
        if time.monotonic() > deadline:
            pane = subprocess.run(["tmux", "capture-pane", "-p", "-S", "-60"], capture_output=True, text=True,
                                  env={**env, "TMUX_TMPDIR": node["PAGEDRAY_LOCAL_NODE"]}).stdout
            raise AssertionError(f"the submitted server did not come up on {address}:\n{pane}")
        time.sleep(1.0)


def _describe(pids: list[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            out.append(f"{pid} {Path(f'/proc/{pid}/cmdline').read_text().replace(chr(0), ' ')[:120]}")
        except OSError:
            out.append(str(pid))
    return out
