"""Prometheus metrics of one serving engine.

Latencies (TTFT, time per output token, end to end) are histograms observed as
requests progress; engine state (queue, running, KV usage, prefix-cache hit rate,
token counters, tokens/s) is read from the engine's latest stats at scrape time.
Each instance has its own registry, so several engines (or tests) never collide.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0)


class _RateWindow:
    """Tokens per second over the last `window` seconds, from a running total."""

    def __init__(self, window: float = 10.0, spacing: float = 0.25) -> None:
        self.window, self.spacing = window, spacing
        self._samples: deque[tuple[float, int]] = deque()
        self._latest: tuple[float, int] | None = None
        self._lock = threading.Lock()

    def record(self, total: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._latest = (now, total)
            if not self._samples or now - self._samples[-1][0] >= self.spacing:
                self._samples.append((now, total))

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            # Keep one sample at or before the window's start as the baseline.
            while len(self._samples) > 1 and self._samples[1][0] <= now - self.window:
                self._samples.popleft()
            if not self._samples or self._latest is None:
                return 0.0
            t0, n0 = self._samples[0]
            return (self._latest[1] - n0) / (now - t0) if now > t0 else 0.0


class ServingMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.ttft = Histogram("pagedray_time_to_first_token_seconds", "Time from arrival to the first token",
                              buckets=_TTFT_BUCKETS, registry=self.registry)
        self.tpot = Histogram("pagedray_time_per_output_token_seconds",
                              "Mean time between output tokens of a finished request",
                              buckets=_TPOT_BUCKETS, registry=self.registry)
        self.e2e = Histogram("pagedray_e2e_request_latency_seconds", "Time from arrival to the last token",
                             buckets=_E2E_BUCKETS, registry=self.registry)
        self.finished = Counter("pagedray_completions_finished", "Finished completions by reason",
                                ["finish_reason"], registry=self.registry)
        self.throughput = _RateWindow()
        self._get_stats: Callable[[], Any] = lambda: None
        # name -> (doc, read): gauges read at scrape time from outside the engine (e.g. replica counts).
        self.extra_gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        self.registry.register(_EngineStatsCollector(self))
        self._http = None

    def bind(self, get_stats: Callable[[], Any]) -> None:
        """Where scrapes read engine state: a callable returning the latest EngineStats or None."""
        self._get_stats = get_stats

    def add_gauge(self, name: str, doc: str, read: Callable[[], float]) -> None:
        """A gauge whose value `read()` returns at each scrape (replaces one of the same name)."""
        self.extra_gauges[name] = (doc, read)

    def observe_ttft(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def observe_tpot(self, seconds: float) -> None:
        self.tpot.observe(seconds)

    def observe_e2e(self, seconds: float) -> None:
        self.e2e.observe(seconds)

    def observe_finished(self, finish_reason: str) -> None:
        self.finished.labels(finish_reason=finish_reason).inc()

    def serve_http(self, port: int, host: str = "127.0.0.1") -> int:
        """Expose /metrics over HTTP; returns the bound port (pass 0 to pick a free one)."""
        try:
            self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise OSError(f"metrics: cannot listen on {host}:{port}: {exc.strerror}") from exc
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _EngineStatsCollector:
    def __init__(self, metrics: ServingMetrics) -> None:
        self.metrics = metrics

    def describe(self):
        return []  # collected lazily; nothing to check at registration

    def collect(self):
        for name, (doc, read) in list(self.metrics.extra_gauges.items()):
            yield GaugeMetricFamily(name, doc, value=float(read()))
        stats = self.metrics._get_stats()
        if stats is None:
            return
        gauges = {
            "pagedray_num_requests_running": ("Requests being scheduled", stats.num_running),
            "pagedray_num_requests_waiting": ("Requests queued for KV blocks", stats.num_waiting),
            "pagedray_kv_cache_usage_ratio": ("Fraction of KV blocks in use",
                                              stats.num_used_blocks / max(1, stats.num_total_blocks)),
            "pagedray_kv_cache_used_blocks": ("KV blocks in use", stats.num_used_blocks),
            "pagedray_kv_cache_total_blocks": ("KV blocks in all", stats.num_total_blocks),
            "pagedray_prefix_cache_hit_rate": ("Prompt tokens served from the prefix cache, fraction",
                                               stats.prefix_cache_hit_rate),
            "pagedray_generation_tokens_per_second": ("Output tokens per second, last 10 s",
                                                      self.metrics.throughput.rate()),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=float(value))
        counters = {
            "pagedray_prompt_tokens": ("Prompt tokens admitted", stats.prompt_tokens_total),
            "pagedray_generation_tokens": ("Output tokens generated", stats.generation_tokens_total),
            "pagedray_preemptions": ("Requests preempted for KV blocks", stats.num_preemptions),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=float(value))
        if getattr(stats, "spec_num_drafts", 0):
            yield from _spec_decode_counters(stats)


def _spec_decode_counters(stats):
    """vLLM's speculative-decoding counters under our prefix (the mean acceptance length is
    1 + accepted / drafts, as vLLM's dashboards compute it)."""
    for name, doc, value in (
            ("pagedray_spec_decode_num_drafts", "Verification steps with proposals", stats.spec_num_drafts),
            ("pagedray_spec_decode_num_draft_tokens", "Proposed tokens", stats.spec_num_draft_tokens),
            ("pagedray_spec_decode_num_accepted_tokens", "Accepted proposed tokens",
             stats.spec_num_accepted_tokens),
            ("pagedray_spec_decode_num_backed_off_steps",
             "Request-steps without proposals because the request's speculation was backed off "
             "(speculative_config.backoff_after_failed_steps)", stats.spec_num_backed_off_steps)):
        yield CounterMetricFamily(name, doc, value=float(value))
    per_pos = CounterMetricFamily("pagedray_spec_decode_num_accepted_tokens_per_pos",
                                  "Accepted proposed tokens by position", labels=["position"])
    for pos, value in enumerate(stats.spec_num_accepted_tokens_per_pos):
        per_pos.add_metric([str(pos)], float(value))
    yield per_pos
