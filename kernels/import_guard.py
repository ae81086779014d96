"""Keep the repository's top-level folders from hiding installed packages of the same name.

Our subpackages live in top-level folders (`kernels/`, `models/`, `cluster/`, ...) that setuptools
maps to `pagedray.kernels`, `pagedray.models`, ... . Python started in the repository root (`python -m
pytest`, `python -c`, a Ray worker whose working directory is the driver's) has that root first on
`sys.path`, so a plain `import kernels` — which transformers does for Hugging Face's `kernels`
package — would find our folder. Each folder's `__init__.py` calls `step_aside` when it is imported
under its bare name: the installed package of that name replaces it in `sys.modules` (the import
system returns whatever `sys.modules` holds once the module has run), or the import fails as it
would without the folder. Our code is always imported as `pagedray.<folder>`, never by bare name.
"""
import importlib.machinery
import importlib.util
import os
import sys


def _without(folder_parent: str) -> list[str]:
    parent = os.path.realpath(folder_parent)
    return [entry for entry in sys.path if os.path.realpath(entry or os.getcwd()) != parent]


def step_aside(name: str, package_path: list[str]) -> None:
    """Replace `sys.modules[name]` (one of our folders) by the installed package `name`."""
    folder = os.path.realpath(package_path[0])
    spec = importlib.machinery.PathFinder.find_spec(name, _without(os.path.dirname(folder)))
    if spec is None or spec.loader is None or _is_ours(spec, folder):
        sys.modules.pop(name, None)
        raise ModuleNotFoundError(
            f"No module named {name!r} (the folder {folder} is pagedray.{os.path.basename(folder)}, "
            "not a top-level package)", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise


def _is_ours(spec: importlib.machinery.ModuleSpec, folder: str) -> bool:
    locations = list(spec.submodule_search_locations or []) + [spec.origin or ""]
    return any(os.path.realpath(p).startswith(folder) for p in locations if p)
