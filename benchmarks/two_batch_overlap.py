"""Two-batch overlap of one decode graph at a large batch (workers/cuda_graphs.py), A/B in one process.

    python benchmarks/two_batch_overlap.py [--shape llama3-8b] [--batch 1024] [--ctx 384] [--carveouts 16,32,48]
        [--forms pipelined,plain]

One engine (eager, dummy weights) provides the model and its KV cache; the bucket is then captured
as a graph several ways and each is timed by CUDA events over replays at a context of --ctx tokens
a sequence (decode_profile's static inputs, no cache writes):
  whole                       the engine's own capture (and with torch's cuBLASLt path for every GEMM)
  two batches, <form>         two half batches on two streams (KernelOptions.two_batch_overlap_min_batch)
                              in the plain or the pipelined form (workers/two_batch.py)
  ... cuBLASLt                the same with torch's cuBLASLt path for every GEMM
  ... cuBLASLt, carveout k    cuBLASLt told to target k fewer SMs (torch._C._set_sm_carveout_experimental),
                              leaving k SMs to the other half's attention
Each variant's hidden states are compared with the whole graph's (relative error). --profile adds
the kernel breakdown of each variant (decode_profile.profile_replay).
"""
from __future__ import annotations

import argparse
import tempfile

import torch

from common import add_model_flags, copy_bandwidth, markdown_table, matmul_tflops, record, write_config
from decode_profile import _set_context, graph_replay_ms, profile_replay, replay_us

BLOCK_SIZE = 16


def variants(batch: int, carveouts: list[int], forms: list[str]) -> list[tuple[str, int, bool, int, bool]]:
    """(name, two_batch_min, cuBLASLt, carveout, pipelined)."""
    rows = [("whole", 0, False, 0, False), ("whole, cuBLASLt", 0, True, 0, False)]
    for form in forms:
        name, pipelined = f"two batches, {form}", form == "pipelined"
        rows += [(name, batch, False, 0, pipelined), (f"{name}, cuBLASLt", batch, True, 0, pipelined)]
        rows += [(f"{name}, cuBLASLt, carveout {k}", batch, True, k, pipelined) for k in carveouts]
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    from pagedray.cluster import LLM
    from pagedray.workers.cuda_graphs import DecodeGraphs
    from pagedray.workers.two_batch import gemm_sm_target
    bandwidth, tflops = copy_bandwidth(), matmul_tflops()
    gemm_rows = carveout_check(args.batch // 2, [0] + args.carveouts, torch.device(args.device), gemm_sm_target)
    max_len = -(-(args.ctx + 16) // BLOCK_SIZE) * BLOCK_SIZE
    with tempfile.TemporaryDirectory() as tmp:
        llm = LLM(write_config(args.shape, tmp), load_format="dummy", dtype=args.dtype, device=args.device,
                  max_model_len=max_len, max_num_seqs=8, enforce_eager=True, enable_prefix_caching=False,
                  gpu_memory_utilization=args.gpu_memory_utilization)
        runner = llm.llm_engine.executor.worker.runner
        num_blocks = llm.llm_engine.num_kv_blocks
        times, rows, reference, profiles = {}, [], None, []
        for name, two_batch_min, lt, carveout, pipelined in variants(args.batch, args.carveouts, args.forms):
            try:
                graphs = DecodeGraphs(runner.model, runner.kv_caches, [args.batch], max_len, BLOCK_SIZE,
                                      runner.device, two_batch_min, pipelined=pipelined)
                _set_context(graphs, args.batch, args.ctx, num_blocks, BLOCK_SIZE)
                with gemm_sm_target(lt, carveout):
                    graphs.capture()
                ms = min(graph_replay_ms(graphs.graphs[args.batch]) for _ in range(args.repeats))
            except Exception as e:   # (one variant failing to capture leaves the others' figures)
                rows.append([name, "failed", "-", f"{type(e).__name__}: {e}"[:200]])
                print(" | ".join(rows[-1]), flush=True)
                continue
            hidden = graphs.outputs[args.batch].float()
            if reference is None:
                reference = hidden.clone()
            err = ((hidden - reference).norm() / reference.norm()).item()
            times[name] = ms
            rows.append([name, f"{ms:.2f}", f"{ms / times['whole']:.3f}", f"{err:.1e}"])
            print(" | ".join(rows[-1]), flush=True)
            if args.profile:
                _, kernels = profile_replay(graphs, args.batch, args.ctx, num_blocks, BLOCK_SIZE, 5)
                profiles.append(f"#### {name}\n\n" + markdown_table(
                    ["kernel", "launches", "µs / replay"], [[f"`{k}`", c, f"{t:.0f}"] for k, c, t in kernels[:8]]))
            del graphs, hidden
            torch.cuda.empty_cache()
        llm.shutdown()
    table = markdown_table(["graph", "replay (ms)", "vs whole", "hidden vs whole (rel. err)"], rows)
    body = (table + f"\n\n- Shape {args.shape}, dummy weights, {args.dtype}, batch {args.batch}, context {args.ctx}; "
            f"best of {args.repeats} medians of 20 replays. Ceilings in this run: copy {bandwidth:.0f} GB/s, "
            f"bf16 matmul {tflops:.0f} TFLOP/s.")
    body += ("\n\nWhether the carveout reaches cuBLAS: one half batch's down_proj GEMM "
             f"([{args.batch // 2}, 14336] x [14336, 4096], bf16, 4 weight copies) through cuBLASLt:\n\n"
             + markdown_table(["SMs left free", "µs"], gemm_rows))
    if profiles:
        body += "\n\n" + "\n\n".join(profiles)
    print(body, flush=True)
    record(f"{args.shape} decode graph, batch {args.batch}, two-batch overlap",
           {name: round(ms, 3) for name, ms in times.items()}, body, headline="whole")
    return 0


def carveout_check(rows: int, carveouts: list[int], device: torch.device, gemm_sm_target) -> list[list]:
    """A GEMM's time through cuBLASLt at each carveout: it should grow as SMs are left free."""
    x = torch.randn(rows, 14336, device=device, dtype=torch.bfloat16)
    weights = [torch.randn(4096, 14336, device=device, dtype=torch.bfloat16) for _ in range(4)]
    out = []
    for k in carveouts:
        with gemm_sm_target(True, k):
            out.append([k, f"{replay_us(lambda a, w: torch.nn.functional.linear(a, w), x, weights):.1f}"])
    print(markdown_table(["SMs left free", "µs"], out), flush=True)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--ctx", type=int, default=384)
    p.add_argument("--carveouts", type=lambda t: [int(x) for x in t.split(",") if x], default=[16, 32, 48])
    p.add_argument("--forms", type=lambda t: [f for f in t.split(",") if f], default=["pipelined", "plain"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    args = p.parse_args(argv)
    if set(args.forms) - {"plain", "pipelined"}:
        raise ValueError(f"--forms takes plain and/or pipelined, got {','.join(args.forms)}")
    if args.batch < 16 or args.batch % 16:
        raise ValueError(f"--batch must be a multiple of 16 (two halves of whole 8-row groups), got {args.batch}")
    return args


if __name__ == "__main__":
    raise SystemExit(main())
