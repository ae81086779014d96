"""Shared pieces of the GPU benchmarks: model shapes, roofline ceilings, FLOP/byte counts, results.

Shapes are written as config.json files (no weights: the engine loads them with
load_format="dummy"; HF initialises its own random weights) and no tokenizer
(prompts are token ids). The ceilings are measured in the same run as the
numbers they divide, never taken from a datasheet.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import random
import statistics
import subprocess
import sys
import time

import torch

from pagedray.common import envs

HERE = pathlib.Path(__file__).resolve().parent

# name -> (transformers config class, its keywords). Sizes are the published models'.
SHAPES: dict[str, tuple[str, dict]] = {
    "llama3-8b": ("LlamaConfig", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
        architectures=["LlamaForCausalLM"])),
    "qwen2.5-0.5b": ("Qwen2Config", dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False, max_window_layers=21,
        bos_token_id=151643, eos_token_id=151645, architectures=["Qwen2ForCausalLM"])),
    # For checking the scripts on a CPU.
    "tiny": ("LlamaConfig", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=2, architectures=["LlamaForCausalLM"])),
}


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """--shape (of SHAPES), --dtype and --device, as every script over these shapes takes them."""
    p.add_argument("--shape", choices=list(SHAPES), default="llama3-8b")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--device", default="cuda")


def add_workload_flags(p: argparse.ArgumentParser) -> None:
    """The offline throughput workload: --num-requests prompts of --input-len random tokens, --output-len
    tokens generated for each (1000 x 256/256 unless given)."""
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=256)


def llama_config(sizes: dict, **extra):
    """A transformers LlamaConfig of `sizes` (hidden_size, layers, heads, vocab_size...) for random or
    dummy weights: BOS/EOS ids 1 and 2, `architectures` set (what the engine's registry reads)."""
    from transformers import LlamaConfig
    return LlamaConfig(**sizes, bos_token_id=1, eos_token_id=2, architectures=["LlamaForCausalLM"], **extra)


def write_config(shape: str, path: str | os.PathLike) -> str:
    """config.json of `shape` in `path` (a folder); returns the folder."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {list(SHAPES)}, got {shape!r}")
    import transformers
    cls_name, kwargs = SHAPES[shape]
    getattr(transformers, cls_name)(**kwargs, dtype="bfloat16").save_pretrained(str(path))
    return str(path)


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Random token ids (the same for a given seed in every script, so peers run the same work)."""
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(n)]


# -- ceilings --------------------------------------------------------------------------------------
def median_ms(fn, reps: int = 10, warmup: int = 3) -> float:
    """Median GPU time of fn() by CUDA events, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def matmul_tflops(n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """bf16 rate of an n^3 product on random data (zeros run faster), TFLOP/s."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = median_ms(lambda: a @ b)
    del a, b
    return 2 * n ** 3 / ms / 1e9


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy, bytes read + written per second (GB/s)."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    del src, dst
    return 2 * nbytes / ms / 1e6


# -- model counts ----------------------------------------------------------------------------------
def param_counts(shape: str) -> dict[str, int]:
    """Parameters by role, from the shape alone (the engine's fused layers hold the same numbers).

    layers: every weight a token's hidden state is multiplied by (attention, MLP, norms);
    lm_head: vocab x hidden (read once per sampled token); embed: the input table (gathered).
    """
    c = SHAPES[shape][1]
    h, inter, layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    head = h // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * head
    bias = (h + 2 * kv) if c["architectures"][0].startswith("Qwen2") else 0
    per_layer = h * (h + 2 * kv) + bias + h * h + 3 * h * inter + 2 * h
    return {"layers": layers * per_layer + h, "lm_head": vocab * h,
            "embed": 0 if c.get("tie_word_embeddings") else vocab * h}


def kv_bytes_per_token(shape: str, elem: int = 2) -> int:
    c = SHAPES[shape][1]
    head = c["hidden_size"] // c["num_attention_heads"]
    return 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * head * elem


def workload_flops(shape: str, num_requests: int, input_len: int, output_len: int) -> float:
    """Fewest FLOPs of the workload: 2 x layer params per token processed (prompt and generated,
    the last generated one excepted), 2 x lm_head params per sampled token, and attention
    (QK^T and PV: 4 x layers x heads x head_dim per (token, context position))."""
    c = SHAPES[shape][1]
    p = param_counts(shape)
    tokens = num_requests * (input_len + output_len - 1)
    ctx_sum = num_requests * sum(range(1, input_len + output_len))   # each token attends to <= itself
    attn = 4 * c["num_hidden_layers"] * c["hidden_size"] * ctx_sum
    return 2 * p["layers"] * tokens + 2 * p["lm_head"] * num_requests * output_len + attn


# -- results ---------------------------------------------------------------------------------------
def card() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"


def commit() -> str:
    if envs.commit():   # a copied tree without .git (the device's carried folder)
        return envs.commit()
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=HERE, timeout=5)
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def command() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])


def stamp() -> str:
    return (f"{card()}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
            f"commit {commit()}, torch {torch.__version__}")


def timed_generate(llm, prompts: list[list[int]], temperature: float, output_len: int) -> float:
    """Seconds of one `LLM.generate` over token-id prompts with ignore_eos; raises unless every
    request produced exactly output_len tokens."""
    from pagedray.cluster import SamplingParams
    params = SamplingParams(temperature=temperature, ignore_eos=True, max_tokens=output_len)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    short = [o.request_id for o in outs if len(o.outputs[0].token_ids) != output_len]
    if short:
        raise RuntimeError(f"{len(short)} requests did not produce {output_len} tokens")
    return elapsed


KERNEL_OPTION_HELP = ("a KernelOptions field as name=value (repeatable), e.g. split_mixed_steps=0, "
                      "prefill_backend=reference, attention_variant.NUM_WARPS=8; the engine config carries it "
                      "to every worker")


def kernel_options(items: list[str]):
    """The engine's KernelOptions from --kernel-option items (for LLM(kernel_options=...)), for A/B runs."""
    from pagedray.common.config import KernelOptions
    options = KernelOptions.parse(items)
    if items:
        print(f"kernel options: {options}", flush=True)
    return options


def require_min(args, minimum: int, *names: str) -> None:
    """ValueError naming the first of these flags whose value is below `minimum` (None: not given)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def record(workload: str, figures: dict, table: str = "", *, headline: str | None = None,
           anchors: dict | None = None) -> None:
    """One JSON record of this run in benchmarks/records/ (benchmarks/records.py): this script, the
    workload, card, commit, command, date, the figures (the headline first), anchors, the markdown table."""
    import records
    records.write(records.make_record(pathlib.Path(sys.argv[0]).stem, workload, figures, card=card(),
                                      commit=commit(), command=command(), headline=headline, anchors=anchors,
                                      notes=f"torch {torch.__version__}", table=table.rstrip()),
                  pathlib.Path(envs.records_dir() or records.RECORDS))


def append_results(title: str, body: str, path: str | os.PathLike | None = None, *,
                   figures: dict | None = None, headline: str | None = None, anchors: dict | None = None) -> None:
    """Record this run (see `record`) under the workload `title`, and with `path` (--results FILE) also
    append the section to that file. benchmarks/RESULTS.md is generated from the records, never appended to."""
    record(title, figures or {}, body, headline=headline, anchors=anchors)
    append_markdown(title, body, path)


def append_markdown(title: str, body: str, path: str | os.PathLike | None) -> None:
    """With a path (--results FILE): append one section there (title, card/date/commit, command, body)."""
    if path:
        with open(path, "a") as f:
            f.write(f"\n### {title}\n\n{stamp()}\n\n`{command()}`\n\n{body.rstrip()}\n")


def run_hf_baseline(mode_args: list[str], timeout: float) -> dict | None:
    """Run `hf_baseline.py <mode_args>` in a subprocess (its memory is freed before the engine
    sizes its KV cache) and return its JSON result, or None when it failed or timed out."""
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve().parent / "hf_baseline.py"), *mode_args]
    print("HF baseline:", " ".join(cmd), flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        print(f"HF baseline did not finish in {timeout} s", file=sys.stderr)
        return _partial_runs(out)
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-4000:], sep="\n", file=sys.stderr)
        return _partial_runs(proc.stdout)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _partial_runs(stdout: str) -> dict | None:
    """The peer runs an HF subprocess finished before it failed or was given up (throughput mode)."""
    partial = [json.loads(line) for line in stdout.splitlines() if line.startswith('{"partial"')]
    print(f"{len(partial)} HF peer run(s) kept", file=sys.stderr)
    if not partial:
        return None
    return {"runs": [p["partial"] for p in partial], "transformers": partial[0]["transformers"],
            "load_s": float("nan")}
