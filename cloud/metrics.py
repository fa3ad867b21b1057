"""Prometheus metrics of a tier: requests, rows, batches, step times, queue depth, KV memory.

One registry per server (tests run several in one process). The front end counts requests by
method and status code and their latency; whoever steps the engine (the engine thread, or a
worker through its heartbeats) reports each step's rows and duration; the engine's own counters
(sessions, free slots, queued work, KV bytes, evictions, expiries, seconds per step stage) are
read from its latest `stats()` snapshot at scrape time.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# Engine `stats()` key -> (metric name, help). Names follow Prometheus' conventions (what
# `promtool check metrics` asks): the unit as a suffix, `_total` only on counters (the client
# library adds it).
_GAUGES = {"sessions": ("flow_engine_sessions", "open continuation sessions"),
           "generations": ("flow_engine_generations", "whole-model generations running"),
           "free_slots": ("flow_engine_free_slots", "free KV cache slots"),
           "queued_work": ("flow_engine_queued_requests", "requests waiting for an engine step"),
           "kv_bytes_in_use": ("flow_engine_kv_cache_in_use_bytes", "KV cache bytes held by sessions"),
           "kv_bytes_total": ("flow_engine_kv_cache_allocated_bytes", "KV cache bytes allocated"),
           "workers": ("flow_engine_workers", "engine workers alive")}
_COUNTERS = {"evictions": ("flow_engine_evictions", "idle sessions evicted for room"),
             "expired": ("flow_engine_expirations", "idle sessions expired"),
             "steps": ("flow_engine_steps", "engine steps"),
             "rows": ("flow_engine_rows", "rows run through the blocks"),
             "forwards": ("flow_engine_forwards", "batched forwards through the blocks (a step "
                          "runs one per kind and length class of its work)"),
             "padding_rows": ("flow_engine_padding_rows",
                              "positions computed only to pad a forward's chunks to its longest"),
             "dropped_frames": ("flow_engine_dropped_frames",
                                "malformed worker-channel messages dropped")}


class _EngineCollector:
    """Exposes the newest engine `stats()` snapshot."""

    def __init__(self):
        self.snapshot: dict = {}

    def collect(self):
        for key, (name, help_text) in _GAUGES.items():
            if key in self.snapshot:
                yield GaugeMetricFamily(name, help_text, value=self.snapshot[key])
        for key, (name, help_text) in _COUNTERS.items():
            if key in self.snapshot:
                yield CounterMetricFamily(name, help_text, value=self.snapshot[key])
        if "stage_seconds" in self.snapshot:
            stages = CounterMetricFamily("flow_engine_stage_seconds",
                                         "seconds of engine steps, by stage", labels=["stage"])
            for stage, seconds in self.snapshot["stage_seconds"].items():
                stages.add_metric([stage], seconds)
            yield stages


class TierMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        # a ContinueStream's messages count as Continue calls: one request, one answer each
        self.requests = Counter("flow_requests", "RPCs answered, by method and status code "
                                "(each ContinueStream message as a Continue)",
                                ["method", "code"], registry=self.registry)
        self.latency = Histogram("flow_request_duration_seconds", "RPC latency", ["method"],
                                 registry=self.registry,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 10))
        self.rows_received = Counter("flow_rows_received", "hand-off rows received",
                                     registry=self.registry)
        self.batch_rows = Histogram("flow_engine_step_rows", "rows per engine step",
                                    registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048))
        self.step_seconds = Histogram("flow_engine_step_duration_seconds", "duration of an engine step",
                                      registry=self.registry,
                                      buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1))
        self._children: dict[tuple, object] = {}  # (metric, labels) -> its labelled child
        self.engine = _EngineCollector()
        self.registry.register(self.engine)

    def count_request(self, method: str, code: str) -> None:
        """One RPC answered with status `code` (a name of `grpc.StatusCode`)."""
        self._child(self.requests, method, code).inc()

    def observe_request(self, method: str, code: str, seconds: float) -> None:
        """One RPC answered with `code` after `seconds` (to its last message, for a stream)."""
        self.count_request(method, code)
        self._child(self.latency, method).observe(seconds)

    def _child(self, metric, *labels: str):
        """`metric.labels(*labels)`, kept: labels() takes a lock and builds a key, once per label
        set rather than once per call."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe_step(self, rows: int, seconds: float) -> None:
        self.batch_rows.observe(rows)
        self.step_seconds.observe(seconds)

    def serve_http(self, port: int, host: str = "127.0.0.1"):
        """Expose /metrics on `port`; returns the HTTP server (`ConfigError` if it cannot listen)."""
        from flow.errors import ConfigError

        try:
            server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as err:
            raise ConfigError(f"cannot serve metrics on {host}:{port} ({err.strerror or err}); "
                              f"choose another --metrics-port") from None
        return server
