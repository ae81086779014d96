"""A small request's latency behind one large-n request: the n cap (half of max_num_seqs) against none.

    python benchmarks/fairness_n.py --shape llama3-8b                       # GPU: n=256 vs n=128 of 256 seats
    python benchmarks/fairness_n.py --shape tiny --device cpu --max-num-seqs 32 --output-len 64   # a CPU check

One engine (dummy weights, random token ids, `ignore_eos`) behind the serving Frontend. Per case, a
large request (n samples of `--output-len` tokens) starts; once its first token is out, a small
request (1 sample, `--small-len` tokens) is sent. Reported: the small request's time to first token
and end-to-end, and the large request's end-to-end, for n = max_num_seqs (what one call could ask
for before the cap: every seat) and n = max_num_seqs // 2 (the cap, cluster/serving/limits.py).
"""
from __future__ import annotations

import argparse
import asyncio
import tempfile
import time

from common import SHAPES, append_results, markdown_table, random_prompts, write_config


async def one_case(frontend, n: int, args, vocab: int) -> dict:
    from pagedray.common.sampling_params import SamplingParams
    big_prompt, small_prompt = random_prompts(2, args.prompt_len, vocab, seed=n)
    big_params = SamplingParams(n=n, max_tokens=args.output_len, ignore_eos=True, temperature=1.0, seed=1)
    small_params = SamplingParams(max_tokens=args.small_len, ignore_eos=True, temperature=0.0)
    t0 = time.perf_counter()
    big = frontend.generate({"prompt_token_ids": big_prompt}, big_params, f"big-{n}")
    await anext(big)   # the large request is running
    big_done = asyncio.create_task(_drain(big))
    start = time.perf_counter()
    first = None
    async for _ in frontend.generate({"prompt_token_ids": small_prompt}, small_params, f"small-{n}"):
        first = first or time.perf_counter()
    small_end = time.perf_counter()
    await big_done
    return {"n": n, "small_ttft_s": first - start, "small_e2e_s": small_end - start,
            "big_e2e_s": time.perf_counter() - t0}


async def _drain(stream) -> None:
    async for _ in stream:
        pass


async def run(args) -> list[dict]:
    from pagedray.cluster.serving.frontend import Frontend
    from pagedray.cluster.serving.inproc_client import InprocClient
    vocab = SHAPES[args.shape][1]["vocab_size"]
    with tempfile.TemporaryDirectory() as tmp:
        client = InprocClient.for_model(write_config(args.shape, tmp), load_format="dummy", device=args.device,
                                        dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                                        max_model_len=args.prompt_len + args.output_len + 8)
        frontend = await Frontend.start_with([client])
        try:
            await one_case(frontend, 2, args, vocab)   # warm-up
            return [await one_case(frontend, n, args, vocab)
                    for n in (args.max_num_seqs, max(1, args.max_num_seqs // 2))]
        finally:
            await frontend.shutdown()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=512, help="tokens per sample of the large request")
    p.add_argument("--small-len", type=int, default=16, help="tokens of the small request")
    p.add_argument("--no-append", action="store_true", help="do not record the run (benchmarks/records/)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = asyncio.run(run(args))
    table = markdown_table(["n of the large request", "small TTFT (s)", "small end-to-end (s)", "large end-to-end (s)"],
                           [[r["n"], f"{r['small_ttft_s']:.2f}", f"{r['small_e2e_s']:.2f}", f"{r['big_e2e_s']:.2f}"]
                            for r in rows])
    print(table)
    if not args.no_append:
        full, capped = rows
        figures = {f"small TTFT behind n={capped['n']} (s)": round(capped["small_ttft_s"], 3),
                   f"small TTFT behind n={full['n']} (s)": round(full["small_ttft_s"], 3)}
        append_results(f"fairness_n: {args.shape} on {args.device}, max_num_seqs={args.max_num_seqs}, "
                       f"{args.output_len} tokens a sample", table, figures=figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
