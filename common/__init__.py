"""Plain-Python types every layer shares: `SamplingParams`, the typed configs, the driver <-> worker
messages, errors. No torch at import time; nothing here imports another pagedray package."""
if __name__ != "pagedray.common":  # found as a bare `common` from the repository root
    from pagedray.kernels.import_guard import step_aside
    step_aside(__name__, __path__)
