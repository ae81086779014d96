"""Keep the repository's top-level folders from hiding installed packages of the same name.

Our subpackages live in top-level folders (`kernels/`, `models/`, `cluster/`, ...) that setuptools
maps to `pagedray.kernels`, `pagedray.models`, ... . Python started in the repository root (`python -m
pytest`, `python -c`, a Ray worker whose working directory is the driver's) has that root first on
`sys.path`, so a plain `import kernels` — which transformers does for Hugging Face's `kernels`
package — would find our folder. Each folder's `__init__.py` calls `step_aside` when it is imported
under its bare name: the installed package of that name replaces it in `sys.modules` (the import
system returns whatever `sys.modules` holds once the module has run). With no such package the
name becomes an empty namespace package (no `__file__`, no portions), which is what a stray folder
without `__init__.py` gives: transformers' `_is_package_available` imports the name when it finds no
distribution metadata and reads exactly that shape as "not installed", whereas raising from the import
breaks `import transformers` (seen with transformers builds that probe Hugging Face's `kernels`
without it installed). Our code is always imported as `pagedray.<folder>`, never by bare name.
"""
import importlib.machinery
import importlib.util
import os
import sys
import types


def _without(folder_parent: str) -> list[str]:
    parent = os.path.realpath(folder_parent)
    return [entry for entry in sys.path if os.path.realpath(entry or os.getcwd()) != parent]


def step_aside(name: str, package_path: list[str]) -> None:
    """Replace `sys.modules[name]` (one of our folders) by the installed package `name`."""
    folder = os.path.realpath(package_path[0])
    spec = importlib.machinery.PathFinder.find_spec(name, _without(os.path.dirname(folder)))
    if spec is None or spec.loader is None or _is_ours(spec, folder):
        sys.modules[name] = _empty_namespace(name)
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise


def _empty_namespace(name: str) -> types.ModuleType:
    """What `import name` gives for a folder without `__init__.py` and nothing in it."""
    module = types.ModuleType(name, f"Not pagedray's folder: import pagedray.{name} (no installed {name!r}).")
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)   # no portions
    module.__path__ = []
    module.__file__ = None
    return module


def _is_ours(spec: importlib.machinery.ModuleSpec, folder: str) -> bool:
    locations = list(spec.submodule_search_locations or []) + [spec.origin or ""]
    return any(os.path.realpath(p).startswith(folder) for p in locations if p)
