"""Prometheus metrics, one CollectorRegistry per app (so tests can run several apps in one process).

Engine gauges and cumulative counters are read from the AsyncLLMEngine's stats snapshot at scrape time;
token counters and latency histograms are observed by the serving code as outputs arrive.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tokenmill.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0,
                    40.0, 80.0)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], dict[str, int]], model: str) -> None:
        self._stats = stats
        self._model = model

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        labels = ["model_name"]

        def gauge(name: str, doc: str, key: str) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=labels)
            family.add_metric([self._model], float(stats.get(key, 0)))
            return family

        def counter(name: str, doc: str, key: str) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=labels)
            family.add_metric([self._model], float(stats.get(key, 0)))
            return family

        yield gauge("tokenmill_num_requests_running", "Sequences being computed this step.", "num_running")
        yield gauge("tokenmill_num_requests_waiting", "Sequences waiting to be scheduled.", "num_waiting")
        yield gauge("tokenmill_kv_blocks_used", "KV blocks held by requests.", "kv_blocks_used")
        yield gauge("tokenmill_kv_blocks_total", "KV blocks in the pool.", "kv_blocks_total")
        yield counter("tokenmill_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache.",
                      "prefix_cache_queried_tokens")
        yield counter("tokenmill_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache.",
                      "prefix_cache_hit_tokens")
        yield counter("tokenmill_num_preemptions", "Requests preempted to free KV blocks.", "num_preemptions")
        yield counter("tokenmill_spec_decode_num_verify_steps", "Request-steps that verified draft tokens.",
                      "spec_num_verify_steps")
        yield counter("tokenmill_spec_decode_num_draft_tokens", "Draft tokens proposed and verified.",
                      "spec_num_draft_tokens")
        yield counter("tokenmill_spec_decode_num_accepted_tokens", "Draft tokens accepted by the target.",
                      "spec_num_accepted_tokens")
        yield gauge("tokenmill_spec_decode_acceptance_rate", "Accepted / drafted tokens since start.",
                    "spec_acceptance_rate")
        yield gauge("tokenmill_spec_decode_mean_accepted_length", "Tokens emitted per verify step since start.",
                    "spec_mean_accepted_length")
        yield from _kv_tier_metrics(stats, self._model)
        per_position = GaugeMetricFamily("tokenmill_spec_decode_per_position_acceptance",
                                         "Acceptance rate of draft position i since start.",
                                         labels=["model_name", "position"])
        for position, rate in enumerate(stats.get("spec_per_position_acceptance", [])):
            per_position.add_metric([self._model, str(position)], float(rate))
        yield per_position



def _kv_tier_metrics(stats: dict, model: str) -> Iterator[Metric]:
    """The host / disk KV tiers (kv_tiers/): present only when the engine runs them."""
    if "kv_tier_loads" not in stats:
        return
    families = (
        (CounterMetricFamily, "tokenmill_kv_tier_hit_blocks", "Blocks loaded back from a KV tier.", "tier",
         {t: f"kv_tier_{t}_hit_blocks" for t in ("host", "disk")}),
        (CounterMetricFamily, "tokenmill_kv_tier_hit_tokens", "Prompt tokens loaded back from a KV tier.", "tier",
         {t: f"kv_tier_{t}_hit_tokens" for t in ("host", "disk")}),
        (CounterMetricFamily, "tokenmill_kv_tier_bytes_moved", "KV bytes copied between tiers.", "direction",
         {d: f"kv_tier_bytes_{d}" for d in ("device_to_host", "host_to_device", "host_to_disk", "disk_to_host")}),
        (GaugeMetricFamily, "tokenmill_kv_tier_occupancy_bytes", "Bytes held by a KV tier.", "tier",
         {t: f"kv_tier_{t}_bytes" for t in ("host", "disk")}),
        (GaugeMetricFamily, "tokenmill_kv_tier_occupancy_blocks", "Blocks held by a KV tier.", "tier",
         {t: f"kv_tier_{t}_blocks" for t in ("host", "disk")}),
        (GaugeMetricFamily, "tokenmill_kv_tier_capacity_bytes", "Byte bound of a KV tier.", "tier",
         {t: f"kv_tier_{t}_capacity_bytes" for t in ("host", "disk")}),
    )
    for kind, name, doc, label, keys in families:
        family = kind(name, doc, labels=["model_name", label])
        for value, key in keys.items():
            family.add_metric([model, value], float(stats.get(key, 0)))
        yield family
    for name, doc, key in (
        ("tokenmill_kv_tier_loads", "Prefix loads from the KV tiers completed.", "kv_tier_loads"),
        ("tokenmill_kv_tier_load_seconds_total", "Seconds from load start to blocks in the pool, summed.",
         "kv_tier_load_seconds_total"),
        ("tokenmill_kv_tier_stores_dropped", "Evicted blocks not stored because a tier queue was full.",
         "kv_tier_stores_dropped"),
        ("tokenmill_kv_tier_disk_files_rejected", "Disk-tier files ignored (corrupt, truncated, foreign).",
         "kv_tier_disk_files_rejected"),
        ("tokenmill_kv_tier_disk_store_errors", "Disk-tier writes that failed (a full disk stops stores).",
         "kv_tier_disk_store_errors"),
    ):
        family = CounterMetricFamily(name, doc, labels=["model_name"])
        family.add_metric([model], float(stats.get(key, 0)))
        yield family
    maximum = GaugeMetricFamily("tokenmill_kv_tier_load_seconds_max", "Slowest prefix load so far.",
                                labels=["model_name"])
    maximum.add_metric([model], float(stats.get("kv_tier_load_seconds_max", 0)))
    yield maximum


class ServerMetrics:
    def __init__(self, stats: Callable[[], dict[str, int]], model: str) -> None:
        self.registry = CollectorRegistry()
        self.model = model
        self.registry.register(_EngineCollector(stats, model))
        labels = ["model_name"]
        self.prompt_tokens = Counter("tokenmill_prompt_tokens", "Prompt tokens processed.", labels,
                                     registry=self.registry).labels(model)
        self.generation_tokens = Counter("tokenmill_generation_tokens", "Tokens generated.", labels,
                                         registry=self.registry).labels(model)
        self.requests = Counter("tokenmill_request_success", "Finished requests by finish reason.",
                                ["model_name", "finish_reason"], registry=self.registry)
        self.ttft = Histogram("tokenmill_time_to_first_token_seconds", "Time to the first generated token.",
                              labels, buckets=_LATENCY_BUCKETS, registry=self.registry).labels(model)
        self.itl = Histogram("tokenmill_inter_token_latency_seconds", "Time between outputs of a request.",
                             labels, buckets=_LATENCY_BUCKETS, registry=self.registry).labels(model)
        self.e2e = Histogram("tokenmill_e2e_request_latency_seconds", "Arrival to last token.",
                             labels, buckets=_LATENCY_BUCKETS, registry=self.registry).labels(model)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def tracker(self) -> "RequestTracker":
        return RequestTracker(self)


class RequestTracker:
    """Latency and token accounting for one engine request, fed its delta (or single final_only) outputs."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.arrival = time.perf_counter()
        self.last: float | None = None
        self.num_tokens = 0
        self.done = False

    def observe(self, output: RequestOutput) -> None:
        if self.done:
            return
        now = time.perf_counter()
        new = sum(len(c.token_ids) for c in output.outputs)
        if new:
            if self.last is None:
                self.metrics.ttft.observe(self._time_to_first_token(output, now))
                self.metrics.prompt_tokens.inc(len(output.prompt_token_ids))
            else:
                self.metrics.itl.observe(now - self.last)
            self.metrics.generation_tokens.inc(new)
            self.num_tokens, self.last = self.num_tokens + new, now
        # Each sample's finish comes in exactly one output (deltas list only the samples that changed).
        for completion in output.outputs:
            if completion.finish_reason is not None:
                self.metrics.requests.labels(self.metrics.model, completion.finish_reason).inc()
        if output.finished:
            self.done = True
            self.metrics.e2e.observe(now - self.arrival)

    def _time_to_first_token(self, output: RequestOutput, now: float) -> float:
        engine_times = output.metrics
        if output.finished and "first_token_time" in engine_times:
            # The first output is the final one (final_only): the engine stamped when the first token came.
            return engine_times["first_token_time"] - engine_times["arrival_time"]
        return now - self.arrival

    def abandon(self) -> None:
        """The client left (or the server stopped) before the request finished: count it as aborted."""
        if not self.done:
            self.done = True
            self.metrics.requests.labels(self.metrics.model, "abort").inc()
