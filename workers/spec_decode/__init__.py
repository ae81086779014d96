"""Speculative decoding on the workers: verification inputs, rejection sampling, drafters."""
from __future__ import annotations


def make_spec_runner(worker):
    """The runner's speculative part for the worker's config (a drafter for model-based methods)."""
    from pagedray.workers.spec_decode.runner import SpecDecodeRunner
    config = worker.speculative_config
    drafter = None
    if config.uses_draft_model:
        from pagedray.workers.spec_decode.drafter import make_drafter
        drafter = make_drafter(worker)
    return SpecDecodeRunner(config, drafter)
