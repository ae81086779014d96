"""Model definitions, the registry and the weight loader."""
if __name__ != "pagedray.models":  # found as a bare `models` from the repository root
    from pagedray.kernels.import_guard import step_aside
    step_aside(__name__, __path__)
from pagedray.models.loader import get_model
from pagedray.models.registry import ModelRegistry, get_kv_cache_spec

__all__ = ["ModelRegistry", "get_kv_cache_spec", "get_model"]
