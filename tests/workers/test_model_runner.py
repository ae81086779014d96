"""ModelRunner.warm_up_logits: the LM head runs once at every row count a step can sample, on CUDA
only (where a kernel first met mid-run would be loaded then, waiting for the queued work).
ModelRunner.profile_run: the worst-case forward stays inside the model's length."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pagedray.models.layers.pipeline import PipelineStage
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
    ModelRunner.warm_up_logits(SimpleNamespace(model=head, device=torch.device("cpu"), stage=PipelineStage()), 5)
    assert head.rows == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_runs_every_row_count():
    head = Head("cuda")
    ModelRunner.warm_up_logits(SimpleNamespace(model=head, device=torch.device("cuda"), stage=PipelineStage()), 5)
    assert head.rows == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("budget, want_tokens", [(512, 4 * 64), (255, 255), (100, 100)])
def test_profile_forward_positions_stay_below_the_model_length(tmp_path, budget, want_tokens):
    """A token budget above max_num_seqs * max_model_len: the profile forward's sequences stop at the
    model's length. (Past it, the positions read rows beyond the rotary table: on CUDA an out-of-bounds
    read, an illegal address once the table sat at the end of an allocation.)"""
    from testkit.tiny_models import make_tiny_llama

    from pagedray.cluster import LLM
    from pagedray.workers.cache_engine import CacheEngine
    path = make_tiny_llama(tmp_path / "m", max_position_embeddings=64)
    llm = LLM(path, device="cpu", num_kv_blocks=16, max_num_seqs=4, max_num_batched_tokens=512)
    worker = llm.llm_engine.executor.worker
    seen: list[torch.Tensor] = []
    hook = worker.runner.model.register_forward_pre_hook(lambda _m, args: seen.append(args[1]))
    worker.runner.profile_run(budget, 4, CacheEngine.empty_caches(worker.kv_spec, worker.device),
                              max_seq_len=llm.llm_engine.model_config.max_model_len)
    hook.remove()
    assert llm.llm_engine.model_config.max_model_len == 64
    assert seen[0].numel() == want_tokens and int(seen[0].max()) < 64
