"""Shared fixtures. Helpers live in plain modules on the test path (pyproject: pythonpath = ["tests"])."""
from __future__ import annotations

import pytest

from pagedray.common.openmp import prefer_passive_wait

prefer_passive_wait()   # before any test module loads torch: OpenMP threads sleep at barriers on a busy box


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A tiny random Llama checkpoint with a tokenizer (see tiny_models.make_tiny_llama for variants)."""
    from testkit.tiny_models import make_tiny_llama
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture
def one_torch_thread():
    """Multithreaded CPU GEMMs round differently with the batch's shape, which can flip a near-tied
    greedy choice of a random model when two runs batch differently. With one thread a row's
    arithmetic does not depend on the batch, so any difference left is a logic difference."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def scoped_registry(monkeypatch):
    """The process-wide ModelRegistry, restored after the test. A test that registers an out-of-tree
    class takes this: left registered, the class reaches later tests' engines, which hand such
    classes to their workers by pickling (a class local to a test, or from the tests' own modules,
    cannot be loaded there)."""
    from pagedray.models import ModelRegistry
    monkeypatch.setattr(ModelRegistry, "_models", dict(ModelRegistry._models))
    monkeypatch.setattr(ModelRegistry, "_user", set(ModelRegistry._user))
    return ModelRegistry
