"""Per-step cost of the Ray executor's transports, and TP=2 == TP=1.

Drives executors directly with hand-built SchedulerOutputs (one prefill, then decode
steps whose running requests travel as deltas, new KV blocks as they fill), so that
nothing but the executor is timed:

- `local`: the embedded executor (TP=1, no Ray): the floor.
- `ray-calls`, `ray-dag` at each TP: one actor call per rank, or a Ray compiled graph.

Per step it records the driver's wall time around `execute_model` and rank 0's time
inside `Worker.execute_model`; their difference is the driver-side overhead of the
transport (serialising the step, moving it to every rank, the result back).

`--check` first runs greedy decoding of a saved random checkpoint at TP=1 (embedded)
and at the largest TP through Ray, and compares tokens and logprobs.

    python benchmarks/ray_step_overhead.py --device cpu --preset tiny       # a smoke run
    python benchmarks/ray_step_overhead.py --device cuda --preset 1b --check --out $OUT
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from ray_loopback import keep_ray_on_loopback

keep_ray_on_loopback()

from pagedray.cluster.config import build_engine_config  # noqa: E402
from pagedray.common.messages import CachedRequestData, NewRequestData, SchedulerOutput  # noqa: E402
from pagedray.common.sampling_params import SamplingParams  # noqa: E402

# Llama shapes. "1b" is TinyLlama-1.1B's; "check" is small enough to save as fp32 safetensors quickly.
PRESETS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=320),
    "check": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=4, vocab_size=32000),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
}


def make_model_dir(path: str, preset: str, weights: bool, seed: int = 0) -> str:
    """config.json (for load_format="dummy"), plus random fp32 safetensors when `weights`."""
    import torch
    from transformers import LlamaForCausalLM

    from common import llama_config
    cfg = llama_config(PRESETS[preset], max_position_embeddings=4096, tie_word_embeddings=False, initializer_range=0.05)
    if not weights:
        cfg.save_pretrained(path)
        return path
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).float()
    model.save_pretrained(path, safe_serialization=True)
    return path


class DecodeDriver:
    """What the scheduler would send: one prefill of `batch` prompts, then one token each per step."""

    def __init__(self, batch: int, prompt_len: int, block_size: int, seed: int = 0) -> None:
        import random
        rng = random.Random(seed)
        self.block_size = block_size
        self.prompts = {f"r{i}": [rng.randrange(3, 300) for _ in range(prompt_len)] for i in range(batch)}
        self.lens = {rid: 0 for rid in self.prompts}          # tokens whose K/V are computed
        self.blocks = {rid: [] for rid in self.prompts}
        self.next_block = 1
        self.outputs: dict[str, list[int]] = {rid: [] for rid in self.prompts}
        self.logprobs: dict[str, list[float]] = {rid: [] for rid in self.prompts}

    def _grow(self, rid: str, total_tokens: int) -> list[int]:
        new = []
        while len(self.blocks[rid]) * self.block_size < total_tokens:
            self.blocks[rid].append(self.next_block)
            new.append(self.next_block)
            self.next_block += 1
        return new

    def blocks_needed(self, steps: int) -> int:
        per_req = -(-(len(next(iter(self.prompts.values()))) + steps + 2) // self.block_size)
        return 1 + per_req * len(self.prompts)

    def first_step(self) -> SchedulerOutput:
        params = SamplingParams(temperature=0.0, max_tokens=1 << 20, logprobs=0, ignore_eos=True)
        new = [NewRequestData(rid, list(p), len(p), params, self._grow(rid, len(p) + 1), 0)
               for rid, p in self.prompts.items()]
        counts = {rid: len(p) for rid, p in self.prompts.items()}
        return SchedulerOutput(new, CachedRequestData(), counts, sum(counts.values()))

    def next_step(self, out) -> SchedulerOutput:
        cached = CachedRequestData()
        for rid in self.prompts:
            self.lens[rid] = len(self.prompts[rid]) + len(self.outputs[rid])
            token = out.sampled_token_ids[rid]
            self.outputs[rid].append(token)
            self.logprobs[rid].append(out.logprobs[rid][0][1])
            cached.append(rid, [token], self._grow(rid, self.lens[rid] + 2), self.lens[rid])
        counts = {rid: 1 for rid in self.prompts}
        return SchedulerOutput([], cached, counts, len(counts))


def build_executor(kind: str, model_dir: str, tp: int, args, dtype: str, load_format: str,
                   num_kv_blocks: int | None):
    # max_num_seqs and max_model_len bound the decode-graph buckets captured at start-up.
    config = build_engine_config(model_dir, device=args.device, dtype=dtype, load_format=load_format,
                                 tensor_parallel_size=tp, executor="local" if kind == "local" else "ray",
                                 block_size=args.block_size, num_kv_blocks=num_kv_blocks,
                                 max_num_seqs=max(args.batches + [args.check_batch]), max_model_len=1024,
                                 max_num_batched_tokens=max(2048, max(args.batches) * args.prompt_len),
                                 gpu_memory_utilization=0.5,
                                 enforce_eager=args.enforce_eager)
    if kind == "local":
        from pagedray.cluster.executors.local import LocalExecutor
        return LocalExecutor(config)
    from pagedray.cluster.executors.ray import RayExecutor
    return RayExecutor(config, transport=kind.removeprefix("ray-"))


def decode(executor, batch: int, prompt_len: int, steps: int, warmup: int, block_size: int) -> dict:
    import ray
    driver = DecodeDriver(batch, prompt_len, block_size)
    out = executor.execute_model(driver.first_step())
    wall = []
    for _ in range(warmup + steps):
        sched = driver.next_step(out)
        t0 = time.perf_counter()
        out = executor.execute_model(sched)
        wall.append(time.perf_counter() - t0)
    wall = wall[warmup:]
    result = {"step_ms": _stats(wall), "tokens": driver.outputs, "logprobs": driver.logprobs}
    if hasattr(executor, "workers"):
        inner = ray.get(executor.workers[0].take_step_seconds.remote())[-steps:]
        result["worker_ms"] = _stats(inner)
        result["overhead_ms"] = _stats([w - i for w, i in zip(wall, inner)])
    return result


def _stats(seconds: list[float]) -> dict:
    ms = sorted(s * 1e3 for s in seconds)
    return {"median": round(statistics.median(ms), 4), "p90": round(ms[int(0.9 * (len(ms) - 1))], 4),
            "min": round(ms[0], 4)}


def release(executor) -> None:
    import gc

    import torch
    executor.shutdown()
    if hasattr(executor, "worker"):   # embedded: drop this process's model and KV cache now
        executor.worker = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    time.sleep(1.0)   # Ray frees the bundles a moment after shutdown returns


def check_tp(args, tmp: str) -> dict:
    """Greedy tokens and logprobs of a saved random checkpoint: embedded TP=1 vs Ray at the largest TP."""
    model_dir = make_model_dir(os.path.join(tmp, "check"), "check" if args.preset != "tiny" else "tiny", True)
    tp = max(args.tp)
    runs = {}
    for kind, size in (("local", 1), ("ray-dag", tp)):
        t0 = time.perf_counter()
        ex = build_executor(kind, model_dir, size, args, "float32", "auto", None)
        started = time.perf_counter() - t0
        res = decode(ex, args.check_batch, 24, args.check_steps, 0, args.block_size)
        runs[kind] = dict(res, start_s=round(started, 2), num_kv_blocks=ex.num_kv_blocks)
        release(ex)
        del ex   # the embedded executor's weights and KV cache sit on GPU 0, which rank 0 profiles next
    a, b = runs["local"], runs["ray-dag"]
    diff = max(abs(x - y) for rid in a["logprobs"] for x, y in zip(a["logprobs"][rid], b["logprobs"][rid]))
    same = a["tokens"] == b["tokens"]
    print(f"check: TP=1 embedded vs TP={tp} ray, fp32, batch {args.check_batch} x {args.check_steps} greedy steps: "
          f"tokens equal={same}, max |logprob diff|={diff:.2e}; KV blocks profiled per rank: "
          f"TP=1 {a['num_kv_blocks']}, TP={tp} {b['num_kv_blocks']}")
    return {"tp": tp, "tokens_equal": same, "max_logprob_diff": diff,
            "num_kv_blocks": {"tp1": a["num_kv_blocks"], f"tp{tp}": b["num_kv_blocks"]},
            "start_s": {"tp1": a["start_s"], f"tp{tp}": b["start_s"]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--preset", default="tiny", choices=list(PRESETS))
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--kinds", nargs="*", default=["local", "ray-calls", "ray-dag"], help="none: --check only")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode")
    ap.add_argument("--check", action="store_true", help="TP=max(--tp) equals TP=1 first (fp32, saved weights)")
    ap.add_argument("--check-batch", type=int, default=8)
    ap.add_argument("--check-steps", type=int, default=32)
    ap.add_argument("--out", default=None, help="folder for ray_step_overhead.json")
    args = ap.parse_args()
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    report: dict = {"args": vars(args), "dtype": dtype, "runs": [], "errors": []}
    with tempfile.TemporaryDirectory() as tmp:
        if args.check:
            _guarded(report, "check", lambda: report.__setitem__("check", check_tp(args, tmp)), args.out)
        model_dir = make_model_dir(os.path.join(tmp, "bench"), args.preset, weights=False) if args.kinds else ""
        blocks = DecodeDriver(max(args.batches), args.prompt_len, args.block_size).blocks_needed(
            args.warmup + args.steps + 1)
        for kind in args.kinds:
            for tp in (args.tp if kind != "local" else [1]):
                _guarded(report, f"{kind} tp={tp}",
                         lambda: _time_executor(args, report, kind, tp, model_dir, dtype, blocks), args.out)


def _time_executor(args, report: dict, kind: str, tp: int, model_dir: str, dtype: str, blocks: int) -> None:
    t0 = time.perf_counter()
    ex = build_executor(kind, model_dir, tp, args, dtype, "dummy", blocks)
    start_s = time.perf_counter() - t0
    try:
        for batch in args.batches:
            res = decode(ex, batch, args.prompt_len, args.steps, args.warmup, args.block_size)
            row = {"kind": kind, "tp": tp, "batch": batch, "start_s": round(start_s, 2),
                   **{k: v for k, v in res.items() if k.endswith("_ms")}}
            report["runs"].append(row)
            print(_format(row), flush=True)
    finally:
        release(ex)


def _guarded(report: dict, what: str, fn, out: str | None) -> None:
    """One failing configuration is recorded and the others still run; the JSON is rewritten each time."""
    import traceback
    try:
        fn()
    except Exception:
        text = traceback.format_exc()
        print(f"FAILED {what}:\n{text}", flush=True)
        report["errors"].append({"what": what, "traceback": text})
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "ray_step_overhead.json"), "w") as f:
            json.dump(report, f, indent=1)


def _format(row: dict) -> str:
    text = (f"{row['kind']:9s} tp={row['tp']} batch={row['batch']:3d}: step {row['step_ms']['median']:8.3f} ms "
            f"(p90 {row['step_ms']['p90']:.3f})")
    if "overhead_ms" in row:
        text += (f"  rank0 inside {row['worker_ms']['median']:8.3f} ms  driver overhead "
                 f"{row['overhead_ms']['median'] * 1e3:7.0f} us (p90 {row['overhead_ms']['p90'] * 1e3:.0f})")
    return text + f"  [start {row['start_s']} s]"


if __name__ == "__main__":
    main()
