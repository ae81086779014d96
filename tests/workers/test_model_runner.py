"""ModelRunner.warm_up_logits: the LM head runs once at every row count a step can sample, on CUDA
only (where a kernel first met mid-run would be loaded then, waiting for the queued work)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pagedray.workers.model_runner import ModelRunner


class Head:
    lm_head_name = "lm_head"

    def __init__(self, device: str) -> None:
        self.lm_head = SimpleNamespace(weight=torch.zeros(10, 6, dtype=torch.float16, device=device))
        self.rows: list[int] = []

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        assert hidden.shape[1:] == (6,) and hidden.dtype == torch.float16
        self.rows.append(hidden.shape[0])
        return hidden @ self.lm_head.weight.t()


def test_cpu_runs_nothing():
    head = Head("cpu")
    ModelRunner.warm_up_logits(SimpleNamespace(model=head, device=torch.device("cpu")), 5)
    assert head.rows == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_runs_every_row_count():
    head = Head("cuda")
    ModelRunner.warm_up_logits(SimpleNamespace(model=head, device=torch.device("cuda")), 5)
    assert head.rows == [1, 2, 3, 4, 5]
