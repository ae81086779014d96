"""Serving benchmark: Poisson arrivals over gRPC; TTFT, TPOT, throughput, and the gRPC
overhead against the offline API on the same requests.

    python benchmarks/serving.py --tiny --device cpu                  # builds a tiny random Llama
    python benchmarks/serving.py --model PATH --num-prompts 500 --request-rate 20

Runs, in order, on the same prompts (random token ids, greedy, ignore_eos so every
request produces exactly --output-len tokens):
  1. offline: `LLM.generate(all prompts)` in this process;
  2. grpc burst: a `pagedray serve` subprocess, every request sent at once: the same work
     as (1), so the time ratio is the cost of the gRPC path (serialization, streaming,
     the asyncio engine loop, the client);
  3. grpc poisson: requests arriving at --request-rate per second; client-side TTFT
     (send to first token), TPOT ((last - first) / (tokens - 1)), end-to-end latency.
Prefix caching is off so that runs 2 and 3 do not reuse run 1's KV blocks.

    python benchmarks/serving.py --synthetic 8b --compare-pacing 1.25 --num-prompts 500 \
        --input-len 256 --output-len 256 --request-rate 20

instead runs prefill pacing off and on side by side (issue 26): for each side a server, the
Poisson run, then a decode-only reference at that run's mean running batch (that many requests at
once, same lengths; the step time is read from the window where all of them decode and none
prefills), and TPOT p50/p99 as multiples of that decode-only step, with TTFT p50/p99.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

# Spinning OpenMP workers make CPU runs on a loaded machine up to 100x slower in the main
# thread (where the offline API steps) than in a side thread (where the server's engine
# steps); passive waiting puts both on an equal footing. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@dataclass
class RequestResult:
    ttft: float
    tpot: float | None
    e2e: float
    tokens: list[int]
    start: float = 0.0      # perf_counter at send
    token_times: list[float] | None = None   # perf_counter when each token arrived


def make_tiny_checkpoint(path: str, vocab: int = 512, max_len: int = 1024) -> str:
    import torch
    from transformers import LlamaForCausalLM

    from common import llama_config
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from testkit.tiny_tokenizer import make_tiny_tokenizer
    torch.manual_seed(0)
    sizes = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    model = LlamaForCausalLM(llama_config(sizes, max_position_embeddings=max_len))
    model.save_pretrained(path, safe_serialization=True)
    make_tiny_tokenizer(path, vocab)
    return path


# Llama shapes for --synthetic: a config.json and no weights (load_format=dummy) or tokenizer
# (token-id prompts; the text side of the stream is then empty).
SYNTHETIC = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
}


def make_synthetic_config(path: str, preset: str) -> str:
    from common import llama_config
    llama_config(SYNTHETIC[preset], max_position_embeddings=4096, dtype="bfloat16").save_pretrained(path)
    return path


def engine_kwargs(args) -> dict:
    kwargs = dict(device=args.device, enable_prefix_caching=False, max_num_seqs=args.max_num_seqs,
                  load_format=args.load_format, dtype=args.dtype)
    if args.num_kv_blocks:
        kwargs["num_kv_blocks"] = args.num_kv_blocks
    return kwargs


def make_prompts(args, vocab: int) -> list[list[int]]:
    rng = random.Random(args.seed)
    return [[rng.randrange(3, vocab) for _ in range(args.input_len)] for _ in range(args.num_prompts)]


WARMUP_REQUESTS = 64


def run_offline(args, prompts) -> tuple[float, list[list[int]]]:
    from pagedray.cluster import LLM, SamplingParams
    llm = LLM(args.model, **engine_kwargs(args))
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    # Warm-up with a batch, not one request: the first large batch pays first-use costs (prefill
    # kernel shapes, allocator growth) that the server, started before the burst, has paid too.
    warm = [{"prompt_token_ids": p} for p in prompts[:WARMUP_REQUESTS]]
    llm.generate(warm, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    llm.llm_engine.shutdown()   # (the worker gives its device memory back)
    return elapsed, [o.outputs[0].token_ids for o in outs]


def start_server(args, extra: list[str] = (), keep: list[str] | None = None) -> tuple[subprocess.Popen, str, str]:
    """A `pagedray serve` subprocess: (process, gRPC address, its ready line); its later stderr
    lines with "prefill pacing" go to `keep`."""
    cmd = [sys.executable, "-m", "pagedray.cluster.cli", "serve", "--model", args.model, "--port", "0",
           "--device", args.device, "--max-num-seqs", str(args.max_num_seqs), "--load-format", args.load_format,
           "--dtype", args.dtype, "--max-pending-requests", str(max(1024, args.num_prompts)),
           "--no-enable-prefix-caching", *extra]
    if args.num_kv_blocks:
        cmd += ["--num-kv-blocks", str(args.num_kv_blocks)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    for line in proc.stderr:
        seen = (seen + [line])[-20:]
        match = re.search(r"ready: serving model .*? on (\S+:\d+)", line)
        if match:
            kept = keep if keep is not None else []
            threading.Thread(target=lambda: [kept.append(x.strip()) for x in proc.stderr if "prefill pacing" in x],
                             daemon=True).start()
            return proc, match.group(1), line
    raise RuntimeError(f"server exited with {proc.wait()} before it was ready; {' '.join(cmd)}\n"
                       + "".join(seen))


async def one_request(stub, pb, prompt: list[int], output_len: int) -> RequestResult:
    request = pb.GenerateRequest(sampling=pb.SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True))
    request.prompt_token_ids.ids.extend(prompt)
    start = time.perf_counter()
    first = last = None
    tokens: list[int] = []
    times: list[float] = []
    async for message in stub.GenerateStream(request, timeout=3600):
        now = time.perf_counter()
        for completion in message.completions:
            if completion.token_ids:
                first = first if first is not None else now
                last = now
                tokens.extend(completion.token_ids)
                times.extend([now] * len(completion.token_ids))
    tpot = (last - first) / (len(tokens) - 1) if len(tokens) > 1 else None
    return RequestResult(first - start, tpot, last - start, tokens, start, times)


async def run_grpc(address: str, prompts, output_len: int, rate: float, seed: int):
    import grpc
    from pagedray.protos import generate_pb2 as pb
    from pagedray.protos import generate_pb2_grpc as pb_grpc
    rng = random.Random(seed)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        # Connect, and warm up as the offline run does.
        await asyncio.gather(*[one_request(stub, pb, p, 8) for p in prompts[:WARMUP_REQUESTS]])
        tasks = []
        start = time.perf_counter()
        for prompt in prompts:
            tasks.append(asyncio.create_task(one_request(stub, pb, prompt, output_len)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        return time.perf_counter() - start, results


async def run_reference(address: str, prompts, output_len: int, batch: int) -> list[RequestResult]:
    """`batch` requests at once (the decode-only reference): after every first token, only decodes run."""
    import grpc
    from pagedray.protos import generate_pb2 as pb
    from pagedray.protos import generate_pb2_grpc as pb_grpc
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        chosen = [prompts[i % len(prompts)] for i in range(batch)]
        return await asyncio.gather(*[one_request(stub, pb, p, output_len) for p in chosen])


def mean_running_batch(results: list[RequestResult], trim: float = 0.1) -> float:
    """Time-averaged number of streams between their first and last token, over the run's span
    without its first and last `trim` (ramp-up and drain)."""
    spans = [(r.start + r.ttft, r.start + r.e2e) for r in results]
    t0, t1 = min(a for a, _ in spans), max(b for _, b in spans)
    lo, hi = t0 + trim * (t1 - t0), t1 - trim * (t1 - t0)
    if hi <= lo:
        return float(len(results))
    return sum(max(0.0, min(b, hi) - max(a, lo)) for a, b in spans) / (hi - lo)


def decode_only_step(results: list[RequestResult]) -> float:
    """Seconds a step of a batch sent at once, in the window where every request has had its first
    token and none its last (so every step in it is decode-only): window / tokens a request got in it."""
    t_a = max(r.token_times[0] for r in results)
    t_b = min(r.token_times[-1] for r in results)
    counts = sorted(sum(1 for t in r.token_times if t_a < t <= t_b) for r in results)
    n = counts[len(counts) // 2]
    return (t_b - t_a) / n if n > 0 else float("nan")


def compare_pacing(args, prompts) -> dict:
    """Prefill pacing off and on, each on its own server: the Poisson run, then the decode-only
    reference at that run's mean running batch."""
    total = args.num_prompts * args.output_len
    rows = []
    for ratio in (None, args.compare_pacing):
        extra = [] if ratio is None else ["--tpot-target-ratio", str(ratio),
                                          "--max-prefill-delay-ms", str(args.max_prefill_delay_ms)]
        kept: list[str] = []
        proc, address, _ = start_server(args, extra, kept)
        try:
            poisson_s, results = asyncio.run(run_grpc(address, prompts, args.output_len, args.request_rate, args.seed))
            batch = mean_running_batch(results)
            reference = asyncio.run(run_reference(address, prompts, args.output_len, max(1, round(batch))))
        finally:
            proc.terminate()
            proc.wait(timeout=120)
        step = decode_only_step(reference)
        row = summarize("pacing off" if ratio is None else f"pacing on, tpot_target_ratio={ratio:g}",
                        poisson_s, results, total)
        row.update(mean_running_batch=round(batch, 1), decode_only_step_ms=round(1000 * step, 2),
                   tpot_p50_over_decode_step=round(row["tpot_ms_p50"] / (1000 * step), 2),
                   tpot_p99_over_decode_step=round(row["tpot_ms_p99"] / (1000 * step), 2))
        if kept:
            row["pacer"] = kept[-1][kept[-1].index("prefill pacing"):]
        rows.append(row)
    return {"rows": rows}


def pacing_table(rows: list[dict]) -> str:
    head = ("| run | mean running batch | decode-only step (ms) | TPOT p50 / p99 (ms) | TPOT p50 / p99 ÷ decode step "
            "| TTFT p50 / p99 (ms) |\n|---|---:|---:|---|---|---|\n")
    return head + "".join(
        f"| {r['run']} | {r['mean_running_batch']} | {r['decode_only_step_ms']} | {r['tpot_ms_p50']} / "
        f"{r['tpot_ms_p99']} | {r['tpot_p50_over_decode_step']}x / {r['tpot_p99_over_decode_step']}x | "
        f"{r['ttft_ms_p50']} / {r['ttft_ms_p99']} |\n" for r in rows)


def summarize(name: str, elapsed: float, results: list[RequestResult] | None, num_tokens: int) -> dict:
    row = {"run": name, "seconds": round(elapsed, 3), "output_tok_per_s": round(num_tokens / elapsed, 1)}
    if results:
        ms = lambda xs, q: round(1000 * _quantile(xs, q), 2)  # noqa: E731
        ttft = [r.ttft for r in results]
        tpot = [r.tpot for r in results if r.tpot is not None]
        e2e = [r.e2e for r in results]
        row.update(ttft_ms_mean=round(1000 * statistics.mean(ttft), 2), ttft_ms_p50=ms(ttft, 0.5),
                   ttft_ms_p99=ms(ttft, 0.99), tpot_ms_mean=round(1000 * statistics.mean(tpot), 2),
                   tpot_ms_p50=ms(tpot, 0.5), tpot_ms_p99=ms(tpot, 0.99), e2e_s_p50=round(_quantile(e2e, 0.5), 3))
    return row


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--tiny", action="store_true", help="build a tiny random Llama in a temp dir")
    p.add_argument("--synthetic", choices=sorted(SYNTHETIC), help="a Llama config of this size, dummy weights")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--request-rate", type=float, default=20.0, help="Poisson arrivals per second")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--num-kv-blocks", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare-pacing", type=float, metavar="RATIO",
                   help="instead: prefill pacing off vs on at this tpot_target_ratio, Poisson runs side by side")
    p.add_argument("--max-prefill-delay-ms", type=float, default=250.0, help="with --compare-pacing")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.device == "auto":
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    tmp = None
    if args.tiny or args.synthetic:
        tmp = tempfile.TemporaryDirectory()
        if args.tiny:
            args.model = make_tiny_checkpoint(tmp.name)
        else:
            args.model = make_synthetic_config(tmp.name, args.synthetic)
            args.load_format = "dummy"
    if not args.model:
        p.error("give --model PATH or --tiny")
    from transformers import AutoConfig
    vocab = AutoConfig.from_pretrained(args.model).vocab_size
    prompts = make_prompts(args, vocab)
    total_tokens = args.num_prompts * args.output_len
    if args.compare_pacing is not None:
        return _report_pacing(args, compare_pacing(args, prompts))

    offline_s, offline_tokens = run_offline(args, prompts)
    proc, address, _ = start_server(args)
    try:
        burst_s, burst = asyncio.run(run_grpc(address, prompts, args.output_len, float("inf"), args.seed))
        poisson_s, poisson = asyncio.run(run_grpc(address, prompts, args.output_len, args.request_rate, args.seed))
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    mismatched = sum(r.tokens != want for r, want in zip(burst, offline_tokens))
    rows = [summarize("offline LLM.generate", offline_s, None, total_tokens),
            summarize("grpc burst (all at t=0)", burst_s, burst, total_tokens),
            summarize(f"grpc poisson {args.request_rate}/s", poisson_s, poisson, total_tokens)]
    import platform
    import torch
    hardware = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    report = {"hardware": hardware, "config": {k: v for k, v in vars(args).items() if k not in ("json", "model")},
              "rows": rows, "grpc_overhead_pct": round(100 * (burst_s / offline_s - 1), 1),
              "burst_outputs_differing_from_offline": mismatched}
    print(json.dumps(report, indent=2))
    from common import record
    offline, burst_row, poisson_row = rows
    record(f"{_model_name(args)}, {args.num_prompts} x {args.input_len}/{args.output_len}, gRPC burst vs offline",
           {"burst / offline": f"{burst_s / offline_s:.2f}x", "burst output tok/s": burst_row["output_tok_per_s"],
            "offline output tok/s": offline["output_tok_per_s"],
            f"Poisson {args.request_rate:g} req/s TPOT p50 (ms)": poisson_row["tpot_ms_p50"],
            f"Poisson {args.request_rate:g} req/s TTFT p50 (ms)": poisson_row["ttft_ms_p50"]},
           "```json\n" + json.dumps(report, indent=1) + "\n```")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def _model_name(args) -> str:
    return ({"8b": "llama3-8b", "1b": "llama-1b"}.get(args.synthetic) if args.synthetic
            else "tiny" if args.tiny else os.path.basename(args.model.rstrip("/")))


def _report_pacing(args, result: dict) -> int:
    import torch
    result["hardware"] = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    result["config"] = {k: v for k, v in vars(args).items() if k not in ("json", "model")}
    print(json.dumps(result, indent=2))
    table = pacing_table(result["rows"])
    print(table)
    off, on = result["rows"]
    from common import record
    record(f"{_model_name(args)}, Poisson {args.request_rate:g} req/s, {args.num_prompts} x "
           f"{args.input_len}/{args.output_len}, prefill pacing off vs on",
           {"TPOT p50 / decode step, pacing on": f"{on['tpot_p50_over_decode_step']}x",
            "TPOT p50 / decode step, pacing off": f"{off['tpot_p50_over_decode_step']}x",
            "TTFT p50 (ms), on / off": f"{on['ttft_ms_p50']} / {off['ttft_ms_p50']}"},
           table + "\n```json\n" + json.dumps(result, indent=1) + "\n```")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
