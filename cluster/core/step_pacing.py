"""Prefill pacing: how many prefill tokens a step with running decodes may carry, from step times.

Plain Python (no torch); used by the Scheduler when `SchedulerConfig.tpot_target_ratio` is set.

Every step with running decodes is in each of their TPOTs. A token budget (max_num_batched_tokens)
says nothing about what a step costs: on a GPU a decode step replays a CUDA graph, while a step that
carries a prefill chunk runs eagerly and costs a launch-bound floor plus the chunk's compute, whatever
its size. So the pacer learns what steps cost and spends a time budget instead:

- Two online least-squares fits (recent steps weigh more) of the measured step time, which flows up
  with each step's output (`ModelRunnerOutput.step_time_s`): decode-only steps on (decode tokens,
  context tokens), steps with prefill on (decode tokens, prefill tokens, context tokens).
- The target step time of the running streams is `tpot_target_ratio` x the predicted decode-only
  step at their batch and context. Each measured step with decodes adds (target - measured) to a
  credit, clamped to what `max_prefill_delay_ms` of steps at target pace leave for prefills
  (a window of that length keeps its streams' mean step time near the target).
- A step with decodes and pending prefill work carries all of it (up to the token budget) once its
  predicted step time fits target + credit; until then, a part only if that part is at least
  `min_prefill_chunk_tokens` and the fit's knee (the chunk whose compute equals the mixed step's
  fixed cost): a sliver would pay the fixed cost for little progress. Held-back arrivals thus go in
  together, one fixed cost for several prompts.

Never starves: once the oldest pending prefill (the waiting queue's head, or a running request in
chunked prefill) has waited `max_prefill_delay_ms` since its arrival, the step gets the whole
token budget, as without pacing; likewise until both fits have seen enough steps, when no decodes
run (nobody to slow down), or when step times do not flow up (an executor that does not time steps).
Speculative proposals count as decode tokens.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from operator import attrgetter
from typing import Callable, Sequence

from pagedray.cluster.core.request import Request

logger = logging.getLogger(__name__)

_COMPUTED = attrgetter("num_computed_tokens")

# Feature scales: keep the normal equations well conditioned (values of order 1).
_TOKENS = 256.0
_CONTEXT = 65536.0


class OnlineLinearFit:
    """Least squares of y on x with exponential forgetting and a small ridge on the non-intercept
    coefficients (so that a feature that never varied, e.g. always-256-token chunks, gets ~0
    weight instead of making the system singular). x[0] must be the constant 1."""

    def __init__(self, num_features: int, decay: float = 0.98, ridge: float = 1e-3) -> None:
        self.n = num_features
        self.decay = decay
        self.ridge = ridge
        self.xtx = [[0.0] * num_features for _ in range(num_features)]
        self.xty = [0.0] * num_features
        self.count = 0
        self._coef: list[float] | None = None

    def add(self, x: Sequence[float], y: float) -> None:
        d, xtx, xty = self.decay, self.xtx, self.xty
        for i in range(self.n):
            row, xi = xtx[i], x[i]
            for j in range(self.n):
                row[j] = d * row[j] + xi * x[j]
            xty[i] = d * xty[i] + xi * y
        self.count += 1
        self._coef = None

    @property
    def coef(self) -> list[float]:
        if self._coef is None:
            a = [row[:] + [b] for row, b in zip(self.xtx, self.xty)]
            for i in range(1, self.n):
                a[i][i] += self.ridge
            a[0][0] += 1e-12
            self._coef = _solve(a)
        return self._coef

    def predict(self, x: Sequence[float]) -> float:
        return sum(c * v for c, v in zip(self.coef, x))


def _solve(a: list[list[float]]) -> list[float]:
    """Gaussian elimination with partial pivoting on an augmented n x (n + 1) matrix."""
    n = len(a)
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        a[col], a[pivot] = a[pivot], a[col]
        p = a[col][col]
        if abs(p) < 1e-15:
            continue
        for r in range(col + 1, n):
            f = a[r][col] / p
            if f:
                for c in range(col, n + 1):
                    a[r][c] -= f * a[col][c]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        p = a[r][r]
        x[r] = 0.0 if abs(p) < 1e-15 else (a[r][n] - sum(a[r][c] * x[c] for c in range(r + 1, n))) / p
    return x


@dataclass
class StepShape:
    """What one step computes, as the fits see it."""
    decode_tokens: int      # rows at their decode point (one token each, plus speculative proposals)
    prefill_tokens: int
    context_tokens: int     # tokens already in the cache of the scheduled rows (attention reads)
    target_s: float | None = None    # the running streams' target step time when it was scheduled
    charged_s: float | None = None   # its predicted time, charged to the credit until it is measured


class StepTimeModel:
    """Predicted step seconds for decode-only steps and for steps with prefill."""

    MIN_DECODE_STEPS = 8
    MIN_MIXED_STEPS = 3

    def __init__(self, decay: float = 0.98) -> None:
        self.decode = OnlineLinearFit(3, decay)
        self.mixed = OnlineLinearFit(4, decay)

    @staticmethod
    def _decode_x(d: int, ctx: int) -> tuple[float, ...]:
        return (1.0, d / _TOKENS, ctx / _CONTEXT)

    @staticmethod
    def _mixed_x(d: int, p: int, ctx: int) -> tuple[float, ...]:
        return (1.0, d / _TOKENS, p / _TOKENS, ctx / _CONTEXT)

    @property
    def ready(self) -> bool:
        return self.decode.count >= self.MIN_DECODE_STEPS and self.mixed.count >= self.MIN_MIXED_STEPS

    def observe(self, shape: StepShape, seconds: float) -> None:
        if shape.prefill_tokens:
            self.mixed.add(self._mixed_x(shape.decode_tokens, shape.prefill_tokens, shape.context_tokens), seconds)
        elif shape.decode_tokens:
            self.decode.add(self._decode_x(shape.decode_tokens, shape.context_tokens), seconds)

    def decode_step(self, d: int, ctx: int) -> float:
        return self.decode.predict(self._decode_x(d, ctx))

    def mixed_step(self, d: int, p: int, ctx: int) -> float:
        return self.mixed.predict(self._mixed_x(d, p, ctx))

    def max_prefill_tokens(self, d: int, ctx: int, limit_s: float, budget: int) -> int:
        """The most prefill tokens (<= budget) whose predicted step time is at most limit_s."""
        at_zero = self.mixed_step(d, 0, ctx)
        if at_zero > limit_s:
            return 0
        per_token = self.mixed.coef[2] / _TOKENS
        if per_token <= 0:
            return budget
        return min(budget, int((limit_s - at_zero) / per_token))

    def knee_tokens(self, d: int, ctx: int) -> float:
        """The chunk whose compute equals a mixed step's fixed cost (what any prefill adds to a
        decode-only step): smaller chunks spend more on that fixed cost than on their tokens."""
        fixed = self.mixed_step(d, 0, ctx) - self.decode_step(d, ctx)
        per_token = self.mixed.coef[2] / _TOKENS
        return fixed / per_token if fixed > 0 and per_token > 0 else 0.0


@dataclass
class PacingPlan:
    """One step's decision: at most `prefill_cap` prefill tokens (the shape is for the fits)."""
    prefill_cap: int
    shape: StepShape
    held: bool = False   # prefill work was pending and the cap held (some of) it back


class PrefillPacer:
    def __init__(self, tpot_target_ratio: float, max_prefill_delay_ms: float, min_prefill_chunk_tokens: int,
                 clock: Callable[[], float] = time.time, decay: float = 0.98, speculative: bool = False) -> None:
        self.ratio = tpot_target_ratio
        self.speculative = speculative   # decode rows carry proposals: count them
        self.max_delay_s = max_prefill_delay_ms / 1000.0
        self.min_chunk = min_prefill_chunk_tokens
        self.clock = clock   # the clock of Request.arrival_time
        self.model = StepTimeModel(decay)
        # Seconds the streams may still spend above target pace; clamped to +-credit_cap_s.
        self.credit_s = 0.0
        self.credit_cap_s = self.max_delay_s * (1.0 - 1.0 / tpot_target_ratio)
        self._shapes: OrderedDict[int, StepShape] = OrderedDict()   # scheduled steps not read yet
        self.num_held_steps = 0      # steps where the cap held pending prefill back (stats, tests)
        self.num_forced_steps = 0    # steps given the whole budget because a prefill waited too long
        self.log_interval_s = 10.0   # a summary line this often (benchmarks/serving.py reads it)
        self._last_log = time.monotonic()

    # -- planning --------------------------------------------------------------
    def plan(self, running: Sequence[Request], waiting: Sequence[Request], budget: int,
             skip: frozenset[str] | set[str] = frozenset()) -> PacingPlan:
        """The prefill cap of the next step (before the scheduler builds it).

        Costs O(running) in C-level sums, plus a walk over the newest running requests: those in
        chunked prefill are always the newest (admission is first come first served, and nobody is
        admitted behind a prefill the token budget or the cap cut), so the walk stops at the first
        one at its decode point. (A pipeline may admit behind a prefill in flight, in `skip`; such a
        prefill then counts as a decode here; the scheduler still caps its chunks.)"""
        pending = prefilling = 0     # prefill tokens and requests of running requests in chunked prefill
        oldest: float | None = None  # arrival of the oldest request with prefill pending
        for r in reversed(running):
            if skip and r.request_id in skip:
                continue
            left = r.num_tokens + r.num_output_placeholders - r.num_computed_tokens
            if left <= 1:
                break
            pending += left
            prefilling += 1
            oldest = r.arrival_time if oldest is None else min(oldest, r.arrival_time)
        d = max(0, len(running) - prefilling - (len(skip) if skip else 0))
        if self.speculative:
            d += sum(len(r.spec_token_ids) for r in running if r.spec_token_ids and r.request_id not in skip)
        ctx = sum(map(_COMPUTED, running))
        if waiting:
            head = waiting[0]
            pending += head.num_tokens
            oldest = head.arrival_time if oldest is None else min(oldest, head.arrival_time)
        shape = StepShape(d, 0, ctx)
        if not pending or not d or not self.model.ready:
            return PacingPlan(budget, shape)
        if self.clock() - oldest >= self.max_delay_s:
            self.num_forced_steps += 1
            return PacingPlan(budget, shape)
        model, want = self.model, min(pending, budget)
        limit = self.ratio * model.decode_step(d, ctx) + self.credit_s
        if model.mixed_step(d, want, ctx) <= limit:
            cap = budget     # all that is pending fits: take it (and any arrival since) in one step
        else:
            # Only part fits: a chunk of it only where it is worth a mixed step's fixed cost.
            cap = model.max_prefill_tokens(d, ctx, limit, budget)
            if cap < min(max(self.min_chunk, model.knee_tokens(d, ctx)), want):
                cap = 0
        held = cap < want
        self.num_held_steps += held
        return PacingPlan(cap, shape, held)

    # -- bookkeeping -----------------------------------------------------------
    def scheduled(self, key: int, plan: PacingPlan, total_tokens: int, max_unread: int) -> None:
        """The step built from `plan` was scheduled with `total_tokens`; its time comes with its output.

        Its predicted cost is charged to the credit now and corrected when its time arrives, so that
        steps scheduled before that (overlapped steps, a pipeline) do not spend the same credit twice."""
        shape = plan.shape
        shape.prefill_tokens = max(0, total_tokens - shape.decode_tokens)
        model = self.model
        if shape.decode_tokens and model.decode.count >= StepTimeModel.MIN_DECODE_STEPS:
            d, p, ctx = shape.decode_tokens, shape.prefill_tokens, shape.context_tokens
            shape.target_s = self.ratio * model.decode_step(d, ctx)
            shape.charged_s = model.mixed_step(d, p, ctx) if p and model.ready else model.decode_step(d, ctx)
            self._add_credit(shape.target_s - shape.charged_s)
        self._shapes[key] = shape
        while len(self._shapes) > max_unread:
            self._shapes.popitem(last=False)

    def observe(self, key: int, step_time_s: float | None) -> None:
        """A step's measured time (None: not timed): update the fits and correct the credit."""
        shape = self._shapes.pop(key, None)
        if shape is None:
            return
        if step_time_s is None or step_time_s <= 0:
            if shape.charged_s is not None:
                self._add_credit(shape.charged_s - shape.target_s)     # nothing measured: undo the charge
            return
        if shape.charged_s is not None:
            self._add_credit(shape.charged_s - step_time_s)
        model = self.model
        model.observe(shape, step_time_s)
        if model.ready and time.monotonic() - self._last_log >= self.log_interval_s:
            self._last_log = time.monotonic()
            logger.info("%s", self.summary(shape))

    def _add_credit(self, seconds: float) -> None:
        cap = self.credit_cap_s
        self.credit_s = max(-cap, min(cap, self.credit_s + seconds))

    def summary(self, shape: StepShape) -> str:
        """What the fits say at this step's batch and context (a log line)."""
        d, ctx, m = max(1, shape.decode_tokens), shape.context_tokens, self.model
        return (f"prefill pacing: decode-only step {1e3 * m.decode_step(d, ctx):.2f} ms at {d} decode tokens and "
                f"{ctx} context tokens; with a 256-token prefill {1e3 * m.mixed_step(d, 256, ctx):.2f} ms, "
                f"2048 tokens {1e3 * m.mixed_step(d, 2048, ctx):.2f} ms; steps held {self.num_held_steps}, "
                f"forced {self.num_forced_steps}; credit {1e3 * self.credit_s:.1f} ms")
