"""Host cost of one engine step, with the model's forward replaced by a near-free stub (CPU).

    python benchmarks/host_overhead.py                      # batch 1, 64, 256 x greedy/temperature x tokenizer
    python benchmarks/host_overhead.py --batch-sizes 256 --modes greedy --profile   # cProfile of one case
    python benchmarks/host_overhead.py --batch-sizes 1 64 --modes greedy --tokenizer no --loops serial overlapped \
        --speculation none wrong right --vocab 128256 --max-num-batched-tokens 512   # speculation's host work
    python benchmarks/host_overhead.py --arch qwen2 --vocab 151936 --batch-sizes 1024 --modes greedy \
        --tokenizer no --loops overlapped --max-num-batched-tokens 16384 --baseline-option gc_threshold=0

On the GPU a decode step is graph replay (GPU) plus host work during which the GPU idles
(docs/perf-notes/history.md: 5.0 ms of 12.3 ms at batch 128 for the 8B shape). This script measures only that
host work: the runner's `_forward` returns a preallocated hidden-state slice and the model's
`compute_logits` a preallocated [rows, vocab] slice (vocab 128256, the Llama-3 shape), so what
is left is the scheduler, the input tensors, the sampler, the scheduler's update and the
engine's output building (and, with a tokenizer, incremental detokenization).

Each case: B requests of --input-len random prompt token ids (ignore_eos, long max_tokens) are
prefilled, --warmup decode steps run, then --steps decode-only steps are timed per stage by
wrapping the stage methods on the instances. Stages:
  schedule           Scheduler.schedule
  prepare_inputs     ModelRunner.prepare_inputs (flat tensors, attention metadata)
  forward_stub       ModelRunner._forward + compute_logits (the stubs: ~0)
  sampler            the runner's sampler call (vocab-wide math runs on the CPU here: on a GPU
                     that part is device time, so read the greedy column as the host-side figure)
  runner_rest        the rest of ModelRunner.execute_model (state update, sampling rows, output)
  update             Scheduler.update_from_output (append tokens, stop checks)
  engine_output      the rest of LLMEngine.step (detokenize, RequestOutput objects)
The "LLM.generate" column times whole steps as LLM.generate drives them (it may ask the engine
for less than the serving path needs); the stage columns are measured on `engine.step()`.
Each case also counts the cyclic GC's collections during the timed steps (per step, and their
time), the CPU time of the LLM.generate steps (this thread's) and, over --opcode-steps more of them,
the Python bytecodes a step runs (sys.settrace): on a shared machine, where other processes stretch
wall and CPU times, that count is the figure to compare (C code is not in it). --kernel-option sets engine switches (KernelOptions); --baseline-option NAME=VALUE runs every
case again, in the same process, on an engine built with those switches instead (the GC threshold,
process-wide, is set to each engine's own value before its cases).
--speculation wrong/right runs n-gram speculation (k = --spec-k) whose lookup is replaced by proposals that
the target always rejects / always accepts (every stubbed logits row's argmax is one token, SPEC_TOKEN):
the lookup's own cost is not in it (as in spec_decode.py's random/oracle runs); `ngram` keeps the real
lookup. Serial steps look up on the driver, overlapped ones on the worker (both are patched).
The tokenizer is a synthetic byte-level BPE with the same vocabulary size (decode cost, not
quality). Torch runs with --threads threads (default 1) so that shared cores disturb less.
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import inspect
import io
import itertools
import json
import os
import pathlib
import pstats
import random
import statistics
import sys
import tempfile
import time

import torch

from common import KERNEL_OPTION_HELP, append_results, kernel_options, markdown_table, require_min
from stage_timer import InstancePatches

HIDDEN = 64
SPEC_TOKEN = 7      # every logits row's argmax under --speculation wrong/right
STAGES = ("schedule", "prepare_inputs", "forward_stub", "sampler", "runner_rest", "update", "engine_output")


# -- setup ---------------------------------------------------------------------------------------
def write_model(path: pathlib.Path, vocab: int, max_len: int, arch: str = "llama") -> str:
    """A Llama (or Qwen2) config with a tiny body and the full vocabulary (dummy weights, no checkpoint)."""
    import transformers
    cls, name = (transformers.Qwen2Config, "Qwen2ForCausalLM") if arch == "qwen2" else (
        transformers.LlamaConfig, "LlamaForCausalLM")
    cfg = cls(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
              max_position_embeddings=max_len, bos_token_id=1, eos_token_id=2,
              architectures=[name])
    cfg.save_pretrained(str(path))
    return str(path)


def write_tokenizer(path: pathlib.Path, vocab: int, seed: int = 0) -> str:
    """A byte-level BPE tokenizer of `vocab` entries: the 256 byte symbols, then random words,
    some ending in half of a two-byte character (so the partial-UTF-8 hold-back runs as on text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    symbols = _byte_symbols()
    entries = [symbols[b] for b in range(256)]
    seen = set(entries)
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    while len(entries) < vocab:
        word = ("\u0120" if rng.random() < 0.6 else "") + "".join(
            rng.choice(letters) for _ in range(rng.randint(2, 8)))
        if rng.random() < 0.05:
            word += symbols[0xC3]   # the lead byte of é, ü, ...: the next token completes it
        if word not in seen:
            seen.add(word)
            entries.append(word)
    tok = Tokenizer(models.BPE(vocab={w: i for i, w in enumerate(entries)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(str(path))
    return str(path)


def _byte_symbols() -> dict[int, str]:
    """GPT-2's byte -> printable symbol map (what ByteLevel decodes back to bytes)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


def build_llm(model: str, tokenizer: str | None, args, max_len: int, options: list[str] | None = None,
              speculation: str = "none"):
    from pagedray.cluster import LLM
    blocks = args.max_batch * -(-max_len // 16) + 16
    opts = kernel_options(args.kernel_option if options is None else options)
    # The GC threshold is process-wide and engines only raise it: each engine's own, as in a process of its own.
    gc.set_threshold(getattr(opts, "gc_threshold", 0) or DEFAULT_GC_THRESHOLD[0], *DEFAULT_GC_THRESHOLD[1:])
    return LLM(model, tokenizer=tokenizer, load_format="dummy", dtype="float32", device="cpu",
               max_model_len=max_len, max_num_seqs=args.max_batch, num_kv_blocks=blocks,
               max_num_batched_tokens=args.max_num_batched_tokens,
               enable_prefix_caching=False, seed=args.seed, kernel_options=opts,
               speculative_config=None if speculation == "none" else {
                   "method": "ngram", "num_speculative_tokens": args.spec_k,
                   "prompt_lookup_min": 1, "prompt_lookup_max": 4,
                   # every step verifies (the host work of a verification is what is measured), but
                   # under wrong-backoff: the default back-off (mostly plain steps, a probe now and then)
                   **({} if speculation == "wrong-backoff" else {"backoff_after_failed_steps": 0})})


def patch_proposals(speculation: str):
    """Replace the n-gram lookup (driver's and worker's) by proposals the stubbed target always
    rejects ("wrong") or accepts ("right"); undo with the returned function. "ngram": the real one."""
    import pagedray.cluster.core.spec as driver_spec
    import pagedray.workers.spec_decode.runner as worker_spec
    if speculation not in ("wrong", "right", "wrong-backoff"):
        return lambda: None
    token = SPEC_TOKEN if speculation == "right" else SPEC_TOKEN + 1
    originals = driver_spec.ngram_propose, worker_spec.ngram_propose

    def propose(tokens, lookup_min, lookup_max, k):
        return [token] * k
    driver_spec.ngram_propose = worker_spec.ngram_propose = propose

    def undo():
        driver_spec.ngram_propose, worker_spec.ngram_propose = originals
    return undo


def set_overlap(llm, overlapped: bool) -> None:
    """The engine's loop: the core's switch, and under speculation the scheduler's and the worker's
    (what the local executor sets at construction for async_scheduling)."""
    engine = llm.llm_engine
    core = getattr(engine, "core", engine)
    core.async_scheduling = overlapped
    if engine.scheduler.spec is not None:
        engine.scheduler.spec.overlapped = overlapped
        engine.executor.worker.runner.spec.overlapped = overlapped


DEFAULT_GC_THRESHOLD = gc.get_threshold()


def stub_model(llm, vocab: int, max_rows: int, max_tokens: int, seed: int, one_argmax: bool = False) -> None:
    """Replace the forward and the logits by slices of preallocated tensors (on the instances);
    `one_argmax`: every row's argmax is SPEC_TOKEN (speculation's proposals are then right or wrong)."""
    runner = llm.llm_engine.executor.worker.runner
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.zeros(max(max_rows, max_tokens), HIDDEN)
    logits = torch.randn(max_rows, vocab, generator=gen)
    if one_argmax:
        logits[:, SPEC_TOKEN] = 100.0

    def forward(inputs):
        return hidden[:inputs.input_ids.shape[0]]

    def compute_logits(h):
        return logits[:h.shape[0]]

    runner._forward = forward
    object.__setattr__(runner.model, "compute_logits", compute_logits)


# -- timing --------------------------------------------------------------------------------------
class Stages(InstancePatches):
    """Wraps the stage methods on the instances (undone by `restore`); seconds per stage per step."""

    def __init__(self, llm) -> None:
        super().__init__()
        engine = llm.llm_engine
        runner = engine.executor.worker.runner
        self.cur: dict[str, float] = {}
        self.steps: list[dict[str, float]] = []
        self.gc_counts = [0, 0, 0]
        self.gc_seconds = 0.0
        self._gc_start = 0.0
        gc.callbacks.append(self._on_gc)
        self._wrap(engine, "step", "step", close=True)
        self._wrap(engine.scheduler, "schedule", "schedule")
        self._wrap(engine.scheduler, "update_from_output", "update")
        self._wrap(engine.executor, "execute_model_async", "execute")
        self._wrap(runner, "prepare_inputs", "prepare_inputs")
        self._wrap(runner, "_forward", "forward_stub")
        self._wrap(runner.model, "compute_logits", "forward_stub")
        self._wrap(runner.sampler, "sample", "sampler")

    def _wrap(self, obj, name: str, stage: str, close: bool = False) -> None:
        original = getattr(obj, name)
        cur, clock = self.cur, time.perf_counter

        def timed(*a, **kw):
            start = clock()
            try:
                return original(*a, **kw)
            finally:
                cur[stage] = cur.get(stage, 0.0) + clock() - start
                if close:
                    self._close()
        self.patch(obj, name, timed)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self.gc_counts[info["generation"]] += 1
            self.gc_seconds += time.perf_counter() - self._gc_start

    def restore(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        super().restore()

    def _close(self) -> None:
        c = dict(self.cur)
        self.cur.clear()
        inner = sum(c.get(s, 0.0) for s in ("prepare_inputs", "forward_stub", "sampler"))
        c["runner_rest"] = max(0.0, c.get("execute", 0.0) - inner)
        c["engine_output"] = max(0.0, c["step"] - c.get("schedule", 0.0) - c.get("execute", 0.0)
                                 - c.get("update", 0.0))
        self.steps.append(c)

    def summary(self) -> dict[str, float]:
        n = len(self.steps)
        out = {s: sum(st.get(s, 0.0) for st in self.steps) / n * 1e3 for s in STAGES}
        out["step"] = sum(st["step"] for st in self.steps) / n * 1e3
        out["step_median"] = statistics.median(st["step"] for st in self.steps) * 1e3
        out["gc"] = self.gc_seconds / n * 1e3
        out["gc_full"] = self.gc_counts[2] / n
        out["gc_collections"] = sum(self.gc_counts) / n
        return out


def _generate_kwargs(engine) -> dict:
    """How LLM.generate calls step (it asks for finished outputs only when the engine offers that)."""
    return {"finished_only": True} if "finished_only" in inspect.signature(engine.step).parameters else {}


def generate_step_ms(engine, steps: int) -> tuple[float, float]:
    """Mean wall and CPU (this thread's) time of a step as LLM.generate drives it."""
    kwargs = _generate_kwargs(engine)
    start, cpu = time.perf_counter(), time.thread_time()
    for _ in range(steps):
        engine.step(**kwargs)
    return (time.perf_counter() - start) / steps * 1e3, (time.thread_time() - cpu) / steps * 1e3


class DeviceModel:
    """Which of the host's work a GPU would wait for (the "exposed" bytecodes), modelling the device as
    busy from a forward's launch until the host waits for that step's sampled ids, and the forward
    as longer than the host's work: a wait for the latest launched step leaves the device idle until
    the next launch. (Serial steps: everything from the wait to the next launch; overlapped plain
    steps: nothing; speculation: from the read of the verified tokens to the next launch.)"""

    def __init__(self, engine) -> None:
        self._undo: list[tuple[object, str, object]] = []
        from pagedray.workers.spec_decode import runner as spec_runner
        from pagedray.workers.step_output import StepOutput
        runner = engine.executor.worker.runner
        self.exposed = False
        self.launches = 0
        forward = runner._forward

        def launched(inputs):
            self.exposed = False
            self.launches += 1
            return forward(inputs)
        self.patch(runner, "_forward", launched)
        waits = [(StepOutput, "token_list", lambda obj: obj._token_list is None and obj.sample is not None)]
        if hasattr(spec_runner, "_Pending"):   # (a base tree may read the verified tokens at once)
            waits.append((spec_runner._Pending, "run", lambda obj: obj.finish is not None))
        for cls, name, waits_now in waits:
            self._stamp(cls)
            self._wait_on(cls, name, waits_now)
        verify = spec_runner.verify

        def waited_verify(*a, **kw):   # (at once, for the step just launched)
            self.exposed = True
            return verify(*a, **kw)
        self.patch(spec_runner, "verify", waited_verify)

    def patch(self, obj, name: str, replacement) -> None:
        self._undo.append((obj, name, getattr(obj, name)))
        setattr(obj, name, replacement)

    def restore(self) -> None:
        for obj, name, original in reversed(self._undo):
            setattr(obj, name, original)

    def _stamp(self, cls) -> None:
        """Objects of `cls` remember the launch they follow (the step they read)."""
        init = cls.__init__

        def stamped(obj, *a, **kw):
            init(obj, *a, **kw)
            obj._device_model_launch = self.launches
        self.patch(cls, "__init__", stamped)

    def _wait_on(self, cls, name: str, waits) -> None:
        original = getattr(cls, name)

        def wrapper(obj, *a, **kw):
            if waits(obj) and getattr(obj, "_device_model_launch", 0) == self.launches:
                self.exposed = True
            return original(obj, *a, **kw)
        self.patch(cls, name, wrapper)


def count_opcodes(engine, steps: int) -> dict:
    """Python bytecodes run per step as LLM.generate drives it, the functions that run the most
    (per step), and the bytecodes a GPU would wait for (`DeviceModel`): a measure of the host's
    interpreted work that other processes on a shared machine cannot disturb (C code — numpy,
    torch, dict and list builtins — is not counted; its calls are, as `c_calls`: a torch op's
    dispatch costs microseconds on the host, a bytecode tens of nanoseconds)."""
    counts: dict[str, int] = {}
    device = DeviceModel(engine)
    exposed, exposed_counts = [0], {}

    def per_opcode(frame, event, arg):
        if event == "opcode":
            code = frame.f_code
            key = "/".join(code.co_filename.rsplit("/", 2)[-2:]) + ":" + code.co_name
            counts[key] = counts.get(key, 0) + 1
            if device.exposed:
                exposed[0] += 1
                exposed_counts[key] = exposed_counts.get(key, 0) + 1
        return per_opcode

    def per_call(frame, event, arg):
        frame.f_trace_opcodes = True
        return per_opcode

    c_calls = [0, 0]   # calls of C functions (torch ops, numpy, builtins), and those a GPU waits for

    exposed_c: dict[str, int] = {}

    def per_c_call(frame, event, arg):
        if event == "c_call":
            c_calls[0] += 1
            if device.exposed:
                c_calls[1] += 1
                key = getattr(arg, "__qualname__", None) or getattr(arg, "__name__", "?")
                exposed_c[key] = exposed_c.get(key, 0) + 1

    kwargs = _generate_kwargs(engine)
    sys.settrace(per_call)
    sys.setprofile(per_c_call)
    try:
        for _ in range(steps):
            engine.step(**kwargs)
    finally:
        sys.setprofile(None)
        sys.settrace(None)
        device.restore()
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:10]
    top_exposed = sorted(exposed_counts.items(), key=lambda kv: -kv[1])[:10]
    return {"opcodes": sum(counts.values()) / steps, "top_opcodes": [(k, v / steps) for k, v in top],
            "exposed_opcodes": exposed[0] / steps, "top_exposed_opcodes": [(k, v / steps) for k, v in top_exposed],
            "c_calls": c_calls[0] / steps, "exposed_c_calls": c_calls[1] / steps,
            "top_exposed_c_calls": [(k, v / steps) for k, v in sorted(exposed_c.items(), key=lambda kv: -kv[1])[:15]]}


_CASE = itertools.count()


def spec_stats(llm) -> dict:
    """The speculation counters so far (over every case of this engine)."""
    spec = llm.llm_engine.scheduler.spec
    return {"accepted": f"{spec.num_accepted_tokens}/{spec.num_draft_tokens}"}


def run_case(llm, batch: int, mode: str, args) -> dict:
    from pagedray.cluster import SamplingParams
    engine = llm.llm_engine
    vocab = engine.model_config.vocab_size
    rng = random.Random(args.seed + batch)
    # Nobody may finish while timed: the first admitted decode through the others' prefill too.
    params = SamplingParams(temperature=0.0 if mode == "greedy" else 1.0, ignore_eos=True,
                            max_tokens=args.max_len - args.input_len)
    # (ids unique over the cases: a worker may still hold a request aborted by the case before)
    ids = [f"b{batch}-{mode}-{next(_CASE)}-{i}" for i in range(batch)]
    # As LLM.generate adds them (final only: the core sends each request's tokens when it finishes).
    final = {"final_only": True} if "final_only" in inspect.signature(engine.add_request).parameters else {}
    for rid in ids:
        prompt = [rng.randrange(3, vocab) for _ in range(args.input_len)]
        engine.add_request(rid, {"prompt_token_ids": prompt}, params, **final)
    while engine.scheduler.num_waiting or any(
            r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running):
        engine.step()
    for _ in range(args.warmup):
        engine.step()
    stages = Stages(llm)
    prof = cProfile.Profile() if args.profile else None
    try:
        if prof:
            prof.enable()
        for _ in range(args.steps):
            engine.step()
        if prof:
            prof.disable()
    finally:
        stages.restore()
    result = stages.summary()
    result["generate_step"], result["generate_step_cpu"] = generate_step_ms(engine, args.steps)
    if args.opcode_steps:
        result.update(count_opcodes(engine, args.opcode_steps))
    running = engine.scheduler.num_running
    if running != batch or any(r.is_finished for r in engine.scheduler.running):
        raise RuntimeError(f"batch {batch}: {running} requests still running after the timed steps")
    engine.abort_request(ids)
    if prof:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(35)
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
        result["profile"] = buf.getvalue()
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    max_len = args.max_len
    rows, profiles = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        model = write_model(root / "model", args.vocab, max_len, args.arch)
        tok = write_tokenizer(root / "tok", args.vocab) if "yes" in args.tokenizer else None
        variants = [("engine", None)] + ([("baseline", args.baseline_option)] if args.baseline_option else [])
        for (variant, options), use_tok, spec in itertools.product(variants, args.tokenizer, args.speculation):
            llm = build_llm(model, tok if use_tok == "yes" else None, args, max_len, options, spec)
            # (a verification's rows: up to k + 1 per request)
            rows_max = args.max_batch * (args.spec_k + 1 if spec != "none" else 1)
            stub_model(llm, args.vocab, rows_max, args.max_num_batched_tokens, args.seed,
                       spec in ("wrong", "right", "wrong-backoff"))
            undo = patch_proposals(spec)
            try:
                for batch, mode, loop in itertools.product(args.batch_sizes, args.modes, args.loops):
                    set_overlap(llm, loop == "overlapped")
                    r = run_case(llm, batch, mode, args)
                    if spec != "none":
                        r.update(spec_stats(llm))
                    rows.append([variant, batch, mode, use_tok, loop, spec, r.get("accepted", "-")]
                                + [f"{r[s]:.3f}" for s in STAGES]
                                + [f"{r['step']:.3f}", f"{r['step'] - r['sampler']:.3f}",
                                   f"{r['generate_step']:.3f}", f"{r['generate_step_cpu']:.3f}",
                                   f"{r['opcodes'] / 1e3:.1f}" if "opcodes" in r else "-",
                                   f"{r['exposed_opcodes'] / 1e3:.1f}" if "opcodes" in r else "-",
                                   f"{r['c_calls']:.0f} / {r['exposed_c_calls']:.0f}" if "opcodes" in r else "-",
                                   f"{r['gc']:.3f}", f"{r['gc_full']:.3f}"])
                    print(json.dumps({"variant": variant, "batch": batch, "mode": mode, "tokenizer": use_tok,
                                      "loop": loop, "speculation": spec,
                                      **{k: round(v, 4) if isinstance(v, float) else v
                                         for k, v in r.items() if k != "profile"}}), flush=True)
                    if "profile" in r:
                        profiles.append(f"== batch {batch} {mode} tokenizer={use_tok} {loop} "
                                        f"speculation={spec}\n{r['profile']}")
            finally:
                undo()
            llm.shutdown()
    header = (["engine", "batch", "sampling", "tokenizer", "loop", "speculation", "accepted / proposed"]
              + [f"{s} (ms)" for s in STAGES]
              + ["step (ms)", "step - sampler (ms)", "LLM.generate step (ms)", "its CPU time (ms)",
                 "its Python bytecodes (thousands)", "of them a GPU waits for (thousands)",
                 "C calls (torch ops, numpy, builtins) / those a GPU waits for", "GC (ms)",
                 "full GCs / step"])
    notes = (f"- CPU ({os.cpu_count()} cores, shared), torch threads {args.threads}; prompts of {args.input_len} "
             f"token ids; {args.warmup} warm-up decode steps, then means over {args.steps} decode-only steps; "
             f"vocab {args.vocab}; forward and logits stubbed; temperature mode = temperature 1.0, no "
             f"top-k/top-p; model {args.arch}; kernel options {args.kernel_option or 'default'}"
             f"{'; baseline: ' + ' '.join(args.baseline_option) if args.baseline_option else ''}"
             f"{f'; speculation: n-gram k={args.spec_k} (wrong/right: lookup replaced, proposals always rejected/accepted)' if set(args.speculation) - {'none'} else ''}."
             f"{' ' + args.label if args.label else ''}")
    body = markdown_table(header, rows) + "\n\n" + notes
    print(body)
    for p in profiles:
        print(p)
    append_results(f"Host overhead per step{' (' + args.label + ')' if args.label else ''}", body,
                   args.results)
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--modes", nargs="+", choices=["greedy", "temperature"], default=["greedy", "temperature"])
    p.add_argument("--tokenizer", nargs="+", choices=["no", "yes"], default=["no", "yes"])
    p.add_argument("--loops", nargs="+", choices=["serial", "overlapped"], default=["serial"],
                   help="the engine's loop; on the CPU nothing overlaps, so 'overlapped' shows its extra host work")
    p.add_argument("--speculation", nargs="+", choices=["none", "wrong", "right", "ngram", "wrong-backoff"],
                   default=["none"],
                   help="n-gram speculation (k = --spec-k) with proposals always rejected / always accepted "
                        "(the lookup replaced), or the real lookup; none: without speculation; every step with "
                        "proposals verifies (back-off off), but wrong-backoff: always rejected with the default "
                        "back-off (speculative_config.backoff_after_failed_steps)")
    p.add_argument("--spec-k", type=int, default=4)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="the engine's step token budget")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--arch", choices=["llama", "qwen2"], default="llama", help="the tiny body's architecture")
    p.add_argument("--kernel-option", action="append", default=[], help=KERNEL_OPTION_HELP)
    p.add_argument("--baseline-option", action="append", default=[],
                   help="NAME=VALUE: run every case again on an engine with these options (the baseline)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="print a cProfile of each case's timed steps")
    p.add_argument("--opcode-steps", type=int, default=3,
                   help="steps whose Python bytecodes are counted (sys.settrace; 0: none)")
    p.add_argument("--label", default="")
    p.add_argument("--results", default=None, help="also append the table to this markdown file (the run is always recorded in benchmarks/records/)")
    args = p.parse_args(argv)
    require_min(args, 1, "input_len", "steps", "vocab", "threads", "spec_k")
    require_min(args, 0, "warmup")
    if min(args.batch_sizes) < 1:
        raise ValueError(f"--batch-sizes must be >= 1, got {args.batch_sizes}")
    args.max_batch = max(args.batch_sizes)
    if args.max_num_batched_tokens < args.max_batch:
        raise ValueError(f"--max-num-batched-tokens ({args.max_num_batched_tokens}) must be >= the largest "
                         f"batch ({args.max_batch})")
    # (a step emits up to k + 1 tokens under speculation)
    per_step = args.spec_k + 1 if set(args.speculation) - {"none"} else 1
    args.max_len = args.input_len + (_prefill_steps(args) + args.warmup + 2 * args.steps + args.opcode_steps + 16) * per_step
    return args


def _prefill_steps(args) -> int:
    """Steps until the largest batch is prefilled: each step's budget goes to the running
    sequences' decode tokens first, the rest to prompt chunks (so the first admitted request
    decodes through all of them)."""
    left, running, steps = args.max_batch * args.input_len, 0, 0
    while left > 0:
        chunk = min(left, args.max_num_batched_tokens - running)
        left -= chunk
        running = min(args.max_batch, (args.max_batch * args.input_len - left) // args.input_len)
        steps += 1
    return steps + 1


if __name__ == "__main__":
    sys.exit(main())
