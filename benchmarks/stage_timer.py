"""Where a step's time goes: a timer around each stage of an engine step, and a short profile.

StageTimer wraps (on the instances, undone by `restore`) the scheduler, the
runner's input preparation, forward, logits and sampler, the executor call and
the whole engine step. With sync=True it synchronises the device after each
GPU stage, so the forward's time is its GPU time and the host stages are pure
host time; that slows the run, so it is used only on a separate run.
count_only=True just counts steps (decode-only or with prefill tokens).
Local executor only (one process).
"""
from __future__ import annotations

import time
from collections import defaultdict

import torch

from common import timed_generate

STAGES = ("schedule", "prepare_inputs", "forward", "logits", "sampler", "runner_rest", "engine_rest")


class InstancePatches:
    """Replaces methods on instances (torch modules included) and puts the originals back."""

    def __init__(self) -> None:
        self._undo: list[tuple[object, str, object, bool]] = []

    def patch(self, obj, name: str, replacement) -> None:
        self._undo.append((obj, name, getattr(obj, name), name in vars(obj)))
        object.__setattr__(obj, name, replacement)   # bypasses nn.Module's attribute hooks

    def restore(self) -> None:
        for obj, name, original, own in reversed(self._undo):
            if own:
                object.__setattr__(obj, name, original)
            else:
                object.__delattr__(obj, name)
        self._undo = []


class StageTimer(InstancePatches):
    def __init__(self, llm, sync: bool = True, count_only: bool = False) -> None:
        super().__init__()
        self.engine = llm.llm_engine
        self.runner = self.engine.executor.worker.runner
        self.sync = sync
        self.steps = 0
        self.decode_steps = 0
        self.totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.counts: dict[str, int] = defaultdict(int)
        self._current: dict[str, float] = {}
        self._kind = "idle"
        self._in_step = False
        # Wall time from one executor call to the next, by the kind of the later one's batch (with
        # overlapped steps that is the GPU time of the earlier batch when the loop is GPU-bound).
        self.wall: dict[str, float] = defaultdict(float)
        self.slowest: list[tuple[float, str, int]] = []
        self._last_close: float | None = None
        self._wrap(self.engine.executor, "execute_model_async", "execute")
        if not count_only:
            self._wrap(self.engine, "step", "step")
            self._wrap(self.engine.scheduler, "schedule", "schedule")
            self._wrap(self.runner, "prepare_inputs", "prepare_inputs")
            self._wrap(self.runner, "_forward", "forward", gpu=True)
            self._wrap(self.runner.model, "compute_logits", "logits", gpu=True)
            self._wrap(self.runner.sampler, "sample", "sampler", gpu=True)

    def _wrap(self, obj, name: str, stage: str, gpu: bool = False) -> None:
        original = getattr(obj, name)
        sync = self.sync and gpu and torch.cuda.is_available()

        def timed(*args, **kwargs):
            if stage == "execute":
                self._classify(args[0])
            elif stage == "step":
                self._in_step = True
            start = time.perf_counter()
            try:
                result = original(*args, **kwargs)
                if sync:
                    torch.cuda.synchronize()
            finally:
                self._current[stage] = self._current.get(stage, 0.0) + time.perf_counter() - start
                if stage == "step":
                    self._in_step = False
                if not self._in_step:   # the step (or, counting only, the executor call) is over
                    self._close()
            return result

        self.patch(obj, name, timed)

    def _classify(self, sched) -> None:
        counts = list(sched.num_scheduled_tokens.values())
        self._kind = "idle" if not counts else ("decode-only" if max(counts) == 1 else "with prefill")
        if counts:
            self.steps += 1
            self.decode_steps += self._kind == "decode-only"

    def _close(self) -> None:
        cur, self._current = self._current, {}
        if self._kind == "idle":
            return
        now = time.perf_counter()
        if self._last_close is not None:
            self.wall[self._kind] += now - self._last_close
            self.slowest = sorted(self.slowest + [(now - self._last_close, self._kind, self.steps)])[-5:]
        self._last_close = now
        step = cur.get("step", cur.get("execute", 0.0))
        execute = cur.get("execute", 0.0)
        inner = sum(cur.get(s, 0.0) for s in ("prepare_inputs", "forward", "logits", "sampler"))
        parts = {s: cur.get(s, 0.0) for s in ("schedule", "prepare_inputs", "forward", "logits", "sampler")}
        parts["runner_rest"] = max(0.0, execute - inner)
        parts["engine_rest"] = max(0.0, step - execute - parts["schedule"])
        parts["step"] = step
        for k, v in parts.items():
            self.totals[self._kind][k] += v
        self.counts[self._kind] += 1
        self._kind = "idle"

    def wall_summary(self) -> str:
        """Wall time between executor calls, by step kind, and the five longest gaps."""
        parts = [f"{kind} {t:.2f} s over {self.counts[kind]} steps ({t / max(1, self.counts[kind]) * 1e3:.1f} ms/step)"
                 for kind, t in self.wall.items()]
        slow = ", ".join(f"{t * 1e3:.0f} ms before step {i} ({kind})" for t, kind, i in reversed(self.slowest))
        return "Wall time between steps: " + "; ".join(parts) + f". Longest: {slow}."

    def table(self) -> str:
        header = ["step kind", "steps", "ms/step"] + [f"{s} (ms)" for s in STAGES]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for kind, totals in self.totals.items():
            n = self.counts[kind]
            cells = [kind, str(n), f"{totals['step'] / n * 1e3:.2f}"]
            cells += [f"{totals[s] / n * 1e3:.2f}" for s in STAGES]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def profile_steps(llm, prompts: list[list[int]], args, decode_steps: int = 3, mixed_steps: int = 2) -> str:
    """torch.profiler tables of a few steady-state steps: decode-only ones, then steps with prefill."""
    from pagedray.cluster import SamplingParams
    engine = llm.llm_engine
    params = SamplingParams(temperature=args.temperature, ignore_eos=True, max_tokens=args.output_len)
    ids = [f"prof-{i}" for i in range(len(prompts))]
    late = max(1, min(8, len(prompts) // 8))
    for rid, p in zip(ids[:-late], prompts[:-late]):
        engine.add_request(rid, {"prompt_token_ids": p}, params)
    out = []
    try:
        while engine.scheduler.num_waiting or _prefilling(engine):
            engine.step()
        for _ in range(2):
            engine.step()
        out.append(_profile(engine, decode_steps, f"{decode_steps} decode-only steps"))
        for rid, p in zip(ids[-late:], prompts[-late:]):
            engine.add_request(rid, {"prompt_token_ids": p}, params)
        out.append(_profile(engine, mixed_steps, f"{mixed_steps} steps with {late} new prompts"))
    finally:
        engine.abort_request(ids)
    return "\n\n".join(out)


def kernel_table(run, title: str, gpu: bool, rows: int = 20) -> str:
    """`run()` under torch.profiler: its time by kernel (the GPU's, else the CPU's), under `title`."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
        run()
    return (f"== {title}, {'GPU' if gpu else 'CPU'} time by kernel\n"
            + prof.key_averages().table(sort_by="cuda_time_total" if gpu else "cpu_time_total", row_limit=rows,
                                        max_name_column_width=70))


def _prefilling(engine) -> bool:
    return any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running)


def _profile(engine, steps: int, title: str) -> str:
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    avg = prof.key_averages()
    tables = []
    for key in ("self_cuda_time_total", "self_cpu_time_total"):
        try:
            tables.append(f"sorted by {key}:\n" + avg.table(sort_by=key, row_limit=15))
        except Exception as exc:  # the key's name differs between torch versions
            tables.append(f"sorted by {key}: unavailable ({exc})")
    return f"== {title} ==\n" + "\n".join(tables)


def gpu_idle_report(llm, prompts: list[list[int]], args, skip: int, steps: int, title: str, top: int = 0) -> str:
    """The engine's own loop (overlapped when it is) under torch.profiler for `steps` steps after
    `skip`: wall time of the window, GPU busy time (union of kernel and copy intervals), the rest
    idle, and the host's time blocked on events, per step. Tells a GPU-bound stretch from one where
    the GPU waits for the host. top > 0 adds the longest kernels, the longest idle gaps and a
    per-kernel table of that many rows."""
    from torch.profiler import ProfilerActivity, profile, schedule
    engine = llm.llm_engine
    patches = InstancePatches()
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                   schedule=schedule(wait=skip, warmup=2, active=steps, repeat=1))
    original = engine.step

    def step(*a, **k):
        result = original(*a, **k)
        prof.step()
        return result

    patches.patch(engine, "step", step)
    try:
        with prof:
            timed_generate(llm, prompts, args.temperature, args.output_len)
    finally:
        patches.restore()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    if not gpu:
        return f"{title}: no GPU activity recorded"
    busy, gaps, cur_start, cur_end = 0.0, [], *gpu[0]
    for start, end in gpu[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            gaps.append((start - cur_end, cur_end))
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    busy += cur_end - cur_start
    t0, span = gpu[0][0], gpu[-1][1] - gpu[0][0]
    averages = prof.key_averages()
    blocked = sum(e.cpu_time_total for e in averages if e.key == "cudaEventSynchronize")
    longest = sorted(kernels, key=lambda e: e.time_range.end - e.time_range.start)[-top:]
    lines = [f"{title}: {steps} steps after {skip}: GPU span {span / steps / 1e3:.2f} ms/step, busy "
             f"{busy / steps / 1e3:.2f} ms/step, idle {1 - busy / span:.1%}; host blocked on events "
             f"{blocked / steps / 1e3:.2f} ms/step"]
    if top:
        lines.append("  longest kernels (ms, at ms into the window): " + "; ".join(
            f"{(e.time_range.end - e.time_range.start) / 1e3:.2f} at {(e.time_range.start - t0) / 1e3:.0f} "
            f"{e.name[:60]}" for e in reversed(longest)))
        lines.append("  longest GPU idle gaps (ms, at ms into the window): " + "; ".join(
            f"{g / 1e3:.2f} at {(at - t0) / 1e3:.0f}" for g, at in sorted(gaps)[-top:][::-1]))
        lines.append("  GPU time by kernel over the window:\n" + averages.table(
            sort_by="self_cuda_time_total" if hasattr(averages[0], "self_cuda_time_total")
            else "self_device_time_total", row_limit=top))
    return "\n".join(lines)


class GpuIdleMeter(InstancePatches):
    """The fraction of a run's wall time that the GPU is idle, cheaply enough for the headline run.

    Two CUDA events per step (local executor): one recorded when the runner starts the step's
    forward, one after the step's last device work is queued (the sampled ids' copy to the host).
    On the one stream they bound the step's device work, so their sum is the GPU's busy time and
    the rest of the wall time is idle: the GPU waiting for the host (between steps) or for nothing
    (before the first and after the last). Launch gaps inside a step count as busy, so the idle
    fraction is a lower bound; `gpu_idle_report` (torch.profiler) gives the exact one for a window.
    The small input copies queued just before the forward count as idle. Where there is no CUDA
    device or no local runner, `summary()` says "n/a".
    """

    def __init__(self, llm) -> None:
        super().__init__()
        worker = getattr(llm.llm_engine.executor, "worker", None)
        runner = getattr(worker, "runner", None)
        self.available = runner is not None and torch.cuda.is_available() and runner.device.type == "cuda"
        self.steps: list[tuple[bool, object, object]] = []   # (decode-only, start event, end event)
        self._start = None
        if not self.available:
            return
        forward, execute = runner._forward, runner.execute_model_async

        def timed_forward(*args, **kwargs):
            if self._start is None:
                self._start = torch.cuda.Event(enable_timing=True)
                self._start.record()
            return forward(*args, **kwargs)

        def timed_execute(sched, *args, **kwargs):
            self._start = None
            result = execute(sched, *args, **kwargs)
            if self._start is not None:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                counts = sched.num_scheduled_tokens.values()
                self.steps.append((max(counts) == 1, self._start, end))
                self._start = None
            return result

        self.patch(runner, "_forward", timed_forward)
        self.patch(runner, "execute_model_async", timed_execute)

    def summary(self, wall_s: float) -> dict:
        """{"gpu_idle": fraction or "n/a", "gpu_busy_s", "decode_busy_ms", "decode_steps"} over a run
        of wall_s seconds (call after the run; it waits for the device)."""
        if not self.available or not self.steps:
            return {"gpu_idle": "n/a"}
        torch.cuda.synchronize()
        busy = [(decode, start.elapsed_time(end) / 1e3) for decode, start, end in self.steps]
        total = sum(t for _, t in busy)
        decode = [t for d, t in busy if d]
        return {"gpu_idle": max(0.0, 1.0 - total / wall_s), "gpu_busy_s": total,
                "decode_busy_ms": sum(decode) / len(decode) * 1e3 if decode else float("nan"),
                "decode_steps": len(decode)}


def format_gpu_idle(stats: dict) -> str:
    """The GPU-idle line of a run (see GpuIdleMeter.summary)."""
    if stats.get("gpu_idle") == "n/a":
        return "GPU idle: n/a (no CUDA device, or not the local executor)"
    return (f"GPU idle {stats['gpu_idle']:.1%} of the run's wall time (busy {stats['gpu_busy_s']:.2f} s by "
            f"CUDA events around each step's device work; a lower bound); decode-only steps: GPU busy "
            f"{stats['decode_busy_ms']:.2f} ms each over {stats['decode_steps']} steps")
