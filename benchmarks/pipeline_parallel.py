"""Pipeline parallelism on the Ray executor: PP=2 against PP=1, and the pipeline bubble.

Three runs of the same greedy workload (random token-id prompts, ignore_eos), each through `LLM` on
the Ray executor so the transport is the same:

- `pp1`: one rank holds every layer (the baseline);
- `pp2-serial`: two stages, one step in flight (the engine reads each step before building the next):
  stage 1 idles while stage 0 runs and the other way round;
- `pp2`: two stages, two steps in flight (what `pipeline_parallel_size=2` does);
- `pp1-again`: the baseline once more (the figure divides by the mean of the two baseline runs).

For each PP=2 run every stage reports the seconds it spent in steps and, of those, blocked on its
neighbour (receiving the previous stage's hidden states, or handing its own to the next):
busy = step time - waiting. The bubble of a stage is 1 - busy / wall time of the run; the figure
given is the mean over stages. On a CPU the waits are real blocking (gloo); on a GPU the transfers
are queued, so read the CPU figures only.

    python benchmarks/pipeline_parallel.py --device cpu --shape small --requests 16 --output-len 32

Every run is recorded (benchmarks/records/; `python benchmarks/records.py` regenerates RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

from ray_loopback import keep_ray_on_loopback

keep_ray_on_loopback()

import ray  # noqa: E402

from common import append_results, llama_config, markdown_table, random_prompts, timed_generate  # noqa: E402

# Llama shapes small enough for a CPU; "small" gives each stage enough work per step to overlap.
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=2048),
}


def make_model_dir(path: str, shape: str) -> str:
    llama_config(SHAPES[shape], max_position_embeddings=1024, tie_word_embeddings=False).save_pretrained(path)
    return path


def run(model: str, args, pp: int, depth: int) -> dict:
    """One configuration: tokens/s over `--repeats` timed generates after a warm-up, and the stages' times."""
    from pagedray.cluster import LLM
    llm = LLM(model, device=args.device, executor="ray", pipeline_parallel_size=pp, load_format="dummy",
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              num_kv_blocks=args.num_kv_blocks, block_size=16)
    try:
        core = llm.llm_engine.core
        core.pipeline_depth = depth
        prompts = random_prompts(args.requests, args.input_len, SHAPES[args.shape]["vocab_size"], seed=1)
        workers = core.executor.workers
        timed_generate(llm, prompts[:2], 0.0, 4)                    # warm-up
        ray.get([w.take_stage_times.remote() for w in workers])    # drop the warm-up's times
        seconds = [timed_generate(llm, prompts, 0.0, args.output_len) for _ in range(args.repeats)]
        times = ray.get([w.take_stage_times.remote() for w in workers])
    finally:
        llm.shutdown()
    wall = sum(seconds)
    out = {"pp": pp, "depth": depth, "seconds": seconds,
           "tok_s": args.requests * args.output_len * len(seconds) / wall}
    if pp > 1:
        stages = []
        for t in times:
            busy = t.step_s - t.recv_wait_s - t.send_wait_s
            stages.append({"steps": t.steps, "busy_s": busy, "recv_wait_s": t.recv_wait_s,
                           "send_wait_s": t.send_wait_s, "busy_frac": busy / wall})
        out["stages"] = stages
        out["bubble"] = 1 - sum(s["busy_frac"] for s in stages) / len(stages)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=8, help="a step's batch: the pipeline needs 2 batches")
    p.add_argument("--max-num-batched-tokens", type=int, default=256)
    p.add_argument("--num-kv-blocks", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--results", default=None, help="also append the table to this markdown file (the run is always recorded)")
    args = p.parse_args()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    load_before = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model_dir(tmp, args.shape)
        # The baseline runs first and last: on a shared machine the load drifts during the run.
        for name, pp, depth in (("pp1", 1, 1), ("pp2-serial", 2, 1), ("pp2", 2, 2), ("pp1-again", 1, 1)):
            r = run(model, args, pp, depth)
            r["name"] = name
            results.append(r)
            print(json.dumps(r), flush=True)
    ray.shutdown()
    base = (results[0]["tok_s"] + results[-1]["tok_s"]) / 2
    rows = []
    for r in results:
        bubble = f"{r['bubble']:.0%}" if "bubble" in r else "-"
        busy = " / ".join(f"{s['busy_frac']:.0%}" for s in r.get("stages", [])) or "-"
        rows.append([r["name"], r["depth"], f"{r['tok_s']:.0f}", f"{r['tok_s'] / base:.2f}x", busy, bubble])
    table = markdown_table(["run", "steps in flight", "output tok/s", "vs pp1 (mean of both runs)", "stage busy (0 / 1)",
                            "bubble"], rows)
    # Wall-clock figures on a CPU shared with other work are only as good as the machine was idle.
    table += (f"\n\n{os.cpu_count()} CPU cores; 1-minute load average {load_before:.1f} at the start, "
              f"{os.getloadavg()[0]:.1f} at the end.")
    print(table)
    pp2 = results[2]
    figures = {"pp2 vs pp1": round(pp2["tok_s"] / base, 3), "pp2 bubble": round(pp2["bubble"], 3),
               "pp2-serial bubble": round(results[1]["bubble"], 3), "pp1 output tok/s": round(base, 1),
               "pp2 output tok/s": round(pp2["tok_s"], 1)}
    append_results(f"pipeline parallelism, {args.device}, {args.shape}, {args.requests} x "
                   f"{args.input_len}/{args.output_len}, max_num_seqs {args.max_num_seqs}", table, args.results,
                   figures=figures, headline="pp2 vs pp1")


if __name__ == "__main__":
    main()
