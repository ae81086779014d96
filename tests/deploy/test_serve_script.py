"""deploy/serve.py: the `ray submit` entry joins the running cluster and starts `pagedray serve` with
the Ray executor; listening beyond loopback needs a token unless --insecure."""
from __future__ import annotations

import os
import runpy

import pytest

from testkit.ray_clusters import REPO

SERVE = str(REPO / "deploy" / "serve.py")
DEFAULTS = ["serve", "--executor", "ray", "--host", "0.0.0.0", "--replica-backend", "ray"]


def _run(monkeypatch, argv: list[str], env: dict[str, str] | None = None) -> list[list[str]]:
    calls = []
    monkeypatch.setattr("pagedray.cluster.cli.main", lambda args: calls.append(args) or 0)
    for name in ("RAY_ADDRESS", "PAGEDRAY_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("sys.argv", ["serve.py", *argv])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(SERVE, run_name="__main__")
    if calls:
        assert done.value.code == 0
    else:
        raise AssertionError(str(done.value.code))
    return calls


def test_joins_the_cluster_and_hands_the_arguments_on(monkeypatch, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    argv = ["--model", "/m", "--tensor-parallel-size", "4", "--auth-token-file", str(token)]
    assert _run(monkeypatch, argv) == [[*DEFAULTS, *argv]]
    assert os.environ["RAY_ADDRESS"] == "auto"


@pytest.mark.parametrize("extra,env", [(["--insecure"], {}), ([], {"PAGEDRAY_AUTH_TOKEN": "s3cret"}),
                                       (["--host", "127.0.0.1"], {})])
def test_token_insecure_or_loopback_may_start(monkeypatch, extra, env):
    calls = _run(monkeypatch, ["--model", "/m", *extra], env)
    assert calls == [[*DEFAULTS, "--model", "/m", *extra]]


@pytest.mark.parametrize("extra,env", [([], {}), (["--host", "10.0.0.5"], {}), ([], {"PAGEDRAY_AUTH_TOKEN": " "})])
def test_refuses_to_serve_beyond_loopback_without_a_token(monkeypatch, extra, env):
    with pytest.raises(AssertionError, match=r"refusing to serve on (0\.0\.0\.0|10\.0\.0\.5) without "
                                             r"authentication: pass --auth-token-file"):
        _run(monkeypatch, ["--model", "/m", *extra], env)
