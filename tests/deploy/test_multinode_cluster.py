"""deploy/local-multinode.yaml end to end across machines: `ray up` (head + 2 workers), `ray submit
--tmux deploy/serve.py` with two replicas (spread over the two workers), a client call on the head
equal to the offline API, `ray down` — and then nothing of the cluster left on any node.

The machines are network namespaces of this host at the YAML's addresses, each with its own sshd and
home (tests/testkit/netns_machines.py); `ray up` runs on a fourth, the laptop. Needs root (`ip netns`),
openssh-server, rsync and tmux (.ci/run installs them). Phase times are printed (pytest -s).
"""
from __future__ import annotations

import json
import sys
import time
import uuid

import pytest

from testkit.launcher_tools import require_tools
from testkit.netns_cluster import netns_unavailable

_why = netns_unavailable()
pytestmark = pytest.mark.skipif(_why is not None, reason=f"no namespace machines here: {_why}")

TOOLS = {"/usr/sbin/sshd": "openssh-server", "rsync": "rsync", "tmux": "tmux"}
YAML = "deploy/local-multinode.yaml"
TOKENS = 12


@pytest.fixture(scope="module")
def machines():
    require_tools(TOOLS)
    from testkit.netns_machines import SshMachines
    with SshMachines(4) as m:
        yield m


def _ok(done, what: str) -> str:
    assert done.returncode == 0, f"{what} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stdout


def _lines(stdout: str, start: str) -> list[str]:
    """The lines of a `ray exec` command's own output that begin with `start`. Its stdout also holds the ray
    CLI's log lines, before the command's output or — where Python buffers stdout (no PYTHONUNBUFFERED) —
    after it, at exit."""
    return [line.strip() for line in stdout.splitlines() if line.strip().startswith(start)]


def _json_reply(stdout: str) -> dict:
    """The JSON object a `ray exec` command printed (from a line that opens with `{`), the CLI's lines around it."""
    text = "\n" + stdout.replace("\r", "")
    return json.JSONDecoder().raw_decode(text, text.index("\n{") + 1)[0]


def test_ray_up_submit_client_down_leaves_nothing(machines, tiny_llama):
    from pagedray.cluster import LLM, SamplingParams
    t0 = time.monotonic()
    times: dict[str, float] = {}
    mark = lambda what: times.setdefault(what, round(time.monotonic() - t0, 1))  # noqa: E731
    cluster = [YAML, "--cluster-name", f"prmn-{uuid.uuid4().hex[:8]}"]
    launcher_env = {"RAY_UP_enable_autoscaler_v2": "0"}
    run = machines.laptop_run
    try:
        _ok(run(["ray", "up", "-y", "--no-config-cache", *cluster], 300, **launcher_env), "ray up")
        mark("ray up")
        count = "python -c 'import ray; ray.init(); print(\"alive nodes:\", sum(n[\"Alive\"] for n in ray.nodes()))'"
        deadline = time.monotonic() + 180
        while True:     # the head's autoscaler launches the workers after `ray up` returns
            done = run(["ray", "exec", *cluster, count], 120)
            nodes = _lines(done.stdout, "alive nodes: ")
            if nodes == ["alive nodes: 3"]:
                break
            if time.monotonic() > deadline:
                logs = "cd $RAY_TMPDIR/ray/session_latest/logs && tail -n 30 monitor.out monitor.log"  # .out: updaters
                log = run(["ray", "exec", *cluster, logs], 120).stdout
                raise AssertionError(f"workers did not join: {nodes or done.stderr[-2000:]}; the head's autoscaler "
                                     f"said:\n{log}")
            time.sleep(3)
        mark("3 nodes up")
        _ok(run(["ray", "submit", "--tmux", *cluster, "deploy/serve.py", "--", "--model", tiny_llama,
                 "--host", "127.0.0.1", "--port", "50051", "--device", "cpu", "--block-size", "16",
                 "--num-kv-blocks", "256", "--replicas", "2"], 120), "ray submit")
        listing = None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            done = run(["ray", "exec", *cluster, "pagedray client --address 127.0.0.1:50051 --list-models"], 120)
            if done.returncode == 0 and '"replicas": 2' in done.stdout and '"replicasTotal": 2' in done.stdout:
                listing = done.stdout
                break
            time.sleep(5)
        assert listing is not None, f"the server never had 2 of 2 replicas ready:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        mark("serving, 2 replicas")
        reply = _ok(run(["ray", "exec", *cluster, "pagedray client --address 127.0.0.1:50051 --token-ids 5,17,42,9 "
                         f"--max-tokens {TOKENS} --temperature 0 --json"], 120), "client")
        got = [int(t) for t in _json_reply(reply)["completions"][0]["tokenIds"]]
        offline = LLM(tiny_llama, device="cpu")
        want = offline.generate([{"prompt_token_ids": [5, 17, 42, 9]}], SamplingParams(temperature=0, max_tokens=TOKENS),
                                use_tqdm=False)[0].outputs[0].token_ids
        offline.shutdown()
        assert got == want
        mark("client == offline")
    finally:
        down = run(["ray", "down", "-y", *cluster], 180)
    _ok(down, "ray down")
    mark("ray down")
    deadline = time.monotonic() + 60
    while (left := {n.name: machines.leftovers(n) for n in machines.cluster_nodes if machines.leftovers(n)}):
        assert time.monotonic() < deadline, f"left running after ray down: {left}"
        time.sleep(1)
    mark("nothing left")
    print(f"multi-node launcher phases (s since start): {times}", file=sys.stderr)
