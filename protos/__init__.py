if __name__ != "pagedray.protos":  # found as a bare `protos` from the repository root
    from pagedray.kernels.import_guard import step_aside
    step_aside(__name__, __path__)
