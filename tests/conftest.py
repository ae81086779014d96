"""Shared fixtures. Helpers live in plain modules on the test path (pyproject: pythonpath = ["tests"])."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A tiny random Llama checkpoint with a tokenizer (see tiny_models.make_tiny_llama for variants)."""
    from tiny_models import make_tiny_llama
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))
