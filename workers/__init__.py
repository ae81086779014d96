if __name__ != "pagedray.workers":  # found as a bare `workers` from the repository root
    from pagedray.kernels.import_guard import step_aside
    step_aside(__name__, __path__)
