"""Our top-level folders never hide an installed package, whatever directory Python starts in.

Python started in the repository root has the root first on sys.path; transformers imports Hugging
Face's `kernels` package there (kernels/import_guard.py explains how our folders step aside)."""
import importlib.metadata
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = ("cluster", "workers", "models", "kernels", "protos", "common")


def _run_in_root(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def test_transformers_and_pagedray_import_from_the_repository_root():
    out = _run_in_root("import transformers.activations, pagedray.cluster, pagedray.models; "
                       "from pagedray.cluster import LLM, SamplingParams; print('ok')")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_bare_folder_names_resolve_to_installed_packages_or_nothing():
    code = ("import importlib, json, sys\n"
            f"result = {{}}\n"
            f"for name in {FOLDERS!r}:\n"
            "    try:\n"
            "        result[name] = getattr(importlib.import_module(name), '__file__', None) or 'namespace'\n"
            "    except ModuleNotFoundError as exc:\n"
            "        result[name] = 'missing: ' + str(exc)\n"
            "print(json.dumps(result))\n")
    out = _run_in_root(code)
    assert out.returncode == 0, out.stderr
    import json
    result = json.loads(out.stdout)
    installed = importlib.metadata.packages_distributions()
    for name, where in result.items():
        if name in installed:   # e.g. Hugging Face's `kernels`: the installed one, never our folder
            assert where.startswith(("/", "namespace")) and not where.startswith(os.path.join(REPO, name)), where
        else:   # an empty namespace, as a folder without __init__.py would give: never our code
            assert where == "namespace", (name, where)


def test_transformers_reads_a_bare_folder_as_not_installed():
    """transformers imports a name it finds on sys.path but not in the distribution metadata; from the
    root that is our folder, and the answer must be "not installed", not an import error."""
    names = [n for n in FOLDERS if n not in importlib.metadata.packages_distributions()]
    code = ("from transformers.utils.import_utils import _is_package_available\n"
            f"print([_is_package_available(n, return_version=True)[0] for n in {names!r}])\n"
            f"import {', '.join(names)}\n"
            f"print([getattr({names[0]}, n, None) for n in ('__file__', 'LLM', 'CUDA_BLOCK_SIZES')])\n")
    out = _run_in_root(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == [str([False] * len(names)), "[None, None, None]"], out.stdout


def test_no_benchmark_script_shares_a_name_with_an_installed_package():
    scripts = {f[:-3] for f in os.listdir(os.path.join(REPO, "benchmarks")) if f.endswith(".py")}
    clashes = scripts & (set(importlib.metadata.packages_distributions()) | set(sys.stdlib_module_names))
    assert not clashes, f"benchmarks/ scripts shadow installed packages: {sorted(clashes)}"
