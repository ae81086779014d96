"""Model definitions, the registry and the weight loader."""
from pagedray.models.loader import get_model
from pagedray.models.registry import ModelRegistry, get_kv_cache_spec

__all__ = ["ModelRegistry", "get_kv_cache_spec", "get_model"]
