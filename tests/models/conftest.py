from __future__ import annotations

import pytest

from pagedray.models import ModelRegistry


@pytest.fixture
def scoped_registry(monkeypatch):
    """The process-wide ModelRegistry, restored after the test: an out-of-tree class registered here
    would otherwise reach later tests' engines, which hand such classes to their workers (by pickling;
    a class local to a test, or from the tests' own modules, cannot be loaded there)."""
    monkeypatch.setattr(ModelRegistry, "_models", dict(ModelRegistry._models))
    monkeypatch.setattr(ModelRegistry, "_user", set(ModelRegistry._user))
    return ModelRegistry
