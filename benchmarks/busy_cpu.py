"""The README's offline example on a CPU that is busy with other work: pagedray as it runs (OpenMP
threads wait passively, common/openmp.py) against OpenMP's default wait policy, side by side.

    python benchmarks/busy_cpu.py [--busy 2] [--max-tokens 64]

Each variant runs in a fresh process (the wait policy is fixed when torch loads) beside `--busy`
spinning processes (`yes > /dev/null`). The default-policy variant imports torch before pagedray,
which is how a process ran before the engine chose the policy (and how one that imports torch first
still runs). Needs the default model (`pagedray info` converts it).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

EXAMPLE = """
{first}
from pagedray.cluster import LLM, SamplingParams
llm = LLM()
params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens={max_tokens}, seed=0)
for out in llm.generate(["The capital of France is", {{"prompt_token_ids": [504, 3575, 282, 7158, 314]}}], params,
                        use_tqdm=False):
    print(repr(out.outputs[0].text[:60]))
"""
VARIANTS = {"pagedray (passive wait)": "", "OpenMP default wait policy": "import torch"}


def timed(first: str, max_tokens: int, busy: int) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    loops = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(busy)]
    try:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", EXAMPLE.format(first=first, max_tokens=max_tokens)], env=env,
                       check=True, cwd="/")
        return time.perf_counter() - start
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--busy", type=int, default=2, help="spinning processes beside the example")
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args(argv)
    seconds = {}
    for name, first in VARIANTS.items():
        seconds[name] = timed(first, args.max_tokens, args.busy)
        print(f"{name}: {seconds[name]:.1f} s", flush=True)
    after, before = seconds.values()
    from common import markdown_table, record
    table = markdown_table(["variant", "seconds"], [[k, f"{v:.1f}"] for k, v in seconds.items()])
    record(f"README offline example, {args.max_tokens} tokens, {args.busy} busy loops beside it",
           {"seconds": round(after, 1), "default policy / passive": f"{before / after:.2f}x"}, table,
           anchors={"OpenMP default wait policy (same run)": f"{before:.1f} s"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
