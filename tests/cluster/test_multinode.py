"""A real multi-node Ray cluster: one network namespace per node (tests/testkit/netns_cluster.py).

One cluster for the module: a 0-CPU head (the driver runs there) and three workers of 2 CPUs and a
fake GPU each. Each test runs a driver scenario (tests/testkit/netns_scenarios.py) in the head's
namespace and asserts on what it saw. The node-kill tests come last, each taking one worker away. Skipped where `ip netns` is not allowed (not root, no iproute2).
"""
from __future__ import annotations

import json
import sys

import pytest

from testkit.netns_cluster import NetnsCluster, netns_unavailable

_why = netns_unavailable()
pytestmark = pytest.mark.skipif(_why is not None, reason=f"no namespace cluster here: {_why}")


@pytest.fixture(scope="module")
def cluster():
    with NetnsCluster([(2, {"fake_gpu": 1})] * 3) as c:
        yield c


def _scenario(cluster: NetnsCluster, name: str, timeout: float = 400, **args) -> dict:
    return cluster.run_python(["-m", "testkit.netns_scenarios", name, json.dumps(args)], timeout,
                              OMP_NUM_THREADS="1")


def test_tp2_with_ranks_on_two_nodes_equals_tp1(cluster, tiny_llama):
    out = _scenario(cluster, "tp_across_nodes", ckpt=tiny_llama)
    worker_ips = {n.ip for n in cluster.workers}
    assert len(out["rank_ips"]) == 2 and len(set(out["rank_ips"])) == 2, out["rank_ips"]
    assert set(out["rank_ips"]) <= worker_ips
    assert out["got"] == out["want"]


def test_serve_pp2_with_stages_on_two_nodes_answers_grpc_and_http_as_offline(cluster, tiny_llama):
    out = _scenario(cluster, "pp_serve", ckpt=tiny_llama)
    assert len(out["rank_ips"]) == 2 and len(set(out["rank_ips"])) == 2, out["rank_ips"]   # one stage per node
    assert out["grpc_ids"] == out["want_ids"]
    assert out["http_text"] == out["want_text"]
    assert out["exit_code"] == 0


def test_node_of_a_pp_replica_killed_mid_stream_loses_no_stream_and_it_is_rebuilt_on_live_nodes(cluster, tiny_llama):
    namespaces = {n.ip: n.name for n in cluster.nodes}
    out = _scenario(cluster, "pp_node_kill", ckpt=tiny_llama, namespaces=namespaces)
    assert len(out["before"]) == 2, out["before"]          # the replica's two stages on two nodes
    assert out["errors"] == []
    assert out["got"] == out["want"]
    killed = out["killed_ip"]
    assert killed not in out["alive_ips"]
    assert len(out["after"]) == 2 and killed not in out["after"], out
    assert set(out["after"]) <= set(out["alive_ips"])
    print(f"PP replica rebuilt {out['rebuilt_s']:.1f} s after the kill", file=sys.stderr)


def test_node_killed_mid_stream_loses_no_stream_and_the_replica_is_rebuilt_elsewhere(cluster, tiny_llama):
    namespaces = {n.ip: n.name for n in cluster.nodes}
    out = _scenario(cluster, "replicas_node_kill", ckpt=tiny_llama, namespaces=namespaces)
    before = out["before"]
    # Spread: each replica on one node, not the same one (the nodes could each hold both).
    assert all(len(ips) == 1 for ips in before.values()), before
    assert len({ips[0] for ips in before.values()}) == 2, before
    assert out["errors"] == []
    assert out["got"] == out["want"]
    # Rebuilt on a live node, never on the one that was killed.
    killed = out["killed_ip"]
    assert killed not in out["alive_ips"]
    assert len(out["after"]) == 2
    for ips in out["after"].values():
        assert killed not in ips and set(ips) <= set(out["alive_ips"]), out
    print(f"replica rebuilt {out['rebuilt_s']:.1f} s after the kill", file=sys.stderr)
