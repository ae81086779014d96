"""Speculative decoding: decode time per output token with and without speculation, side by side in
one run, with the measured acceptance.

    python benchmarks/spec_decode.py --part smollm2            # (a) default model, n-gram, copying task
    python benchmarks/spec_decode.py --part 8b                 # (b) 8B shape, batch 1, k=4
    python benchmarks/spec_decode.py --part batch64            # (c) 8B shape, batch 64 throughput
    python benchmarks/spec_decode.py --part 8b --shape tiny --device cpu --output-len 8   # CPU check
    python benchmarks/spec_decode.py --part 8b --tensor-parallel-size 2 --runs draft_identical,eagle3
    python benchmarks/spec_decode.py --part 8b --runs oracle,random --overlap   # overlapped vs serial steps
    python benchmarks/spec_decode.py --part 8b --runs random --backoff-off-too --profile   # kernels of a verification
    python benchmarks/spec_decode.py --part 8b --runs oracle,random --overlap --backoff-off-too

(a) SmolLM2 (real weights) greedy at batch 1 on a "repeat this code with one change" prompt, n-gram
    proposals (k=4, prompt_lookup 1..4) against the same engine without speculation.
(b) The 8B shape (random weights) at batch 1, k=4:
    - draft_identical: a draft model with the target's own weights (acceptance 1; the draft costs as
      much as the target, so this bounds the mechanism with an expensive drafter);
    - draft_random: a 2-layer draft of the same shape whose LM head differs (acceptance ~0: overhead);
    - oracle: proposals read from the baseline's own greedy output (acceptance 1 at no drafting cost:
      the verification mechanism's ceiling); random: random proposals (its overhead alone). Both
      replace the n-gram lookup's proposals in this process (benchmark-only; the engine is the same);
      --overlap runs them (and ngram) with overlapped steps too (the lookup then runs on the worker).
    Speculation backs off per request whose proposals keep failing (speculative_config's default
    backoff_after_failed_steps=4, backoff_max_steps=64): "back-off on" rows are what users get; with
    --backoff-off-too every run but oracle (acceptance 1 never backs off) runs again with back-off
    off ("back-off off": every step verifies, the raw cost of a verification).
(c) The 8B shape at batch 64: output tokens/s without speculation, with oracle proposals and with
    n-gram proposals (random prompts: few matches).
Time per output token = (T(N) - T(1)) / (N - 1) over one generate of N and one of 1 token.
"verifying steps / token": the timed run's steps with proposals per output token and request.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time

from common import SHAPES, append_results, markdown_table, random_prompts, write_config

CODE = '''def moving_average(values, window):
    """Average of each run of `window` consecutive values."""
    if window <= 0:
        raise ValueError("window must be positive")
    out = []
    total = sum(values[:window])
    out.append(total / window)
    for i in range(window, len(values)):
        total += values[i] - values[i - window]
        out.append(total / window)
    return out
'''
COPY_PROMPT = ("Here is a Python function:\n\n```python\n" + CODE + "```\n\nRewrite it exactly as it is, "
               "but rename the function to `rolling_mean`:\n\n```python\n")


def _shutdown(llm) -> None:
    """Shut the engine down; on CUDA, say what the process still holds (the next engine profiles
    its KV budget against it)."""
    llm.shutdown()
    import torch
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        print(f"after shutdown: {torch.cuda.memory_allocated() / 2**30:.2f} GiB allocated, "
              f"{torch.cuda.memory_reserved() / 2**30:.2f} GiB reserved, {(total - free) / 2**30:.2f} GiB "
              f"in use on the device", flush=True)


def _generate(llm, prompts, max_tokens: int) -> tuple[float, list[list[int]]]:
    from pagedray.cluster import SamplingParams
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    return time.perf_counter() - start, [list(o.outputs[0].token_ids) for o in outs]


def _measure(llm, prompts, output_len: int, repeats: int, after_warmup=None) -> dict:
    """Decode ms per output token (per request) and the acceptance of the timed runs."""
    warm = _generate(llm, prompts, output_len)[1]            # warm-up (kernels, allocator)
    if after_warmup is not None:
        after_warmup(warm)
    before = llm.llm_engine.get_stats()
    # Twice at least: the first one-token run after the warm-up paid a one-off (a negative ms/token
    # on an H100 with --repeats 1).
    t1 = min(_generate(llm, prompts, 1)[0] for _ in range(max(2, repeats)))
    runs = [_generate(llm, prompts, output_len) for _ in range(repeats)]
    tn, tokens = min(r[0] for r in runs), runs[0][1]
    after = llm.llm_engine.get_stats()
    drafts = after.spec_num_draft_tokens - before.spec_num_draft_tokens
    accepted = after.spec_num_accepted_tokens - before.spec_num_accepted_tokens
    steps = after.spec_num_drafts - before.spec_num_drafts
    # (steps with proposals of the timed runs: one-token runs make none)
    verifying = steps / (len(prompts) * output_len * len(runs))
    return {"ms_per_token": 1e3 * (tn - t1) / (output_len - 1), "verifying": verifying,
            "tokens_per_s": len(prompts) * (output_len - 1) / (tn - t1),
            "acceptance": accepted / drafts if drafts else None,
            "mean_accept_len": 1 + accepted / steps if steps else None, "tokens": tokens}


def _profile(llm, prompts, output_len: int, label: str) -> None:
    """--profile: device (or CPU) time by kernel over one timed generate, printed to stderr — where a
    verification step's extra time goes against the plain engine's step."""
    import torch
    from stage_timer import kernel_table
    print(kernel_table(lambda: _generate(llm, prompts, output_len), f"{label}: {len(prompts)} x {output_len} tokens",
                       torch.cuda.is_available()), file=sys.stderr, flush=True)


def _patch_proposals(llm, propose) -> None:
    """Replace the n-gram lookup's proposals in this in-process engine (benchmark-only): on the driver
    for serial steps, on the worker for overlapped ones (async scheduling: the lookup runs there,
    on the worker's tokens, the unread step's included). `propose(prompt, num_outputs, k)`."""
    spec = llm.llm_engine.scheduler.spec
    worker_spec = llm.llm_engine.executor.worker.runner.spec
    if worker_spec.overlapped:
        from pagedray.workers.spec_decode.runner import Drafts

        def lookup(runner, groups):
            lists = []
            for rid, _, _ in groups:
                state = runner.requests[rid]
                n = state.num_prompt_tokens
                lists.append(propose(state.token_ids[:n], len(state.token_ids) - n, spec.k))
            return Drafts([rid for rid, _, _ in groups], lists=lists)
        worker_spec._ngram = lookup
        return

    # (the lookup only: the back-off still decides which steps propose)
    spec.lookup = lambda request: propose(request.prompt_token_ids, request.num_output_tokens, spec.k)


def _oracle(reference: dict[tuple, list[int]]):
    """Proposals read from `reference` (prompt -> its greedy output), which the warm-up run replaces
    by this engine's own output (a bf16 near-tie may resolve otherwise in a 5-row verification than in
    the baseline's 1-row step, and the baseline's continuation would be wrong from there on)."""
    def propose(prompt, n, k):
        return reference[tuple(prompt)][n:n + k]
    return propose


def _settle_oracle(llm, prompts, output_len: int, reference: dict[tuple, list[int]], rounds: int = 8) -> None:
    """Run with the oracle's proposals until its output is its reference: dummy weights leave many bf16
    near-ties, which a 5-row verification resolves otherwise than the run the reference came from
    (acceptance 0.435 on an H100 with one round). Once a run reproduces its reference every proposal
    was accepted, and every later run verifies the same rows, so it reproduces it again."""
    for _ in range(rounds):
        tokens = _generate(llm, prompts, output_len)[1]
        if all(reference[tuple(p["prompt_token_ids"])] == t for p, t in zip(prompts, tokens)):
            return
        reference.update((tuple(p["prompt_token_ids"]), t) for p, t in zip(prompts, tokens))


def _random(vocab: int):
    rng = random.Random(0)
    return lambda prompt, n, k: [rng.randrange(vocab) for _ in range(k)]


def _row(name: str, r: dict, base: dict) -> list:
    acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.3f}"
    alen = "-" if r["mean_accept_len"] is None else f"{r['mean_accept_len']:.2f}"
    verifying = f"{r['verifying']:.3f}" if r.get("verifying") else "-"
    return [name, f"{r['ms_per_token']:.2f}", f"{r['tokens_per_s']:.0f}", f"{base['ms_per_token'] / r['ms_per_token']:.2f}x",
            acc, alen, verifying]


RUNS = ("oracle", "random", "ngram", "draft_identical", "draft_small", "eagle", "eagle3")
HEADER = ["run", "ms / output token (per request)", "output tok/s", "speed-up", "acceptance", "mean acceptance length",
          "verifying steps / token"]


def part_smollm2(args) -> tuple[str, list]:
    from pagedray.cluster import LLM
    from pagedray.cluster.default_model import default_model_path
    model = default_model_path()
    kw = dict(device=args.device, max_num_seqs=4)
    base_llm = LLM(model, **kw)
    prompt = base_llm.get_tokenizer().encode(COPY_PROMPT)
    prompts = [{"prompt_token_ids": prompt}]
    base = _measure(base_llm, prompts, args.output_len, args.repeats)
    base_llm.shutdown()   # its device memory back before the next engine profiles
    rows = [_row("no speculation", base, base)]
    for k in (2, 4):
        llm = LLM(model, **kw, speculative_config={"method": "ngram", "num_speculative_tokens": k,
                                                    "prompt_lookup_min": 1, "prompt_lookup_max": 4})
        r = _measure(llm, prompts, args.output_len, args.repeats)
        same = r["tokens"] == base["tokens"]
        rows.append(_row(f"ngram k={k} (same tokens: {same})", r, base))
        llm.shutdown()
    return "Speculative decoding (a): SmolLM2-135M, batch 1, n-gram on a copying prompt", rows


def _target(args, root: str) -> str:
    return write_config(args.shape, root)


def _small_draft(args, root: str) -> str:
    import transformers
    cls_name, kwargs = SHAPES[args.shape]
    # Fewer layers than the target: the dummy weights' stream then gives it another LM head.
    layers = 2 if kwargs["num_hidden_layers"] > 2 else 1
    getattr(transformers, cls_name)(**dict(kwargs, num_hidden_layers=layers), dtype="bfloat16").save_pretrained(root)
    return root


def _eagle_head(args, root: str, eagle3: bool) -> str:
    """config.json of a one-layer EAGLE / EAGLE-3 head for the shape (random weights: load_format dummy)."""
    import transformers
    cls_name, kwargs = SHAPES[args.shape]
    arch = "LlamaForCausalLMEagle3" if eagle3 else "LlamaForCausalLM"
    getattr(transformers, cls_name)(**dict(kwargs, num_hidden_layers=1, architectures=[arch]),
                                    dtype="bfloat16").save_pretrained(root)
    return root


def part_8b(args, batch: int) -> tuple[str, list]:
    from pagedray.cluster import LLM
    tmp = tempfile.mkdtemp()
    target = _target(args, f"{tmp}/target")
    vocab = SHAPES[args.shape][1]["vocab_size"]
    prompts = [{"prompt_token_ids": p} for p in random_prompts(batch, args.input_len, vocab)]
    kw = dict(device=args.device, load_format="dummy", max_num_seqs=batch, max_model_len=args.input_len + 2 * args.output_len + 16)
    if args.tensor_parallel_size > 1:   # the drafters shard with the target (Ray executor)
        kw.update(executor="ray", tensor_parallel_size=args.tensor_parallel_size)
    k = args.k
    llm = LLM(target, **kw)
    base = _measure(llm, prompts, args.output_len, args.repeats)
    if args.profile:
        _profile(llm, prompts, args.output_len, "no speculation")
    _shutdown(llm)
    reference = {tuple(p["prompt_token_ids"]): t for p, t in zip(prompts, base["tokens"])}
    rows = [_row("no speculation", base, base)]
    ngram = {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 1, "prompt_lookup_max": 4}
    def own_output(prompts_, tokens):
        reference.update((tuple(p["prompt_token_ids"]), t) for p, t in zip(prompts_, tokens))
    runs = {"oracle": ("oracle proposals (acceptance 1, free drafter)", lambda: ngram, _oracle(reference)),
            "random": ("random proposals (acceptance ~0, free drafter)", lambda: ngram, _random(vocab)),
            "ngram": ("n-gram", lambda: ngram, None),
            "draft_identical": ("draft model, identical weights",
                                lambda: {"method": "draft_model", "model": target, "num_speculative_tokens": k}, None),
            "draft_small": ("draft model, 2 layers, another head",
                            lambda: {"method": "draft_model", "model": _small_draft(args, f"{tmp}/draft"),
                                     "num_speculative_tokens": k}, None),
            "eagle": ("EAGLE head, random weights (its overhead)",
                      lambda: {"method": "eagle", "model": _eagle_head(args, f"{tmp}/eagle", False),
                               "num_speculative_tokens": k}, None),
            "eagle3": ("EAGLE-3 head, random weights (its overhead)",
                       lambda: {"method": "eagle3", "model": _eagle_head(args, f"{tmp}/eagle3", True),
                                "num_speculative_tokens": k}, None)}
    chosen = args.runs.split(",") if args.runs else (list(runs) if batch == 1 else ["oracle", "random", "ngram"])
    for key in chosen:
        name, cfg, propose = runs[key]
        # A drafter's runs overlap steps by default (async scheduling); --serial-too adds the same run
        # without the overlap beside it.
        # --overlap: the n-gram runs (oracle, random, ngram) overlapped and serial side by side.
        free = propose is not None or key == "ngram"
        modes = [True, False] if args.tensor_parallel_size == 1 and (
            args.serial_too and not free or args.overlap and free) else [None]
        # --backoff-off-too: beside the default (back-off on), every step verifying (its raw overhead);
        # the oracle's proposals are all accepted, so back-off never changes it.
        backoffs = [True, False] if args.backoff_off_too and key != "oracle" else [None]
        for overlap, backoff in ((o, b) for o in modes for b in backoffs):
            spec = cfg() if backoff is not False else dict(cfg(), backoff_after_failed_steps=0)
            llm = LLM(target, **kw, speculative_config=spec, async_scheduling=overlap)
            if propose is not None:
                _patch_proposals(llm, propose)
            oracle = name.startswith("oracle")
            if oracle:
                _settle_oracle(llm, prompts, args.output_len, reference)
            r = _measure(llm, prompts, args.output_len, args.repeats,
                         (lambda tokens: own_output(prompts, tokens)) if oracle else None)
            mode = "" if len(modes) == 1 else (", overlapped steps" if overlap else ", serial steps")
            if backoff is not None:
                mode += ", back-off on" if backoff else ", back-off off (every step verifies)"
            rows.append(_row(f"{name}, k={k}{mode}", r, base))
            if args.profile:
                _profile(llm, prompts, args.output_len, f"{name}, k={k}{mode}")
            _shutdown(llm)
    what = "(b) batch 1" if batch == 1 else f"(c) batch {batch}"
    tp = f", tensor_parallel_size={args.tensor_parallel_size}" if args.tensor_parallel_size > 1 else ""
    return f"Speculative decoding {what}: {args.shape} (random weights), input {args.input_len}{tp}", rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("smollm2", "8b", "batch64"), required=True)
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--batch", type=int, default=64, help="--part batch64's batch size")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--runs", help="--part 8b/batch64: comma-separated subset of oracle, random, ngram, draft_identical, "
                                  "draft_small, eagle, eagle3 (default: all at batch 1; oracle, random, ngram at batch 64); "
                                  "the baseline always runs")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="--part 8b/batch64: target and drafter sharded over this many GPUs (Ray executor; "
                        "steps are not overlapped there)")
    p.add_argument("--overlap", action="store_true",
                   help="--part 8b/batch64: the oracle, random and ngram runs (serial by default) also with "
                        "overlapped steps (async_scheduling=True; the n-gram lookup, or its replacement, runs on the worker)")
    p.add_argument("--profile", action="store_true",
                   help="--part 8b/batch64: after each row's timing, its time by kernel over one more generate "
                        "(stderr): where a verification step's extra time goes")
    p.add_argument("--backoff-off-too", action="store_true",
                   help="--part 8b/batch64: each run but oracle also with speculation's back-off off "
                        "(backoff_after_failed_steps=0: every step verifies, the raw overhead of a verification)")
    p.add_argument("--serial-too", action="store_true",
                   help="--part 8b/batch64: each drafter run also without overlapped steps (async_scheduling=False)")
    args = p.parse_args()
    if args.output_len < 2:
        raise ValueError(f"--output-len must be >= 2, got {args.output_len}")
    unknown = [r for r in (args.runs or "").split(",") if r and r not in RUNS]
    if unknown:
        raise ValueError(f"--runs: unknown {unknown}; choose from {list(RUNS)}")
    if args.part == "smollm2":
        title, rows = part_smollm2(args)
    else:
        title, rows = part_8b(args, 1 if args.part == "8b" else args.batch)
    table = markdown_table(HEADER, rows)
    print(title)
    print(table)
    print(json.dumps({"title": title, "rows": rows}))
    append_results(title, table)   # the run's record (benchmarks/records/)


if __name__ == "__main__":
    main()
