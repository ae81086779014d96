"""Driver side: the offline API, engines, scheduler, executors, server, CLI."""
if __name__ != "pagedray.cluster":  # found as a bare `cluster` from the repository root
    from pagedray.kernels.import_guard import step_aside
    step_aside(__name__, __path__)
from pagedray.common.lora import LoRARequest
from pagedray.common.openmp import prefer_passive_wait
from pagedray.common.sampling_params import SamplingParams

prefer_passive_wait()   # before anything here loads torch (common/openmp.py says why)

__all__ = ["LLM", "LLMEngine", "LoRARequest", "SamplingParams", "RequestOutput", "CompletionOutput"]


def __getattr__(name: str):
    # Lazy: importing the scheduler or the config must not pull in torch.
    if name == "LLM":
        from pagedray.cluster.llm import LLM
        return LLM
    if name == "LLMEngine":
        from pagedray.cluster.engine import LLMEngine
        return LLMEngine
    if name in ("RequestOutput", "CompletionOutput"):
        from pagedray.cluster import outputs
        return getattr(outputs, name)
    raise AttributeError(name)
