"""endpoint_auth: the settings check both servers run, and the bearer comparison (the servers'
refusals over the wire: tests/cluster/test_server.py and serving/test_http_server.py)."""
from __future__ import annotations

import pytest

from pagedray.cluster.serving.endpoint_auth import bearer_matches, checked_token


@pytest.mark.parametrize("token, cert, key, match", [
    ("t", b"cert", None, "together"), (None, None, b"key", "together"), ("  ", None, None, "empty"),
])
def test_bad_settings(token, cert, key, match):
    with pytest.raises(ValueError, match=match):
        checked_token(token, cert, key)


def test_token_stripped_or_none():
    assert checked_token(" s3cret ", b"c", b"k") == b"s3cret"
    assert checked_token(None, None, None) is None


@pytest.mark.parametrize("header, ok", [
    ("Bearer s3cret", True), ("bearer s3cret ", True), ("Bearer s3cre", False), ("Basic s3cret", False),
    ("s3cret", False), ("", False),
])
def test_bearer(header, ok):
    assert bearer_matches(header, b"s3cret") is ok
